"""The PPO-Lagrangian math of train_ppo_lag.py against values computed by hand (REFERENCE section 3).

Per-action tensors are (B, T), column t = action token t + 1; `mask` marks the real response tokens (EOS included,
never padding, contiguous per row). Expected numbers are written out on concrete inputs, and GAE is compared with a
plain per-sequence python loop, so a wrong sign, a wrong mean or an off-by-one shows up as a mismatch.
"""

import math
import random

import pytest
import torch

from train_ppo_lag import (actor_loss, combined_advantage, critic_loss, gae_advantages, masked_mean, pid_lambda,
                           shape_rewards, slice_batch, update_lambda)

PAD = 1e6  # an extreme value put into every padded position: it must never reach a result


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(got: torch.Tensor, expected, tol=1e-12):
    expected = expected if isinstance(expected, torch.Tensor) else t64(expected)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected.to(got.dtype), atol=tol, rtol=0), (got, expected)


# ---- shaping (step 3) --------------------------------------------------------------------------------------------

# Four rollouts, T = 6 action columns, P = padding:
#   row 0: left prompt padding, a 3-token response (cols 2..4, EOS at col 4), right padding after EOS (col 5)
#   row 1: a 1-token response (only the EOS, col 3)
#   row 2: no EOS: the response runs to the last column (cols 3..5)
#   row 3: end scores beyond clip_range_score (cols 1..4)
SHAPE_MASK = [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 0]]
P = PAD
SHAPE_LOGP = [[P, P, -1.0, -2.0, -0.5, P], [P, P, P, -0.2, P, P], [P, P, P, -1.0, -1.0, -3.0],
              [P, -1.0, -1.0, -1.0, -1.0, P]]
SHAPE_REF = [[-P, -P, -1.5, -1.0, -0.5, -P], [-P, -P, -P, -0.7, -P, -P], [-P, -P, -P, -2.0, -1.0, -1.0],
             [-P, -1.0, -1.0, -1.0, -1.0, -P]]
# kl_t = logpi - logpi_ref on the real tokens:
#   row 0: 0.5, -1.0, 0.0      row 1: 0.5      row 2: 1.0, 0.0, -2.0      row 3: 0, 0, 0, 0


def test_shape_rewards_by_hand():
    beta, clip = 0.1, 50.0
    mask = torch.tensor(SHAPE_MASK, dtype=torch.bool)
    logp, ref = t64(SHAPE_LOGP), t64(SHAPE_REF)
    r_end, c_end = t64([2.0, 1.0, -1.5, 100.0]), t64([-3.0, 0.5, 2.5, -75.0])

    rewards = shape_rewards(r_end, logp, ref, mask, beta, clip, kl_sign=-1.0)
    close(rewards, [
        [0, 0, -0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0, 0],  # end score on the EOS (col 4), not on the pad (col 5)
        [0, 0, 0, -0.1 * 0.5 + 1.0, 0, 0],  # 1-token response: KL and end score on the same token
        [0, 0, 0, -0.1 * 1.0, 0.0, -0.1 * -2.0 - 1.5],  # no EOS: the end score on the last column
        [0, 0, 0, 0, 50.0, 0],  # 100 clipped to +50
    ])
    costs = shape_rewards(c_end, logp, ref, mask, beta, clip, kl_sign=+1.0)
    close(costs, [
        [0, 0, 0.1 * 0.5, 0.1 * -1.0, 0.1 * 0.0 - 3.0, 0],
        [0, 0, 0, 0.1 * 0.5 + 0.5, 0, 0],
        [0, 0, 0, 0.1 * 1.0, 0.0, 0.1 * -2.0 + 2.5],
        [0, 0, 0, 0, -50.0, 0],  # -75 clipped to -50
    ])
    # zero outside the mask whatever the padding holds
    assert (rewards[~mask] == 0).all() and (costs[~mask] == 0).all()
    # the float mask gives the same result as the bool mask
    close(shape_rewards(r_end, logp, ref, mask.double(), beta, clip, kl_sign=-1.0), rewards)


def test_shape_rewards_clip_the_per_token_total():
    """clip(-beta kl_t + [t = T] r_end) per token, not clip(r_end) plus an unclipped KL term."""
    mask = torch.ones(1, 2, dtype=torch.bool)
    logp, ref = t64([[1.0, 1.0]]), t64([[0.0, 0.0]])  # kl = [1, 1]
    close(shape_rewards(t64([60.0]), logp, ref, mask, 1.0, 50.0, kl_sign=-1.0), [[-1.0, 50.0]])  # not [-1, 49]
    close(shape_rewards(t64([-60.0]), logp, ref, mask, 1.0, 50.0, kl_sign=+1.0), [[1.0, -50.0]])  # the cost: +kl
    one = torch.ones(1, 1, dtype=torch.bool)
    close(shape_rewards(t64([0.0]), t64([[1.0]]), t64([[0.0]]), one, 2.0, 0.5, kl_sign=-1.0), [[-0.5]])  # not -2
    close(shape_rewards(t64([0.0]), t64([[1.0]]), t64([[0.0]]), one, 2.0, 0.5, kl_sign=+1.0), [[0.5]])


def test_shape_rewards_end_score_on_last_real_token_random():
    """Random variable-length masks: the only non-KL mass sits on each row's last real column."""
    g = torch.Generator().manual_seed(0)
    mask = random_mask(8, 10, random.Random(1))
    logp = torch.randn(8, 10, generator=g, dtype=torch.float64)
    end = torch.randn(8, generator=g, dtype=torch.float64)
    shaped = shape_rewards(end, logp, logp, mask, 0.3, 50.0, kl_sign=-1.0)  # kl = 0: only the end scores
    for i in range(8):
        last = mask[i].nonzero().max().item()
        expected = torch.zeros(10, dtype=torch.float64)
        expected[last] = end[i]
        close(shaped[i], expected)


# ---- GAE (step 4) ------------------------------------------------------------------------------------------------


def random_mask(batch: int, width: int, rng: random.Random) -> torch.Tensor:
    """Contiguous response masks: left prompt part, 1..rest real tokens, right padding; always one 1-token row and
    one row running to the last column (no EOS)."""
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for i in range(batch):
        start = rng.randrange(0, width)
        length = rng.randint(1, width - start)
        if i == 0:
            length = 1
        if i == 1:
            length = width - start
        mask[i, start:start + length] = True
    return mask


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion on each sequence's real tokens alone, V(T+1) = 0."""
    adv = torch.zeros_like(values)
    ret = torch.zeros_like(values)
    for i in range(values.shape[0]):
        idx = mask[i].nonzero().flatten().tolist()
        r = [rewards[i, j].item() for j in idx]
        v = [values[i, j].item() for j in idx]
        running, next_v = 0.0, 0.0
        out = [0.0] * len(idx)
        for k in reversed(range(len(idx))):
            delta = r[k] + gamma * next_v - v[k]
            running = delta + gamma * lam * running
            out[k] = running
            next_v = v[k]
        for k, j in enumerate(idx):
            adv[i, j] = out[k]
            ret[i, j] = out[k] + v[k]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 0.0), (1.0, 1.0), (0.9, 0.95), (0.99, 0.5)])
def test_gae_matches_per_sequence_loop(gamma, lam):
    rng = random.Random(int(gamma * 100 + lam * 10))
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    mask = random_mask(7, 9, rng)
    rewards = torch.randn(7, 9, generator=g, dtype=torch.float64) * mask
    values = torch.randn(7, 9, generator=g, dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = gae_loop(rewards, values, mask, gamma, lam)
    close(adv, exp_adv, 1e-10)
    close(ret, exp_ret, 1e-10)
    close(ret, (adv + values) * mask, 1e-10)  # returns = A + V on the mask, 0 outside
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    # huge numbers in every padded position (rewards and values) change nothing
    noisy_r = torch.where(mask, rewards, torch.full_like(rewards, 1e9))
    noisy_v = torch.where(mask, values, torch.full_like(values, -1e9))
    adv2, ret2 = gae_advantages(noisy_r, noisy_v, mask, gamma, lam)
    close(adv2, exp_adv, 1e-10)
    close(ret2, exp_ret, 1e-10)
    if lam == 0.0:  # A_t = delta_t = r_t + gamma V(t+1) - V(t), V(T+1) = 0
        next_v = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(7, 1, dtype=torch.float64)], 1)
        close(adv, (rewards + gamma * next_v - values) * mask, 1e-10)
    if lam == 1.0 and gamma == 1.0:  # Monte-Carlo: returns = reward-to-go
        to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
        close(ret, to_go * mask, 1e-10)


def test_gae_by_hand():
    P = PAD
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    rewards = t64([[P, 0.1, -0.2, 1.0], [0.5, 2.0, P, P]])
    values = t64([[P, 0.5, 0.4, 0.3], [1.0, -1.0, P, P]])
    gamma, lam = 0.9, 0.5
    # row 0 (cols 1..3):
    a3 = 1.0 + 0.9 * 0.0 - 0.3  # 0.7, V(T+1) = 0
    a2 = (-0.2 + 0.9 * 0.3 - 0.4) + 0.9 * 0.5 * a3  # -0.33 + 0.315 = -0.015
    a1 = (0.1 + 0.9 * 0.4 - 0.5) + 0.9 * 0.5 * a2  # -0.04 - 0.00675 = -0.04675
    # row 1 (cols 0..1, then padding):
    b1 = 2.0 + 0.0 - (-1.0)  # 3.0
    b0 = (0.5 + 0.9 * -1.0 - 1.0) + 0.9 * 0.5 * b1  # -1.4 + 1.35 = -0.05
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    close(adv, [[0, a1, a2, a3], [b0, b1, 0, 0]])
    close(adv, [[0, -0.04675, -0.015, 0.7], [-0.05, 3.0, 0, 0]])
    close(ret, [[0, a1 + 0.5, a2 + 0.4, a3 + 0.3], [b0 + 1.0, b1 - 1.0, 0, 0]])
    # gamma = 1, lambda = 1: the return is the plain sum of the remaining rewards
    _, ret = gae_advantages(rewards, values, mask, 1.0, 1.0)
    close(ret, [[0, 0.1 - 0.2 + 1.0, -0.2 + 1.0, 1.0], [2.5, 2.0, 0, 0]])


# ---- combined advantage (step 5) ---------------------------------------------------------------------------------


def test_combined_advantage_closed_form():
    ar, ac = t64([[1.0, -2.0, 0.5]]), t64([[0.5, 3.0, -1.0]])
    close(combined_advantage(ar, ac, 0.0), ar)
    close(combined_advantage(ar, ac, 2.0), [[(1.0 - 1.0) / 3, (-2.0 - 6.0) / 3, (0.5 + 2.0) / 3]])
    close(combined_advantage(ar, ac, 0.5), [[(1.0 - 0.25) / 1.5, (-2.0 - 1.5) / 1.5, (0.5 + 0.5) / 1.5]])


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 4.0, 20.0])
def test_kl_part_of_combined_advantage_is_independent_of_lambda(lam):
    beta = 0.05
    g = torch.Generator().manual_seed(3)
    mask = random_mask(6, 8, random.Random(3))
    logp = torch.randn(6, 8, generator=g, dtype=torch.float64)
    ref = torch.randn(6, 8, generator=g, dtype=torch.float64)
    zero_end, zero_values = torch.zeros(6, dtype=torch.float64), torch.zeros(6, 8, dtype=torch.float64)
    r = shape_rewards(zero_end, logp, ref, mask, beta, 50.0, kl_sign=-1.0)
    c = shape_rewards(zero_end, logp, ref, mask, beta, 50.0, kl_sign=+1.0)
    kl_part = -beta * (logp - ref) * mask
    # the per-token shaped signal
    close(combined_advantage(r, c, lam), kl_part)
    # through GAE with lambda_GAE = 0 and zero values: A = r per token
    ar, _ = gae_advantages(r, zero_values, mask, 1.0, 0.0)
    ac, _ = gae_advantages(c, zero_values, mask, 1.0, 0.0)
    close(combined_advantage(ar, ac, lam), kl_part)
    # and with any lambda_GAE (GAE is linear): the advantage of the -beta*kl signal alone
    ar, _ = gae_advantages(r, zero_values, mask, 1.0, 0.95)
    ac, _ = gae_advantages(c, zero_values, mask, 1.0, 0.95)
    close(combined_advantage(ar, ac, lam), gae_advantages(kl_part, zero_values, mask, 1.0, 0.95)[0])


# ---- actor loss (step 6) -----------------------------------------------------------------------------------------


def actor_case():
    """Three rows: 3 real tokens, 1 real token, 2 real tokens; padding holds extreme values."""
    eps = 0.2
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    old = t64([[-30.0, -1.0, -1.0, -1.0], [-30.0, -30.0, -2.0, 5.0], [-0.5, -0.7, 40.0, -40.0]])
    ratio = t64([[1.0, 1.5, 1.5, 0.5], [1.0, 1.0, 0.5, 1.0], [1.1, 0.9, 1.0, 1.0]])
    new = old + ratio.log()
    new[0, 0], new[1, 0], new[1, 3], new[2, 2], new[2, 3] = 60.0, -60.0, -50.0, 50.0, 80.0  # exp overflows / inf
    adv = t64([[1e9, 2.0, -1.0, -2.0], [-1e9, 7.0, 1.0, 1e9], [3.0, -1.0, 1e9, -1e9]])
    return new, old, adv, mask, eps


def test_actor_loss_by_hand():
    new, old, adv, mask, eps = actor_case()
    # row 0: rho 1.5, A +2: min(3.0, 1.2*2 = 2.4) = 2.4   (clip active, positive advantage)
    #        rho 1.5, A -1: min(-1.5, 1.2*-1 = -1.2) = -1.5 (clip inactive, negative advantage)
    #        rho 0.5, A -2: min(-1.0, 0.8*-2 = -1.6) = -1.6 (clip active, negative advantage)
    row0 = (2.4 - 1.5 - 1.6) / 3
    # row 1: rho 0.5, A +1: min(0.5, 0.8) = 0.5           (clip inactive, positive advantage)
    row1 = 0.5
    # row 2: rho 1.1, A +3: 3.3 (inside the range); rho 0.9, A -1: -0.9
    row2 = (3.3 - 0.9) / 2
    expected = -(row0 + row1 + row2) / 3  # per-sequence means, then the batch mean: a 1-token row weighs as much
    loss = actor_loss(new, old, adv, mask, eps)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    token_mean = -(2.4 - 1.5 - 1.6 + 0.5 + 3.3 - 0.9) / 6
    assert abs(loss.item() - token_mean) > 1e-3  # not the flat token mean


def test_actor_loss_gradients_vanish_where_clipped():
    new, old, adv, mask, eps = actor_case()
    new = new.clone().requires_grad_(True)
    actor_loss(new, old, adv, mask, eps).backward()
    grad = new.grad
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    # clipped tokens get no gradient; unclipped: d/dlogpi of -(rho A)/n_i/B = -rho A / n_i / B
    assert grad[0, 1].item() == 0 and grad[0, 3].item() == 0
    assert grad[0, 2].item() == pytest.approx(-(1.5 * -1.0) / 3 / 3)
    assert grad[1, 2].item() == pytest.approx(-(0.5 * 1.0) / 1 / 3)
    assert grad[2, 0].item() == pytest.approx(-(1.1 * 3.0) / 2 / 3)


def test_actor_loss_padding_does_not_matter():
    new, old, adv, mask, eps = actor_case()
    reference = actor_loss(new, old, adv, mask, eps)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        noise = torch.randn(new.shape, generator=g, dtype=torch.float64) * 1e3
        got = actor_loss(torch.where(mask, new, noise), torch.where(mask, old, -noise),
                         torch.where(mask, adv, noise * 1e6), mask, eps)
        assert got.item() == pytest.approx(reference.item(), abs=1e-12)


def test_actor_loss_with_lambda_zero_is_ppo():
    new, old, adv, mask, eps = actor_case()
    cost_adv = torch.randn(adv.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 10
    ppo = actor_loss(new, old, adv, mask, eps)
    assert actor_loss(new, old, combined_advantage(adv, cost_adv, 0.0), mask, eps).item() == ppo.item()
    assert actor_loss(new, old, combined_advantage(adv, cost_adv, 1.0), mask, eps).item() != ppo.item()


# ---- critic loss (step 7) ----------------------------------------------------------------------------------------


def test_critic_loss_by_hand():
    eps_v = 0.5
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    values = t64([[1.0, 0.2, 1e8], [-1e8, -1.0, 3e7]])
    old = t64([[0.0, 0.0, -1e8], [1e8, 0.0, 0.0]])
    returns = t64([[2.0, 1.0, 5e7], [1e9, 0.0, -1e9]])
    # row 0, col 0: V 1.0, V_old 0 -> V_clip 0.5; (1 - 2)^2 = 1, (0.5 - 2)^2 = 2.25: the clipped branch wins
    #        col 1: V 0.2 inside the range -> both (0.2 - 1)^2 = 0.64
    row0 = (2.25 + 0.64) / 2
    # row 1 (one token): V -1.0, V_old 0 -> V_clip -0.5; (-1 - 0)^2 = 1, (-0.5 - 0)^2 = 0.25: the unclipped wins
    row1 = 1.0
    expected = 0.5 * (row0 + row1) / 2  # 0.61125
    loss = critic_loss(values, old, returns, mask, eps_v)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.61125)
    # gradient: the clipped-winning token gets none; the others 0.5 * 2 (V - G) / n_i / B
    leaf = values.clone().requires_grad_(True)
    critic_loss(leaf, old, returns, mask, eps_v).backward()
    assert leaf.grad[0, 0].item() == 0
    assert leaf.grad[0, 1].item() == pytest.approx(0.5 * 2 * (0.2 - 1.0) / 2 / 2)
    assert leaf.grad[1, 1].item() == pytest.approx(0.5 * 2 * (-1.0 - 0.0) / 1 / 2)
    assert (leaf.grad[~mask] == 0).all()


# ---- lambda (step 9) ---------------------------------------------------------------------------------------------


def test_update_lambda_one_step_closed_form():
    # log: ln lambda' = ln 2 + 0.1 * 2 * (1.5 - 0.5)
    assert update_lambda(2.0, 1.5, 0.5, 0.1, 20.0, "log") == pytest.approx(math.exp(math.log(2.0) + 0.2), rel=1e-12)
    assert update_lambda(2.0, 1.5, 0.5, 0.1, 20.0) == pytest.approx(2.0 * math.exp(0.2), rel=1e-12)  # default: log
    assert update_lambda(2.0, -1.0, 0.5, 0.1, 20.0, "log") == pytest.approx(2.0 * math.exp(-0.3), rel=1e-12)
    # additive: lambda' = lambda + lr * (J_C - d)
    assert update_lambda(2.0, 1.5, 0.5, 0.1, 20.0, "additive") == pytest.approx(2.1, rel=1e-12)
    assert update_lambda(2.0, -1.0, 0.5, 0.1, 20.0, "additive") == pytest.approx(1.85, rel=1e-12)
    # J_C = d: no move
    for mode in ("log", "additive"):
        assert update_lambda(3.0, -0.5, -0.5, 0.1, 20.0, mode) == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize("mode", ["log", "additive"])
@pytest.mark.parametrize("lambda_max", [20.0, 5.0, 3.0, 1.7])
def test_update_lambda_direction_and_bounds(mode, lambda_max):
    lam = 1.0
    assert update_lambda(lam, 0.3, 0.0, 0.1, lambda_max, mode) > lam  # J_C > d: rises
    assert update_lambda(lam, -0.3, 0.0, 0.1, lambda_max, mode) < lam  # J_C < d: falls
    for _ in range(20):  # a big violation: capped, never above lambda_max (exactly, not up to rounding)
        lam = update_lambda(lam, 50.0, -0.5, 0.1, lambda_max, mode)
        assert 0 < lam <= lambda_max
    assert lam == pytest.approx(lambda_max, rel=1e-12)
    for _ in range(50):  # a big slack: additive hits 0 and stays there, log stays strictly positive
        lam = update_lambda(lam, -30.0, 0.0, 0.1, lambda_max, mode)
        assert lam <= lambda_max
        assert lam >= 0.0 if mode == "additive" else lam > 0.0
    if mode == "additive":
        assert lam == 0.0
        assert update_lambda(0.0, -1.0, 0.0, 0.1, lambda_max, mode) == 0.0


def test_update_lambda_huge_violation_does_not_overflow():
    # ln lambda + 0.1 * 20 * 1e4 = ln 20 + 2e4: exp of it overflows a float; the cap in log space comes first
    lam = update_lambda(20.0, 1e4, 0.0, 0.1, 20.0, "log")
    assert lam <= 20.0 and lam == pytest.approx(20.0, rel=1e-12)
    assert update_lambda(20.0, 1e4, 0.0, 0.1, 20.0, "additive") == 20.0


def test_update_lambda_log_needs_a_positive_lambda():
    with pytest.raises(ValueError, match="needs lambda > 0"):
        update_lambda(0.0, 1.0, 0.0, 0.1, 20.0, "log")


def test_pid_lambda_by_hand():
    kp, ki, kd, lambda_max = 1.0, 0.1, 0.5, 5.0
    # first update: no derivative; I = max(0, 10 + 0.4) = 10.4; lambda = 1*0.4 + 0.1*10.4 = 1.44
    lam, integral = pid_lambda(0.4, 10.0, None, kp, ki, kd, lambda_max)
    assert (lam, integral) == pytest.approx((1.44, 10.4))
    # e falls to -0.2: I = 10.2; lambda = -0.2 + 1.02 + 0.5*(-0.6) = 0.52 (the derivative pulls it down at once)
    lam, integral = pid_lambda(-0.2, integral, 0.4, kp, ki, kd, lambda_max)
    assert (lam, integral) == pytest.approx((0.52, 10.2))
    # a big slack: the integral stays >= 0 and lambda >= 0
    lam, integral = pid_lambda(-30.0, integral, -0.2, kp, ki, kd, lambda_max)
    assert (lam, integral) == (0.0, 0.0)
    # a big violation: capped at lambda_max
    assert pid_lambda(40.0, 0.0, 0.0, kp, ki, kd, lambda_max)[0] == lambda_max


def test_update_lambda_invalid_mode():
    with pytest.raises(ValueError):
        update_lambda(1.0, 0.0, 0.0, 0.1, 20.0, "multiplicative")


# ---- masked mean -------------------------------------------------------------------------------------------------


def test_masked_mean_ignores_padding_even_nan():
    values = torch.tensor([[1.0, 2.0, float("nan"), float("inf")], [float("nan"), -4.0, 0.0, 1e30]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert masked_mean(values, mask).item() == pytest.approx((1.0 + 2.0 - 4.0 + 0.0) / 4)
    close(masked_mean(values, mask, dim=-1), torch.tensor([1.5, -2.0]), 1e-6)
    close(masked_mean(values, mask.long(), dim=-1), torch.tensor([1.5, -2.0]), 1e-6)  # integer masks too
    # a row without any real token gives 0, not NaN
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


# ---- slicing a rollout batch into minibatches --------------------------------------------------------------------


def test_slice_batch_qwen_style_patches():
    # three images with 1x2x2, 1x2x4 and 1x4x2 patches: 4, 8 and 8 rows of pixel_values, concatenated
    grid = torch.tensor([[1, 2, 2], [1, 2, 4], [1, 4, 2]])
    owner = torch.cat([torch.full((4,), 0), torch.full((8,), 1), torch.full((8,), 2)])
    pixel_values = torch.stack([owner.float(), torch.arange(20).float()], 1)  # (20, 2): owner, patch index
    batch = {"input_ids": torch.arange(15).view(3, 5), "attention_mask": torch.ones(3, 5, dtype=torch.long),
             "mm_token_type_ids": torch.arange(15).view(3, 5) % 2, "pixel_values": pixel_values,
             "image_grid_thw": grid, "rows": ["a", "b", "c"]}
    out = slice_batch(batch, torch.tensor([2, 0]))
    assert torch.equal(out["input_ids"], batch["input_ids"][[2, 0]])
    assert torch.equal(out["mm_token_type_ids"], batch["mm_token_type_ids"][[2, 0]])
    assert torch.equal(out["image_grid_thw"], grid[[2, 0]])
    assert out["pixel_values"][:, 1].tolist() == list(range(12, 20)) + list(range(0, 4))
    assert out["rows"] == ["c", "a"]
    out = slice_batch(batch, torch.tensor([1]))
    assert out["pixel_values"][:, 1].tolist() == list(range(4, 12)) and (out["pixel_values"][:, 0] == 1).all()
    assert torch.equal(out["image_grid_thw"], grid[[1]])


def test_slice_batch_llava_style_batch_dim():
    pixel_values = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 3, 4, 4).clone()  # LLaVA: (B, C, H, W)
    batch = {"input_ids": torch.arange(12).view(3, 4), "attention_mask": torch.ones(3, 4, dtype=torch.long),
             "response_mask": torch.zeros(3, 4, dtype=torch.bool), "pixel_values": pixel_values,
             "ended": torch.tensor([True, False, True])}
    out = slice_batch(batch, torch.tensor([1, 2]))
    assert out["pixel_values"].shape == (2, 3, 4, 4)
    assert out["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert torch.equal(out["input_ids"], batch["input_ids"][[1, 2]])
    assert out["ended"].tolist() == [False, True]
    # LLaVA-NeXT: (B, patches, C, H, W) with image_sizes (B, 2)
    nxt = {"input_ids": torch.arange(6).view(2, 3), "pixel_values": torch.arange(2).float().view(2, 1, 1, 1, 1).expand(2, 5, 3, 2, 2),
           "image_sizes": torch.tensor([[28, 28], [28, 56]])}
    out = slice_batch(nxt, torch.tensor([1]))
    assert out["pixel_values"].shape == (1, 5, 3, 2, 2) and (out["pixel_values"] == 1).all()
    assert out["image_sizes"].tolist() == [[28, 56]]


# ---- the math block alone, as a notebook copies it -----------------------------------------------------------


def math_block() -> str:
    """The lines of train_ppo_lag.py from the math block's opening rule to its end marker."""
    from conftest import ROOT

    lines = (ROOT / "train_ppo_lag.py").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# The method's math")) - 1
    end = next(i for i, line in enumerate(lines) if line.startswith("# ---- end of the math block"))
    return "\n".join(lines[start:end + 1]) + "\n"


def test_the_math_block_runs_alone_on_hand_values():
    """Property 2 of the redesign: the method's math is one contiguous block (at most 200 lines) that imports
    nothing but torch (and the standard library's math); exec'd alone in an empty namespace, every function
    gives the hand-computed values."""
    import ast

    block = math_block()
    assert len(block.splitlines()) <= 200
    imported = {alias.name for node in ast.walk(ast.parse(block)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported == {"torch", "math"}
    ns = {"__name__": "notebook"}
    exec(compile(block, "math_block", "exec"), ns)
    functions = {name for name, value in ns.items() if callable(value) and getattr(value, "__module__", "") == "notebook"}
    assert functions == {"masked_mean", "shape_rewards", "gae_advantages", "combined_advantage", "whiten", "actor_loss",
                         "critic_loss", "policy_drift", "update_lambda", "pid_lambda"}
    t = torch.tensor
    mask = t([[False, True, True], [False, True, False]])
    assert ns["masked_mean"](t([[9.0, 1.0, 2.0], [9.0, 4.0, PAD]]), mask).item() == pytest.approx(7 / 3)
    # shaping: -beta * kl on every token, the end score added on the last real one, clipped at +-2
    shaped = ns["shape_rewards"](t([1.0, 5.0]), t([[0.0, 0.5, 0.2], [0.0, 0.3, PAD]]), t([[0.0, 0.0, 0.0], [0.0, 0.1, 0.0]]),
                                 mask, 0.1, 2.0, -1.0)
    assert torch.allclose(shaped, t([[0.0, -0.05, 1.0 - 0.02], [0.0, 2.0, 0.0]]))
    # GAE with gamma = 1, lambda = 0.5 on row 0: delta_2 = 1 - 2 = -1, delta_1 = 0 + 2 - 1 = 1, A_1 = 1 + 0.5 * -1
    advantages, returns = ns["gae_advantages"](t([[0.0, 0.0, 1.0]]), t([[PAD, 1.0, 2.0]]), t([[False, True, True]]),
                                               1.0, 0.5)
    assert torch.allclose(advantages, t([[0.0, 0.5, -1.0]])) and torch.allclose(returns, t([[0.0, 1.5, 1.0]]))
    assert ns["combined_advantage"](t([3.0]), t([1.0]), 2.0).item() == pytest.approx((3 - 2) / 3)
    white = ns["whiten"](t([[0.0, 1.0, 3.0]]), t([[False, True, True]]))
    assert torch.allclose(white, t([[0.0, -1.0, 1.0]]), atol=1e-4)
    # the clipped surrogate: rho = e^0.5 > 1.2 with A > 0 is clipped at 1.2; with A < 0 the unclipped rho counts
    one = t([[True]])
    assert ns["actor_loss"](t([[0.5]]), t([[0.0]]), t([[1.0]]), one, 0.2).item() == pytest.approx(-1.2)
    assert ns["actor_loss"](t([[0.5]]), t([[0.0]]), t([[-1.0]]), one, 0.2).item() == pytest.approx(math.exp(0.5))
    # value loss: V = 3 moved 2 from V_old = 1, clipped at 1 + 0.5: 0.5 * max((3 - 2)^2, (1.5 - 2)^2) = 0.5
    assert ns["critic_loss"](t([[3.0]]), t([[1.0]]), t([[2.0]]), one, 0.5).item() == pytest.approx(0.5)
    approx_kl, clip_fraction = ns["policy_drift"](t([[0.5, 0.0]]), t([[0.0, 0.0]]), t([[True, True]]), 0.2)
    assert approx_kl.item() == pytest.approx((math.exp(0.5) - 1 - 0.5) / 2) and clip_fraction.item() == 0.5
    assert ns["update_lambda"](1.0, 2.0, 1.0, 0.1, 10.0) == pytest.approx(math.exp(0.1))
    assert ns["update_lambda"](1.0, 0.0, 1.0, 0.5, 10.0, "additive") == pytest.approx(0.5)
    assert ns["pid_lambda"](0.5, 1.0, 0.0, 2.0, 0.1, 1.0, 10.0) == pytest.approx((2 * 0.5 + 0.1 * 1.5 + 0.5, 1.5))

"""The stage losses and metrics against values computed by hand (REFERENCE section 2; utils section 6).

Every expected number below is written out with math.log / math.exp on concrete inputs, never by calling the same
formula on tensors, so a wrong sign, a wrong mean or an off-by-one shift shows up as a mismatch.
"""

import math

import pytest
import torch

from modeling import token_log_probs
from score_training import cost_loss, cost_objective, pairwise_accuracy, reward_loss, reward_objective, sign_correct
from train_ppo_lag import masked_mean
from utils import sft_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def neg_log_sigmoid(x: float) -> float:
    """-log sigma(x) = log(1 + e^-x)."""
    return math.log(1.0 + math.exp(-x))


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ---- reward model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [0.0, 0.001, 0.5])
def test_reward_loss_value_by_hand(reg):
    chosen, rejected = leaf([1.0, -0.5, 2.0]), leaf([0.0, 0.5, 2.0])
    # pairwise: margins 1, -1, 0
    pairwise = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0)) + math.log(2.0)) / 3
    # regularisation: mean over pairs of (R_w^2 + R_l^2) / 2 = ((1 + 0)/2 + (0.25 + 0.25)/2 + (4 + 4)/2) / 3
    squares = (0.5 + 0.25 + 4.0) / 3
    expected = pairwise + reg * squares
    loss = reward_loss(chosen, rejected, reg)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    if reg == 0.5:  # the large coefficient makes the term clearly visible
        assert loss.item() - reward_loss(chosen, rejected, 0.0).item() == pytest.approx(0.5 * 4.75 / 3)


@pytest.mark.parametrize("reg", [0.001, 0.5])
def test_reward_loss_gradients_by_hand(reg):
    c, r = [1.0, -0.5, 2.0], [0.0, 0.5, 2.0]
    chosen, rejected = leaf(c), leaf(r)
    reward_loss(chosen, rejected, reg).backward()
    n = len(c)
    # d/dc [-log sigma(c - r)] = -(1 - sigma(c - r)); d/dc [reg * (c^2 + r^2) / 2] = reg * c; all divided by n
    for i in range(n):
        assert chosen.grad[i].item() == pytest.approx((-(1 - sigmoid(c[i] - r[i])) + reg * c[i]) / n, rel=1e-10)
        assert rejected.grad[i].item() == pytest.approx(((1 - sigmoid(c[i] - r[i])) + reg * r[i]) / n, rel=1e-10)


def test_reward_loss_pushes_chosen_up_and_rejected_down():
    chosen, rejected = leaf([1.0, -0.5, 0.3]), leaf([0.0, 0.5, 0.3])
    reward_loss(chosen, rejected, 0.001).backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # one descent step widens every margin
    with torch.no_grad():
        assert ((chosen - 0.1 * chosen.grad) - (rejected - 0.1 * rejected.grad) > chosen - rejected).all()


def test_pairwise_accuracy_strict_ties_wrong():
    first = torch.tensor([1.0, 2.0, 3.0, 0.5, -1.0])
    second = torch.tensor([0.0, 2.0, 4.0, 0.4, -1.0])
    # right, tie (wrong), wrong, right, tie (wrong) -> 2 / 5
    assert pairwise_accuracy(first, second).item() == pytest.approx(2 / 5)
    assert pairwise_accuracy(torch.zeros(3), torch.zeros(3)).item() == 0.0
    # the per-pair metric used in the training loop agrees
    _, _, metrics_fn = reward_objective(0.001)
    assert metrics_fn(first, second, {})["accuracy"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


# ---- cost model ------------------------------------------------------------------------------------------------


def cost_loss_by_hand(h, s, sh, ss, reg):
    n = len(h)
    pairwise = sum(neg_log_sigmoid(h[i] - s[i]) for i in range(n)) / n
    sign_h = sum(neg_log_sigmoid(sh[i] * h[i]) for i in range(n)) / n
    sign_s = sum(neg_log_sigmoid(ss[i] * s[i]) for i in range(n)) / n
    squares = sum((h[i] ** 2 + s[i] ** 2) / 2 for i in range(n)) / n  # = mean of C^2 over all 2n responses
    return pairwise + sign_h + sign_s + reg * squares


@pytest.mark.parametrize("signs", ["graded", "binary"])
@pytest.mark.parametrize("reg", [0.001, 0.5])
def test_cost_loss_value_by_hand(signs, reg):
    h, s = [1.5, -0.5, 0.2], [-1.0, 0.5, 0.0]
    sh, ss = ([3.0, 1.0, 2.0], [-2.0, 0.0, -3.0]) if signs == "graded" else ([1.0, 1.0, 1.0], [-1.0, -1.0, -1.0])
    loss = cost_loss(leaf(h), leaf(s), torch.tensor(sh, dtype=torch.float64),
                     torch.tensor(ss, dtype=torch.float64), reg)
    assert loss.item() == pytest.approx(cost_loss_by_hand(h, s, sh, ss, reg), rel=1e-12)


def test_cost_loss_concrete_numbers():
    """One pair, s_h = 3, s_s = -2, C(y_h) = 1, C(y_s) = -1, reg = 0.5, all spelled out."""
    loss = cost_loss(leaf([1.0]), leaf([-1.0]), torch.tensor([3.0]), torch.tensor([-2.0]), 0.5)
    expected = math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-3.0)) + math.log(1 + math.exp(-2.0)) + 0.5 * 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("reg", [0.001, 0.5])
def test_cost_loss_gradients_by_hand(reg):
    h, s = [1.5, -0.5, 0.2], [-1.0, 0.5, 0.0]
    sh, ss = [3.0, 1.0, 2.0], [-2.0, 0.0, -3.0]
    higher, safer = leaf(h), leaf(s)
    cost_loss(higher, safer, torch.tensor(sh, dtype=torch.float64), torch.tensor(ss, dtype=torch.float64),
              reg).backward()
    n = len(h)
    for i in range(n):
        # d/dC [-log sigma(k C)] = -k (1 - sigma(k C))
        dh = -(1 - sigmoid(h[i] - s[i])) - sh[i] * (1 - sigmoid(sh[i] * h[i])) + reg * h[i]
        ds = (1 - sigmoid(h[i] - s[i])) - ss[i] * (1 - sigmoid(ss[i] * s[i])) + reg * s[i]
        assert higher.grad[i].item() == pytest.approx(dh / n, rel=1e-10)
        assert safer.grad[i].item() == pytest.approx(ds / n, rel=1e-10)


def _sign_term_grads(h, s, sh, ss):
    """Gradients of the sign term alone: cost_loss minus reward_loss (same pairwise and regularisation terms)."""
    higher, safer = leaf(h), leaf(s)
    sh_t, ss_t = torch.tensor(sh, dtype=torch.float64), torch.tensor(ss, dtype=torch.float64)
    sign_term = cost_loss(higher, safer, sh_t, ss_t, 0.3) - reward_loss(higher, safer, 0.3)
    return torch.autograd.grad(sign_term, (higher, safer))


def test_cost_sign_term_direction_and_zero_sign():
    # y_h harmful (s > 0) in every pair; y_s safe (s < 0), then a refusal rated 0 (s = 0), then safe again
    h, s = [0.5, -0.2, 1.0], [0.3, 0.4, -0.7]
    sh, ss = [3.0, 1.0, 2.0], [-2.0, 0.0, -1.0]
    grad_h, grad_s = _sign_term_grads(h, s, sh, ss)
    assert (grad_h < 0).all()  # descent pushes an unsafe response's cost up
    assert grad_s[0] > 0 and grad_s[2] > 0  # ... and a safe one's down
    assert grad_s[1].item() == 0.0  # s = 0: exactly no gradient from the sign term
    # the sign term's value for s = 0 is the constant log 2 / n, which moves nothing
    higher, safer = leaf(h), leaf(s)
    value = (cost_loss(higher, safer, torch.tensor(sh), torch.tensor(ss), 0.0)
             - reward_loss(higher, safer, 0.0)).item()
    expected = (neg_log_sigmoid(1.5) + neg_log_sigmoid(-0.2) + neg_log_sigmoid(2.0)
                + neg_log_sigmoid(-0.6) + math.log(2.0) + neg_log_sigmoid(0.7)) / 3
    assert value == pytest.approx(expected, rel=1e-12)
    # full loss: the gradient on the s = 0 response is exactly the pairwise + regularisation gradient
    higher, safer = leaf(h), leaf(s)
    reg = 0.5
    cost_loss(higher, safer, torch.tensor(sh, dtype=torch.float64), torch.tensor(ss, dtype=torch.float64),
              reg).backward()
    assert safer.grad[1].item() == pytest.approx(((1 - sigmoid(-0.2 - 0.4)) + reg * 0.4) / 3, rel=1e-12)


def test_cost_graded_sign_pushes_harder_than_binary():
    grad_graded, _ = _sign_term_grads([0.0], [0.0], [3.0], [-1.0])
    grad_binary, _ = _sign_term_grads([0.0], [0.0], [1.0], [-1.0])
    assert grad_graded.item() == pytest.approx(-3 * 0.5) and grad_binary.item() == pytest.approx(-0.5)


def test_sign_correct_by_hand_zero_cost_wrong():
    costs = torch.tensor([0.5, -0.5, 0.0, 0.0, 2.0, -1.0])
    is_safe = torch.tensor([False, True, False, True, True, False])
    # unsafe & C>0 right, safe & C<0 right, C == 0 wrong either way, safe & C>0 wrong, unsafe & C<0 wrong
    assert sign_correct(costs, is_safe).tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_cost_metrics_per_pair():
    _, _, metrics_fn = cost_objective("rate", 0.001)
    higher = torch.tensor([1.0, 0.0, -1.0])
    safer = torch.tensor([-1.0, 0.0, 2.0])
    batch = {"first_is_safe": torch.tensor([False, False, True]), "second_is_safe": torch.tensor([True, True, True])}
    m = metrics_fn(higher, safer, batch)
    assert m["accuracy"].tolist() == [1.0, 0.0, 0.0]  # strict: the tie is wrong
    # pair 0: both signs right; pair 1: C = 0 twice -> 0; pair 2: -1 safe right, 2 safe wrong -> 0.5
    assert m["sign_accuracy"].tolist() == [1.0, 0.0, 0.5]


# ---- utils: SFT cross-entropy, masked mean, log-probs ----------------------------------------------------------


LOGITS = [  # (batch 2, length 4, vocab 3)
    [[0.1, 0.2, 0.3], [2.0, 0.0, -1.0], [0.5, 1.5, -0.5], [9.0, -9.0, 0.0]],
    [[1.0, -1.0, 0.0], [0.0, 3.0, 1.0], [-2.0, 0.0, 2.0], [4.0, 4.0, -4.0]],
]


def log_softmax_by_hand(row, index):
    return row[index] - math.log(sum(math.exp(x) for x in row))


def test_sft_loss_by_hand_shifted_and_masked():
    logits = torch.tensor(LOGITS)
    # row 0: prompt at 0-1, response tokens 2 and 0 at positions 2, 3; row 1: one response token (1) at position 3
    labels = torch.tensor([[-100, -100, 2, 0], [-100, -100, -100, 1]])
    # the label at position t is predicted by the logits at t - 1; the mean is over all 3 response tokens
    expected = -(log_softmax_by_hand(LOGITS[0][1], 2) + log_softmax_by_hand(LOGITS[0][2], 0)
                 + log_softmax_by_hand(LOGITS[1][2], 1)) / 3
    assert sft_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # an unshifted reading (logits at t for the label at t) would give something else
    unshifted = -(log_softmax_by_hand(LOGITS[0][2], 2) + log_softmax_by_hand(LOGITS[0][3], 0)
                  + log_softmax_by_hand(LOGITS[1][3], 1)) / 3
    assert abs(expected - unshifted) > 0.5
    # the prompt positions carry no loss: changing their logits and the labels' first column changes nothing
    changed = logits.clone()
    changed[:, 0] = 100.0
    changed[:, 3] = -50.0  # the last position predicts nothing
    assert sft_loss(changed, labels).item() == pytest.approx(expected, rel=1e-6)


def test_sft_loss_gradient_only_on_predicting_positions():
    logits = torch.tensor(LOGITS, requires_grad=True)
    labels = torch.tensor([[-100, -100, 2, 0], [-100, -100, -100, 1]])
    sft_loss(logits, labels).backward()
    nonzero = (logits.grad.abs().sum(-1) > 0).tolist()
    assert nonzero == [[False, True, True, False], [False, False, True, False]]


def test_masked_mean_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, 1e6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert masked_mean(values, mask, dim=-1).tolist() == pytest.approx([(1 + 2 + 3) / 3, (4 + 5) / 2])
    assert masked_mean(values, mask.bool(), dim=-1).tolist() == pytest.approx([2.0, 4.5])
    # a fully padded row gives 0, not a division by zero
    assert masked_mean(values, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]]), dim=-1).tolist() == [0.0, 4.0]
    # gradients reach only the real positions
    v = values.clone().requires_grad_(True)
    masked_mean(v, mask).backward()
    assert torch.allclose(v.grad, torch.tensor([[0.2, 0.2, 0.2, 0.0], [0.2, 0.2, 0.0, 0.0]]))


def test_token_log_probs_by_hand():
    """log pi(token_t) from the logits at position t-1 (T = 1, nothing suppressed)."""
    logits = torch.tensor(LOGITS)
    ids = torch.tensor([[0, 1, 2, 0], [2, 2, 0, 1]])
    out = token_log_probs(logits[:, :-1], ids[:, 1:], chunk_size=2)
    assert out.shape == (2, 3)
    expected = [[log_softmax_by_hand(LOGITS[b][t - 1], int(ids[b, t])) for t in range(1, 4)] for b in range(2)]
    assert torch.allclose(out, torch.tensor(expected), rtol=1e-6, atol=0)
    # consistent with the SFT loss on fully labelled rows
    assert (-out.mean()).item() == pytest.approx(sft_loss(logits, ids).item(), rel=1e-6)

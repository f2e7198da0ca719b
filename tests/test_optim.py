"""infra.optim.optimizer_step, the end of an accumulation in every stage: clip, one finiteness decision, step, schedule,
zero the gradients; on real parameters, with the project's own optimizer and schedule (make_optimizer)."""

import math

import pytest
import torch
import torch.nn as nn

from infra.optim import NonFiniteGuard, make_optimizer, optimizer_step

LR = 0.1
# a skipped update calls scheduler.step() without optimizer.step(), on purpose: torch warns about it
SKIPS = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")


def linear(seed: int, n: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n, 1, bias=False)


def trained(model: nn.Linear, warmup_ratio: float = 0.0, total_steps: int = 4):
    """(optimizer, scheduler) as a stage builds them: AdamW without weight decay, a linear schedule."""
    return make_optimizer(model, LR, (0.9, 0.999), 0.0, "linear", warmup_ratio, total_steps)


def backward(model: nn.Linear, x: list[float], scale: float = 1.0) -> torch.Tensor:
    """loss = scale * (w . x): its gradient is scale * x."""
    loss = scale * model(torch.tensor([x])).sum()
    loss.backward()
    return loss


def test_a_finite_loss_clips_and_steps():
    model = linear(0)
    before = model.weight.detach().clone()
    optimizer, scheduler = trained(model)
    loss = backward(model, [3.0, 4.0, 0.0])  # gradient norm 5
    guard = NonFiniteGuard(max_consecutive=3)
    norms = optimizer_step({"model": model}, {"model": (optimizer, scheduler)}, 1.0, guard, loss, step=1)
    assert list(norms) == ["model"] and float(norms["model"]) == pytest.approx(5.0)  # the norm before clipping
    # AdamW's first step moves each weight by lr * sign(its gradient) (up to eps), whatever the clipping: -0.1 for
    # the two weights with a positive gradient, nothing where the gradient is 0
    assert model.weight.detach()[0].tolist() == pytest.approx((before[0] - torch.tensor([LR, LR, 0.0])).tolist())
    assert model.weight.grad is None  # zeroed (set to None)
    assert scheduler.last_epoch == 1 and scheduler.get_last_lr()[0] == pytest.approx(LR * 3 / 4)
    assert guard.total == 0


def test_clipping_reaches_the_step():
    """Two steps on the same gradient direction: Adam's second update depends on the gradient's size relative to
    the first, so an unclipped and a clipped second step differ; with max_grad_norm 0 nothing is clipped."""
    def two_steps(max_grad_norm):
        model = linear(0)
        optimizer, scheduler = trained(model)
        guard = NonFiniteGuard(max_consecutive=3)
        norms = []
        for step, scale in ((1, 1.0), (2, 10.0)):
            loss = backward(model, [3.0, 4.0, 0.0], scale)
            norms.append(float(optimizer_step({"m": model}, {"m": (optimizer, scheduler)}, max_grad_norm, guard,
                                              loss, step)["m"]))
        return model.weight.detach().clone(), norms

    unclipped, norms = two_steps(0.0)
    assert norms == pytest.approx([5.0, 50.0])  # the norms before clipping either way
    clipped, clipped_norms = two_steps(5.0)
    assert clipped_norms == pytest.approx([5.0, 50.0])
    assert not torch.equal(unclipped, clipped)
    # clipped to norm 5, the second gradient equals the first: Adam moves by lr * 3/4 * m_hat / sqrt(v_hat) = 0.075
    first_move = torch.tensor([LR, LR, 0.0])
    expected = linear(0).weight.detach()[0] - first_move - 0.75 * first_move
    assert clipped[0].tolist() == pytest.approx(expected.tolist())


@SKIPS
def test_a_nan_loss_skips_the_step_but_schedules_and_zeroes():
    model = linear(0)
    before = model.weight.detach().clone()
    optimizer, scheduler = trained(model)
    loss = backward(model, [3.0, 4.0, 0.0]) + float("nan")  # finite gradients, NaN loss: the loss itself is checked
    guard = NonFiniteGuard(max_consecutive=3)
    norms = optimizer_step({"model": model}, {"model": (optimizer, scheduler)}, 1.0, guard, loss, step=7)
    assert float(norms["model"]) == pytest.approx(5.0)
    assert torch.equal(model.weight.detach(), before)  # not stepped
    assert not optimizer.state  # AdamW never ran: no moments
    assert model.weight.grad is None  # but zeroed: nothing leaks into the next accumulation
    assert scheduler.last_epoch == 1 and scheduler.get_last_lr()[0] == pytest.approx(LR * 3 / 4)  # still scheduled
    assert (guard.total, guard.consecutive) == (1, 1)


@SKIPS
def test_one_decision_for_several_models():
    """PPO's case: one model's NaN gradient skips the update of all of them; each has its own schedule."""
    actor, critic = linear(0), linear(1)
    before = {name: m.weight.detach().clone() for name, m in (("actor", actor), ("critic", critic))}
    optimizers = {"actor": trained(actor, warmup_ratio=0.5), "critic": trained(critic)}
    loss = backward(actor, [3.0, 4.0, 0.0]) + backward(critic, [1.0, float("nan"), 0.0])
    guard = NonFiniteGuard(max_consecutive=3)
    norms = optimizer_step({"actor": actor, "critic": critic}, optimizers, 1.0, guard, loss.detach(), step=1)
    assert list(norms) == ["actor", "critic"]
    assert float(norms["actor"]) == pytest.approx(5.0) and math.isnan(float(norms["critic"]))
    assert torch.equal(actor.weight.detach(), before["actor"]) and torch.equal(critic.weight.detach(), before["critic"])
    assert actor.weight.grad is None and critic.weight.grad is None
    assert optimizers["actor"][1].get_last_lr()[0] == pytest.approx(LR / 2)  # warmup: step 1 of 2
    assert optimizers["critic"][1].get_last_lr()[0] == pytest.approx(LR * 3 / 4)
    assert guard.total == 1
    # the next, finite update steps both
    loss = backward(actor, [3.0, 4.0, 0.0]) + backward(critic, [1.0, 1.0, 0.0])
    optimizer_step({"actor": actor, "critic": critic}, optimizers, 1.0, guard, loss.detach(), step=2)
    assert not torch.equal(actor.weight.detach(), before["actor"])
    assert not torch.equal(critic.weight.detach(), before["critic"])
    assert (guard.total, guard.consecutive) == (1, 0)


def test_total_optimizer_steps_counts_accumulated_batches_and_caps():
    from infra.optim import total_optimizer_steps

    assert total_optimizer_steps(10, 4, 3) == 6  # 2 full accumulations per epoch (the 2 left over start the next)
    assert total_optimizer_steps(3, 4, 2) == 2  # fewer batches than one accumulation: still one step per epoch
    assert total_optimizer_steps(10, 1, 3, max_steps=7) == 7

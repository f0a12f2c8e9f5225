"""δ-GClip: the clip rule against hand-computed values, and full optimizer steps by hand."""

import io
import math

import pytest
import torch

from dynamics.clipping import DeltaGClip, DeltaWarmup, clip_factor, global_grad_norm, measure_step


@pytest.mark.parametrize(
    "grad_norm, gamma, delta, factor, clip_active, delta_active",
    [
        (0.5, 1.0, 0.1, 1.0, False, False),  # γ/‖g‖ = 2: no clipping
        (2.0, 1.0, 0.1, 0.5, True, False),  # γ/‖g‖ = 0.5 above the floor
        (20.0, 1.0, 0.1, 0.1, True, True),  # γ/‖g‖ = 0.05: the floor binds
        (20.0, 1.0, 0.0, 0.05, True, False),  # GClip: no floor
        (20.0, 1.0, 1.0, 1.0, True, False),  # δ = 1 never clips, and the floor is not "active"
        (1.0, 1.0, 0.5, 1.0, False, False),  # γ/‖g‖ = 1 exactly: clipping not active
        (10.0, 1.0, 0.1, 0.1, True, False),  # γ/‖g‖ = δ exactly: the floor does not bind
    ],
)
def test_measure_step_hand_values(grad_norm, gamma, delta, factor, clip_active, delta_active):
    m = measure_step(grad_norm, lr=0.1, gamma=gamma, delta=delta, eps=0.0)
    assert m.clip_factor == pytest.approx(factor, rel=1e-12)
    assert m.effective_lr == pytest.approx(0.1 * factor, rel=1e-12)
    assert m.clip_active is clip_active
    assert m.delta_active is delta_active


def test_clip_factor_uses_eps():
    assert clip_factor(0.0, gamma=1e-9, delta=0.0) == pytest.approx(1e-9 / 1e-8)


def test_clip_factor_nonfinite_norm_gives_floor():
    assert clip_factor(math.inf, 1.0, 0.3) == 0.3
    assert clip_factor(math.nan, 1.0, 0.3) == 0.3


def test_global_norm_spans_groups_and_skips_missing_grads():
    a, b, c = torch.zeros(3, requires_grad=True), torch.zeros(2, 2, requires_grad=True), torch.zeros(4, requires_grad=True)
    a.grad = torch.tensor([1.0, 2.0, 2.0])
    b.grad = torch.tensor([[4.0, 0.0], [0.0, 0.0]])
    assert global_grad_norm([a, b, c]).item() == pytest.approx(math.sqrt(1 + 4 + 4 + 16))


@pytest.mark.parametrize("gamma", [0.0, -1.0, math.nan])
def test_invalid_gamma_names_value(gamma):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=r"gamma=.*\(0\.0, inf\]"):
        DeltaGClip(opt, gamma=gamma, delta=0.1)


@pytest.mark.parametrize("delta", [-0.1, 1.5, math.nan])
def test_invalid_delta_names_range(delta):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match=r"delta=.*\[0\.0, 1\.0\]"):
        DeltaGClip(opt, gamma=1.0, delta=delta)


def test_invalid_lr_names_value():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    with pytest.raises(ValueError, match="lr=0.0"):
        DeltaGClip(opt, gamma=1.0, delta=0.1)


def _param(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_sgd_momentum_step_matches_hand_computation():
    """Two steps of δ-GClip on SGD(momentum=0.9, weight_decay=0.01), computed by hand."""
    x = _param([1.0, -2.0])
    opt = DeltaGClip(torch.optim.SGD([x], lr=0.5, momentum=0.9, weight_decay=0.01), gamma=1.0, delta=0.2)
    expected = torch.tensor([1.0, -2.0], dtype=torch.float64)
    buffer = torch.zeros(2, dtype=torch.float64)
    for grad in ([3.0, 4.0], [0.3, 0.4]):  # ‖g‖ = 5 then 0.5
        g = torch.tensor(grad, dtype=torch.float64)
        x.grad = g.clone()
        m = opt.measure()
        c = min(1.0, max(0.2, 1.0 / (g.norm().item() + 1e-8)))
        assert m.clip_factor == pytest.approx(c)
        d = g + 0.01 * expected  # weight decay is added by SGD, after the norm
        buffer = d if not buffer.any() else 0.9 * buffer + d
        expected = expected - 0.5 * c * buffer
        opt.step()
        torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-12)
    assert opt.param_groups[0]["lr"] == 0.5  # the multiplier is undone after the step


def test_adam_step_matches_hand_computation():
    """Two steps of δ-GClip on Adam: the learning-rate multiplier scales Adam's update."""
    x = _param([0.5, 1.5, -1.0])
    beta1, beta2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    opt = DeltaGClip(torch.optim.Adam([x], lr=lr, betas=(beta1, beta2), eps=eps), gamma=0.1, delta=0.3)
    expected = x.detach().clone()
    m1 = torch.zeros(3, dtype=torch.float64)
    m2 = torch.zeros(3, dtype=torch.float64)
    for t, grad in enumerate(([2.0, -1.0, 2.0], [0.01, 0.02, -0.02]), start=1):
        g = torch.tensor(grad, dtype=torch.float64)
        x.grad = g.clone()
        c = min(1.0, max(0.3, 0.1 / (g.norm().item() + 1e-8)))
        m1 = beta1 * m1 + (1 - beta1) * g
        m2 = beta2 * m2 + (1 - beta2) * g * g
        update = (m1 / (1 - beta1**t)) / ((m2 / (1 - beta2**t)).sqrt() + eps)
        expected = expected - lr * c * update
        opt.step()
        torch.testing.assert_close(x.detach(), expected, rtol=1e-10, atol=1e-12)
    assert opt.last.delta_active is False  # second step: 0.1/0.03 > 1, no clipping
    assert opt.last.clip_factor == 1.0


def test_measure_then_step_uses_one_measurement():
    x = _param([3.0, 4.0])
    opt = DeltaGClip(torch.optim.SGD([x], lr=1.0), gamma=1.0, delta=0.0)
    x.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    measured = opt.measure()
    opt.step()
    assert opt.last is measured
    torch.testing.assert_close(x.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64) * (1 - 0.2), rtol=0, atol=1e-7)


def test_scheduler_attached_to_wrapper_sets_eta():
    x = _param([1.0])
    opt = DeltaGClip(torch.optim.SGD([x], lr=0.1), gamma=1.0, delta=0.5)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
    x.grad = torch.tensor([10.0], dtype=torch.float64)
    assert opt.measure().lr == pytest.approx(0.1)
    opt.step()
    scheduler.step()
    x.grad = torch.tensor([10.0], dtype=torch.float64)
    m = opt.measure()
    assert m.lr == pytest.approx(0.01)
    assert m.effective_lr == pytest.approx(0.01 * 0.5)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = torch.randn(8, 4)

    def make(module):
        return DeltaGClip(torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9), gamma=0.05, delta=0.3)

    def train_step(module, opt):
        opt.zero_grad()
        module(data).square().mean().backward()
        opt.step()

    opt = make(model)
    for _ in range(3):
        train_step(model, opt)
    clone = torch.nn.Linear(4, 2)
    clone.load_state_dict(model.state_dict())
    clone_opt = make(clone)
    # Through bytes, as a checkpoint would go: a direct load would share the
    # momentum tensors between both optimizers (torch.optim's load keeps them).
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone_opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert clone_opt.steps == 3
    assert clone_opt.last == opt.last
    for _ in range(2):
        train_step(model, opt)
        train_step(clone, clone_opt)
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_warmup_stops_clipping_after_its_epochs():
    x = _param([1.0])
    opt = DeltaGClip(torch.optim.SGD([x], lr=0.1), gamma=1.0, delta=0.2)
    warmup = DeltaWarmup(opt, epochs=2)
    x.grad = torch.tensor([100.0], dtype=torch.float64)
    warmup.set_epoch(1)
    assert opt.measure().clip_factor == 0.2
    warmup.set_epoch(2)
    m = opt.measure()
    assert m.clip_factor == 1.0
    assert not m.clip_active
    assert not m.delta_active


def _sgd_with_grad(value, nonfinite="skip"):
    x = torch.ones(4, dtype=torch.float32, requires_grad=True)
    opt = DeltaGClip(torch.optim.SGD([x], lr=0.1, momentum=0.9), gamma=1.0, delta=0.25, nonfinite=nonfinite)
    x.grad = torch.full((4,), value, dtype=torch.float32)
    return x, opt


def test_huge_finite_gradient_has_finite_norm_and_floor_step():
    """1e20 per element squares to 1e40, past float32's range; the norm must stay finite."""
    x, opt = _sgd_with_grad(1e20)
    m = opt.measure()
    assert m.grad_norm == pytest.approx(2e20, rel=1e-6)
    assert m.effective_lr == pytest.approx(0.1 * 0.25)
    assert m.delta_active
    assert not m.skipped
    opt.step()
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_nonfinite_gradient_skips_step(value):
    x, opt = _sgd_with_grad(1.0)
    x.grad[2] = value
    m = opt.measure()
    assert m.skipped
    assert not m.clip_active
    assert not m.delta_active
    opt.step()
    assert torch.equal(x.detach(), torch.ones(4))
    assert opt.skipped_steps == 1
    assert opt.optimizer.state == {} or not opt.optimizer.state[x]  # momentum untouched


def test_nonfinite_gradient_raises_when_asked():
    x, opt = _sgd_with_grad(1.0, nonfinite="raise")
    x.grad[0] = math.nan
    with pytest.raises(FloatingPointError, match="contains inf or NaN"):
        opt.step()
    assert torch.equal(x.detach(), torch.ones(4))

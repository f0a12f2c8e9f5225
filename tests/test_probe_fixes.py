"""Regression tests for the sharpness probes: AMSGrad preconditioning, optimizers over some
parameters, seed spread, pyhessian's sign, and the probe's input checks.

Each reference is exact: the dense Hessian of a tiny float64 model from
``torch.autograd.functional.hessian`` and its eigenvalues from ``torch.linalg.eigvalsh``.
"""

import logging
import types

import pytest
import torch
from torch import nn

from dynamics.clipping import DeltaGClip
from dynamics.data import TensorLoader
from dynamics.trainer import TrainConfig, Trainer
from probes import HessianUnsupportedError, SharpnessProbe, adam_preconditioner, pyhessian_top_eigenvalue, sharpness_spread, top_eigenvalue
from test_hessian_operator import UnusedHead
from test_sharpness_engine import _dense_hessian


def _tiny_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    inputs, targets = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    return model, inputs, targets


def _preconditioned_top(hessian, diagonal):
    scale = diagonal.rsqrt()
    return torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1].item()


def test_adam_preconditioner_amsgrad_dense():
    """AMSGrad divides by sqrt(max_exp_avg_sq / (1 − β2^t)) + ε. The fault: P was built
    from ``exp_avg_sq``, which β2 = 0.5 lets fall well below its running maximum."""
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, betas=(0.9, 0.5), eps=1e-3, amsgrad=True)
    for _ in range(8):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()

    states = [optimizer.state[p] for p in model.parameters()]
    maximum = torch.cat([s["max_exp_avg_sq"].reshape(-1) for s in states])
    current = torch.cat([s["exp_avg_sq"].reshape(-1) for s in states])
    assert (maximum - current).max() > 0.1 * maximum.max()  # the two moments differ, so the test can fail

    diagonal = adam_preconditioner(optimizer, list(model.parameters()))
    expected = (maximum / (1 - 0.5**8)).sqrt() + 1e-3
    torch.testing.assert_close(diagonal, expected, rtol=1e-12, atol=0)

    exact = _preconditioned_top(_dense_hessian(model, loss_fn, inputs, targets), expected)
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, max_iter=60, tol=1e-10, preconditioner=diagonal)
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-7)


def test_adam_preconditioner_rejects_foreign_param():
    """The fault: a parameter outside the optimizer raised a bare StopIteration."""
    model, _, _ = _tiny_problem()
    optimizer = torch.optim.Adam(model[2].parameters())
    with pytest.raises(ValueError, match=r"params\[0\] \(shape \(5, 3\)\) is not in the optimizer's param_groups"):
        adam_preconditioner(optimizer, list(model.parameters()))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_probe_over_optimized_params_only(kind):
    """The optimizer updates only the last layer, while the first keeps requires_grad=True.

    The fault: the probe took the Hessian over every trainable parameter and passed them
    all to ``adam_preconditioner``, whose StopIteration ended the run. Parameters outside
    the optimizer never move, so the rows must hold λ_max of the last layer's block.
    """
    model, inputs, targets = _tiny_problem()
    assert model[0].weight.requires_grad
    if kind == "adam":
        base = torch.optim.Adam(model[2].parameters(), lr=0.05, eps=1e-3)
    else:
        base = torch.optim.SGD(model[2].parameters(), lr=0.5)
    optimizer = DeltaGClip(base, gamma=1.0, delta=0.5)
    probe = SharpnessProbe(inputs, targets, every_epochs=1, max_iter=60, tol=1e-10)
    loader = TensorLoader(inputs, targets, 6)
    loss_fn = nn.CrossEntropyLoss()
    result = Trainer(model, loss_fn, loader, loader, optimizer, TrainConfig(2, progress=False), [probe]).fit()

    rows = result.recorder.rows("sharpness")
    final_step = rows[-1]["step"]
    assert final_step == 4
    raw = [r for r in rows if r["step"] == final_step and not r["preconditioned"]]
    preconditioned = [r for r in rows if r["step"] == final_step and r["preconditioned"]]
    assert len(preconditioned) == (1 if kind == "adam" else 0)

    last = sum(p.numel() for p in model[2].parameters())
    block = _dense_hessian(model, loss_fn, inputs, targets)[-last:, -last:]
    assert raw[0]["lambda_max"] == pytest.approx(torch.linalg.eigvalsh(block)[-1].item(), rel=1e-8)
    if kind == "adam":
        diagonal = adam_preconditioner(base, list(model[2].parameters()))
        assert preconditioned[0]["lambda_max"] == pytest.approx(_preconditioned_top(block, diagonal), rel=1e-8)


def test_probe_measure_params_order():
    """``measure(params=...)`` takes the block of those parameters whatever order they come in."""
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    hessian = _dense_hessian(model, loss_fn, inputs, targets)
    first = sum(p.numel() for p in model[0].parameters())
    params = [model[2].bias, model[0].weight, model[0].bias, model[2].weight]
    exact = torch.linalg.eigvalsh(hessian)[-1].item()
    block = torch.linalg.eigvalsh(hessian[:first, :first])[-1].item()
    probe = SharpnessProbe(inputs, targets, max_iter=60, tol=1e-10)
    assert probe.measure(model, loss_fn, params=params).lambda_max == pytest.approx(exact, rel=1e-8)
    probe = SharpnessProbe(inputs, targets, max_iter=60, tol=1e-10)
    assert probe.measure(model, loss_fn, params=list(model[0].parameters())).lambda_max == pytest.approx(block, rel=1e-8)


def test_probe_measure_rejects_bad_params():
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="params is empty"):
        SharpnessProbe(inputs, targets).measure(model, loss_fn, params=[])
    probe = SharpnessProbe(inputs, targets, backend="pyhessian")
    with pytest.raises(HessianUnsupportedError, match="pyhessian backend .* updates only some of them; use backend='ours'"):
        probe.measure(model, loss_fn, params=list(model[2].parameters()))


@pytest.mark.parametrize("optimizer_kind", ["sgd", "adam"])
def test_pyhessian_probe_in_training_run(optimizer_kind, caplog):
    """With the optimizer over every parameter, the pyhessian backend still records λ_max.
    Under Adam it has no preconditioned sharpness: that row used to end the run with a
    ValueError, and is now left out with a warning."""
    model, inputs, targets = _tiny_problem()
    model.float()
    inputs = inputs.float()
    loss_fn = nn.CrossEntropyLoss()
    make = torch.optim.SGD if optimizer_kind == "sgd" else torch.optim.Adam
    optimizer = make(model.parameters(), lr=0.1 if optimizer_kind == "sgd" else 1e-3)
    probe = SharpnessProbe(inputs, targets, every_epochs=1, max_iter=200, tol=1e-6, backend="pyhessian")
    loader = TensorLoader(inputs, targets, 6)
    with caplog.at_level(logging.WARNING):
        result = Trainer(model, loss_fn, loader, loader, optimizer, TrainConfig(1, progress=False), [probe]).fit()
    rows = result.recorder.rows("sharpness")
    assert len(rows) == 1
    assert ("pyhessian backend cannot measure it" in caplog.text) == (optimizer_kind == "adam")
    model.double()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs.double(), targets))[-1].item()
    assert rows[0]["lambda_max"] == pytest.approx(exact, rel=1e-3)


def test_spread_seeds_differ_at_loose_tol():
    """The fault: every solve started from the loss gradient, so seeds never mattered and
    the seed spread was always zero. At tol 1e-2 each seed's Gaussian start stops at a
    different Ritz value θ. Here λ_max is the eigenvalue nearest θ, so it lies within the
    residual of θ, which a converged solve keeps at most tol·|θ|."""
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs, targets))[-1].item()
    tol = 1e-2
    spread = sharpness_spread(model, loss_fn, [(inputs, targets)], seeds=(0, 1), max_iter=30, tol=tol)
    assert spread.count == 2
    assert all(spread.converged)
    assert abs(spread.values[0] - spread.values[1]) > 1e-9 * exact
    assert spread.std > 0
    for value in spread.values:
        assert value <= exact * (1 + 1e-12)  # a Ritz value never exceeds λ_max
        assert exact - value <= tol * abs(value)


def test_spread_seeds_match_eigvalsh_at_tight_tol():
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs, targets))[-1].item()
    spread = sharpness_spread(model, loss_fn, [(inputs, targets)], seeds=(0, 1, 2), max_iter=60, tol=1e-10)
    assert all(spread.converged)
    for value in spread.values:
        assert value == pytest.approx(exact, rel=1e-8)


def test_spread_seeds_over_some_params():
    """With ``params`` the Gaussian start has the size of that block."""
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    last = sum(p.numel() for p in model[2].parameters())
    block = _dense_hessian(model, loss_fn, inputs, targets)[-last:, -last:]
    spread = sharpness_spread(model, loss_fn, [(inputs, targets)], seeds=(0, 1), max_iter=60, tol=1e-10,
                              params=list(model[2].parameters()))
    for value in spread.values:
        assert value == pytest.approx(torch.linalg.eigvalsh(block)[-1].item(), rel=1e-8)


@pytest.mark.parametrize("options, message", [
    ({"seeds": ()}, r"invalid seeds=\(\): expected at least one seed"),
    ({"generator": torch.Generator()}, "sets generator from each seed"),
    ({"start": torch.ones(32, dtype=torch.float64)}, "sets start from each seed"),
])
def test_spread_rejects_bad_arguments(options, message):
    """The faults: empty seeds returned NaN with numpy warnings, and ``generator=`` raised
    "got multiple values for keyword argument"."""
    model, inputs, targets = _tiny_problem()
    with pytest.raises(ValueError, match=message):
        sharpness_spread(model, nn.CrossEntropyLoss(), [(inputs, targets)], **options)


def test_pyhessian_negative_dominant_unconverged(caplog):
    """pyhessian's power iteration returns the eigenvalue of largest magnitude. The fault:
    on a spectrum whose negative end dominates, that value was recorded as λ_max with
    converged=True."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    inputs, targets = torch.randn(16, 3), torch.randn(16, 1)

    def negated_squared_loss(outputs, targets):
        return -((outputs - targets) ** 2).mean()

    spectrum = torch.linalg.eigvalsh(_dense_hessian(model.double(), negated_squared_loss, inputs.double(),
                                                    targets.double()))
    model.float()
    assert spectrum[-1] > 0
    assert -spectrum[0] > 2 * spectrum[-1]  # the negative end dominates

    with caplog.at_level(logging.WARNING, logger="probes.backends"):
        estimate = pyhessian_top_eigenvalue(model, negated_squared_loss, inputs, targets, max_iter=200, tol=1e-6)
    assert estimate.lambda_max == pytest.approx(spectrum[0].item(), rel=1e-3)
    assert not estimate.converged
    assert "largest magnitude" in caplog.text
    assert "backend='ours'" in caplog.text


def test_pyhessian_positive_top_has_no_sign_warning(caplog):
    """A positive largest-magnitude eigenvalue is λ_max: no warning. ``converged`` follows
    the residual rule, which pyhessian's relative-change rule does not meet here."""
    model, inputs, targets = _tiny_problem()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, nn.CrossEntropyLoss(), inputs, targets))
    model.float()
    inputs = inputs.float()
    assert exact[-1] > -exact[0]
    with caplog.at_level(logging.WARNING, logger="probes.backends"):
        estimate = pyhessian_top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, max_iter=200, tol=1e-6)
    assert estimate.converged == (estimate.residual <= 1e-6 * estimate.lambda_max)
    assert estimate.lambda_max == pytest.approx(exact[-1].item(), rel=1e-3)
    assert "largest magnitude" not in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"momentum": 1.0}, r"invalid momentum=1\.0: expected .* in \[0, 1\)"),
    ({"momentum": 1.5}, r"invalid momentum=1\.5"),
    ({"momentum": -0.1}, r"invalid momentum=-0\.1"),
    ({"momentum": float("nan")}, r"invalid momentum=nan"),
    ({"momentum": float("inf")}, r"invalid momentum=inf"),
    ({"momentum": "0.9"}, r"invalid momentum='0\.9'"),
    ({"every_epochs": 1.5}, r"invalid every_epochs=1\.5: expected an integer >= 0"),
    ({"every_epochs": -1}, r"invalid every_epochs=-1"),
    ({"every_epochs": True}, r"invalid every_epochs=True"),
    ({"every_steps": 2.0}, r"invalid every_steps=2\.0: expected an integer >= 0"),
    ({"every_steps": False}, r"invalid every_steps=False"),
    ({"max_iter": 2.5}, r"invalid max_iter=2\.5: expected an integer >= 1"),
    ({"max_iter": True}, r"invalid max_iter=True"),
])
def test_probe_rejects_bad_settings(options, message):
    """These passed construction and failed later with a TypeError, or never."""
    _, inputs, targets = _tiny_problem()
    with pytest.raises(ValueError, match=message):
        SharpnessProbe(inputs, targets, **options)


@pytest.mark.parametrize("options", [{"momentum": 0}, {"momentum": 0.9}, {"every_epochs": 0}, {"every_steps": 3},
                                     {"max_iter": 1}])
def test_probe_accepts_valid_settings(options):
    _, inputs, targets = _tiny_problem()
    SharpnessProbe(inputs, targets, **options)


def test_adam_stateless_parameters_keep_preconditioned_rows(caplog):
    """An optimized parameter without a gradient has no Adam state, and that used to drop
    every preconditioned row silently. The row is now over the parameters with state."""
    torch.manual_seed(0)
    model = UnusedHead().double()
    inputs, targets = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 2, (12,))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05, eps=1e-3)
    probe = SharpnessProbe(inputs, targets, every_epochs=1, max_iter=80, tol=1e-10)
    loader = TensorLoader(inputs, targets, 6)
    with caplog.at_level(logging.WARNING):
        result = Trainer(model, loss_fn, loader, loader, optimizer, TrainConfig(1, progress=False), [probe]).fit()
    preconditioned = [r for r in result.recorder.rows("sharpness") if r["preconditioned"]]
    assert len(preconditioned) == 1
    assert "2 of 6 optimized parameters have no Adam state" in caplog.text
    moving = [model.body.weight, model.body.bias, model.head.weight, model.head.bias]
    used = sum(p.numel() for p in moving)
    block = _dense_hessian(model, loss_fn, inputs, targets)[:used, :used]
    diagonal = adam_preconditioner(optimizer, moving)
    assert preconditioned[0]["lambda_max"] == pytest.approx(_preconditioned_top(block, diagonal), rel=1e-8)


@pytest.mark.parametrize("optimized", ["all", "head"])
def test_pyhessian_failure_switches_probe_off(optimized):
    """pyhessian asserts on a parameter the loss does not reach, and takes no subset of
    the parameters. Both used to end the training run; the probe now switches off."""
    torch.manual_seed(0)
    model = UnusedHead()
    inputs, targets = torch.randn(12, 5), torch.randint(0, 2, (12,))
    params = model.parameters() if optimized == "all" else model.head.parameters()
    optimizer = torch.optim.SGD(params, lr=0.1)
    probe = SharpnessProbe(inputs, targets, every_epochs=1, backend="pyhessian")
    loader = TensorLoader(inputs, targets, 6)
    result = Trainer(model, nn.CrossEntropyLoss(), loader, loader, optimizer, TrainConfig(2, progress=False),
                     [probe]).fit()
    events = result.recorder.rows("probe_events")
    assert [event["event"] for event in events] == ["disabled"]
    assert "backend='ours'" in events[0]["reason"]
    assert result.recorder.rows("sharpness") == []


@pytest.mark.parametrize("options, message", [
    ({"chunk_size": 0}, "invalid chunk_size=0"),
    ({"targets": torch.zeros(5, dtype=torch.long)}, r"inputs and targets differ in length \(12 and 5\)"),
])
def test_probe_checks_its_batch(options, message):
    """A bad chunk size or a short target tensor used to pass the constructor and fail at the first solve."""
    _, inputs, targets = _tiny_problem()
    arguments = {"inputs": inputs, "targets": targets, **options}
    with pytest.raises(ValueError, match=message):
        SharpnessProbe(**arguments)


# The trace cache key names a module object by identity and leaves its attributes out.
SETTINGS = types.ModuleType("settings")
SETTINGS.scale = 1.0


class HiddenScale(nn.Module):
    """An MLP that reads its scale from a module object, so no cache key of the traced product contains it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(SETTINGS.scale * self.body(x)))


def test_auto_recheck_catches_a_stale_trace(monkeypatch):
    """Under hvp_method="auto" the probe kept the first solve's path for good, so a
    traced product that missed a changed value returned the old λ_max at every later
    solve. The check every AUTO_RECHECK solves finds the disagreement and switches to
    double backward."""
    from probes.sharpness import AUTO_RECHECK

    monkeypatch.setattr(SETTINGS, "scale", 1.0)
    torch.manual_seed(0)
    model = HiddenScale().double()
    inputs, targets = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    loss_fn = nn.CrossEntropyLoss()
    probe = SharpnessProbe(inputs, targets, max_iter=80, tol=1e-10)
    probe.measure(model, loss_fn)  # "auto" runs both paths, so the split product is traced and cached
    probe.hvp_method = "forward_over_reverse"  # the choice of "auto" depends on timing: pin the traced path
    monkeypatch.setattr(SETTINGS, "scale", 3.0)
    exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs, targets))[-1].item()
    for _ in range(AUTO_RECHECK - 1):
        probe.measure(model, loss_fn)  # the stale trace: the gap this check exists for
    estimate = probe.measure(model, loss_fn)
    assert estimate.method.endswith("double_backward")
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-8)


def test_probe_survives_parameters_unfrozen_between_solves():
    """Unfreezing a layer after the first solve made the previous eigenvector too short to
    start the next one, and the ValueError ended the training run."""
    model, inputs, targets = _tiny_problem()
    model[0].requires_grad_(False)
    probe = SharpnessProbe(inputs, targets, max_iter=100, tol=1e-8)
    first = probe.measure(model, nn.CrossEntropyLoss())
    model[0].requires_grad_(True)
    second = probe.measure(model, nn.CrossEntropyLoss())
    exact = torch.linalg.eigvalsh(_dense_hessian(model, nn.CrossEntropyLoss(), inputs, targets))[-1].item()
    assert first.vector.numel() < second.vector.numel()
    assert probe.last_start == "gradient"
    assert second.lambda_max == pytest.approx(exact, rel=1e-6)


def test_probe_inside_no_grad():
    """Called inside torch.no_grad() (evaluation code often is), the probe either raised
    autograd's bare error or blamed a Linear module for having no second derivative."""
    model, inputs, targets = _tiny_problem()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, nn.CrossEntropyLoss(), inputs, targets))[-1].item()
    for method in ("auto", "double_backward", "forward_over_reverse"):
        with torch.no_grad():
            estimate = SharpnessProbe(inputs, targets, hvp_method=method, tol=1e-8, max_iter=100).measure(
                model, nn.CrossEntropyLoss())
        assert estimate.lambda_max == pytest.approx(exact, rel=1e-6), method


def test_foreign_parameter_is_rejected():
    """A tensor that is not a trainable parameter of the model was dropped without a word."""
    model, inputs, targets = _tiny_problem()
    foreign = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="1 of the 2 tensors in params are not trainable parameters"):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, params=[model[0].weight, foreign])


def test_spread_rejects_unknown_bn_mode():
    """bn_mode="tran" used to run in eval mode without a word."""
    model, inputs, targets = _tiny_problem()
    with pytest.raises(ValueError, match="invalid bn_mode='tran'"):
        sharpness_spread(model, nn.CrossEntropyLoss(), [(inputs, targets)], bn_mode="tran")


def test_probe_rejects_a_fractional_seed():
    model, inputs, targets = _tiny_problem()
    with pytest.raises(ValueError, match="invalid seed=1.5"):
        SharpnessProbe(inputs, targets, seed=1.5)


def test_probe_without_a_loss_says_so():
    """A ProbeSession built without loss_fn failed with "'NoneType' object is not callable"."""
    from dynamics.session import ProbeSession

    model, inputs, targets = _tiny_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    session = ProbeSession(model, optimizer, [SharpnessProbe(inputs, targets)], run_id="run")
    session.start_epoch(1)
    with pytest.raises(ValueError, match="pass loss_fn= to ProbeSession"):
        session.end_epoch()


class CountingMLP(nn.Module):
    """Counts the inputs it has seen in train mode in a buffer that forward replaces."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        self.register_buffer("seen", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.seen = self.seen + len(x)  # a new tensor, not an in-place write
        return self.body(x)


@pytest.mark.parametrize("method", ["auto", "double_backward", "forward_over_reverse"])
def test_probe_restores_a_buffer_that_forward_replaces(method):
    """Buffers were restored by copying the saved values into the old tensors, so a buffer
    that forward had replaced kept the probe's count (16 after one solve)."""
    _, inputs, targets = _tiny_problem()
    model = CountingMLP()
    original = model.seen
    SharpnessProbe(inputs, targets, hvp_method=method).measure(model, nn.CrossEntropyLoss())
    assert model.seen is original
    assert model.seen.item() == 0.0


def test_pyhessian_backend_reports_a_real_residual():
    """pyhessian stops when its value changes by less than tol between iterations; with
    λ1/λ2 = 1/0.97 that happened 2.9% below λ_max (seed 2), and the backend reported
    converged=True."""
    torch.manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([1.0, 0.97], dtype=torch.float64),
                          torch.linspace(0.0, 0.3, 18, dtype=torch.float64)])
    root = basis @ torch.diag(spectrum.sqrt()) @ basis.T  # H = root·root has this spectrum

    def half_squared_error(outputs, targets_):
        return 0.5 * (outputs - targets_).square().mean()

    model = nn.Linear(20, 1, bias=False).double()
    inputs, targets = root * 20 ** 0.5, torch.zeros(20, 1, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(_dense_hessian(model, half_squared_error, inputs, targets))[-1].item()
    estimate = pyhessian_top_eigenvalue(model, half_squared_error, inputs, targets, max_iter=100, tol=1e-3)
    assert exact == pytest.approx(1.0, rel=1e-9)
    assert estimate.lambda_max < 0.98 * exact  # pyhessian's own rule stopped early
    assert not estimate.converged
    assert estimate.residual > 1e-3 * estimate.lambda_max

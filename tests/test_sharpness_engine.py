"""The sharpness engine: both HVP paths, estimators, Adam preconditioning, unsupported models."""

import gc
import logging

import pytest
import torch
from torch import nn

from dynamics.clipping import DeltaGClip
from dynamics.data import TensorLoader
from dynamics.trainer import TrainConfig, Trainer
from probes import (
    HessianOperator,
    HessianUnsupportedError,
    SharpnessProbe,
    adam_preconditioner,
    hutchinson_trace,
    lanczos,
    power_iteration,
    pyhessian_top_eigenvalue,
    refined_lower_bound,
    sharpness_spread,
    top_eigenvalue,
)


def _matrix(diagonal):
    return torch.diag(torch.tensor(diagonal, dtype=torch.float64))


@pytest.mark.parametrize("diagonal, expected", [((-5.0, 3.0, 1.0), 3.0), ((4.0, -4.0, 1.0), 4.0)])
def test_power_iteration_returns_top_or_reports_failure(diagonal, expected):
    """Power iteration must never return −5 for diag(−5, 3, 1): the shift fixes it."""
    matrix = _matrix(diagonal)
    estimate = power_iteration(lambda v: matrix @ v, 3, max_iter=500, tol=1e-8, generator=torch.Generator().manual_seed(0))
    if estimate.converged:
        assert estimate.lambda_max == pytest.approx(expected, rel=1e-6)
    else:
        assert estimate.lambda_max != pytest.approx(min(diagonal), rel=1e-3)


def test_lanczos_top_three_with_bulk_and_outliers():
    generator = torch.Generator().manual_seed(5)
    dim = 300
    spectrum = torch.rand(dim, generator=generator, dtype=torch.float64)  # bulk in [0, 1]
    spectrum[:2] = torch.tensor([50.0, 20.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(spectrum) @ basis.T
    exact = torch.sort(spectrum, descending=True).values[:3]
    estimate = lanczos(lambda v: matrix @ v, dim, k=3, max_iter=150, tol=1e-6, generator=generator)
    assert estimate.converged
    assert len(estimate.eigenvalues) == 3
    for found, true in zip(estimate.eigenvalues, exact.tolist()):
        assert found == pytest.approx(true, abs=1e-3)


def test_refined_value_by_hand():
    """diag(3, 1) from (1, 1)/√2: θ = 2, Hv − θv = (1, −1)/√2 so r = 1, and ‖Hv‖²/θ = 5/2."""
    matrix = _matrix((3.0, 1.0))
    start = torch.tensor([1.0, 1.0], dtype=torch.float64)
    # tol 0.6 lets power iteration accept r = 1 ≤ 0.6·θ at once, before its shifted phase.
    for solve in (lanczos, power_iteration):
        estimate = solve(lambda v: matrix @ v, 2, max_iter=1, tol=0.6, start=start)
        assert estimate.lambda_max == pytest.approx(2.0)
        assert estimate.residual == pytest.approx(1.0)
        assert estimate.lambda_refined == pytest.approx(2.5)
    assert refined_lower_bound(2.0, 1.0, -1.0) == pytest.approx(2.0 + 1.0 / 3.0)
    assert refined_lower_bound(2.0, 3.0, 0.0) == 2.0  # r ≥ θ − L: too far from an eigenvector
    assert refined_lower_bound(-1.0, 1.0, 0.0) == -1.0  # θ at or below the floor: nothing to add
    assert refined_lower_bound(1e300, 1e200, -1e300) == pytest.approx(1e300 + 5e99)  # no overflow
    assert refined_lower_bound(1.0, 1e200, 0.0) == 1.0
    with pytest.raises(ValueError, match="invalid residual=-1.0"):
        refined_lower_bound(2.0, -1.0, 0.0)


def _spectrum_matrix(spectrum, seed):
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), generator=generator, dtype=torch.float64))
    return basis @ torch.diag(spectrum) @ basis.T, basis[:, torch.argmax(spectrum)], generator


def _steps(matrix, start, floor=None, max_iter=6):
    """Return (θ, refined) after each Lanczos product."""
    trace = []
    lanczos(lambda v: matrix @ v, len(start), max_iter=max_iter, tol=0.0, start=start, floor=floor,
            callback=lambda j, theta, refined, residual: trace.append((theta, refined)))
    return trace


def test_refined_value_semidefinite_warm_start():
    """A warm start near the top eigenvector: the refined value lies between θ and λ_max
    at every step, and after one product it is far closer than θ."""
    spectrum = torch.linspace(0.0, 1.0, 200, dtype=torch.float64)
    spectrum[:3] = torch.tensor([50.0, 20.0, 10.0], dtype=torch.float64)
    matrix, top, generator = _spectrum_matrix(spectrum, seed=3)
    start = top + 0.02 * torch.randn(200, generator=generator, dtype=torch.float64)
    trace = _steps(matrix, start)
    for theta, refined in trace:
        assert theta - 1e-9 <= refined <= 50.0 + 1e-9
    theta, refined = trace[0]
    assert 50.0 - refined < 0.2 * (50.0 - theta)


def test_refined_value_indefinite_with_floor():
    """With the true bottom of the spectrum as the floor, the refined value stays a lower bound."""
    spectrum = torch.linspace(-3.0, 1.0, 150, dtype=torch.float64)
    spectrum[0] = 12.0
    matrix, top, generator = _spectrum_matrix(spectrum, seed=4)
    start = top + 0.3 * torch.randn(150, generator=generator, dtype=torch.float64)
    trace = _steps(matrix, start, floor=-3.0)
    for theta, refined in trace:
        assert theta - 1e-9 <= refined <= 12.0 + 1e-9
    assert trace[1][1] > trace[1][0] + 1e-3  # the second step is close enough for a correction


def test_refined_value_skipped_far_from_eigenvector():
    """diag(4, −4, 1) from (1, 1, 1): θ = 1/3, r² = 98/9; the default floor 0 lies above −4,
    so r²/θ = 32.7 would overshoot λ_max = 4 eightfold. With r ≥ θ − L the value stays θ."""
    matrix = _matrix((4.0, -4.0, 1.0))
    estimate = lanczos(lambda v: matrix @ v, 3, max_iter=1, tol=1e-12, start=torch.ones(3, dtype=torch.float64))
    assert estimate.lambda_max == pytest.approx(1.0 / 3.0)
    assert estimate.residual == pytest.approx((98.0 / 9.0) ** 0.5)
    assert estimate.lambda_refined == estimate.lambda_max


@pytest.mark.parametrize("start", [torch.zeros(3), torch.full((3,), float("nan"))])
def test_power_iteration_rejects_bad_start(start):
    """The fault: a zero or NaN start made every Rayleigh quotient NaN, returned without an error."""
    matrix = _matrix((3.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="must be finite and non-zero"):
        power_iteration(lambda v: matrix @ v, 3, start=start)


@pytest.mark.parametrize("solve", [lanczos, power_iteration])
def test_non_finite_product_raises_clear_error(solve):
    """The fault: Lanczos failed inside eigh with torch's LinAlgError, and power iteration returned NaN."""
    def product(v):
        return torch.where(torch.arange(len(v)) == 1, torch.nan, 2.0 * v)

    with pytest.raises(FloatingPointError, match="at step 1 .* is not finite"):
        solve(product, 3, start=torch.ones(3, dtype=torch.float64))


def test_probe_solves_once_when_cadences_meet():
    """With every_steps dividing the epoch, the epoch-end measurement reuses the step's rows.

    The fault: the epoch end solved again at the step just measured, writing duplicate
    rows and a trivial |cos| of 1 between two eigenvectors of the same Hessian.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(32, 4), torch.randint(0, 3, (32,))
    optimizer = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.05), gamma=1.0, delta=0.5)
    probe = SharpnessProbe(inputs, targets, every_epochs=1, every_steps=2, max_iter=30, tol=1e-4)
    loader = TensorLoader(inputs, targets, 16)  # 2 steps per epoch
    result = Trainer(model, nn.CrossEntropyLoss(), loader, loader, optimizer, TrainConfig(3, progress=False), [probe]).fit()
    steps = [row["step"] for row in result.recorder.rows("sharpness")]
    assert steps == [2, 4, 6]
    assert probe.estimates == 3
    assert [row["lambda_max"] for row in result.recorder.rows("epochs")] == [
        row["lambda_max"] for row in result.recorder.rows("sharpness")]


def test_refined_value_network_eigvalsh():
    """One product from a perturbed top eigenvector of a real network's Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    inputs, targets = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    loss_fn = nn.CrossEntropyLoss()
    hessian = _dense_hessian(model, loss_fn, inputs, targets)
    values, vectors = torch.linalg.eigh(hessian)
    start = vectors[:, -1] + 0.1 * torch.randn(len(values), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, max_iter=1, start=start, warn=False)
    exact = values[-1].item()
    assert estimate.lambda_max < estimate.lambda_refined
    assert abs(estimate.lambda_refined - exact) < 0.3 * abs(estimate.lambda_max - exact)


def test_lanczos_finds_hidden_top_eigenvalue():
    """A start with little weight on λ1 = 1: the Ritz value sits near λ2 = 0.9 for a few
    products, with a moderate residual. A stop rule on the error estimated from the gap
    to the next Ritz value stopped there (0.90, converged); the residual rule must not."""
    matrix = _matrix((1.0, 0.9, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0))
    start = torch.tensor([0.1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    estimate = lanczos(lambda v: matrix @ v, 8, tol=1e-2, start=start)
    assert estimate.converged
    assert estimate.lambda_max == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("tol", [-1e-3, float("nan"), float("inf")])
def test_solvers_reject_bad_tolerance(tol):
    """A negative or NaN tol used to run every product silently, and inf stopped at once."""
    matrix = _matrix((3.0, 1.0))
    for solve in (lanczos, power_iteration):
        with pytest.raises(ValueError, match="invalid tol="):
            solve(lambda v: matrix @ v, 2, tol=tol)


@pytest.mark.parametrize("seed", range(10))
def test_lanczos_close_top_pair_within_tolerance(seed):
    """λ2 = 0.9·λ1 above a bulk in [0, 0.5], from a Gaussian start: at tol 1e-3 the
    converged λ_max is within 1e-3 of eigvalsh's."""
    spectrum = 0.5 * torch.rand(200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    spectrum[:2] = torch.tensor([1.0, 0.9], dtype=torch.float64)
    matrix, _, generator = _spectrum_matrix(spectrum, seed)
    estimate = lanczos(lambda v: matrix @ v, 200, max_iter=150, tol=1e-3, generator=generator)
    assert estimate.converged
    assert estimate.lambda_max == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("index", [0, 2])
def test_lanczos_top_two_from_an_eigenvector(index):
    """From an exact eigenvector the Krylov space is invariant after one product. With
    k = 2 the solve used to stop there with one value and converged=True."""
    matrix = _matrix((5.0, 3.0, 1.0, 0.5))
    start = torch.zeros(4, dtype=torch.float64)
    start[index] = 1.0
    estimate = lanczos(lambda v: matrix @ v, 4, k=2, tol=1e-8, start=start,
                       generator=torch.Generator().manual_seed(0))
    assert estimate.converged
    assert estimate.eigenvalues == pytest.approx([5.0, 3.0], rel=1e-8)
    assert estimate.lambda_2 == pytest.approx(3.0, rel=1e-8)


@pytest.mark.parametrize("diagonal, start, k, expected", [
    ((5.0, 5.0, 3.0, 2.0, 1.0, 0.5), None, 2, [5.0, 5.0]),  # a repeated top value, from a Gaussian start
    ((7.0, -3.0, 0.0, 0.0, 0.0, 0.0), None, 3, [7.0, 0.0, 0.0]),
    ((5.0, 4.0, 3.0, 2.0), (1.0, 0.0, 1.0, 0.0), 2, [5.0, 4.0]),  # a start in the span of two eigenvectors
])
def test_lanczos_top_k_invariant_space(diagonal, start, k, expected):
    """Once the space held k Ritz values, an invariant space used to end the solve with
    converged=True, though the eigenvalues outside it were never seen (5, 3 for the first)."""
    matrix = _matrix(diagonal)
    start = None if start is None else torch.tensor(start, dtype=torch.float64)
    estimate = lanczos(lambda v: matrix @ v, len(diagonal), k=k, tol=1e-8, start=start,
                       generator=torch.Generator().manual_seed(3))
    assert estimate.converged
    assert estimate.eigenvalues == pytest.approx(expected, abs=1e-8)


def test_lanczos_invariant_at_max_iter():
    """An invariant space reached at the last allowed product, before k values were
    found, used to end the solve with converged=True."""
    matrix = _matrix((5.0, 4.0, 3.0, 2.0))
    estimate = lanczos(lambda v: matrix @ v, 4, k=2, max_iter=1, start=torch.eye(4, dtype=torch.float64)[0])
    assert not estimate.converged


def test_lanczos_callback_reports_each_product():
    """The callback gets, after each product, the values and residual the solve would
    return if it stopped there; its last call matches the returned estimate."""
    matrix = _matrix((6.0, 3.0, 2.0, 1.0, 0.5))
    calls = []
    estimate = lanczos(lambda v: matrix @ v, 5, tol=1e-6, start=torch.ones(5, dtype=torch.float64),
                       callback=lambda *values: calls.append(values))
    assert [call[0] for call in calls] == list(range(1, estimate.hvp_count + 1))
    assert calls[0][1] == pytest.approx(12.5 / 5)  # Rayleigh quotient of (1, ..., 1)
    assert calls[-1][1:] == pytest.approx((estimate.lambda_max, estimate.lambda_refined, estimate.residual))
    assert calls[-1][3] <= 1e-6 * 6.0 < calls[-2][3]  # the residual rule stopped it


def test_top_eigenvalue_invariant_gradient():
    """Least squares with H = diag(9, 1) and a gradient along the second axis: the
    gradient start used to return 1 with converged=True."""
    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    inputs = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    estimate = top_eigenvalue(model, nn.MSELoss(), inputs, targets, tol=1e-8, hvp_method="double_backward")
    assert estimate.converged
    assert estimate.lambda_max == pytest.approx(9.0, rel=1e-8)


class BatchNormCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        return self.head(nn.functional.avg_pool2d(x, 2).flatten(1))


def _bn_problem():
    torch.manual_seed(0)
    model = BatchNormCNN().train()
    return model, torch.randn(24, 1, 8, 8), torch.randint(0, 3, (24,))


def test_both_hvp_paths_agree_on_train_mode_batchnorm():
    model, inputs, targets = _bn_problem()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    loss_fn = nn.CrossEntropyLoss()
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    from probes.hessian import solve_mode

    with solve_mode(model):
        reverse = HessianOperator(model, loss_fn, inputs, targets, method="double_backward")(vector)
        forward = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
    torch.testing.assert_close(forward, reverse, rtol=1e-5, atol=1e-5)
    for name, value in buffers.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert model.training and model.norm.track_running_stats


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_unequal_chunks_match_single_batch(method):
    model, inputs, targets = _bn_problem()
    model.eval()  # batch statistics differ per chunk in train mode; eval mode makes chunks additive
    loss_fn = nn.CrossEntropyLoss()
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    whole = HessianOperator(model, loss_fn, inputs, targets, method=method)(vector)
    chunked_operator = HessianOperator(model, loss_fn, inputs, targets, chunk_size=10, method=method)
    assert [len(t) for _, t in chunked_operator.chunks] == [10, 10, 4]
    torch.testing.assert_close(chunked_operator(vector), whole, rtol=1e-6, atol=1e-6)


def _live_tensors():
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_fifty_probe_calls_keep_memory_and_grad(method):
    model, inputs, targets = _bn_problem()
    nn.CrossEntropyLoss()(model(inputs), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    probe = SharpnessProbe(inputs, targets, max_iter=10, hvp_method=method)
    probe.measure(model, nn.CrossEntropyLoss())
    baseline = _live_tensors()
    for _ in range(50):
        probe.measure(model, nn.CrossEntropyLoss())
    assert _live_tensors() <= baseline + 2  # the previous vector is replaced, nothing accumulates
    for p, grad in zip(model.parameters(), grads):
        assert torch.equal(p.grad, grad)


def _dense_hessian(model, loss_fn, inputs, targets):
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(vector):
        pieces = torch.split(vector, [p.numel() for p in params])
        state = {n: piece.view_as(p) for n, piece, p in zip(names, pieces, params)}
        return loss_fn(torch.func.functional_call(model, state, (inputs,)), targets)

    return torch.autograd.functional.hessian(loss_of, flat)


def test_preconditioned_sharpness_matches_dense_with_real_adam_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    inputs, targets = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-3)
    for _ in range(4):
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    diagonal = adam_preconditioner(optimizer, list(model.parameters()))
    state = optimizer.state[model[0].weight]
    expected_first = (state["exp_avg_sq"] / (1 - 0.999**4)).sqrt().reshape(-1)[0] + 1e-3
    assert diagonal[0].item() == pytest.approx(expected_first.item(), rel=1e-12)

    hessian = _dense_hessian(model, loss_fn, inputs, targets)
    scale = diagonal.rsqrt()
    exact = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1].item()
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, max_iter=60, tol=1e-10, preconditioner=diagonal)
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-7)


def test_top_eigenvalue_over_some_parameters():
    """``params`` restricts the Hessian to their block: here the last layer's, whose
    rows and columns come last in the dense Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    inputs, targets = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    loss_fn = nn.CrossEntropyLoss()
    hessian = _dense_hessian(model, loss_fn, inputs, targets)
    last = sum(p.numel() for p in model[2].parameters())
    exact = torch.linalg.eigvalsh(hessian[-last:, -last:])[-1].item()
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, tol=1e-10, params=list(model[2].parameters()))
    assert estimate.vector.numel() == last
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-8)


def test_hutchinson_trace_close_to_exact():
    torch.manual_seed(0)
    matrix = torch.randn(30, 30, dtype=torch.float64)
    matrix = matrix @ matrix.T
    mean, error = hutchinson_trace(lambda v: matrix @ v, 30, samples=400, generator=torch.Generator().manual_seed(1))
    assert abs(mean - matrix.trace().item()) <= 4 * error
    assert error < 0.1 * matrix.trace().item()


def test_spread_over_batches_and_seeds():
    model, inputs, targets = _bn_problem()
    batches = [(inputs[:12], targets[:12]), (inputs[12:], targets[12:])]
    spread = sharpness_spread(model, nn.CrossEntropyLoss(), batches, seeds=(0, 1), max_iter=40, tol=1e-6)
    assert spread.count == 4
    assert all(spread.converged)
    # Seeds agree on each batch; batches differ.
    assert spread.values[0] == pytest.approx(spread.values[1], rel=1e-4)
    assert spread.std > 0


class OnceDifferentiableSquare(torch.autograd.Function):
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x


class FusedSquare(nn.Module):
    def forward(self, x):
        return OnceDifferentiableSquare.apply(x)


def _unsupported_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), FusedSquare(), nn.Linear(6, 3))


def test_unsupported_model_error_names_module():
    model = _unsupported_model()
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(HessianUnsupportedError, match=r"module '1' \(FusedSquare\).*switch the sharpness probe off"):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, hvp_method="double_backward")


def test_unsupported_model_disables_probe_and_training_continues(caplog):
    model = _unsupported_model()
    inputs, targets = torch.randn(64, 4), torch.randint(0, 3, (64,))
    optimizer = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, delta=0.2)
    probe = SharpnessProbe(inputs[:16], targets[:16], every_steps=2, hvp_method="double_backward")
    loader = TensorLoader(inputs, targets, 16)
    with caplog.at_level(logging.ERROR):
        result = Trainer(model, nn.CrossEntropyLoss(), loader, loader, optimizer, TrainConfig(2, progress=False), [probe]).fit()
    assert result.status == "completed"
    assert len(result.recorder.rows("steps")) == 8
    events = result.recorder.rows("probe_events")
    assert len(events) == 1
    assert events[0]["event"] == "disabled"
    assert "FusedSquare" in events[0]["reason"]
    assert "switched off" in caplog.text


class ReverseOnlySquare(torch.autograd.Function):
    """Twice differentiable in reverse mode, but without the setup_context that torch.func needs."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class ReverseOnly(nn.Module):
    def forward(self, x):
        return ReverseOnlySquare.apply(x)


def test_forward_mode_error_names_module_and_keeps_buffers():
    """A module that fails only in forward mode used to be reported as "an operation outside
    the model's leaf modules", because each module was checked by double backward alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6),
                          ReverseOnly(), nn.Linear(6, 3))
    inputs, targets = torch.randn(8, 3, 6, 6), torch.randint(0, 3, (8,))
    state = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(HessianUnsupportedError, match=r"module '5' \(ReverseOnly\) .* forward_over_reverse"):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, hvp_method="forward_over_reverse")
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    estimate = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, hvp_method="auto")
    assert estimate.method == "lanczos/double_backward"


class TooManyCalls(BaseException):
    """Escapes every handler in the probe, so a runaway loop fails the test instead of hanging it."""


class CountingLinear(nn.Linear):
    calls = 0

    def forward(self, x):
        CountingLinear.calls += 1
        if CountingLinear.calls > 100:
            raise TooManyCalls
        return super().forward(x)


class FunctionalCube(nn.Module):
    """A once-differentiable operation between two leaf modules, outside any leaf module."""

    def __init__(self):
        super().__init__()
        self.first, self.second = CountingLinear(4, 6), CountingLinear(6, 3)

    def forward(self, x):
        return self.second(OnceDifferentiableSquare.apply(self.first(x)))


def test_forward_mode_error_outside_leaf_modules_ends():
    """The module checks ran with the recording hooks still on, so each check appended a new
    record to the list being walked: the error was never raised and memory grew without end."""
    torch.manual_seed(0)
    CountingLinear.calls = 0
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(HessianUnsupportedError, match="outside the model's leaf modules"):
        top_eigenvalue(FunctionalCube(), nn.CrossEntropyLoss(), inputs, targets, hvp_method="forward_over_reverse")


def test_auto_hvp_falls_back_when_forward_mode_fails(caplog):
    """once_differentiable has no forward-mode rule either; auto must then raise clearly."""
    model = _unsupported_model()
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(HessianUnsupportedError):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, hvp_method="auto")


def test_adam_run_records_preconditioned_sharpness(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(32, 4), torch.randint(0, 3, (32,))
    optimizer = DeltaGClip(torch.optim.Adam(model.parameters(), lr=0.01), gamma=1.0, delta=0.5)
    probe = SharpnessProbe(inputs, targets, every_epochs=1, max_iter=30, tol=1e-4)
    loader = TensorLoader(inputs, targets, 16)
    with caplog.at_level(logging.WARNING):
        result = Trainer(model, nn.CrossEntropyLoss(), loader, loader, optimizer, TrainConfig(2, progress=False), [probe]).fit()
    rows = result.recorder.rows("sharpness")
    kinds = {(r["threshold_kind"], r["preconditioned"]) for r in rows}
    assert kinds == {("2/h", False), ("(2+2β1)/(h(1-β1))", True)}
    adam_row = [r for r in rows if r["preconditioned"]][-1]
    assert adam_row["threshold"] == pytest.approx(3.8 / (0.1 * adam_row["effective_lr"]))
    assert "not the stability criterion" in caplog.text
    for row in rows:
        assert row["lambda_refined"] == pytest.approx(row["lambda_max"], rel=1e-3)
        assert row["lambda_refined"] >= row["lambda_max"]
    assert rows[0]["start"] == "gradient"
    assert rows[-1]["start"] == "previous"
    assert 0.0 <= rows[-1]["eigenvector_cosine"] <= 1.0 + 1e-9


def test_pyhessian_backend_restores_mode_and_grad():
    model, inputs, targets = _bn_problem()
    nn.CrossEntropyLoss()(model(inputs), targets).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    estimate = pyhessian_top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, max_iter=50)
    assert model.training
    for p, grad in zip(model.parameters(), grads):
        assert torch.equal(p.grad, grad)
    assert estimate.hvp_count >= 2
    model.eval()
    ours = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, max_iter=60, tol=1e-6)
    assert estimate.lambda_max == pytest.approx(ours.lambda_max, rel=1e-2)


def test_dropout_is_disabled_during_a_solve_and_recorded():
    """With dropout active every product would see a new mask and Lanczos would not converge."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    inputs, targets = torch.randn(20, 5), torch.randint(0, 3, (20,))
    estimate = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, max_iter=60, tol=1e-8,
                              hvp_method="forward_over_reverse")
    assert estimate.dropout == "disabled"
    assert estimate.converged
    assert model[2].training
    model.eval()
    reference = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, max_iter=60, tol=1e-8)
    assert estimate.lambda_max == pytest.approx(reference.lambda_max, rel=1e-6)


@pytest.mark.parametrize("start", [None, (1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)])
def test_lanczos_zero_hessian_converges_at_once(start):
    """A zero Hessian (for example over parameters the loss is linear in) used to run all
    max_iter products and report converged=False. A Gaussian vector with Hv = 0 shows
    that H is zero on the space it came from."""
    start = None if start is None else torch.tensor(start, dtype=torch.float64)
    estimate = lanczos(lambda v: 0 * v, 8, k=3, max_iter=50, start=start, generator=torch.Generator().manual_seed(0))
    assert estimate.converged
    assert estimate.hvp_count == (1 if start is None else 2)
    assert estimate.lambda_max == 0.0
    assert estimate.eigenvalues == [0.0, 0.0, 0.0]


def test_lanczos_identity_block_after_an_eigenvector_start():
    """From the top eigenvector of diag(5, 1, ..., 1), the restart's Gaussian vector is an
    eigenvector of value 1, which then fills the remaining seven dimensions."""
    matrix = _matrix((5.0,) + (1.0,) * 7)
    estimate = lanczos(lambda v: matrix @ v, 8, k=3, tol=1e-8, start=torch.eye(8, dtype=torch.float64)[0],
                       generator=torch.Generator().manual_seed(0))
    assert estimate.converged
    assert estimate.hvp_count == 2
    assert estimate.eigenvalues == pytest.approx([5.0, 1.0, 1.0], abs=1e-12)
    assert estimate.lambda_2 == pytest.approx(1.0, abs=1e-12)


def _bias_at_optimum():
    """Least squares whose bias sits at its optimum: the gradient has no bias component,
    and the bias direction is the top eigenvector of the Hessian, with eigenvalue 2."""
    torch.manual_seed(0)
    inputs = torch.randn(200, 60, dtype=torch.float64) * torch.logspace(0, -1.5, 60, dtype=torch.float64) * 0.6
    inputs -= inputs.mean(0)
    targets = torch.randn(200, 1, dtype=torch.float64)
    model = nn.Linear(60, 1).double()
    with torch.no_grad():
        model.bias += targets.mean() - model(inputs).mean()
    return model, inputs, targets


def _squared_error(outputs, targets):
    return (outputs - targets).square().mean()


def test_gradient_start_orthogonal_to_top_eigenvector():
    """The loss gradient had no weight on the top eigenvector, so the Krylov space never saw
    it: λ_max 0.886 was reported as converged where the dense value is 2."""
    model, inputs, targets = _bias_at_optimum()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, _squared_error, inputs, targets))[-1].item()
    rng = torch.get_rng_state()
    estimate = top_eigenvalue(model, _squared_error, inputs, targets, tol=1e-6)
    assert exact == pytest.approx(2.0, rel=1e-12)
    assert estimate.converged
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-6)
    assert torch.equal(torch.get_rng_state(), rng)  # the Gaussian part came from the solve's own generator


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(40, 1), nn.Linear(40, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


def test_probe_warm_start_finds_a_new_sharp_direction():
    """Two heads with separate loss terms: head b's term is off at the first solve, so the
    eigenvector lies in head a, then b turns sharp. The warm start had no weight on head b,
    and the probe reported head a's value as converged."""
    torch.manual_seed(0)
    model = TwoHeads().double()
    inputs, targets = torch.randn(64, 40, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    scale = {"b": 0.0}

    def loss_fn(outputs, targets_):
        return _squared_error(outputs[:, 0], targets_[:, 0]) + scale["b"] * _squared_error(outputs[:, 1], targets_[:, 1])

    probe = SharpnessProbe(inputs, targets, tol=1e-6, max_iter=100)
    first = probe.measure(model, loss_fn)
    scale["b"] = 3.0
    second = probe.measure(model, loss_fn)
    exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs, targets))[-1].item()
    assert probe.last_start == "previous"
    assert second.lambda_max > first.lambda_max * 2
    assert second.lambda_max == pytest.approx(exact, rel=1e-6)


def test_lanczos_float32_products_find_repeated_eigenvalues():
    """Least squares with a 3-output linear layer repeats each eigenvalue three times. With
    float32 products β never fell below the float64 invariance level of 1e-10·‖H‖, so the
    solve reported four distinct values as converged instead of the triple top value."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False)
    inputs, targets = torch.randn(40, 5), torch.randn(40, 3)
    operator = HessianOperator(model, _squared_error, inputs, targets)
    estimate = lanczos(operator, operator.dim, k=4, tol=1e-6, max_iter=15, generator=torch.Generator().manual_seed(1))
    exact = torch.linalg.eigvalsh(_dense_hessian(model, _squared_error, inputs, targets).double()).flip(0)[:4]
    assert estimate.converged
    assert estimate.eigenvalues == pytest.approx(exact.tolist(), rel=1e-5)


def test_start_shapes_and_dtypes_before_mixing():
    """The Gaussian mixing broadcast a (dim, 1) start to (dim, dim), failed on an integer
    start, and replaced a start whose norm overflows with pure noise instead of rejecting it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    inputs, targets = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    exact = torch.linalg.eigvalsh(_dense_hessian(model, _squared_error, inputs, targets))[-1].item()
    for start in (torch.ones(4, 1), torch.ones(4, dtype=torch.int64)):
        estimate = top_eigenvalue(model, _squared_error, inputs, targets, start=start, tol=1e-8)
        assert estimate.lambda_max == pytest.approx(exact, rel=1e-8)
    with pytest.raises(ValueError, match="must be finite and non-zero, not of norm inf"):
        top_eigenvalue(model, _squared_error, inputs, targets, start=torch.full((4,), 1e200, dtype=torch.float64))

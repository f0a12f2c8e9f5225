"""λ_max estimates against exact values (eigvalsh of the full Hessian) and against pyhessian."""

import math
import pickle
import warnings

import pytest
import torch
from torch import nn

from probes.hessian import HessianOperator, lanczos_top_eigen, top_eigenvalue
from probes.sharpness import SharpnessProbe


def _matrix_operator(matrix):
    return lambda v: matrix @ v


@pytest.mark.parametrize("diagonal, expected", [((-5.0, 3.0, 1.0), 3.0), ((4.0, -4.0, 1.0), 4.0)])
def test_lanczos_returns_largest_algebraic_eigenvalue(diagonal, expected):
    """A power iteration would return −5 for diag(−5, 3, 1); Lanczos must return 3."""
    matrix = torch.diag(torch.tensor(diagonal, dtype=torch.float64))
    estimate = lanczos_top_eigen(_matrix_operator(matrix), 3, generator=torch.Generator().manual_seed(0))
    assert estimate.converged
    assert estimate.lambda_max == pytest.approx(expected, abs=1e-10)


def test_lanczos_with_bulk_and_outliers():
    generator = torch.Generator().manual_seed(1)
    dim = 200
    eigenvalues = torch.rand(dim, generator=generator, dtype=torch.float64)
    eigenvalues[:2] = torch.tensor([50.0, 20.0], dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    estimate = lanczos_top_eigen(_matrix_operator(matrix), dim, max_iter=60, tol=1e-8, generator=generator)
    assert estimate.converged
    assert estimate.lambda_max == pytest.approx(50.0, rel=1e-8)
    assert estimate.lambda_2 == pytest.approx(20.0, rel=1e-3)
    residual = (matrix @ estimate.vector - estimate.lambda_max * estimate.vector).norm().item()
    assert residual <= 1e-6 * 50


def test_lanczos_warns_when_not_converged():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        estimate = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, max_iter=2, tol=1e-12)
    assert not estimate.converged
    assert estimate.hvp_count == 2


def _tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    inputs = torch.randn(10, 3, dtype=torch.float64)
    targets = torch.randint(0, 2, (10,))
    return model, inputs, targets


def _full_hessian(model, loss_fn, inputs, targets):
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(vector):
        pieces = torch.split(vector, [s.numel() for s in shapes])
        state = {name: piece.view(shape) for (name, _), piece, shape in zip(model.named_parameters(), pieces, shapes)}
        return loss_fn(torch.func.functional_call(model, state, (inputs,)), targets)

    return torch.autograd.functional.hessian(loss_of, flat)


def test_lambda_max_matches_eigvalsh_of_full_hessian():
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    exact = torch.linalg.eigvalsh(_full_hessian(model, loss_fn, inputs, targets))[-1].item()
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, max_iter=40, tol=1e-10)
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-8)


def test_chunked_products_match_single_batch():
    model, inputs, targets = _tiny_problem()
    loss_fn = nn.CrossEntropyLoss()
    whole = HessianOperator(model, loss_fn, inputs, targets)
    chunked = HessianOperator(model, loss_fn, inputs, targets, chunk_size=4)  # chunks of 4, 4, 2
    assert [len(t) for _, t in chunked.chunks] == [4, 4, 2]
    vector = torch.randn(whole.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(chunked(vector), whole(vector), rtol=1e-10, atol=1e-12)


class SmallCNN(nn.Module):
    def __init__(self, batch_norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4) if batch_norm else nn.Identity()
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        return self.head(nn.functional.max_pool2d(x, 2).flatten(1))


def test_lambda_max_matches_pyhessian_on_small_cnn():
    import pyhessian  # a test dependency: a missing install must fail, not skip
    torch.manual_seed(0)
    model = SmallCNN()
    inputs, targets = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    ours = top_eigenvalue(model, loss_fn, inputs, targets, max_iter=60, tol=1e-6)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pyhessian.hessian(model, loss_fn, data=(inputs, targets), cuda=False)
        top, _ = reference.eigenvalues(maxIter=300, tol=1e-7)
    assert ours.converged
    assert ours.lambda_max == pytest.approx(top[0], rel=1e-3)


def _snapshot(model):
    return {
        "modes": [m.training for m in model.modules()],
        "buffers": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def test_sharpness_probe_leaves_model_unchanged():
    torch.manual_seed(0)
    model = SmallCNN(batch_norm=True)
    model.train()
    model.head.eval()  # a mixed-mode model must come back mixed
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    nn.CrossEntropyLoss()(model(inputs), targets).backward()  # fills .grad and BN running stats
    model.conv.bias.grad = None
    before = _snapshot(model)

    probe = SharpnessProbe(inputs, targets, bn_mode="train", max_iter=10)
    for _ in range(3):
        probe.measure(model, nn.CrossEntropyLoss())

    after = _snapshot(model)
    assert after["modes"] == before["modes"]
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value), name
    assert after["grad_ids"] == before["grad_ids"]
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(after["rng"], before["rng"])


def test_sharpness_probe_warm_start_uses_fewer_products():
    model, inputs, targets = _tiny_problem()
    probe = SharpnessProbe(inputs, targets, max_iter=50, tol=1e-6)
    cold = probe.measure(model, nn.CrossEntropyLoss())
    warm = probe.measure(model, nn.CrossEntropyLoss())
    assert warm.lambda_max == pytest.approx(cold.lambda_max, rel=1e-6)
    assert warm.hvp_count < cold.hvp_count


@pytest.mark.parametrize("start, expected", [
    ("auto", ["gradient", "previous", "previous", "gradient"]),
    ("previous", ["gradient", "previous", "previous", "previous"]),
    ("gradient", ["gradient", "gradient", "gradient", "gradient"]),
])
def test_sharpness_probe_start_choice(start, expected):
    """Under "auto", a turned eigenvector (|cos| below 0.5) sends the next solve back to the gradient."""
    model, inputs, targets = _tiny_problem()
    probe = SharpnessProbe(inputs, targets, max_iter=50, tol=1e-6, start=start)
    starts, cosines = [], []
    for call in range(4):
        if call == 3:
            probe.cosine[False] = 0.2  # as if the eigenvector had turned between the last two calls
        probe.measure(model, nn.CrossEntropyLoss())
        starts.append(probe.last_start)
        cosines.append(probe.cosine[False])
    assert starts == expected
    assert math.isnan(cosines[0])
    assert cosines[1] == pytest.approx(1.0, abs=1e-6)  # same parameters: the same eigenvector


def test_sharpness_probe_cosine_survives_resume():
    model, inputs, targets = _tiny_problem()
    probe = SharpnessProbe(inputs, targets, max_iter=50, tol=1e-6)
    for _ in range(2):
        probe.measure(model, nn.CrossEntropyLoss())
    restored = SharpnessProbe(inputs, targets, max_iter=50, tol=1e-6)
    restored.load_state_dict(probe.state_dict())
    assert restored.cosine == probe.cosine
    assert torch.equal(restored.previous[False], probe.previous[False])


def test_sharpness_probe_rejects_unknown_start():
    model, inputs, targets = _tiny_problem()
    with pytest.raises(ValueError, match="invalid start='warm'"):
        SharpnessProbe(inputs, targets, start="warm")
    # Set after construction, a typo used to fall through to the previous eigenvector.
    probe = SharpnessProbe(inputs, targets, start="gradient")
    with pytest.raises(ValueError, match="invalid start='gradeint'"):
        probe.start = "gradeint"
    assert probe.start == "gradient"


def test_probe_reads_old_pickles():
    """Before ``start`` became a checked property it was a plain attribute, and older
    probes had no ``_step_rows``, ``group`` or ``_batch_size``: such pickles used to fail
    at their first solve with AttributeError."""
    _, inputs, targets = _tiny_problem()
    probe = SharpnessProbe(inputs, targets, start="gradient")
    old = probe.__dict__
    old["start"] = old.pop("_start")
    for name in ("_step_rows", "group", "_batch_size"):
        del old[name]
    restored = pickle.loads(pickle.dumps(probe))
    assert restored.start == "gradient"
    assert restored._start_vector(False, 10) is None  # the first solve starts from the gradient
    assert (restored._step_rows, restored.group, restored._batch_size) == ((-1, []), None, None)
    fresh = pickle.loads(pickle.dumps(SharpnessProbe(inputs, targets, start="previous")))
    assert fresh.start == "previous"


def test_probe_pickle_invalid_start():
    """Versions before the setter accepted start='gradeint', which then meant 'previous'."""
    _, inputs, targets = _tiny_problem()
    probe = SharpnessProbe(inputs, targets)
    probe.__dict__["start"] = "gradeint"
    del probe.__dict__["_start"]
    with pytest.raises(ValueError, match="invalid start='gradeint'"):
        pickle.loads(pickle.dumps(probe))


@pytest.mark.parametrize("options, message", [
    ({"tol": -1e-3}, "invalid tol=-0.001"),
    ({"tol": float("nan")}, "invalid tol=nan"),
    ({"max_iter": 0}, "invalid max_iter=0"),
])
def test_sharpness_probe_rejects_bad_budget(options, message):
    """These used to pass construction and fail only at the first solve, inside training."""
    _, inputs, targets = _tiny_problem()
    with pytest.raises(ValueError, match=message):
        SharpnessProbe(inputs, targets, **options)

"""Regression tests for the Hessian operator: parameters the loss does not reach, random
numbers drawn outside ``nn.Dropout``, and the checks of its inputs.

References are exact: the dense Hessian of a tiny float64 model from
``torch.autograd.functional.hessian`` and its eigenvalues from ``torch.linalg.eigvalsh``.
"""

import logging
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from dynamics.data import TensorLoader
from dynamics.trainer import TrainConfig, Trainer
from probes import HessianOperator, HessianUnsupportedError, SharpnessProbe, hutchinson_trace, lanczos, top_eigenvalue
from probes.hessian import check_tol, power_iteration
from test_sharpness_engine import _unsupported_model

METHODS = ["auto", "double_backward", "forward_over_reverse"]


def _dense_hessian(model, loss_fn, inputs, targets, seed=None, before_forward=None):
    """Return the dense Hessian over the trainable parameters.

    With ``seed``, every forward pass draws its random numbers from the global generator
    seeded with it, as a solve does for its first chunk. ``before_forward`` is called
    before every forward pass.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def loss_of(vector):
        pieces = torch.split(vector, [p.numel() for _, p in named])
        values = {name: piece.view_as(p) for (name, p), piece in zip(named, pieces)}
        if seed is not None:
            torch.manual_seed(seed)
        if before_forward is not None:
            before_forward()
        return loss_fn(torch.func.functional_call(model, values, (inputs,)), targets)

    with torch.random.fork_rng(devices=[]):
        return torch.autograd.functional.hessian(loss_of, flat)


class UnusedHead(nn.Module):
    """An MLP with an auxiliary head that this loss never reaches."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)
        self.aux = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class FunctionalDropout(nn.Module):
    """Dropout through ``F.dropout``, which switching ``nn.Dropout`` modules off does not reach."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(nn.functional.dropout(torch.tanh(self.body(x)), 0.5, self.training))


class OwnGeneratorDropout(nn.Module):
    """Dropout whose mask comes from a generator the module holds, which no global seed reaches."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)
        self.generator = torch.Generator().manual_seed(5)

    def forward(self, x):
        hidden = torch.tanh(self.body(x))
        if self.training:
            hidden = hidden * torch.bernoulli(torch.full_like(hidden, 0.5), generator=self.generator) * 2
        return self.head(hidden)


class NoisyLoss(nn.Module):
    """Cross-entropy with per-sample weights drawn from a generator stored in the loss."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(9)

    def forward(self, outputs, targets):
        weights = torch.rand(len(targets), generator=self.generator, dtype=outputs.dtype) + 0.5
        return (nn.functional.cross_entropy(outputs, targets, reduction="none") * weights).mean()


def _batch(size=16):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (size,), generator=generator)


@pytest.mark.parametrize("chunk_size", [None, 5])
@pytest.mark.parametrize("method", METHODS)
def test_unused_parameters_have_zero_hessian(method, chunk_size):
    """An auxiliary head outside the loss used to raise autograd's "appears to not have
    been used in the graph" on double backward (so also under auto)."""
    torch.manual_seed(0)
    model = UnusedHead().double()
    inputs, targets = _batch()
    loss_fn = nn.CrossEntropyLoss()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs, targets))[-1].item()
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, tol=1e-9, max_iter=100, hvp_method=method,
                              chunk_size=chunk_size)
    assert estimate.converged
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-8)
    aux = slice(-sum(p.numel() for p in model.aux.parameters()), None)
    # The Gaussian part of the start decays there like (0/λ_max)^k: only rounding is left.
    assert estimate.vector[aux].abs().max() < 1e-8


def test_gradient_independent_of_parameters():
    """A loss linear in a parameter has a gradient without a graph there, so its Hessian
    rows are zero. Double backward used to fail on that gradient, which does not require grad."""
    model = nn.Linear(3, 1).double()
    loss_fn = lambda outputs, targets: (outputs.squeeze(1) * targets).mean()  # noqa: E731
    inputs, targets = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    operator = HessianOperator(model, loss_fn, inputs, targets, method="double_backward")
    assert torch.count_nonzero(operator(torch.ones(operator.dim, dtype=torch.float64))) == 0


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("method", METHODS)
def test_functional_dropout_mask_is_fixed(method, chunk_size):
    """Dropout through F.dropout stayed on during a solve: each product that reran the
    forward pass drew a new mask, so the operator was not even symmetric, the row recorded
    dropout="absent", and the probe moved training's random stream. Now every product of
    a chunk draws the same mask and the global RNG is left as it was."""
    torch.manual_seed(0)
    model = FunctionalDropout().double().train()
    inputs, targets = _batch()
    loss_fn = nn.CrossEntropyLoss()
    before = torch.get_rng_state()
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, tol=1e-9, max_iter=100, hvp_method=method,
                              chunk_size=chunk_size)
    assert torch.equal(torch.get_rng_state(), before)
    assert estimate.dropout == "mask fixed"
    assert estimate.converged
    if chunk_size is None:  # one chunk, one mask: the Hessian of the loss with that mask
        exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs, targets, seed=0))[-1].item()
        assert estimate.lambda_max == pytest.approx(exact, rel=1e-8)
    else:  # each chunk its own mask, the same in every product: a symmetric operator
        operator = HessianOperator(model, loss_fn, inputs, targets, chunk_size=chunk_size, method=method)
        u, v = torch.randn(2, operator.dim, dtype=torch.float64)
        assert torch.dot(u, operator(v)).item() == pytest.approx(torch.dot(v, operator(u)).item(), rel=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("method", METHODS)
def test_module_generator_mask_fixed(method, chunk_size):
    """A module that drew its mask from its own torch.Generator drew a new mask at every
    product: the operator was not symmetric, the row recorded dropout="absent", and the
    solve moved the generator, so training after a probe call saw other masks."""
    torch.manual_seed(0)
    model = OwnGeneratorDropout().double().train()
    inputs, targets = _batch()
    loss_fn = nn.CrossEntropyLoss()
    before = model.generator.get_state()
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, tol=1e-9, max_iter=100, hvp_method=method,
                              chunk_size=chunk_size)
    assert torch.equal(model.generator.get_state(), before)
    assert estimate.dropout == "mask fixed"
    assert estimate.converged
    if chunk_size is None:  # the Hessian of the loss with the mask drawn first from the saved state
        exact = torch.linalg.eigvalsh(_dense_hessian(model, loss_fn, inputs, targets,
                                                     before_forward=lambda: model.generator.set_state(before)))
        assert estimate.lambda_max == pytest.approx(exact[-1].item(), rel=1e-8)
    else:
        operator = HessianOperator(model, loss_fn, inputs, targets, chunk_size=chunk_size, method=method)
        u, v = torch.randn(2, operator.dim, dtype=torch.float64)
        assert torch.dot(u, operator(v)).item() == pytest.approx(torch.dot(v, operator(u)).item(), rel=1e-10)
        operator.release()
        assert torch.equal(model.generator.get_state(), before)


@pytest.mark.parametrize("method", METHODS)
def test_loss_generator_mask_fixed(method):
    """A loss module that drew sample weights from its own generator moved it at every
    product: the chunked operator was not symmetric and the row recorded dropout="absent"."""
    torch.manual_seed(0)
    model, loss_fn = UnusedHead().double(), NoisyLoss()
    inputs, targets = _batch()
    before = loss_fn.generator.get_state()
    estimate = top_eigenvalue(model, loss_fn, inputs, targets, tol=1e-9, max_iter=100, hvp_method=method,
                              chunk_size=7)
    assert torch.equal(loss_fn.generator.get_state(), before)
    assert estimate.dropout == "mask fixed"
    operator = HessianOperator(model, loss_fn, inputs, targets, chunk_size=7, method=method)
    u, v = torch.randn(2, operator.dim, dtype=torch.float64)
    assert torch.dot(u, operator(v)).item() == pytest.approx(torch.dot(v, operator(u)).item(), rel=1e-10)


@pytest.mark.parametrize("model_class, loss_class", [
    (FunctionalDropout, nn.CrossEntropyLoss),
    (OwnGeneratorDropout, nn.CrossEntropyLoss),
    (UnusedHead, NoisyLoss),
])
def test_probe_keeps_training_with_dropout(model_class, loss_class):
    """Training with a sharpness probe every step gives the same parameters, bit for bit,
    as training without it, on models whose random draws the probe cannot switch off.
    With a generator stored in the model or the loss, the probe's forward passes used to
    move it, so every later training step drew other numbers."""
    def train(with_probe):
        torch.manual_seed(0)
        model = model_class().train()
        inputs, targets = torch.randn(32, 5), torch.randint(0, 3, (32,))
        probes = [SharpnessProbe(inputs[:8], targets[:8], every_steps=1, max_iter=10)] if with_probe else []
        loader = TensorLoader(inputs, targets, 8, shuffle=True, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        result = Trainer(model, loss_class(), loader, loader, optimizer, TrainConfig(2, progress=False),
                         probes).fit()
        return model, result

    plain, _ = train(False)
    probed, result = train(True)
    assert {row["dropout"] for row in result.recorder.rows("sharpness")} == {"mask fixed"}
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)


def test_nn_dropout_still_disabled():
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    inputs, targets = _batch()
    estimate = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, tol=1e-9, max_iter=100)
    model.eval()
    exact = torch.linalg.eigvalsh(_dense_hessian(model, nn.CrossEntropyLoss(), inputs, targets))[-1].item()
    assert estimate.dropout == "disabled"
    assert estimate.lambda_max == pytest.approx(exact, rel=1e-8)


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double(), *_batch()


@pytest.mark.parametrize("change, message", [
    (lambda x, y: (x, y[:10]), r"inputs and targets differ in length \(16 and 10\)"),
    (lambda x, y: (x[:0], y[:0]), r"the sharpness batch is empty"),
])
def test_operator_rejects_bad_batches(change, message):
    """A shorter target tensor used to cut the inputs silently to its length."""
    model, inputs, targets = _small()
    with pytest.raises(ValueError, match=message):
        top_eigenvalue(model, nn.CrossEntropyLoss(), *change(inputs, targets))


@pytest.mark.parametrize("options, message", [
    ({"chunk_size": 0}, r"invalid chunk_size=0: expected an integer >= 1"),
    ({"chunk_size": 2.5}, r"invalid chunk_size=2.5"),
    ({"max_iter": 2.5}, r"invalid max_iter=2.5: expected an integer >= 1"),
    ({"max_iter": 0, "estimator": "power"}, r"invalid max_iter=0"),
    ({"tol": 5}, r"invalid tol=5: expected a number in \[0, 1\)"),
    ({"tol": True}, r"invalid tol=True"),
    ({"start": torch.ones(5, dtype=torch.float64)}, r"has 5 entries, but the operator acts on 39"),
    ({"preconditioner": torch.ones(5)}, r"flat vector of 39 finite positive entries"),
    ({"preconditioner": -torch.ones(39)}, r"flat vector of 39 finite positive entries"),
])
def test_top_eigenvalue_rejects_bad_options(options, message):
    model, inputs, targets = _small()
    with pytest.raises(ValueError, match=message):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, **options)


def test_no_trainable_parameter_is_named():
    model, inputs, targets = _small()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets)


def test_solver_counts_must_be_integers():
    matrix = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"invalid k=2.0"):
        lanczos(lambda v: matrix @ v, 3, k=2.0)
    with pytest.raises(ValueError, match=r"invalid samples=2.5"):
        hutchinson_trace(lambda v: matrix @ v, 3, samples=2.5)
    with pytest.raises(ValueError, match=r"invalid tol=1.0"):
        check_tol(1.0)


def test_unconverged_power_iteration_returns_its_own_vector():
    """An unconverged power iteration used to return the next iterate, not the vector
    whose Rayleigh quotient and residual it reported."""
    generator = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(20, 20, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.linspace(1.0, 2.0, 20, dtype=torch.float64)) @ basis.T
    estimate = power_iteration(lambda v: matrix @ v, 20, max_iter=4, tol=1e-12, generator=generator)
    assert not estimate.converged
    v = estimate.vector
    assert torch.dot(v, matrix @ v).item() == pytest.approx(estimate.lambda_max, rel=1e-12)
    assert (matrix @ v - estimate.lambda_max * v).norm().item() == pytest.approx(estimate.residual, rel=1e-10)


def test_auto_names_the_module_without_second_derivative():
    """Under auto, the error used to list both paths' raw messages without the module."""
    model = _unsupported_model()
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(HessianUnsupportedError, match=r"module '1' \(FusedSquare\).*Forward-over-reverse failed too"):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, hvp_method="auto")


def test_auto_nan_parameters_blame_no_path(caplog):
    """A NaN parameter used to log "forward_over_reverse failed (its product differed ... by nan)"
    before the clear error."""
    model, inputs, targets = _small()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with caplog.at_level(logging.WARNING), pytest.raises(FloatingPointError, match="not finite"):
        top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, hvp_method="auto", start=torch.ones(39))
    assert "differed" not in caplog.text


class NumpyNoise(nn.Module):
    """A forward pass that draws its noise from numpy and Python's random module."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 3)

    def forward(self, x):
        noise = torch.as_tensor(np.random.rand(*x.shape), dtype=x.dtype) + random.random()
        return self.body(torch.tanh(x + noise))


def test_numpy_and_python_draws_are_fixed_and_restored():
    """Draws from numpy and Python's random module used to move training's streams and
    change at every product."""
    model = NumpyNoise().double()
    inputs, targets = _batch()
    numpy_before, python_before = np.random.get_state(), random.getstate()
    estimate = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, tol=1e-9, max_iter=100,
                              hvp_method="double_backward", chunk_size=7)
    assert estimate.dropout == "mask fixed"
    assert estimate.converged
    assert np.array_equal(np.random.get_state()[1], numpy_before[1])
    assert np.random.get_state()[2] == numpy_before[2]
    assert random.getstate() == python_before


def test_tol_accepts_numpy_floats():
    check_tol(np.float32(1e-3))
    check_tol(np.float64(1e-3))


def test_chunked_products_see_the_same_spectral_norm():
    """nn.utils.spectral_norm advances its power-iteration vector at every train-mode forward.
    Chunked products re-ran the forward, so each product saw another function: λ_max with
    chunks of 8 differed from the single-batch value, both reported as converged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.spectral_norm(nn.Linear(4, 8)), nn.Tanh(), nn.Linear(8, 3)).double().train()
    inputs, targets = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    saved = {name: buffer.clone() for name, buffer in model.named_buffers()}
    values = []
    for chunk_size in (None, 8):
        estimate = top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, chunk_size=chunk_size,
                                  hvp_method="double_backward", tol=1e-8, max_iter=100)
        assert all(torch.equal(saved[name], buffer) for name, buffer in model.named_buffers())  # left as found
        values.append(estimate.lambda_max)
    assert values[1] == pytest.approx(values[0], rel=1e-10)


def test_batchnorm_one_input_chunk_rejected():
    """A chunk_size leaving one input in the last chunk ended the run at its first solve with
    torch's "Expected more than 1 value per channel", which does not mention chunk_size. A
    convolutional BatchNorm with one input of several pixels has enough values and runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()
    inputs, targets = torch.randn(17, 4), torch.randint(0, 3, (17,))
    for method in ("auto", "double_backward", "forward_over_reverse"):
        with pytest.raises(ValueError, match=r"batch of 17 inputs is cut into chunks of \[1, 8\] inputs"):
            top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, chunk_size=8, hvp_method=method)
    model.eval()
    assert top_eigenvalue(model, nn.CrossEntropyLoss(), inputs, targets, chunk_size=8).converged
    convolutional = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 3))
    images, labels = torch.randn(3, 1, 4, 4), torch.randint(0, 3, (3,))
    assert top_eigenvalue(convolutional.train(), nn.CrossEntropyLoss(), images, labels, chunk_size=2).converged

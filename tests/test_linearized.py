"""Forward-over-reverse products with the primal pass done once per solve (probes.linearized)."""

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import probes.linearized as linearized
from probes import HessianOperator, HessianUnsupportedError
from probes.hessian import solve_mode, top_eigenvalue
from test_sharpness_engine import BatchNormCNN


class BranchOnValue(BatchNormCNN):
    """A model whose Python control flow reads a tensor value: a trace would freeze the branch."""

    def forward(self, x):
        scale = 2.0 if x.mean() > 0 else 0.5
        return super().forward(x * scale)


def _problem(model_class=BatchNormCNN):
    torch.manual_seed(0)
    return model_class().train(), torch.randn(24, 1, 8, 8), torch.randint(0, 3, (24,))


def _dense(model, loss_fn, inputs, targets):
    """Return (gradient, Hessian) of the loss at the current parameters, in float64.

    By ``torch.autograd.functional`` (reverse over reverse), independent of the
    forward-mode path under test. (``torch.func.hessian`` disagrees with finite
    differences on train-mode BatchNorm in torch 2.13, so it is not the reference.)
    """
    names = [name for name, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss_of(flat):
        pieces = torch.split(flat, [p.numel() for p in params])
        state = {name: piece.view_as(p) for name, piece, p in zip(names, pieces, params)}
        return loss_fn(torch.func.functional_call(model, state, (inputs,)), targets)

    flat = torch.cat([p.reshape(-1) for p in params]).double()
    model.double()
    try:
        flat.requires_grad_(True)
        gradient = torch.autograd.grad(loss_of(flat), flat)[0]
        return gradient, torch.autograd.functional.hessian(loss_of, flat.detach())
    finally:
        model.float()


@pytest.mark.parametrize("train_mode", [True, False])
def test_split_product_matches_dense(train_mode):
    """The split product equals H·v from the dense Hessian, and its gradient equals ∇L, in both BatchNorm modes."""
    model, inputs, targets = _problem()
    model.train(train_mode)
    loss_fn = nn.CrossEntropyLoss()
    with solve_mode(model):
        gradient, hessian = _dense(model, loss_fn, inputs.double(), targets)
        operator = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")
        vector = torch.randn(operator.dim, dtype=torch.float64)
        product = operator(vector)
        found_gradient = operator.gradient()
    assert operator.split_fallback_reason == ""
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(found_gradient, gradient, rtol=1e-4, atol=1e-6)


def test_split_traced_once_per_signature(monkeypatch):
    """A second solve after an optimizer step reuses the trace and uses the new parameters.
    A change of module mode traces again."""
    traces = []
    original = linearized.split_product
    monkeypatch.setattr(linearized, "split_product", lambda *args: traces.append(1) or original(*args))
    model, inputs, targets = _problem()
    loss_fn = nn.CrossEntropyLoss()
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        with solve_mode(model):
            product = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
            _, hessian = _dense(model, loss_fn, inputs.double(), targets)
        torch.testing.assert_close(product, hessian @ vector, rtol=1e-4, atol=1e-4)
        optimizer.zero_grad()
        loss_fn(model(inputs), targets).backward()
        optimizer.step()
    assert len(traces) == 1
    model.eval()
    with solve_mode(model):
        HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
    assert len(traces) == 2


def test_value_branching_model_falls_back(caplog):
    """A model that branches on a tensor value is not traced, the reason is logged, and the
    plain torch.func product still equals the dense one."""
    model, inputs, targets = _problem(BranchOnValue)
    loss_fn = nn.CrossEntropyLoss()
    with caplog.at_level(logging.INFO, logger="probes.hessian"), solve_mode(model):
        operator = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")
        vector = torch.randn(operator.dim, dtype=torch.float64)
        product = operator(vector)
        _, hessian = _dense(model, loss_fn, inputs.double(), targets)
    assert "tensor value" in operator.split_fallback_reason
    assert "recompute the primal pass" in caplog.text
    torch.testing.assert_close(product, hessian @ vector, rtol=1e-4, atol=1e-4)


def test_identity_copies_bypassed():
    """Same-dtype ``_to_copy`` and same-shape ``expand`` nodes are bypassed; a real dtype
    conversion and a copy written to in place stay."""
    aten = torch.ops.aten

    def function(x):
        same = aten._to_copy(x, dtype=torch.float32) * 2
        wider = aten._to_copy(x, dtype=torch.float64)
        written = aten._to_copy(x, dtype=torch.float32)
        written.add_(1)
        return same + aten.expand(x, [3, 4]), wider, written

    x = torch.randn(3, 4)
    graph_module = make_fx(function)(x)
    expected = graph_module(x)
    assert linearized._drop_identity_copies(graph_module.graph) == 2
    graph_module.recompile()
    remaining = [node for node in graph_module.graph.nodes if linearized._packet_name(node) == "_to_copy"]
    assert len(remaining) == 2
    for found, value in zip(graph_module(x), expected):
        torch.testing.assert_close(found, value)


class TwoConv(nn.Module):
    """Two convolutions, so that the second one's backward computes an input gradient."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.second = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.second(torch.relu(self.norm(self.first(x)))))
        return self.head(nn.functional.avg_pool2d(x, 2).flatten(1))


def _convolution_masks(graph_module):
    """Return the (input, weight) gradient flags of each ``convolution_backward``."""
    return [tuple(node.args[-1][:2]) for node in graph_module.graph.nodes
            if linearized._packet_name(node) == "convolution_backward"]


@pytest.mark.parametrize("train_mode", [True, False])
def test_lean_primal_skips_parameter_gradients(train_mode):
    """The lean primal part computes no convolution weight gradient and binds the same values."""
    model, inputs, targets = _problem(TwoConv)
    model.train(train_mode)
    loss_fn = nn.CrossEntropyLoss()
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    with solve_mode(model):
        split, full, gradient = linearized.cached_split_product(model, names, loss_fn, 1.0, params, inputs, targets)
        _, lean, none = linearized.cached_split_product(model, names, loss_fn, 1.0, params, inputs, targets,
                                                        with_gradient=False)
        tangents = [torch.randn_like(p) for p in params]
        expected, found = split.product(full, tangents), split.product(lean, tangents)
    assert none is None
    assert len(gradient) == len(params)
    # The second convolution's backward computes both gradients in the full part and
    # only the input gradient in the lean part. (The lean part may still compute a
    # weight-gradient term that the tangent part reads, as in train mode here.)
    assert (True, True) in _convolution_masks(split.primal)
    assert (True, False) in _convolution_masks(split.primal_lean)
    assert (True, True) not in _convolution_masks(split.primal_lean)
    assert len(lean) == len(full)
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_warm_start_binds_lean_primal(monkeypatch):
    """A solve given a start vector binds without the gradient; one without it binds once, with it."""
    calls = []
    original = linearized.SplitProduct.bind

    def recording(self, params, state, inputs, targets, with_gradient=True):
        calls.append(with_gradient)
        return original(self, params, state, inputs, targets, with_gradient)

    model, inputs, targets = _problem(TwoConv)
    loss_fn = nn.CrossEntropyLoss()
    top_eigenvalue(model, loss_fn, inputs, targets, hvp_method="forward_over_reverse", max_iter=3, warn=False)
    monkeypatch.setattr(linearized.SplitProduct, "bind", recording)
    cold = top_eigenvalue(model, loss_fn, inputs, targets, hvp_method="forward_over_reverse", warn=False)
    assert calls == [True]
    calls.clear()
    warm = top_eigenvalue(model, loss_fn, inputs, targets, hvp_method="forward_over_reverse", start=cold.vector,
                          warn=False)
    assert calls == [False]
    assert warm.lambda_max == pytest.approx(cold.lambda_max, rel=1e-3)


def test_prune_output_masks_keeps_read_outputs():
    """Only the outputs that no node reads are switched off, and the graph's result stays the same."""
    aten = torch.ops.aten

    def function(grad_output, x, weight):
        parts = aten.convolution_backward(grad_output, x, weight, [0], [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                          [True, True, True])
        return parts[0]

    args = (torch.randn(2, 3, 5, 5), torch.randn(2, 2, 5, 5), torch.randn(3, 2, 3, 3))
    graph_module = make_fx(function)(*args)
    assert linearized._prune_output_masks(graph_module.graph) == 1
    node = next(n for n in graph_module.graph.nodes if linearized._packet_name(n) == "convolution_backward")
    assert node.args[-1] == [True, False, False]
    graph_module.recompile()
    torch.testing.assert_close(graph_module(*args), function(*args))


class Scaled(nn.Module):
    """An MLP with a frozen output scale, a float attribute and a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.scale = nn.Parameter(torch.ones(3), requires_grad=False)
        self.power = 1.0
        self.shift = torch.zeros(3)

    def forward(self, x):
        return (self.body(x) * self.scale + self.shift) ** self.power


class Focal(nn.Module):
    def __init__(self, gamma):
        super().__init__()
        self._gamma = gamma

    def forward(self, outputs, targets):
        log_p = nn.functional.log_softmax(outputs, dim=1).gather(1, targets[:, None]).squeeze(1)
        return (-(1 - log_p.exp()) ** self._gamma * log_p).mean()


SMOOTHING = 0.0
CONFIG = {"weight": 1.0}
TEMPERATURE = 1.0
GAIN = 1.0


class Slotted:
    __slots__ = ("gain",)

    def __init__(self):
        self.gain = 1.0


class Deep(nn.Module):
    """An MLP whose forward reads a module-level global, a class attribute, a field two
    config objects deep, a numpy array and a field of an object with ``__slots__``."""

    factor = 1.0

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
        self.cfg = Configured.Settings()
        self.cfg.model = Configured.Settings()
        self.cfg.model.offset = 1.0
        self.weights = np.ones(5)
        self.slotted = Slotted()

    def forward(self, x):
        hidden = self.body[0](x) * (TEMPERATURE * self.factor * self.cfg.model.offset * self.slotted.gain)
        return self.body[1](torch.tanh(hidden * torch.as_tensor(self.weights, dtype=hidden.dtype)))


class Configured(nn.Module):
    """An MLP whose forward reads a config dict entry, an activation attribute and a
    field of a plain config object."""

    class Settings:
        def __init__(self):
            self.offset = 0.0

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
        self.cfg = {"scale": 1.0}
        self.act = torch.tanh
        self.settings = self.Settings()

    def forward(self, x):
        return self.body[1](self.act(self.cfg["scale"] * self.body[0](x) + self.settings.offset))


def _gained(values):
    """A helper that reads a module-level global."""
    return values * GAIN


class Helped(nn.Module):
    """An MLP whose forward reads a global only through a helper function."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))

    def forward(self, x):
        return self.body[1](torch.tanh(_gained(self.body[0](x))))


def through_helper(outputs, targets):
    return nn.functional.cross_entropy(_gained(outputs), targets)


def smoothed(outputs, targets):
    return nn.functional.cross_entropy(outputs, targets, label_smoothing=SMOOTHING)


def _change_frozen(model, _):
    model.scale = nn.Parameter(torch.full((3,), 3.0), requires_grad=False)


def _change_float(model, _):
    model.power = 2.0


def _change_tensor_attribute(model, _):
    model.shift = torch.tensor([0.5, -1.0, 2.0])  # not uniform: cross-entropy ignores a uniform shift


def _change_global(model, _):
    global SMOOTHING
    SMOOTHING = 0.3


def _change_dict_entry(model, _):
    model.cfg["scale"] = 3.0


def _change_activation(model, _):
    model.act = torch.sigmoid


def _change_object_field(model, _):
    model.settings.offset = 0.7


def _change_closure_dict(model, _):
    CONFIG["weight"] = 4.0


def _change_module_global(model, _):
    global TEMPERATURE
    TEMPERATURE = 3.0


def _change_helper_global(model, _):
    global GAIN
    GAIN = 3.0


def _change_forward_helper_global(model, _):
    _change_helper_global(model, _)


def _change_class_attribute(model, _):
    type(model).factor = 3.0


def _change_nested_config(model, _):
    model.cfg.model.offset = 3.0


def _change_array_in_place(model, _):
    model.weights[:] = 3.0


def _change_slot(model, _):
    model.slotted.gain = 3.0


class Tempered:
    """A plain object whose bound method is the loss; the method reads its temperature."""

    def __init__(self):
        self.temperature = 1.0

    def loss(self, outputs, targets):
        return nn.functional.cross_entropy(outputs / self.temperature, targets)


TEMPERED = Tempered()


def _change_method_owner(model, _):
    TEMPERED.temperature = 0.25


DEEP_CHANGES = (_change_module_global, _change_class_attribute, _change_nested_config, _change_array_in_place,
                _change_slot)


def _make_weighted_loss():
    config = CONFIG

    def weighted(outputs, targets):
        return config["weight"] * nn.functional.cross_entropy(outputs, targets)

    return weighted


@pytest.mark.parametrize("change, loss_fn, changed_loss", [
    (_change_frozen, smoothed, None),
    (_change_float, smoothed, None),
    (_change_tensor_attribute, smoothed, None),
    (_change_global, smoothed, None),
    (None, Focal(0.0), Focal(3.0)),
    (_change_dict_entry, smoothed, None),
    (_change_activation, smoothed, None),
    (_change_object_field, smoothed, None),
    (_change_closure_dict, _make_weighted_loss(), None),
    *((change, smoothed, None) for change in DEEP_CHANGES),
    (_change_method_owner, TEMPERED.loss, None),
    (_change_helper_global, through_helper, None),
    (_change_forward_helper_global, smoothed, None),
])
def test_cached_split_sees_changed_values(change, loss_fn, changed_loss, monkeypatch):
    """Check that each value a trace would freeze, other than parameters and buffers, is part of the cache key.

    The first five cases were always keyed: a frozen parameter replaced, a float or
    tensor attribute, a global a loss reads, and a fresh loss with a different private
    setting. The others used to return the old Hessian: an entry of a config dict, a
    swapped activation function, a field of a config object, a dict in the loss's
    closure, a module-level global, a class attribute, a field two config objects deep,
    a numpy array changed in place, a ``__slots__`` field, an attribute of the object
    whose bound method is the loss, and a global read through a helper function that the
    loss or ``forward`` calls. Each solve after a change must match double backward.
    """
    monkeypatch.setattr(TEMPERED, "temperature", 1.0)
    monkeypatch.setitem(globals(), "SMOOTHING", 0.0)
    monkeypatch.setitem(CONFIG, "weight", 1.0)
    monkeypatch.setitem(globals(), "TEMPERATURE", 1.0)
    monkeypatch.setattr(Deep, "factor", 1.0)
    monkeypatch.setitem(globals(), "GAIN", 1.0)
    torch.manual_seed(0)
    if change in DEEP_CHANGES:
        model = Deep()
    elif change is _change_forward_helper_global:
        model = Helped()
    elif change in (_change_dict_entry, _change_activation, _change_object_field):
        model = Configured()
    else:
        model = Scaled()
    inputs, targets = torch.randn(12, 4), torch.randint(0, 3, (12,))
    vector = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad), dtype=torch.float64)
    for current in (loss_fn, changed_loss or loss_fn):
        split = HessianOperator(model, current, inputs, targets, method="forward_over_reverse")(vector)
        reference = HessianOperator(model, current, inputs, targets, method="double_backward")(vector)
        torch.testing.assert_close(split, reference, rtol=1e-4, atol=1e-5)
        if change is not None:
            change(model, current)


def test_trace_under_autocast_not_reused_outside():
    model, inputs, targets = _problem()
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
    split = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
    reference = HessianOperator(model, loss_fn, inputs, targets, method="double_backward")(vector)
    torch.testing.assert_close(split, reference, rtol=1e-4, atol=1e-5)


def test_cache_keeps_no_model_alive():
    """A loss that closes over the model, and a rejected trace, must not keep the model alive
    (the cache once held the loss and the rejection's traceback)."""
    import gc
    import weakref

    def run(model_class):
        model, inputs, targets = _problem(model_class)
        model.eval()

        def loss_fn(outputs, labels):
            return nn.functional.cross_entropy(outputs, labels) * (1.0 if model.training else 1.0)

        operator = HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")
        operator(torch.randn(operator.dim, dtype=torch.float64))
        return weakref.ref(model)

    references = [run(BatchNormCNN), run(BranchOnValue)]
    gc.collect()
    assert [reference() for reference in references] == [None, None]


def test_loss_reading_parameters_is_rejected():
    """An L2 term over model.parameters() in the loss is outside what forward-over-reverse can
    differentiate: the path raises naming the parameter, and auto keeps double backward."""
    model, inputs, targets = _problem()
    model.eval()

    def loss_fn(outputs, labels):
        return nn.functional.cross_entropy(outputs, labels) + 0.1 * sum(p.square().sum() for p in model.parameters())

    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with pytest.raises(HessianUnsupportedError, match="reads parameter 'conv.weight'"):
        HessianOperator(model, loss_fn, inputs, targets, method="forward_over_reverse")(vector)
    operator = HessianOperator(model, loss_fn, inputs, targets, method="auto")
    product = operator(vector)
    assert operator.method == "double_backward"
    reference = HessianOperator(model, loss_fn, inputs, targets, method="double_backward")(vector)
    torch.testing.assert_close(product, reference)


def test_mse_loss_falls_back_without_crashing():
    """Tracing the product of nn.MSELoss crashes torch 2.13 with a segmentation fault. The plain
    product runs first and fails cleanly, so auto keeps double backward. A subprocess contains a crash."""
    script = (
        "import torch\nfrom torch import nn\nfrom probes import top_eigenvalue\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))\n"
        "estimate = top_eigenvalue(model, nn.MSELoss(), torch.randn(16, 5), torch.randn(16, 3), warn=False)\n"
        "print(estimate.method)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("lanczos/double_backward")


def test_mse_forward_mode_error_message():
    """The error used to say that the loss had no second derivative, which MSE has."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(HessianUnsupportedError, match="hvp_method='double_backward'") as raised:
        top_eigenvalue(model, nn.MSELoss(), torch.randn(16, 5), torch.randn(16, 3), hvp_method="forward_over_reverse")
    assert "no second derivative" not in str(raised.value)


class SharedSubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)
        self.again = self.first  # one submodule under two names

    def forward(self, x):
        return self.out(torch.tanh(self.again(torch.tanh(self.first(x)))))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_shared_submodule_keeps_its_parameters(chunk_size):
    """functional_call alone left plain tensors in place of a twice-registered submodule's
    parameters, so they dropped out of training; both forward-over-reverse paths put them back."""
    torch.manual_seed(0)
    model, inputs, targets = SharedSubmodule(), torch.randn(8, 5), torch.randint(0, 3, (8,))
    parameters = list(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    vector = torch.randn(sum(p.numel() for p in parameters), dtype=torch.float64)
    product = HessianOperator(model, loss_fn, inputs, targets, chunk_size=chunk_size,
                              method="forward_over_reverse")(vector)
    reference = HessianOperator(model, loss_fn, inputs, targets, method="double_backward")(vector)
    torch.testing.assert_close(product, reference, rtol=1e-4, atol=1e-5)
    assert model.first.weight is parameters[0]
    assert isinstance(model.first.weight, nn.Parameter)


@pytest.mark.parametrize("chunk_size", [None, 2])  # the traced split, and the plain product
def test_first_product_emits_no_deprecation_warnings(chunk_size):
    """The first torch.func.jvp of a process loads torch's decompositions through
    torch.jit.script, which used to print 18 DeprecationWarnings into the user's run."""
    script = (
        "import torch\nfrom torch import nn\nfrom probes import top_eigenvalue\n"
        "model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))\n"
        "top_eigenvalue(model, nn.CrossEntropyLoss(), torch.randn(5, 3), torch.randint(0, 2, (5,)),\n"
        f"               hvp_method='forward_over_reverse', chunk_size={chunk_size})\n"
    )
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", script],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]


LOGGER = logging.getLogger("tests.helper_chain")
TABLE = [float(index) for index in range(200_000)]


def _third(x):
    LOGGER.debug("activation")  # a plain object three calls below forward
    return torch.tanh(x) if TABLE else x


def _second(x):
    return _third(x)


def _first(x):
    return _second(x)


class Chained(nn.Module):
    """An MLP whose activation sits three helper calls below ``forward``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))

    def forward(self, x):
        return self.body[1](_first(self.body[0](x)))


def test_helper_chain_traces_once(monkeypatch):
    """An object at the depth limit was keyed by the identity of a dict built afresh at
    every call, so a logger three helper calls down made every solve trace again."""
    traces = []
    original = linearized.split_product
    monkeypatch.setattr(linearized, "split_product", lambda *args: traces.append(1) or original(*args))
    torch.manual_seed(0)
    model = Chained().double()
    inputs, targets = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for _ in range(3):
        operator = HessianOperator(model, nn.CrossEntropyLoss(), inputs, targets, method="forward_over_reverse")
        operator(vector)
        operator.release()
    assert len(traces) == 1


def _key_referents(model):
    """Return the objects that the trace cache key of ``model`` names by identity."""
    params = list(model.parameters())
    names = [name for name, _ in model.named_parameters()]
    inputs, targets = torch.randn(2, 4), torch.randint(0, 3, (2,))
    _, referents = linearized.signature(model, names, [], nn.CrossEntropyLoss(), 1.0, params, [], inputs, targets)
    return referents


for _index in range(6):  # six helpers that each name all six
    exec(f"def _calling_{_index}(x):\n    return x if ({' or '.join(f'_calling_{j}' for j in range(6))}) else x")


class Calling(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)

    def forward(self, x):
        return _calling_0(self.body(x))  # noqa: F821 (defined by the loop above)


def test_key_of_calling_helpers_stays_small():
    """Helpers that call each other were expanded again at every level, so the key grew as
    the number of helpers to the fourth power, and a big list that a helper read was keyed
    item by item at every solve."""
    assert len(_key_referents(Calling())) < 100
    assert any(referent is TABLE for referent in _key_referents(Chained()))


def _gap_after_change(model, loss_fn, change):
    """Trace the split product, apply ``change()``, and return max |split − double backward| after it."""
    torch.manual_seed(0)
    inputs, targets = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    vector = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)

    def product(method):
        operator = HessianOperator(model, loss_fn, inputs, targets, method=method)
        result = operator(vector)
        operator.release()
        return result

    product("forward_over_reverse")
    change()
    return (product("forward_over_reverse") - product("double_backward")).abs().max().item()


LOOKUP = [[0.0] * 100 for _ in range(1000)]
SMALL_CONFIG = {"scale": 2.0}


class TableThenConfig(nn.Module):
    """An MLP whose forward reads a big table and then a small config dict."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))

    def forward(self, x):
        hidden = self.body[0](x) if LOOKUP else -self.body[0](x)
        return self.body[1](torch.tanh(hidden * SMALL_CONFIG["scale"]))


def test_small_config_after_big_table(monkeypatch):
    """A table read first used up the key's item budget, so a config dict read after it
    was keyed by identity and a changed entry reused the stale trace."""
    monkeypatch.setitem(SMALL_CONFIG, "scale", 2.0)
    torch.manual_seed(0)
    gap = _gap_after_change(TableThenConfig().double(), nn.CrossEntropyLoss(),
                            lambda: SMALL_CONFIG.__setitem__("scale", 3.0))
    assert gap < 1e-10


ACTIVATION_CONFIG = {"scale": 2.0}
LOSS_CONFIG = {"power": 2.0}


def _make_activation(config):
    def activation(x):
        return torch.tanh(x * config["scale"])

    return activation


ACTIVATION = _make_activation(ACTIVATION_CONFIG)


class Described(nn.Module):
    """An MLP whose attribute describes its activation three levels deep, and whose forward calls it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
        self.spec = {"blocks": [{"activation": ACTIVATION}]}

    def forward(self, x):
        return self.body[1](ACTIVATION(self.body[0](x)))


def _loss_third(outputs, targets):
    return (nn.functional.cross_entropy(outputs, targets, reduction="none") ** LOSS_CONFIG["power"]).mean()


def _loss_second(outputs, targets):
    return _loss_third(outputs, targets)


def _loss_first(outputs, targets):
    return _loss_second(outputs, targets)


def test_function_met_twice_keyed_at_shallowest(monkeypatch):
    """A function met first deep in the key was not expanded again where it came up
    shallower. So a config that only the shallower expansion reached was left out. Two
    cases: the closure of an activation also listed in a module's spec, and a global three
    loss calls down."""
    monkeypatch.setitem(ACTIVATION_CONFIG, "scale", 2.0)
    monkeypatch.setitem(LOSS_CONFIG, "power", 2.0)
    torch.manual_seed(0)
    gap = _gap_after_change(Described().double(), nn.CrossEntropyLoss(),
                            lambda: ACTIVATION_CONFIG.__setitem__("scale", 3.0))
    assert gap < 1e-10
    gap = _gap_after_change(Helped().double(), _loss_first, lambda: LOSS_CONFIG.__setitem__("power", 1.0))
    assert gap < 1e-10


class Node:
    """A plain object whose fields point at other nodes."""


NODES = [Node() for _ in range(30)]
for _node in NODES:
    for _index, _other in enumerate(NODES):
        setattr(_node, f"link_{_index}", _other)


class Linked(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.graph = NODES[0]

    def forward(self, x):
        return self.body(x)


def test_object_graph_key_stays_small():
    """Keying each object's fields one level down walked 30 linked objects of 30 fields to
    the depth limit: 837,939 objects named in every key, rebuilt at every solve."""
    assert len(_key_referents(Linked())) < 5000

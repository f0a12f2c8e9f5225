"""Forward-over-reverse Hessian-vector products with the primal pass done once per solve.

``torch.func.jvp(torch.func.grad(loss))`` recomputes the forward and backward pass of
the parameters at every product, although only the tangents change between the
products of one solve. Here the product is traced once per model signature into an
FX graph of aten operations and split in two:

- the *primal part*, every operation that does not depend on the tangent (the
  forward pass, the backward pass and the values the tangent terms read). It runs
  once per solve, at the current parameters and batch;
- the *tangent part*, everything else. Each product runs only this part.

For a network of convolutions, a forward+backward costs three convolution passes
(one forward, two backward). The plain product costs nine: three in the forward
pass (the primal and two tangent terms) and six in the backward pass. The split
product costs six, the same as a double-backward product with its graph reused.

The trace records the model's Python control flow for the traced batch shape, and
every value it reads other than the parameters, buffers and batch, which are inputs of
the graph. The cache key therefore contains each module's attributes (train/eval,
``track_running_stats``, floats, tensors with their version counter; dicts, lists,
config objects, numpy arrays and functions by content), its class attributes, the
globals and default arguments that its ``forward`` names, the loss's settings or the
code, closure and globals of a loss function, and the autocast state. A function among
those globals is keyed with the globals it names in turn, four levels deep.
A trace that reads a tensor's value into Python (``.item()``, ``if tensor:``) or
draws random numbers is rejected, because its graph would be valid only for the
values seen while tracing. The first trace of each key is checked against the plain
product.
NOTE: a read that bypasses aten operations (``tensor.tolist()``, ``.numpy()``) is
not detected, so a branch on it is frozen at the traced batch's value. Neither is a
value deeper than four levels, or one read through an imported module
(``settings.SCALE``, or a helper called as ``helpers.scale(x)``) or by a library
function: a changed one leaves the trace stale. ``SharpnessProbe(hvp_method="auto")``
compares both paths again every ``AUTO_RECHECK`` solves, which catches that.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import types
import warnings
import weakref
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import fx, nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# aten operations whose traced graph would hold only for the values seen while tracing.
_VALUE_DEPENDENT = {"_local_scalar_dense", "is_nonzero", "item"}


class TraceRejected(RuntimeError):
    """Error raised when a traced product would be valid only for the values seen while tracing."""


class ParametersReadDirectly(TraceRejected):
    """Error raised when the loss or the model reads a parameter other than through the
    substituted parameters (for example an L2 term over ``model.parameters()``).

    No forward-over-reverse product can differentiate such a read, because
    ``torch.func.functional_call`` substitutes the parameters only inside the model call.
    """


def call_with(model: nn.Module, values: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    """Return ``model(inputs)`` with the named parameters and buffers replaced by ``values``.

    This is ``torch.func.functional_call`` followed by putting back the parameters and
    buffers of every module. On a submodule registered under two names (``self.b = self.a``),
    ``functional_call`` alone leaves plain tensors in place of that module's parameters
    (torch 2.13), so the optimizer would stop updating them.
    """
    from torch.func import functional_call

    saved = [(module, dict(module._parameters), dict(module._buffers)) for module in model.modules()]
    try:
        return functional_call(model, values, (inputs,))
    finally:
        for module, parameters, buffers in saved:
            module._parameters.update(parameters)
            module._buffers.update(buffers)


@contextlib.contextmanager
def quiet_jvp_setup() -> Iterator[None]:
    """Silence the DeprecationWarnings that torch 2.13 emits (18 of them) when the first
    ``torch.func.jvp`` of a process loads its decompositions through ``torch.jit.script``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=DeprecationWarning)
        yield


def _packet_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(target, "__name__", str(target)))


class SplitProduct:
    """A traced forward-over-reverse product, split into its primal and tangent parts.

    ``bind(params, state, inputs, targets)`` runs the primal part. It returns the
    values the tangent part reads and the loss gradient. ``product(bound, tangents)``
    returns H·tangents as a tuple shaped like ``params``. Built by :func:`split_product`.

    The primal part exists in two versions. ``primal`` also returns the loss gradient,
    which a cold start uses as its start vector. ``primal_lean`` leaves out the
    parameter gradients, which the tangent part does not read: a convolution's
    backward then computes only its input gradient, one convolution pass instead of two.
    A warm-started solve needs only this version.
    """

    def __init__(self, primal: fx.GraphModule, primal_lean: fx.GraphModule, tangent: fx.GraphModule) -> None:
        self.primal = primal
        self.primal_lean = primal_lean
        self.tangent = tangent

    def bind(self, params: Sequence[torch.Tensor], state: Sequence[torch.Tensor], inputs: torch.Tensor,
             targets: torch.Tensor, with_gradient: bool = True
             ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
        """Run the primal part; return (the values the tangent part reads, the loss gradient or None).

        With ``with_gradient=False`` the lean version runs and the gradient is None.
        """
        with torch.no_grad():
            if not with_gradient:
                return tuple(self.primal_lean(*params, *state, inputs, targets)), None
            values = tuple(self.primal(*params, *state, inputs, targets))
        return values[: -len(params)], values[-len(params) :]

    def product(self, bound: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.tangent(*bound, *tangents))


def split_product(model: nn.Module, param_names: Sequence[str], state_names: Sequence[str], loss_fn: LossFn,
                  weight: float, params: Sequence[torch.Tensor], state: Sequence[torch.Tensor],
                  inputs: torch.Tensor, targets: torch.Tensor) -> SplitProduct:
    """Trace v ↦ ∇²(weight·loss_fn(model(inputs), targets))·v and split it (see the module docstring).

    ``state`` contains the model's other parameters and its buffers, named by
    ``state_names``. They are inputs of the graph, like ``params``, so later values
    reach it. The plain ``torch.func`` product runs once first: an error there
    propagates before tracing, because some operations that fail in it crash the
    process when traced (``mse_loss`` in torch 2.13). The traced product must then
    match it. Raises :class:`TraceRejected` when the trace depends on tensor values or
    random numbers, or does not match.
    """
    from torch.func import grad, jvp
    from torch.fx.experimental.proxy_tensor import make_fx

    n, m = len(params), len(state)

    def hvp(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        primals, fixed_values = flat[:n], flat[n : n + m]
        batch_inputs, batch_targets, tangents = flat[n + m], flat[n + m + 1], flat[n + m + 2 :]
        fixed = dict(zip(state_names, fixed_values))

        def loss(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            outputs = call_with(model, {**fixed, **dict(zip(param_names, values))}, batch_inputs)
            return loss_fn(outputs, batch_targets) * weight

        gradient, product = jvp(grad(loss), (tuple(primals),), (tuple(tangents),))
        return (*gradient, *product)

    detached = [p.detach() for p in params]
    fixed_values = [t.detach() for t in state]
    generator = torch.Generator().manual_seed(0)
    check_tangents = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in detached]
    with quiet_jvp_setup():
        expected = hvp(*detached, *fixed_values, inputs, targets, *check_tangents)[n:]
    try:
        graph_module = make_fx(hvp)(*detached, *fixed_values, inputs, targets, *check_tangents)
    except RuntimeError as error:
        if "_local_scalar_dense" in str(error) or "data-dependent" in str(error):
            raise TraceRejected("the model reads a tensor value into Python (data-dependent control flow), "
                                "so a traced graph would hold only for the values seen while tracing") from error
        raise
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = _packet_name(node)
        tags = getattr(node.target, "tags", ())
        if name in _VALUE_DEPENDENT:
            raise TraceRejected(f"the model reads a tensor value into Python ({name}), so a traced graph "
                                "would hold only for the values seen while tracing")
        if torch.Tag.nondeterministic_seeded in tags:
            raise TraceRejected(f"the model draws random numbers ({name}) during the solve")
    _check_no_parameter_constants(graph_module, model)
    split = SplitProduct(*_split(graph_module, tangent_start=n + m + 2, primal_outputs=n))
    scale = max(max(t.abs().max().item() for t in expected), 1e-30)
    for with_gradient in (True, False):
        bound, _ = split.bind(detached, fixed_values, inputs, targets, with_gradient)
        found = split.product(bound, check_tangents)
        mismatch = max((a - b).abs().max().item() for a, b in zip(found, expected)) / scale
        if not mismatch <= 1e-4:
            raise TraceRejected(f"the traced product differs from the plain product by {mismatch:.2e} (relative)")
    return split


def _check_no_parameter_constants(graph_module: fx.GraphModule, model: nn.Module) -> None:
    """Raise :class:`ParametersReadDirectly` if the trace froze a parameter as a constant."""
    storages = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters() if p.numel() > 0}
    for node in graph_module.graph.nodes:
        if node.op != "get_attr":
            continue
        constant = getattr(graph_module, node.target, None)
        if isinstance(constant, torch.Tensor) and constant.numel() > 0:
            name = storages.get(constant.untyped_storage().data_ptr())
            if name is not None:
                raise ParametersReadDirectly(
                    f"the loss or the model reads parameter {name!r} outside the model call (for example an "
                    "L2 term over model.parameters()), which forward-over-reverse products cannot "
                    "differentiate; use hvp_method='double_backward' or add the term to the model's output")


def _mutates(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _drop_identity_copies(graph: fx.Graph) -> int:
    """Bypass ``_to_copy`` and ``expand`` nodes that return their input unchanged; return how many.

    Tracing forward-mode formulas records dtype conversions to the dtype a tensor
    already has, and expands to the shape it already has. Run eagerly these are
    no-ops, but in the graph each ``_to_copy`` copies a whole activation. A node is
    bypassed only when its value has the input's dtype, device, shape and strides and
    no operation writes in place to either.
    """
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or _packet_name(node) not in ("_to_copy", "expand"):
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node):
            continue
        before, after = source.meta.get("val"), node.meta.get("val")
        if not (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)):
            continue
        same = (before.dtype, before.device, before.layout, before.shape) == (after.dtype, after.device, after.layout,
                                                                                 after.shape)
        if not same or before.layout != torch.strided or before.stride() != after.stride():
            continue
        if any(_mutates(user) for user in [*node.users, *source.users]):
            continue
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        dropped += 1
    return dropped


def _prune_output_masks(graph: fx.Graph) -> int:
    """Switch off the outputs of multi-output operations that no node reads; return how many changed.

    Backward operations such as ``convolution_backward`` and
    ``native_batch_norm_backward`` take an ``output_mask`` and compute only the
    gradients it selects. The trace records the mask of the full backward pass, so
    after the parameter gradients are dropped from a graph's outputs, a convolution
    would still compute its weight gradient and throw it away.
    """
    changed = 0
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        names = [argument.name for argument in schema.arguments]
        if "output_mask" not in names:
            continue
        index = names.index("output_mask")
        in_args = index < len(node.args)
        mask = list(node.args[index] if in_args else node.kwargs["output_mask"])
        if any(user.target is not operator.getitem for user in node.users):
            continue  # the whole tuple is read, so every output stays
        read = {user.args[1] for user in node.users if user.users}  # a getitem without users is dead
        pruned = [bool(selected) and position in read for position, selected in enumerate(mask)]
        if pruned == mask:
            continue
        if in_args:
            node.args = (*node.args[:index], pruned, *node.args[index + 1 :])
        else:
            node.kwargs = {**node.kwargs, "output_mask": pruned}
        changed += 1
    return changed


def _split(graph_module: fx.GraphModule, tangent_start: int,
           primal_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule, fx.GraphModule]:
    """Split a traced graph into the nodes that depend on the tangent placeholders and the rest.

    The first ``primal_outputs`` outputs do not depend on the tangents, so the primal
    part returns them after the boundary values. Returns (primal part, primal part
    without those outputs, tangent part); the tangent part returns the other outputs.
    """
    graph = graph_module.graph
    _drop_identity_copies(graph)
    graph.eliminate_dead_code()  # also the shape checks forward-mode formulas record
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    tangent_inputs = placeholders[tangent_start:]
    output = next(node for node in graph.nodes if node.op == "output")
    primal_results, tangent_results = output.args[0][:primal_outputs], output.args[0][primal_outputs:]

    depends: set[fx.Node] = set(tangent_inputs)
    for node in graph.nodes:
        if node.op not in ("placeholder", "output") and any(arg in depends for arg in node.all_input_nodes):
            depends.add(node)
    # Values computed in the primal part and read by the tangent part (or returned by it
    # as they are, for example a zero product of a parameter the loss does not use).
    boundary = [
        node for node in graph.nodes
        if node not in depends and node.op != "output"
        and (any(user in depends for user in node.users) or node in tangent_results)
    ]

    primal_graph = fx.Graph()
    primal_env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in depends or node.op == "output":
            continue
        primal_env[node] = primal_graph.node_copy(node, lambda arg: primal_env[arg])
    boundary_values = tuple(primal_env[node] for node in boundary)
    primal_graph.output(boundary_values + tuple(primal_env[node] for node in primal_results))
    primal_graph.eliminate_dead_code()
    primal_module = fx.GraphModule(graph_module, primal_graph)

    lean_graph = fx.Graph()
    lean_env: dict[fx.Node, fx.Node] = {}
    lean_graph.graph_copy(primal_graph, lean_env)  # every node but the output
    lean_graph.output(tuple(lean_env[node] for node in boundary_values))
    lean_graph.eliminate_dead_code()
    _prune_output_masks(lean_graph)
    lean_graph.eliminate_dead_code()

    tangent_graph = fx.Graph()
    tangent_env: dict[fx.Node, fx.Node] = {}
    for index, node in enumerate(boundary):
        tangent_env[node] = tangent_graph.placeholder(f"bound_{index}")
    for index, node in enumerate(tangent_inputs):
        tangent_env[node] = tangent_graph.placeholder(f"tangent_{index}")
    for node in graph.nodes:
        if node in depends and node.op != "placeholder":
            tangent_env[node] = tangent_graph.node_copy(node, lambda arg: tangent_env[arg])
    tangent_graph.output(tuple(tangent_env[node] for node in tangent_results))
    tangent_graph.eliminate_dead_code()
    _prune_output_masks(tangent_graph)
    return primal_module, fx.GraphModule(graph_module, lean_graph), fx.GraphModule(graph_module, tangent_graph)


# Split products per model and signature, kept as long as the model lives. Beyond
# CACHE_SIZE signatures (for example after changes of batch shape) the oldest is dropped.
# An entry holds weak references to the objects its key names by identity, so it keeps
# nothing alive, and it is stale once one of them is gone.
CACHE_SIZE = 4
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple]]" = weakref.WeakKeyDictionary()
_SIMPLE = (bool, int, float, complex, str, bytes, type(None))
_DEPTH = 4  # levels of containers, objects and closures keyed by content
_ARRAY_BYTES = 1 << 20  # numpy arrays up to this size are keyed by content, larger ones by identity
_LIBRARIES = ("torch", "numpy")  # packages whose functions are keyed without their globals
# Items of lists, tuples, dicts and sets that one key reads by content. A container of more
# than _SMALL_ITEMS items that would go past this count is keyed by identity, so a big table
# read by a helper stays cheap, while a small config dict read after it is still keyed by content.
_KEY_ITEMS = 100_000
_SMALL_ITEMS = 16


class _Fingerprint:
    """Key parts for the values a trace may have frozen, and the objects named by identity."""

    def __init__(self) -> None:
        self.referents: list[object] = []
        # The shallowest depth at which each function was keyed by content. Helpers that call
        # each other would otherwise be expanded again at every level. A function met again
        # at that depth or deeper adds nothing, but one met shallower reaches further.
        self.function_depths: dict[int, int] = {}
        self.items_left = _KEY_ITEMS

    def identity(self, obj: object) -> tuple:
        self.referents.append(obj)
        return ("id", id(obj))

    def value(self, obj: object, depth: int = 0) -> tuple:
        """Return a key for a value read by the model or the loss.

        Containers, plain objects and functions are keyed by content down to
        ``_DEPTH`` levels, and by identity below that. So a changed entry of a config dict,
        field of a config object or activation function changes the key. Containers are
        keyed by content up to ``_KEY_ITEMS`` items per key (beyond that, those of more
        than ``_SMALL_ITEMS`` items by identity), and a function that comes up again no
        shallower than before by identity.
        """
        if isinstance(obj, _SIMPLE):
            return ("value", type(obj), obj)
        if isinstance(obj, torch.Tensor):
            # The version counter changes with every in-place write.
            return ("tensor", *self.identity(obj), obj._version, *_tensor_key(obj))
        if isinstance(obj, torch.dtype | torch.device):
            return ("value", str(obj))
        if isinstance(obj, nn.Module) or depth >= _DEPTH:
            return self.identity(obj)  # a submodule has its own entry in the key
        if isinstance(obj, (list, tuple, dict, set, frozenset)):
            if len(obj) > max(self.items_left, _SMALL_ITEMS):
                return ("long", type(obj), len(obj), *self.identity(obj))
            self.items_left -= len(obj)
        if isinstance(obj, (list, tuple)):
            return (type(obj), tuple(self.value(item, depth + 1) for item in obj))
        if isinstance(obj, dict):
            return (type(obj), tuple((self.value(key, depth + 1), self.value(item, depth + 1))
                                     for key, item in obj.items()))
        if isinstance(obj, (set, frozenset)) and all(isinstance(item, _SIMPLE) for item in obj):
            return ("set", tuple(sorted(obj, key=repr)))
        if isinstance(obj, types.FunctionType):
            if self.function_depths.get(id(obj), _DEPTH) <= depth:
                return ("function again", *self.identity(obj))
            self.function_depths[id(obj)] = depth
            closure = tuple(self.value(cell.cell_contents, depth + 1) for cell in obj.__closure__ or ())
            return ("function", self.identity(obj.__code__), closure, self.value(obj.__defaults__ or (), depth + 1),
                    self.named_globals(obj, depth + 1))
        if isinstance(obj, types.MethodType):
            return ("method", self.value(obj.__func__, depth + 1), self.owner(obj.__self__, depth + 1))
        if isinstance(obj, functools.partial):
            return ("partial", self.value(obj.func, depth + 1), self.value(obj.args, depth + 1),
                    self.value(obj.keywords, depth + 1))
        if isinstance(obj, np.ndarray) and obj.nbytes <= _ARRAY_BYTES:
            return ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
        if isinstance(obj, np.generic):
            return ("value", obj.dtype.str, obj.item())
        if type(obj).__module__ not in ("builtins", "torch"):
            fields = dict(vars(obj)) if isinstance(getattr(obj, "__dict__", None), dict) else {}
            for klass in type(obj).__mro__:
                slots = getattr(klass, "__slots__", ())
                for name in (slots,) if isinstance(slots, str) else slots:
                    if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                        fields[name] = getattr(obj, name)
            if fields and depth + 1 < _DEPTH:
                return ("object", self.identity(obj), self.value(fields, depth + 1))
            if fields:
                # At the depth limit the dict built here would be keyed by its own identity, which
                # is new at every call, so the key would never repeat. Simple fields are keyed instead.
                return ("object", self.identity(obj),
                        tuple((name, item) for name, item in fields.items() if isinstance(item, _SIMPLE)))
        return self.identity(obj)

    def named_globals(self, function: object, depth: int = 0) -> tuple:
        """Return a key for the globals that a function's code names.

        A helper function among them is keyed with its own globals in turn, so a global
        read two calls down is in the key too. The result is empty for a builtin, and
        for a torch or numpy function that a model's code calls (``depth`` > 0).
        """
        function = getattr(function, "__func__", function)
        code = getattr(function, "__code__", None)
        if code is None:
            return ()
        if depth > 0 and (getattr(function, "__module__", None) or "").split(".")[0] in _LIBRARIES:
            return ()
        namespace = function.__globals__
        return tuple((name, self.value(namespace[name], depth)) for name in code.co_names if name in namespace)

    def code(self, function: object) -> tuple:
        """Return a key for what a method's code reads besides its arguments: the globals
        it names, and its default arguments."""
        function = getattr(function, "__func__", function)
        return (self.named_globals(function), self.value(getattr(function, "__defaults__", None) or ()))

    def class_attributes(self, cls: type) -> tuple:
        """Return a key for the data attributes of a module's class and its bases below ``nn.Module``."""
        parts = []
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                break
            for name, value in vars(klass).items():
                if name.startswith("__") or callable(value) or isinstance(value, (staticmethod, classmethod, property)):
                    continue
                parts.append((klass.__qualname__, name, self.value(value)))
        return tuple(parts)

    def attributes(self, obj: object) -> tuple:
        """Return a key for an object's attributes that are not parameters, buffers or submodules.

        Hooks are attributes too (dicts of functions), since a forward hook can change
        the output.
        """
        return tuple(sorted(
            ((name, self.value(value)) for name, value in vars(obj).items()
             if name not in ("_parameters", "_buffers", "_modules")),
            key=lambda item: item[0],
        ))

    def owner(self, obj: object, depth: int = 0) -> tuple:
        """Return a key for the object a bound method belongs to, by content: the method may read any attribute."""
        if isinstance(obj, nn.Module) and depth < _DEPTH:
            tensors = tuple((name, self.value(t)) for name, t in [*obj.named_parameters(), *obj.named_buffers()])
            return ("module", type(obj), self.attributes(obj), tensors)
        return self.value(obj, depth)

    def loss(self, loss_fn: LossFn) -> tuple:
        """Return a key for a loss, so that an equal fresh one (``nn.CrossEntropyLoss()`` per call) reuses the trace.

        A function is keyed by its code, defaults, closure (by content, as in
        :meth:`value`) and the globals its code names, helper functions with their
        globals in turn; a bound method also by its object's attributes.
        """
        if isinstance(loss_fn, nn.Module):
            tensors = tuple((name, self.value(t)) for name, t in [*loss_fn.named_parameters(), *loss_fn.named_buffers()])
            return (type(loss_fn), self.attributes(loss_fn), tensors)
        function = getattr(loss_fn, "__func__", loss_fn)
        owner = getattr(loss_fn, "__self__", None)
        code = getattr(function, "__code__", None)
        if code is None:  # a callable object or a builtin
            return ("callable", type(loss_fn), self.attributes(loss_fn) if hasattr(loss_fn, "__dict__") else (),
                    self.identity(loss_fn))
        return (self.value(function), self.named_globals(function), self.owner(owner) if owner is not None else None)


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tensor.device, tensor.requires_grad


def signature(model: nn.Module, param_names: Sequence[str], state_names: Sequence[str], loss_fn: LossFn,
              weight: float, params: Sequence[torch.Tensor], state: Sequence[torch.Tensor],
              inputs: torch.Tensor, targets: torch.Tensor) -> tuple[tuple, list[object]]:
    """Return everything a trace depends on apart from parameter, buffer and batch values,
    and the objects the key names by identity."""
    fingerprint = _Fingerprint()
    modules = tuple(
        (name, type(module), fingerprint.attributes(module), fingerprint.class_attributes(type(module)),
         fingerprint.code(type(module).forward))
        for name, module in model.named_modules()
    )
    device_type = inputs.device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    key = (
        tuple(param_names), tuple(state_names), fingerprint.loss(loss_fn), weight, modules, autocast,
        tuple(_tensor_key(p) for p in params), tuple(_tensor_key(t) for t in state),
        _tensor_key(inputs), _tensor_key(targets),
    )
    return key, fingerprint.referents


def _references(referents: list[object]) -> list:
    """Return weak references where an object allows them, else the object itself."""
    references = []
    for obj in referents:
        try:
            references.append(weakref.ref(obj))
        except TypeError:  # for example a list or a dict
            references.append(lambda obj=obj: obj)
    return references


def cached_split_product(model: nn.Module, param_names: Sequence[str], loss_fn: LossFn, weight: float,
                         params: Sequence[torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
                         with_gradient: bool = True,
                         ) -> tuple[SplitProduct, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """Return the split product for this model and signature (traced on first use), the
    bound values and the loss gradient (None with ``with_gradient=False``, see :meth:`SplitProduct.bind`).

    A rejected trace is remembered too, so that it is not traced again. It raises
    :class:`TraceRejected` each time.
    """
    selected = {id(p) for p in params}
    # Every other parameter (frozen ones too) and every buffer is an input of the graph.
    named_state = [(name, p) for name, p in model.named_parameters() if id(p) not in selected]
    named_state += list(model.named_buffers())
    state_names = [name for name, _ in named_state]
    state = [t for _, t in named_state]
    key, referents = signature(model, param_names, state_names, loss_fn, weight, params, state, inputs, targets)
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(key)
    if entry is not None and any(reference() is not obj for reference, obj in zip(entry[1], referents)):
        entry = None  # an object named by identity was freed and its id reused
    if entry is None:
        try:
            split = split_product(model, param_names, state_names, loss_fn, weight, params, state, inputs, targets)
        except TraceRejected as rejection:
            # Kept without its traceback, whose frames would keep the model alive.
            split = (type(rejection), str(rejection))
        per_model.pop(key, None)
        if len(per_model) >= CACHE_SIZE:
            del per_model[next(iter(per_model))]
        entry = per_model[key] = (split, _references(referents))
    split = entry[0]
    if isinstance(split, tuple):
        rejection_type, message = split
        raise rejection_type(message)
    detached = [p.detach() for p in params]
    bound, gradient = split.bind(detached, [t.detach() for t in state], inputs, targets, with_gradient)
    return split, bound, gradient

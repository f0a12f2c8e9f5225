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

The trace records the model's Python control flow for the traced batch shape and
module flags (train/eval, ``track_running_stats``). A trace that reads a tensor's
value into Python (``.item()``, ``if tensor:``) or draws random numbers is refused,
because its graph would be valid only for the values seen while tracing.
"""

from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch import fx, nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# aten operations whose traced graph would hold only for the values seen while tracing.
_VALUE_DEPENDENT = {"_local_scalar_dense", "is_nonzero", "item"}


class TraceRejected(RuntimeError):
    """Error raised when a traced product would be valid only for the values seen while tracing."""


def _packet_name(node: fx.Node) -> str:
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", getattr(target, "__name__", str(target)))


class SplitProduct:
    """A traced forward-over-reverse product, split into its primal and tangent parts.

    ``bind(params, buffers, inputs, targets)`` runs the primal part. It returns the
    values the tangent part reads and the loss gradient, which the primal part computes
    anyway. ``product(bound, tangents)`` returns H·tangents as a tuple shaped like
    ``params``. Built by :func:`split_product`.
    """

    def __init__(self, primal: fx.GraphModule, tangent: fx.GraphModule, loss_fn: LossFn) -> None:
        self.primal = primal
        self.tangent = tangent
        self.loss_fn = loss_fn  # held so that the ids in the cache key cannot be reused

    def bind(self, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], inputs: torch.Tensor,
             targets: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Run the primal part; return (the values the tangent part reads, the loss gradient)."""
        with torch.no_grad():
            values = tuple(self.primal(*params, *buffers, inputs, targets))
        return values[: -len(params)], values[-len(params) :]

    def product(self, bound: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.tangent(*bound, *tangents))


def split_product(model: nn.Module, param_names: Sequence[str], buffer_names: Sequence[str], loss_fn: LossFn,
                  weight: float, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor],
                  inputs: torch.Tensor, targets: torch.Tensor) -> SplitProduct:
    """Trace v ↦ ∇²(weight·loss_fn(model(inputs), targets))·v and split it (see the module docstring).

    Raises :class:`TraceRejected` when the trace depends on tensor values or random
    numbers; other tracing failures propagate as they are.
    """
    from torch.func import functional_call, grad, jvp
    from torch.fx.experimental.proxy_tensor import make_fx

    n, m = len(params), len(buffers)

    def hvp(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        primals, state = flat[:n], flat[n : n + m]
        batch_inputs, batch_targets, tangents = flat[n + m], flat[n + m + 1], flat[n + m + 2 :]
        fixed = dict(zip(buffer_names, state))

        def loss(values: tuple[torch.Tensor, ...]) -> torch.Tensor:
            outputs = functional_call(model, {**fixed, **dict(zip(param_names, values))}, (batch_inputs,))
            return loss_fn(outputs, batch_targets) * weight

        gradient, product = jvp(grad(loss), (tuple(primals),), (tuple(tangents),))
        return (*gradient, *product)

    detached = [p.detach() for p in params]
    probe_tangents = [torch.zeros_like(p) for p in detached]
    try:
        graph_module = make_fx(hvp)(*detached, *[b.detach() for b in buffers], inputs, targets, *probe_tangents)
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
    primal, tangent = _split(graph_module, tangent_start=n + m + 2, primal_outputs=n)
    return SplitProduct(primal, tangent, loss_fn)


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


def _split(graph_module: fx.GraphModule, tangent_start: int,
           primal_outputs: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a traced graph into the nodes that depend on the tangent placeholders and the rest.

    The first ``primal_outputs`` outputs do not depend on the tangents, so the primal
    part returns them after the boundary values. The tangent part returns the others.
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
    primal_graph.output(tuple(primal_env[node] for node in [*boundary, *primal_results]))
    primal_graph.eliminate_dead_code()

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
    return fx.GraphModule(graph_module, primal_graph), fx.GraphModule(graph_module, tangent_graph)


# Split products per model and signature, kept as long as the model lives. Beyond
# CACHE_SIZE signatures (for example after changes of batch shape) the oldest is dropped.
CACHE_SIZE = 4
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, SplitProduct | TraceRejected]]" = weakref.WeakKeyDictionary()


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tensor.dtype, tensor.device, tensor.requires_grad


def _loss_key(loss_fn: LossFn) -> tuple:
    """Return a key for a loss: its settings for a module, so that a fresh
    ``nn.CrossEntropyLoss()`` per call reuses the trace, and its identity for a function."""
    if not isinstance(loss_fn, nn.Module):
        return ("function", id(loss_fn))
    settings = tuple(sorted(
        (name, value) for name, value in vars(loss_fn).items()
        if not name.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))
    ))
    tensors = tuple((name, id(tensor)) for name, tensor in [*loss_fn.named_parameters(), *loss_fn.named_buffers()])
    return (type(loss_fn), settings, tensors)


def signature(model: nn.Module, param_names: Sequence[str], buffer_names: Sequence[str], loss_fn: LossFn,
              weight: float, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor],
              inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    """Return everything a trace depends on apart from tensor values."""
    flags = tuple(
        (name, module.training, getattr(module, "track_running_stats", None))
        for name, module in model.named_modules()
    )
    return (
        tuple(param_names), tuple(buffer_names), _loss_key(loss_fn), weight, flags,
        tuple(_tensor_key(p) for p in params), tuple(_tensor_key(b) for b in buffers),
        _tensor_key(inputs), _tensor_key(targets),
    )


def cached_split_product(model: nn.Module, param_names: Sequence[str], loss_fn: LossFn, weight: float,
                         params: Sequence[torch.Tensor], inputs: torch.Tensor,
                         targets: torch.Tensor) -> tuple[SplitProduct, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Return the split product for this model and signature (traced on first use), the
    bound values and the loss gradient.

    A rejected trace is remembered too, so that it is not traced again. It raises
    :class:`TraceRejected` each time.
    """
    named_buffers = [(name, b) for name, b in model.named_buffers()]
    buffer_names = [name for name, _ in named_buffers]
    buffers = [b for _, b in named_buffers]
    key = signature(model, param_names, buffer_names, loss_fn, weight, params, buffers, inputs, targets)
    per_model = _CACHE.setdefault(model, {})
    entry = per_model.get(key)
    if entry is None:
        try:
            entry = split_product(model, param_names, buffer_names, loss_fn, weight, params, buffers, inputs, targets)
        except TraceRejected as rejection:
            entry = rejection
        if len(per_model) >= CACHE_SIZE:
            del per_model[next(iter(per_model))]
        per_model[key] = entry
    if isinstance(entry, TraceRejected):
        raise TraceRejected(str(entry))
    bound, gradient = entry.bind([p.detach() for p in params], [b.detach() for b in buffers], inputs, targets)
    return entry, bound, gradient

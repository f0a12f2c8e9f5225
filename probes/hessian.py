"""Hessian-vector products of a training loss, and eigenvalue estimators built on them.

Conventions a reader could get wrong:

- The loss is the training loss with the same reduction as training (the mean over
  the batch). A batch split into chunks is weighted by chunk size, so the product is
  the one of the whole batch, except with BatchNorm in train mode: there each chunk
  is normalized with its own statistics.
- λ_max is the largest *algebraic* eigenvalue, not the largest in magnitude. Lanczos
  finds both ends of the spectrum and reports the top one; power iteration is shifted
  when the dominant eigenvalue is negative or does not converge.
- Neither product path writes ``.grad``: both use ``torch.autograd.grad`` or
  ``torch.func`` transforms.
- BatchNorm in train mode uses batch statistics and, during a product, does not
  update its running buffers (``track_running_stats`` is switched off for the solve).
- Every product of a solve sees the same function. ``nn.Dropout`` modules are switched
  off for the solve. Random numbers drawn elsewhere in the forward pass (functional
  dropout, attention dropout) come from a generator seeded alike for every product, so
  the mask is fixed; the estimate records ``dropout="mask fixed"``. A generator stored as
  an attribute of a module of the model or the loss starts each forward pass from its
  state at the start of the solve. The global RNG and those generators are left as they
  were either way. Generators kept elsewhere are not found (see
  ``probes.state.model_generators``).
- A parameter the loss does not reach has zero rows and columns in the Hessian.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import random
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from dynamics.distributed import all_reduce_sum, sum_over_ranks
from probes.linearized import ParametersReadDirectly, SplitProduct, cached_split_product, call_with, quiet_jvp_setup
from probes.state import generators_moved, restore_buffers, restore_generators, snapshot_buffers, snapshot_generators

log = logging.getLogger(__name__)

HVP_METHODS = ("auto", "double_backward", "forward_over_reverse")
Operator = Callable[[torch.Tensor], torch.Tensor]


class HessianUnsupportedError(RuntimeError):
    """The model has an operation without a second derivative in the requested path."""


def is_integer(value: object) -> bool:
    """True for an int (or an integer numpy or torch scalar), False for bool, float or anything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def select_parameters(model: nn.Module, params: Sequence[torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Return the (name, parameter) pairs a Hessian is taken over: those with ``requires_grad``,
    restricted to ``params`` when given, in the order of ``model.named_parameters()``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        requested = {id(p) for p in params}
        named = [(name, p) for name, p in named if id(p) in requested]
        if len(named) < len(requested):
            raise ValueError(f"{len(requested) - len(named)} of the {len(requested)} tensors in params are not "
                             "trainable parameters of the model (parameters of another model, or with "
                             "requires_grad=False); pass only the model's own trainable parameters")
    return named


def hessian_dim(model: nn.Module, params: Sequence[torch.Tensor] | None = None) -> int:
    """Return the number of rows of the Hessian over ``params`` (see :func:`select_parameters`)."""
    return sum(p.numel() for _, p in select_parameters(model, params))


def check_batch(inputs: torch.Tensor, targets: torch.Tensor, chunk_size: int | None) -> None:
    """Raise ValueError unless the batch has one target per input, at least one pair, and a valid ``chunk_size``."""
    if len(inputs) != len(targets):
        raise ValueError(f"inputs and targets differ in length ({len(inputs)} and {len(targets)}): "
                         "pass one target per input, so that chunks split them alike")
    if len(targets) == 0:
        raise ValueError("the sharpness batch is empty (0 inputs): pass at least one (input, target) pair")
    if chunk_size is not None and not (is_integer(chunk_size) and chunk_size >= 1):
        raise ValueError(f"invalid chunk_size={chunk_size!r}: expected an integer >= 1, or None for the whole "
                         "batch at once")


def check_count(name: str, value: object, meaning: str) -> None:
    """Raise ValueError unless ``value`` is an integer >= 1; ``meaning`` names what it counts."""
    if not (is_integer(value) and value >= 1):
        raise ValueError(f"invalid {name}={value!r}: expected an integer >= 1 ({meaning})")


@contextmanager
def solve_mode(model: nn.Module) -> Iterator[dict[str, str]]:
    """Freeze BatchNorm buffers and disable dropout for the duration of a solve.

    Yields a record of what was done (``dropout``: disabled or absent). Module flags
    are restored on exit.
    """
    changed: list[tuple[nn.Module, str, bool]] = []
    record = {"dropout": "absent"}
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            changed.append((module, "track_running_stats", True))
            module.track_running_stats = False
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            changed.append((module, "training", True))
            module.training = False
            record["dropout"] = "disabled"
    try:
        yield record
    finally:
        for module, attribute, value in changed:
            setattr(module, attribute, value)


class HessianOperator:
    """The map v ↦ H v for ``loss_fn(model(inputs), targets)`` at the current parameters.

    Vectors are flat float64 tensors over ``params`` in order. Two paths compute it:

    - ``double_backward``: ∇(∇L·v) by ``torch.autograd.grad`` twice. With one chunk
      the gradient graph is built once and reused by every product.
    - ``forward_over_reverse``: ``torch.func.jvp`` of ``torch.func.grad``. With one chunk
      the product is traced once per model signature and split (:mod:`probes.linearized`):
      the forward and backward pass run once per operator, each product runs only the
      tangent terms. With several chunks, or a model that cannot be traced, each product
      runs one forward and one backward with dual numbers and keeps no graph. The loss
      must reach the parameters only through ``model(inputs)``: an L2 term over
      ``model.parameters()`` is checked for and rejected with one chunk.
      NOTE: with several chunks such a term is silently left out of the product.
    NOTE: a custom ``torch.autograd.Function`` whose ``backward`` detaches what it
    computes from, without ``@once_differentiable``, gives a wrong product on both
    paths, and nothing in autograd shows it.

    ``auto`` times one product of each on the first call and keeps the faster path
    that works; a path that fails is logged with its reason. When both work but
    their products differ by more than 1e-3 (relative), it keeps double backward. The
    other path's cached graph or bound values are then dropped. With several chunks
    (``chunk_size`` smaller than the batch) each product walks the chunks, so memory
    holds one chunk's graph at a time. The model is used in its current mode; wrap
    the calls in :func:`solve_mode` (the estimators here do).

    Under ``torch.distributed`` with ``group`` (or the default group when one is
    initialized), each rank passes its own part of the batch. The loss is weighted by
    the batch size summed over the ranks, and products and gradients are all-reduced,
    so every rank gets the product of the union of the parts. Pass the bare module, not
    the DDP wrapper.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        inputs: torch.Tensor,
        targets: torch.Tensor,
        params: Sequence[torch.Tensor] | None = None,
        chunk_size: int | None = None,
        method: str = "auto",
        group=None,
    ) -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"invalid hvp method={method!r}: expected one of {HVP_METHODS}")
        check_batch(inputs, targets, chunk_size)
        self.model = model
        self.loss_fn = loss_fn
        named = select_parameters(model, params)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.dim = sum(p.numel() for p in self.params)
        if self.dim == 0:
            raise ValueError("no parameter to differentiate: the model has no parameter with requires_grad=True"
                             + (" among the given params" if params is not None else "")
                             + ". Unfreeze the parameters whose Hessian you want")
        self.group = group
        # The loss of the whole batch: over every rank's part when distributed.
        self.batch_size = sum_over_ranks(len(targets), targets.device, group)
        chunk_size = chunk_size or len(targets)
        self.chunks = [
            (inputs[start : start + chunk_size], targets[start : start + chunk_size])
            for start in range(0, len(targets), chunk_size)
        ]
        self.method = method
        self.fallback_reason = ""
        self.products = 0
        self._grads: tuple[torch.Tensor, ...] | None = None
        # Forward-over-reverse with the primal pass done once (probes.linearized).
        self._split_product: SplitProduct | None = None
        self._bound: tuple[torch.Tensor, ...] = ()
        self._split_gradient: torch.Tensor | None = None
        self.split_fallback_reason = ""  # set when the split cannot be used
        self.random_draws = False  # whether a forward pass drew random numbers (see _fixed_randomness)
        self._devices = sorted({p.device.index if p.device.index is not None else torch.cuda.current_device()
                                for p in self.params if p.device.type == "cuda"})
        # Buffers as the solve found them, put back before each chunk's forward pass. A forward in
        # train mode may update a buffer that its output reads, such as the power-iteration vector
        # of nn.utils.spectral_norm, and every product must see the same function.
        self._saved_buffers = snapshot_buffers(model)
        # Generators stored as module attributes are saved too. Each chunk's forward pass starts
        # from their saved states, so it draws the same numbers in every product.
        self._saved_generators = snapshot_generators(model, loss_fn)

    @contextmanager
    def _fixed_randomness(self, chunk: int) -> Iterator[None]:
        """Run a chunk's forward pass with the global generators (torch's, numpy's and
        Python's) seeded by the chunk's index, and the generators stored as module attributes
        at their states from the start of the solve. Restore all of them afterwards.

        Every product thus draws the same dropout mask for a chunk, and training's random
        streams do not move. Sets ``random_draws`` when the pass drew random numbers.
        """
        saved = (np.random.get_state(), random.getstate())
        restore_generators(self._saved_generators)
        try:
            with torch.random.fork_rng(devices=self._devices):
                torch.default_generator.manual_seed(chunk)
                for device in self._devices:
                    torch.cuda.default_generators[device].manual_seed(chunk)
                np.random.seed(chunk)
                random.seed(chunk)
                before = self._rng_states()
                yield
                if not self.random_draws:
                    after = self._rng_states()
                    self.random_draws = (any(not torch.equal(a, b) for a, b in zip(before[0], after[0]))
                                         or before[1] != after[1] or generators_moved(self._saved_generators))
        finally:
            np.random.set_state(saved[0])
            random.setstate(saved[1])
            restore_generators(self._saved_generators)

    def _rng_states(self) -> tuple[list[torch.Tensor], tuple]:
        torch_states = [torch.get_rng_state(), *(torch.cuda.get_rng_state(device) for device in self._devices)]
        numpy_state = np.random.get_state()
        return torch_states, (numpy_state[1].tobytes(), numpy_state[2], random.getstate())

    # -- the two paths ---------------------------------------------------------------

    def _chunk_grads(self, chunk: int, create_graph: bool = True) -> tuple[torch.Tensor, ...]:
        """Return the gradient of the weighted loss of one chunk (zeros for parameters it does not reach)."""
        inputs, targets = self.chunks[chunk]
        restore_buffers(self._saved_buffers)
        with self._fixed_randomness(chunk):
            loss = self.loss_fn(self.model(inputs), targets) * (len(targets) / self.batch_size)
        return torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True,
                                   materialize_grads=True)

    def _grads_times(self, grads: Sequence[torch.Tensor], tangents: list[torch.Tensor], retain_graph: bool) -> torch.Tensor:
        """Return the flat ∇(grads·tangents), zero where a gradient does not depend on the parameters."""
        pairs = [(g, t) for g, t in zip(grads, tangents) if g.requires_grad]
        if not pairs:
            return torch.zeros(self.dim, dtype=torch.float64, device=self.params[0].device)
        outputs, weights = zip(*pairs)
        return self._flat(torch.autograd.grad(outputs, self.params, weights, retain_graph=retain_graph,
                                              allow_unused=True, materialize_grads=True))

    def _split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        pieces = torch.split(vector, [p.numel() for p in self.params])
        return [piece.view_as(p).to(p.dtype) for piece, p in zip(pieces, self.params)]

    @staticmethod
    def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64)

    def _checked_grads(self, chunk: int) -> tuple[torch.Tensor, ...]:
        grads = self._chunk_grads(chunk)
        if has_delayed_error(grads):
            raise RuntimeError("the gradient graph passes through a function marked @once_differentiable")
        return grads

    def _double_backward(self, tangents: list[torch.Tensor]) -> torch.Tensor:
        if len(self.chunks) == 1:
            if self._grads is None:
                self._grads = self._checked_grads(0)
            return self._grads_times(self._grads, tangents, retain_graph=True)
        total = None
        for chunk in range(len(self.chunks)):
            part = self._grads_times(self._checked_grads(chunk), tangents, retain_graph=False)
            total = part if total is None else total + part
        return total

    def _bind_split(self, with_gradient: bool = False) -> bool:
        """Bind the split product, tracing it on first use per model signature; return False if unusable.

        Products alone need only the lean primal part. With ``with_gradient`` the full
        one runs, once, and its gradient is kept.
        """
        if self._split_product is not None and (not with_gradient or self._split_gradient is not None):
            return True
        if len(self.chunks) > 1 or self.split_fallback_reason:
            return False
        inputs, targets = self.chunks[0]
        try:
            with self._fixed_randomness(0):
                self._split_product, self._bound, gradient = cached_split_product(
                    self.model, self.names, self.loss_fn, len(targets) / self.batch_size, self.params, inputs,
                    targets, with_gradient)
        except ParametersReadDirectly:
            raise  # the plain product would drop the same term
        except Exception as error:  # the plain product remains, and it reports its own errors
            self.split_fallback_reason = f"{type(error).__name__}: {error}".splitlines()[0]
            log.info("forward-over-reverse products recompute the primal pass at every product: %s",
                     self.split_fallback_reason)
            return False
        if gradient is not None:
            self._split_gradient = self._flat(gradient)
        return True

    def _forward_over_reverse(self, tangents: list[torch.Tensor]) -> torch.Tensor:
        if self._bind_split():
            return self._flat(self._split_product.product(self._bound, tangents))
        from torch.func import grad, jvp

        def chunk_loss(params: tuple[torch.Tensor, ...], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            outputs = call_with(self.model, dict(zip(self.names, params)), inputs)
            return self.loss_fn(outputs, targets) * (len(targets) / self.batch_size)

        primals = tuple(p.detach() for p in self.params)
        total = None
        for chunk, (inputs, targets) in enumerate(self.chunks):
            gradient = grad(lambda params: chunk_loss(params, inputs, targets))
            with quiet_jvp_setup(), self._fixed_randomness(chunk):
                _, product = jvp(gradient, (primals,), (tuple(tangents),))
            part = self._flat(product)
            total = part if total is None else total + part
        return total

    def _run(self, method: str, tangents: list[torch.Tensor]) -> torch.Tensor:
        if method == "double_backward":
            return self._double_backward(tangents)
        return self._forward_over_reverse(tangents)

    def _choose(self, tangents: list[torch.Tensor]) -> torch.Tensor:
        """Time one product on each path, keep the faster that works, return its product."""
        results: dict[str, tuple[float, torch.Tensor]] = {}
        errors: dict[str, str] = {}
        for method in ("forward_over_reverse", "double_backward"):
            try:
                if len(self.chunks) == 1:
                    self._run(method, tangents)  # builds the cached graph or split; later products reuse it
                started = time.perf_counter()
                product = self._run(method, tangents)
                product.sum().item()  # host sync, so the time covers the device work
            except (RuntimeError, NotImplementedError) as error:
                errors[method] = f"{type(error).__name__}: {error}".splitlines()[0]
                continue
            results[method] = (time.perf_counter() - started, product)
        if not results:
            raise HessianUnsupportedError(describe_unsupported(self.model, self.chunks[0][0], "double_backward",
                                                               RuntimeError(errors["double_backward"]))
                                          + f". Forward-over-reverse failed too ({errors['forward_over_reverse']})")
        self.method = min(results, key=lambda m: results[m][0])
        if len(results) == 2:
            forward, reverse = results["forward_over_reverse"][1], results["double_backward"][1]
            difference = ((forward - reverse).norm() / reverse.norm().clamp_min(1e-30)).item()
            # A non-finite product is not a disagreement: the solver's own check names it.
            if math.isfinite(forward.norm().item()) and math.isfinite(reverse.norm().item()) and not difference <= 1e-3:
                # Double backward differentiates the loss as written; keep it.
                self.method = "double_backward"
                errors["forward_over_reverse"] = f"its product differed from double backward's by {difference:.2e}"
        # Keep only the chosen path's cached state in memory.
        if self.method == "double_backward":
            self._split_product, self._bound, self._split_gradient = None, (), None
        else:
            self._grads = None
        if errors:
            self.fallback_reason = "; ".join(f"{m} failed ({e})" for m, e in errors.items())
            log.warning("Hessian-vector products use %s because %s", self.method, self.fallback_reason)
        return results[self.method][1]

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # a probe may be called inside torch.no_grad(), as evaluation code often is
            return all_reduce_sum(self._local_product(vector), self.group)

    def _local_product(self, vector: torch.Tensor) -> torch.Tensor:
        self.products += 1
        tangents = self._split(vector)
        if self.method == "auto":
            return self._choose(tangents)
        try:
            return self._run(self.method, tangents)
        except ParametersReadDirectly as error:
            raise HessianUnsupportedError(str(error)) from error
        except (RuntimeError, NotImplementedError) as error:
            raise HessianUnsupportedError(describe_unsupported(self.model, self.chunks[0][0], self.method, error)) from error

    def gradient(self) -> torch.Tensor:
        """Return the flat gradient of the loss on the whole batch (float64, detached, all-reduced).

        With one chunk on a path that may use double backward, this builds the cached
        gradient graph that later products reuse, so the gradient comes for free.
        """
        with torch.enable_grad():
            return all_reduce_sum(self._local_gradient(), self.group)

    def _local_gradient(self) -> torch.Tensor:
        if self.method == "forward_over_reverse" and self._bind_split(with_gradient=True):
            return self._split_gradient
        if len(self.chunks) == 1 and self.method in ("auto", "double_backward"):
            try:
                if self._grads is None:
                    self._grads = self._checked_grads(0)
                return self._flat([g.detach() for g in self._grads])
            except RuntimeError as error:
                self._grads = None
                if self.method == "double_backward":
                    raise HessianUnsupportedError(
                        describe_unsupported(self.model, self.chunks[0][0], self.method, error)
                    ) from error
        total = None
        for chunk in range(len(self.chunks)):
            part = self._flat(self._chunk_grads(chunk, create_graph=False))
            total = part if total is None else total + part
        return total

    def release(self) -> None:
        """Drop the cached gradient graph and the bound values of the split product, and restore
        the buffers and the modules' generators."""
        self._grads = None
        self._split_product, self._bound, self._split_gradient = None, (), None
        restore_buffers(self._saved_buffers)
        restore_generators(self._saved_generators)


def has_delayed_error(roots: Sequence[torch.Tensor]) -> bool:
    """Check whether a gradient graph contains the node that ``@once_differentiable`` plants.

    That node hangs off detached copies, so a second derivative taken with respect to
    the parameters never runs it: autograd silently drops its contribution instead of
    raising. Walking the graph is the only way to notice.
    """
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        # torch 2.13 names the planted node's class "Error"; "DelayedError" is its C++ name.
        if type(node).__name__ in ("Error", "DelayedError"):
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _double_backward_through(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """Differentiate twice through one recorded call of ``module``, raising RuntimeError where that fails."""
    sources = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    sources += [p for p in module.parameters(recurse=False) if p.requires_grad]
    first = torch.autograd.grad(output.square().sum(), sources, create_graph=True, allow_unused=True)
    if has_delayed_error([g for g in first if g is not None]):
        raise RuntimeError("once differentiable")
    second = sum(g.sum() for g in first if g is not None and g.requires_grad)
    if isinstance(second, torch.Tensor):
        torch.autograd.grad(second, sources, allow_unused=True)


def _forward_over_reverse_through(module: nn.Module, args: tuple) -> None:
    """Take ``torch.func.jvp`` of the gradient through one call of ``module`` on ``args``.

    Raises RuntimeError where forward-mode differentiation fails. Leaves the module's buffers as found.
    """
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    params = {n: p.detach() for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    buffers = snapshot_buffers(module)  # module is a leaf, so these are its own buffers

    def squared_output(weights: dict[str, torch.Tensor], tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        call = list(args)
        for i, tensor in zip(positions, tensors):
            call[i] = tensor
        return torch.func.functional_call(module, weights, tuple(call)).square().sum()

    primals = (params, tuple(args[i].detach() for i in positions))
    tangents = torch.utils._pytree.tree_map(torch.ones_like, primals)
    try:
        torch.func.jvp(torch.func.grad(squared_output, argnums=(0, 1)), primals, tangents)
    finally:
        restore_buffers(buffers)


def describe_unsupported(model: nn.Module, inputs: torch.Tensor, method: str, error: Exception) -> str:
    """Name the first leaf module whose output has no second derivative, and the way out.

    Runs the model once with forward hooks and tries double backward through each
    leaf module on its own; only called after a product has failed.
    """
    if method == "forward_over_reverse" and "ZeroTensors are immutable" in str(error):
        # torch 2.13's forward-mode AD fails this way inside some twice-differentiable
        # losses (nn.MSELoss among them): the model is fine, the path is not.
        return (
            f"forward-mode differentiation failed inside torch ({error}), a known failure of "
            "torch.func.jvp with some losses such as nn.MSELoss, not a missing second derivative. "
            "Use hvp_method='double_backward', or 'auto', which falls back to it"
        )
    records: list[tuple[str, nn.Module, tuple, object]] = []
    names = {module: name for name, module in model.named_modules()}

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if not list(module.children()):
            records.append((names.get(module, "?"), module, args, output))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    culprit = None
    try:
        devices = [inputs.device.index or 0] if inputs.device.type == "cuda" else []
        with torch.enable_grad(), torch.random.fork_rng(devices=devices):  # training's random stream must not move
            model(inputs[:2])
            for handle in handles:  # before the checks, which call the modules again
                handle.remove()
            for name, module, args, output in records:
                if not isinstance(output, torch.Tensor) or not output.requires_grad:
                    continue
                try:
                    if method == "forward_over_reverse":
                        _forward_over_reverse_through(module, args)
                    else:
                        _double_backward_through(module, args, output)
                except RuntimeError:
                    culprit = f"module {name!r} ({type(module).__name__})"
                    break
                except Exception:  # noqa: BLE001 - a check that cannot run on this module says nothing about it
                    continue
    except RuntimeError:
        pass
    finally:
        for handle in handles:
            handle.remove()
    where = culprit or "an operation outside the model's leaf modules (the loss, or a functional call)"
    return (
        f"{where} has no second derivative for the {method} Hessian-vector product ({error}). "
        "Replace it with a twice-differentiable implementation (for attention, "
        "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)), try the other hvp method, or switch the "
        "sharpness probe off for this model"
    )


@dataclass
class EigenEstimate:
    """λ_max with what it cost and how far to trust it.

    ``residual`` is ‖H v − λ v‖ for the returned unit vector v (Lanczos: the Ritz
    residual β_k·|s_k|, equal to the true residual in exact arithmetic); ``lambda_2``
    is the second Ritz value, so λ1/λ2 near 1 warns of a small spectral gap.
    ``eigenvalues`` lists the top-k estimates in decreasing order when k > 1.
    ``lambda_refined`` is λ_max plus a second-order correction from the residual
    (:func:`refined_lower_bound`), often within 1e-3 of λ_max a product or two
    before λ_max itself. It equals λ_max where the residual is not finite, and is NaN
    from the pyhessian backend, which reports no residual.
    """

    lambda_max: float
    vector: torch.Tensor
    hvp_count: int
    residual: float
    converged: bool
    lambda_2: float = math.nan
    eigenvalues: list[float] = field(default_factory=list)
    method: str = ""
    # "disabled" when the solve switched nn.Dropout modules off, "mask fixed" when the forward
    # pass drew random numbers anyway (functional or attention dropout), from one seed per chunk.
    dropout: str = "absent"
    lambda_refined: float = math.nan

    @property
    def gap_ratio(self) -> float:
        """λ1/λ2, the usual warning sign for a slowly converging estimate when near 1."""
        if self.lambda_2 == 0 or not math.isfinite(self.lambda_2):
            return math.nan
        return self.lambda_max / self.lambda_2


def refined_lower_bound(theta: float, residual: float, floor: float) -> float:
    """Return θ + r²/(θ − L), an estimate of λ_max closer than the Rayleigh quotient θ, or θ when r ≥ θ − L.

    For a unit vector u with Rayleigh quotient θ and residual r = ‖Hu − θu‖, and a floor
    L at or below every eigenvalue of H, the matrix M = H − L·I is positive
    semi-definite. The Rayleigh quotient of M at M^(1/2)·u is ‖Mu‖²/(uᵀMu) =
    θ − L + r²/(θ − L), and no Rayleigh quotient of M exceeds λ_max − L. So
    θ + r²/(θ − L) is a lower bound on λ_max, never below θ, and its error is of second
    order in r where θ's is of first order in r²/gap. With L = 0 it is ‖Hu‖²/(uᵀHu).
    A floor above the true bottom of the spectrum can push the value past λ_max, by
    less than r. Returns θ unchanged when r is not finite or r ≥ θ − L: u is then too far
    from an eigenvector for the correction to mean anything.
    """
    if residual < 0:
        raise ValueError(f"invalid residual={residual}: a residual norm ‖Hu − θu‖ is >= 0")
    if not (math.isfinite(residual) and residual < theta - floor):
        return theta
    return theta + residual * (residual / (theta - floor))  # the ratio is < 1, so no overflow


def _checked_product(operator: Operator, vector: torch.Tensor, step: int) -> torch.Tensor:
    """Apply ``operator``, raising a clear error when the Hessian-vector product is not finite."""
    product = operator(vector)
    if not bool(torch.isfinite(product).all()):
        raise FloatingPointError(
            f"the Hessian-vector product at step {step} of the eigenvalue solve is not finite (inf or NaN). "
            "Check that the loss and the parameters are finite, for example that training has not diverged"
        )
    return product


def _random_start(dim: int, generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    return torch.randn(dim, generator=generator, dtype=torch.float64).to(device)


def _orthogonalize(vector: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Return ``vector`` minus its projection on the orthonormal rows of ``basis``, done
    twice, because one pass leaves rounding errors that grow over a long Lanczos run."""
    for _ in range(2):
        vector = vector - basis.T @ (basis @ vector)
    return vector


def check_tol(tol: float) -> None:
    """Raise ValueError unless 0 <= ``tol`` < 1. A tol of 0 never stops a solve early.

    ``tol`` bounds the relative residual ‖Hv − θv‖/|θ|, and one of 1 or more holds for
    vectors far from any eigenvector, so it would stop a solve after its first product.
    """
    if not (isinstance(tol, numbers.Real) and not isinstance(tol, bool) and math.isfinite(tol) and 0 <= tol < 1):
        raise ValueError(f"invalid tol={tol!r}: expected a number in [0, 1), such as 1e-3 (relative residual "
                         "‖Hv − λv‖/|λ|)")


def _unit_start(start: torch.Tensor | None, dim: int, generator: torch.Generator | None,
                device: torch.device | str, solver: str) -> torch.Tensor:
    """Return ``start`` (a Gaussian vector when None) normalized, in float64 on ``device``.

    Raises ValueError naming ``solver`` when the vector is zero or not finite.
    """
    if start is not None and start.numel() != dim:
        raise ValueError(f"the start vector of {solver} has {start.numel()} entries, but the operator acts on "
                         f"{dim}: pass a flat vector over the same parameters (for example a previous estimate's "
                         "eigenvector), or None")
    vector = (start if start is not None else _random_start(dim, generator, device)).to(device=device, dtype=torch.float64)
    norm = vector.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"the start vector of {solver} must be finite and non-zero, not of norm {norm.item()}. "
                         "Pass such a vector, or None for a Gaussian one")
    return vector / norm


def lanczos(
    operator: Operator,
    dim: int,
    k: int = 1,
    max_iter: int = 50,
    tol: float = 1e-3,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    callback: Callable[[int, float, float, float], None] | None = None,
    floor: float | None = None,
    breakdown: float | None = None,
) -> EigenEstimate:
    """Estimate the k largest algebraic eigenvalues of a symmetric operator by Lanczos.

    Every new Lanczos vector is reorthogonalized against all previous ones (twice),
    so no spurious copies of converged eigenvalues appear. The iteration stops when
    each of the top k Ritz pairs has residual at most ``tol``·|θ|, when the Krylov
    space is the whole space, or after ``max_iter`` products; ``converged`` is False
    only in the last case. When the Krylov space turns invariant before it fills the
    whole space (a start on an eigenvector or in the span of a few, such as the gradient
    of a linear least-squares model), the solve goes on from a fresh Gaussian vector
    orthogonal to it, and stops only once that new block's top Ritz pair has a residual
    at most ``tol`` times the top value. A Gaussian start that is itself an eigenvector,
    with eigenvalue α, ends the solve as converged: almost surely H is then α·I on the
    space that vector was drawn from, so α is counted once for each dimension of it (a
    zero Hessian takes one or two products). Invariance is declared at
    β ≤ ``breakdown``·max|θ|, so eigenvalues are resolved only to about
    ``breakdown``·‖H‖. Products computed in float32 carry rounding errors near
    1e-7·‖H‖, so β never falls to float64's 1e-10, and repeated eigenvalues would be
    missed without it being noticed. By default ``breakdown`` follows the precision of
    ``operator.params`` (:func:`product_breakdown`), or is 1e-10 for an operator without them.
    ``start`` (for example the previous estimate's eigenvector) seeds the Krylov
    space; without it a Gaussian vector is drawn from ``generator``. ``callback(j, θ, refined, r)``
    receives, after the j-th product, the top Ritz value, its refined value and its
    residual (benchmarks use it).
    ``floor`` is a lower bound on the spectrum for ``lambda_refined``; by default
    min(0, smallest Ritz value). That default is a true lower bound only for a positive
    semi-definite Hessian or once the smallest Ritz value has converged. Otherwise an
    unconverged solve's ``lambda_refined`` can exceed λ_max (by less than the residual).
    """
    check_count("max_iter", max_iter, "Hessian-vector products at most")
    check_count("k", k, "eigenvalues wanted")
    check_tol(tol)
    if breakdown is None:
        params = getattr(operator, "params", None)
        breakdown = product_breakdown(params) if params else 1e-10
    q = _unit_start(start, dim, generator, device, "Lanczos")
    steps = min(max_iter, dim)
    # Rows grow by doubling: a solve usually stops far below max_iter, and a full
    # (max_iter, dim) block would cost a large allocation on every call.
    basis = torch.empty(min(steps, 8), dim, dtype=torch.float64, device=device)
    basis[0] = q
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    block = 0  # index of the first Lanczos vector since the last restart
    gaussian_block = start is None  # whether the current block started from a Gaussian vector
    repeated = 0  # extra copies of the last block's value, when a Gaussian start was an eigenvector
    for j in range(steps):
        w = _checked_product(operator, basis[j], j + 1)
        alpha = torch.dot(basis[j], w)
        w = w - alpha * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        w = _orthogonalize(w, basis[: j + 1])
        beta = w.norm().item()
        alphas.append(alpha.item())

        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)  # ascending
        top = min(k, len(alphas))
        residuals = beta * vectors[-1, -top:].abs()
        bottom = floor if floor is not None else min(0.0, values[0].item())
        refined = refined_lower_bound(values[-1].item(), residuals[-1].item(), bottom)
        if callback is not None:
            callback(j + 1, values[-1].item(), refined, residuals[-1].item())
        scale = values[-top:].abs().clamp_min(torch.finfo(torch.float64).tiny)
        invariant = beta <= breakdown * max(values.abs().max().item(), 1e-300)
        if j + 1 == dim:  # the whole space: the values are exact
            converged = True
            break
        if invariant and j == block and gaussian_block:
            # A Gaussian vector is almost surely an eigenvector only when H is α·I on the space it
            # was drawn from (the complement of the earlier blocks), so α fills that space. This
            # ends the solve of a zero Hessian after one or two products instead of max_iter.
            repeated = dim - block - 1
            converged = True
            break
        if block > 0:  # since a restart: the newest block's top pair must settle too, at the overall scale
            _, block_vectors = torch.linalg.eigh(tridiagonal[block:, block:])
            block_settled = beta * abs(block_vectors[-1, -1].item()) <= tol * scale[-1].item()
        else:
            block_settled = True
        if not invariant and len(alphas) >= k and block_settled and bool((residuals <= tol * scale).all()):
            converged = True
            break
        if j + 1 < steps:
            if j + 1 == len(basis):
                grown = torch.empty(min(2 * len(basis), steps), dim, dtype=torch.float64, device=device)
                grown[: len(basis)] = basis
                basis = grown
            if invariant:
                # Larger eigenvalues may lie outside an invariant space: go on from a Gaussian
                # vector orthogonal to it, with a zero coupling in the tridiagonal matrix.
                w = _orthogonalize(_random_start(dim, generator, device), basis[: j + 1])
                basis[j + 1] = w / w.norm()
                betas.append(0.0)
                block = j + 1
                gaussian_block = True
            else:
                basis[j + 1] = w / beta
                betas.append(beta)

    used = len(alphas)
    ritz = vectors[:, -1].to(device)
    vector = basis[:used].T @ ritz
    vector = vector / vector.norm()
    spectrum = sorted(values.tolist() + [alphas[-1]] * repeated, reverse=True)
    top_values = spectrum[:k]
    return EigenEstimate(
        lambda_max=values[-1].item(),
        vector=vector,
        hvp_count=used,
        residual=beta * abs(vectors[-1, -1].item()),
        converged=converged,
        lambda_2=spectrum[1] if len(spectrum) > 1 else math.nan,
        eigenvalues=top_values,
        method="lanczos",
        lambda_refined=refined,
    )


def lanczos_top_eigen(operator: Operator, dim: int, max_iter: int = 50, tol: float = 1e-3,
                      start: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", breakdown: float | None = None) -> EigenEstimate:
    """Estimate the largest algebraic eigenvalue by Lanczos (:func:`lanczos` with k = 1)."""
    return lanczos(operator, dim, 1, max_iter, tol, start, generator, device, breakdown=breakdown)


def product_breakdown(params: Sequence[torch.Tensor]) -> float:
    """Return the relative β at which Lanczos should call its Krylov space invariant, for products in these dtypes.

    100 machine epsilons of the least precise parameter dtype (1.2e-5 for float32), at
    least 1e-10 and at most 1e-3.
    """
    epsilon = max(torch.finfo(p.dtype).eps for p in params)
    return min(max(1e-10, 100 * epsilon), 1e-3)


def _power(operator: Operator, start: torch.Tensor, shift: float, max_iter: int, tol: float) -> tuple[float, torch.Tensor, int, float, bool, float]:
    """Power iteration on H + shift·I; return (θ of H, v, products, residual, converged, max ‖Hv‖).

    θ and the residual belong to the returned v, the last vector multiplied.
    """
    v = start / start.norm()
    theta, residual, spectral = math.nan, math.inf, 0.0
    for used in range(1, max_iter + 1):
        hv = _checked_product(operator, v, used)
        spectral = max(spectral, hv.norm().item())
        theta = torch.dot(v, hv).item()  # Rayleigh quotient of H
        residual = (hv - theta * v).norm().item()
        if residual <= tol * max(abs(theta), 1e-300):
            return theta, v, used, residual, True, spectral
        shifted = hv + shift * v
        norm = shifted.norm()
        if norm == 0 or not torch.isfinite(norm) or used == max_iter:
            break
        v = shifted / norm
    return theta, v, used, residual, False, spectral


def power_iteration(
    operator: Operator,
    dim: int,
    max_iter: int = 100,
    tol: float = 1e-3,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    floor: float | None = None,
) -> EigenEstimate:
    """Estimate the largest algebraic eigenvalue by power iteration, shifted when needed.

    Plain power iteration converges to the eigenvalue of largest magnitude. When that
    one is negative, or the iteration does not converge (for example λ_max = −λ_min),
    the second phase iterates on H + s·I with s the largest ‖Hv‖ seen, which makes the
    spectrum non-negative and λ_max + s dominant when s ≥ |λ_min| (s ≤ ‖H‖, so a few
    products can leave it short). ``max_iter`` bounds each phase.
    ``floor`` is the spectrum's lower bound for ``lambda_refined``: by default 0, or −s
    after a shifted phase. For an indefinite Hessian 0 is not a true bound, and −s is one
    only when s ≥ |λ_min|; otherwise an unconverged estimate's ``lambda_refined`` can
    exceed λ_max.
    NOTE: from a start inside an invariant subspace (an eigenvector, or the loss gradient
    of linear least squares) power iteration converges to that subspace's top eigenvalue
    and reports it as converged. Lanczos detects that case and looks further.
    """
    check_count("max_iter", max_iter, "Hessian-vector products at most, in each phase")
    check_tol(tol)
    start = _unit_start(start, dim, generator, device, "power iteration")
    theta, v, used, residual, converged, spectral = _power(operator, start, 0.0, max_iter, tol)
    total, shift = used, 0.0
    if not converged or theta < 0:
        shift = spectral
        theta, v, used, residual, converged, _ = _power(operator, v + 0.1 * _random_start(dim, generator, device), shift, max_iter, tol)
        total += used
    refined = refined_lower_bound(theta, residual, floor if floor is not None else -shift)
    return EigenEstimate(theta, v / v.norm(), total, residual, converged, method="power", lambda_refined=refined)


def hutchinson_trace(operator: Operator, dim: int, samples: int = 20, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """Estimate tr(H) as the mean of vᵀHv over Rademacher vectors; return (mean, standard error)."""
    check_count("samples", samples, "Rademacher vectors")
    values = []
    for _ in range(samples):
        v = (torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64) * 2 - 1).to(device)
        values.append(torch.dot(v, operator(v)).item())
    mean = sum(values) / samples
    spread = math.sqrt(sum((x - mean) ** 2 for x in values) / (samples - 1) / samples) if samples > 1 else math.nan
    return mean, spread


ESTIMATORS = ("lanczos", "power")
# Weight of the Gaussian vector mixed into every start of top_eigenvalue, relative to the unit start.
START_NOISE = 0.1


def mixed_start(start: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return the unit ``start`` plus ``START_NOISE`` times a unit Gaussian vector from ``generator``.

    A start orthogonal to the top eigenvector keeps the whole Krylov space orthogonal to
    it. Examples are the loss gradient of a bias at its optimum, or the previous
    eigenvector after a new direction sharpened. The solve then converges to a smaller
    eigenvalue with a small residual. The Gaussian part gives every eigenvector a non-zero
    weight; at 0.1 it lowers the start's cosine with a well-aligned top eigenvector by
    only about 0.5%.
    """
    start = start.to(torch.float64)
    noise = _random_start(start.numel(), generator, start.device)
    return start / start.norm() + START_NOISE * noise / noise.norm()


def top_eigenvalue(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    max_iter: int = 50,
    tol: float = 1e-3,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    warn: bool = True,
    hvp_method: str = "auto",
    estimator: str = "lanczos",
    preconditioner: torch.Tensor | None = None,
    group=None,
    params: Sequence[torch.Tensor] | None = None,
) -> EigenEstimate:
    """Estimate λ_max of the loss Hessian on one batch, in the model's current mode.

    The Hessian is over ``params`` (by default every parameter with ``requires_grad``),
    taken in the order of ``model.named_parameters()``; the others are held fixed.

    With ``preconditioner`` d (a flat positive vector, the diagonal of P), estimates
    λ_max(P^-1/2 H P^-1/2) instead, the sharpness that governs an Adam step.
    ``estimate.method`` records the estimator and the product path used.

    Without ``start``, the solve starts from the loss gradient (scaled by P^-1/2 when
    preconditioned), which lies mostly in the top eigenspace of the Hessian, so
    Lanczos needs about one product fewer than from a random vector (4 against 5-6
    for 1e-3 relative error on a CIFAR-ResNet-20, ``benchmarks/sharpness.py``). A zero
    or non-finite gradient falls back to a Gaussian start. Either start, given or the
    gradient, is mixed with a Gaussian vector (:func:`mixed_start`), so that a start
    orthogonal to the top eigenvector cannot hide it. Random numbers come from
    ``generator``, by default a fresh one seeded with 0, never from the global generator.

    Under ``torch.distributed`` each rank passes its part of the batch and gets the
    estimate for the union (see :class:`HessianOperator`); ``generator`` must then be
    seeded alike on every rank.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"invalid estimator={estimator!r}: expected one of {ESTIMATORS}")
    operator = HessianOperator(model, loss_fn, inputs, targets, params=params, chunk_size=chunk_size, method=hvp_method,
                               group=group)
    device = operator.params[0].device
    apply: Operator = operator
    if preconditioner is not None:
        diagonal = preconditioner.detach().reshape(-1)
        if diagonal.numel() != operator.dim or not bool(torch.isfinite(diagonal).all() and (diagonal > 0).all()):
            raise ValueError(f"the preconditioner must be a flat vector of {operator.dim} finite positive entries "
                             f"(the diagonal of P over the parameters, in order), not one of {diagonal.numel()} "
                             "entries with a minimum of "
                             f"{diagonal.min().item() if diagonal.numel() else math.nan:.3g}")
        scale = diagonal.to(device=device, dtype=torch.float64).rsqrt()
        apply = lambda v: scale * operator(scale * v)  # noqa: E731
    solve = (functools.partial(lanczos_top_eigen, breakdown=product_breakdown(operator.params))
             if estimator == "lanczos" else power_iteration)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    try:
        with solve_mode(model) as record:
            if start is None:
                gradient = operator.gradient()
                if preconditioner is not None:
                    gradient = scale * gradient
                norm = gradient.norm()
                if torch.isfinite(norm) and norm > 0:
                    start = gradient
            if start is not None:
                start = start.detach().reshape(-1).to(device=device, dtype=torch.float64)
                norm = start.norm()
                # A start of the wrong size or norm goes to the solver unmixed, whose error names it.
                if len(start) == operator.dim and torch.isfinite(norm) and norm > 0:
                    start = mixed_start(start, generator)
            estimate = solve(apply, operator.dim, max_iter, tol, start, generator, device)
    except ValueError as error:
        if "Expected more than 1 value per channel" not in str(error):
            raise
        sizes = sorted({len(chunk_targets) for _, chunk_targets in operator.chunks})
        raise ValueError(
            f"BatchNorm in train mode received one value per channel ({error}). The sharpness batch of "
            f"{len(targets)} inputs is cut into chunks of {sizes} inputs; pick a chunk_size that leaves at least 2 "
            "inputs in every chunk, or evaluate BatchNorm in eval mode"
        ) from error
    finally:
        operator.release()
    estimate.method = f"{estimate.method}/{operator.method}"
    estimate.dropout = "mask fixed" if operator.random_draws else record["dropout"]
    if warn and not estimate.converged:
        warnings.warn(
            f"λ_max estimate {estimate.lambda_max:.6g} did not converge in {estimate.hvp_count} "
            f"Hessian-vector products (residual {estimate.residual:.3g}, tolerance {tol}·|λ|); "
            "raise max_iter to trust it",
            RuntimeWarning,
            stacklevel=2,
        )
    return estimate

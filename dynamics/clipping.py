"""δ-GClip: gradient clipping with a floor on the step size.

For base learning rate η (the wrapped optimizer's ``lr`` after any scheduler), clipping
threshold γ > 0 and floor δ ∈ [0, 1], each step uses the clip factor

    c_t = min(1, max(δ, γ / (‖g_t‖ + ε))),        ε = 1e-8,

and the effective step size h_t = η·c_t. Here g_t is the gradient of the training loss
as stored in ``.grad`` (so without the weight decay that the wrapped optimizer adds),
and ‖·‖ is one global L2 norm over every parameter that has a gradient, across all
parameter groups. δ = 0 is plain GClip.

The factor is applied as a learning-rate multiplier on the wrapped optimizer for that
one step. For SGD this equals scaling the gradient; for Adam it is the only form that
changes the update, because Adam's update is invariant to the scale of the gradient.

Two flags describe each step:

- clip active: γ / (‖g‖ + ε) < 1, the clipping bound is below the gradient norm;
- δ active (the floor binds): δ > γ / (‖g‖ + ε) and δ < 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from dynamics.distributed import all_reduce_sum, broadcast_from_first

EPS = 1e-8


@dataclass(frozen=True)
class StepMeasurement:
    """Measurement and clip decision of one step, shared by the clipping rule and the probes.

    ``grad_norm`` is the global L2 norm of ``.grad`` before clipping; ``lr`` is η, the
    first parameter group's learning rate before the clip factor; ``effective_lr`` is
    h = η·``clip_factor``.
    """

    grad_norm: float
    lr: float
    clip_factor: float
    effective_lr: float
    clip_active: bool
    delta_active: bool
    skipped: bool = False  # the gradient held inf or NaN, so no step was taken

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def global_grad_norm(params: Iterable[torch.Tensor], sharded: bool = False, group=None) -> torch.Tensor:
    """Return the L2 norm of all ``.grad`` tensors together, as a 0-d float32 tensor.

    Under ``torch.distributed`` (``group``, or the default group when one is active):
    with replicated gradients (DDP, after its all-reduce) the local norm is the norm of
    the averaged gradient, and the first rank's value is broadcast so that every rank
    holds the same bits. With ``sharded=True`` (FSDP, where each rank holds a piece of
    the gradient) the result is the square root of the all-reduced sum of squares.

    Parameters without a gradient are skipped. Per-tensor norms come from one fused
    ``torch._foreach_norm`` call per device and dtype, accumulated in float32. When
    that overflows (finite elements of about 1e19 or more square past float32's
    range), the norm is recomputed in float64, so only a gradient that contains inf or
    NaN has a non-finite norm.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if sharded:
        return _sharded_norm(grads, group)
    if not grads:
        raise ValueError("no parameter has a gradient: call loss.backward() before measuring")
    return broadcast_from_first(_local_norm(grads), group)


def _sharded_norm(grads: list[torch.Tensor], group) -> torch.Tensor:
    """Return sqrt(Σ over ranks of the local sum of squares), accumulated in float64."""
    if grads:
        device = grads[0].device
    else:  # this rank has no shard with a gradient; it still joins the all-reduce
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        local += grad.double().square().sum()
    return all_reduce_sum(local, group).sqrt().float()


def _local_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    grouped: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for grad in grads:
        grouped.setdefault((grad.device, grad.dtype), []).append(grad)
    device = grads[0].device
    squares = []
    for group in grouped.values():
        norms = torch._foreach_norm(group, 2.0)
        squares.append(torch.stack(norms).float().to(device).square().sum())
    total = torch.stack(squares).sum().sqrt()
    if torch.isfinite(total):
        return total
    # host sync, only on this rare path: tell overflow from a gradient holding inf or NaN.
    wide = torch.stack([g.double().norm().to(device) for g in grads]).norm()
    return wide.float() if torch.isfinite(wide) else total


def clip_factor(grad_norm: float, gamma: float, delta: float, eps: float = EPS) -> float:
    """Return c = min(1, max(δ, γ / (‖g‖ + ε))); a non-finite norm gives δ."""
    ratio = gamma / (grad_norm + eps)
    if not math.isfinite(ratio):
        ratio = 0.0 if math.isnan(ratio) else ratio
    return min(1.0, max(delta, ratio))


def measure_step(
    grad_norm: float, lr: float, gamma: float, delta: float, eps: float = EPS
) -> StepMeasurement:
    """Apply the δ-GClip rule to one measured gradient norm.

    A non-finite norm marks the step as skipped: no step size (h = 0), and neither
    clipping nor the floor counts as active.
    """
    if not math.isfinite(grad_norm):
        return skipped_step(grad_norm, lr)
    ratio = gamma / (grad_norm + eps)
    factor = clip_factor(grad_norm, gamma, delta, eps)
    return StepMeasurement(
        grad_norm=grad_norm,
        lr=lr,
        clip_factor=factor,
        effective_lr=lr * factor,
        clip_active=ratio < 1.0,
        delta_active=delta > ratio and delta < 1.0,
    )


def unclipped_step(grad_norm: float, lr: float) -> StepMeasurement:
    """Return the measurement of a step taken without any clipping (plain SGD or Adam)."""
    if not math.isfinite(grad_norm):
        return skipped_step(grad_norm, lr)
    return StepMeasurement(grad_norm, lr, 1.0, lr, False, False)


def skipped_step(grad_norm: float, lr: float) -> StepMeasurement:
    """Return the measurement of a step skipped because its gradient held inf or NaN."""
    return StepMeasurement(grad_norm, lr, math.nan, 0.0, False, False, skipped=True)


class NonFiniteGradientError(FloatingPointError):
    """A gradient held inf or NaN and the run was configured to stop on it."""


def _check_range(name: str, value: float, low: float, high: float, low_open: bool) -> None:
    below = value <= low if low_open else value < low
    if not isinstance(value, (int, float)) or math.isnan(value) or below or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"invalid {name}={value!r}: expected a number in {bracket}{low}, {high}]")


class DeltaGClip(Optimizer):
    r"""Wrap any ``torch.optim`` optimizer with δ-GClip.

    At every step, with η the learning rate of each parameter group::

        c_t = min(1, max(δ, γ / (‖g_t‖ + ε)))
        lr_group ← η_group · c_t           (for this step only, then restored)
        inner.step()

    Args:
        optimizer: the wrapped optimizer (SGD, Adam, AdamW, ...). Its learning rate is
            η; LR schedulers may be attached to either this wrapper or the inner one.
        gamma: clipping threshold γ > 0, in units of gradient norm.
        delta: floor δ ∈ [0, 1] on the clip factor. δ = 0 is GClip, δ = 1 never clips.
        eps: ε added to the norm before dividing.
        nonfinite: what a gradient holding inf or NaN does: ``skip`` the step (the
            parameters and the inner optimizer's state stay as they are, and
            ``skipped_steps`` counts it) or ``raise`` :class:`NonFiniteGradientError`.
        sharded: the gradients are sharded across ranks (FSDP), so ‖g‖ all-reduces the
            sum of squares. Leave False for DDP, whose gradients are replicated.
        process_group: the ``torch.distributed`` process group (default: the global group when
            one is initialized). Every rank gets the same ‖g‖, clip factor and counters.

    The wrapper shares ``param_groups`` and ``state`` with the inner optimizer, so it
    passes as an ``Optimizer`` to schedulers. Call :meth:`measure` after ``backward``
    to read the step's measurement before stepping; :meth:`step` reuses it, so the
    gradient norm is computed once per step.
    """

    def __init__(
        self, optimizer: Optimizer, gamma: float, delta: float = 0.0, eps: float = EPS, nonfinite: str = "skip",
        sharded: bool = False, process_group=None,
    ) -> None:
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"invalid nonfinite={nonfinite!r}: expected 'skip' or 'raise'")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"DeltaGClip wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DeltaGClip):
            raise TypeError("DeltaGClip cannot wrap another DeltaGClip")
        _check_range("gamma", gamma, 0.0, math.inf, low_open=True)
        _check_range("delta", delta, 0.0, 1.0, low_open=False)
        _check_range("eps", eps, 0.0, math.inf, low_open=False)
        for group in optimizer.param_groups:
            lr = group["lr"]
            lr = lr.item() if isinstance(lr, torch.Tensor) else lr
            _check_range("lr", lr, 0.0, math.inf, low_open=True)

        self.optimizer = optimizer
        self.gamma = float(gamma)
        self.delta = float(delta)
        self.eps = float(eps)
        # Optimizer.__init__ appends the inner optimizer's group dicts themselves, so
        # both objects see every change a scheduler makes to ``lr``.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.nonfinite = nonfinite
        self.sharded, self.process_group = sharded, process_group  # how ‖g‖ is combined across ranks (see global_grad_norm)
        self.last: StepMeasurement | None = None
        self._pending: StepMeasurement | None = None
        self.steps = 0
        self.skipped_steps = 0

    def __repr__(self) -> str:
        return f"DeltaGClip(gamma={self.gamma}, delta={self.delta}, eps={self.eps}, optimizer={self.optimizer!r})"

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def grad_norm(self) -> torch.Tensor:
        """Return ‖g‖ over this optimizer's parameters, combined across ranks as configured (no host sync)."""
        return global_grad_norm(self._params(), sharded=self.sharded, group=self.process_group)

    def measure(self, grad_norm: float | None = None) -> StepMeasurement:
        """Measure ‖g‖ (unless given) and decide the clip factor for the coming step.

        The call syncs with the device once (``.item()`` on the norm).
        """
        if grad_norm is None:
            grad_norm = self.grad_norm().item()
        lr = self.param_groups[0]["lr"]
        lr = lr.item() if isinstance(lr, torch.Tensor) else float(lr)
        self._pending = measure_step(grad_norm, lr, self.gamma, self.delta, self.eps)
        return self._pending

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Take one step of the wrapped optimizer with every group's lr scaled by c_t."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        measurement = self._pending if self._pending is not None else self.measure()
        self._pending = None
        if measurement.skipped:
            self.last = measurement
            self.steps += 1
            self.skipped_steps += 1
            if self.nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"invalid gradient at step {self.steps}: norm {measurement.grad_norm}, the gradient contains inf or NaN; "
                    "lower the learning rate, or use nonfinite='skip' to skip such steps"
                )
            return loss

        base_lrs = [group["lr"] for group in self.param_groups]
        try:
            for group, lr in zip(self.param_groups, base_lrs):
                group["lr"] = lr * measurement.clip_factor
            self.optimizer.step()
        finally:
            for group, lr in zip(self.param_groups, base_lrs):
                group["lr"] = lr
        self.last = measurement
        self.steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "gamma": self.gamma,
            "delta": self.delta,
            "eps": self.eps,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "last": None if self.last is None else self.last.as_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"optimizer", "gamma", "delta", "eps", "steps", "last"} - set(state_dict)
        if missing:
            raise ValueError(f"not a DeltaGClip state_dict: missing keys {sorted(missing)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        # The inner load replaces its group dicts, so share them again.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        self.gamma = float(state_dict["gamma"])
        self.delta = float(state_dict["delta"])
        self.eps = float(state_dict["eps"])
        self.steps = int(state_dict["steps"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        last = state_dict["last"]
        self.last = None if last is None else StepMeasurement(**last)


class DeltaWarmup:
    """Apply δ-GClip only during the first ``epochs`` epochs, then step unclipped.

    Call :meth:`set_epoch` at the start of every epoch (the trainer does). During
    warm-up the wrapper's floor is ``delta``; afterwards the clip factor is 1.
    """

    def __init__(self, clipper: DeltaGClip, epochs: int) -> None:
        if not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"invalid warm-up epochs={epochs!r}: expected an integer >= 0")
        self.clipper = clipper
        self.epochs = epochs
        self.delta = clipper.delta
        self.gamma = clipper.gamma

    def set_epoch(self, epoch: int) -> None:
        """Switch clipping on for epochs 0..epochs-1 and off from then on."""
        if epoch < self.epochs:
            self.clipper.gamma, self.clipper.delta = self.gamma, self.delta
        else:
            # δ = 1 makes c_t = 1 at every step, and neither flag can be raised
            # by a norm below inf: clipping is off.
            self.clipper.gamma, self.clipper.delta = math.inf, 1.0

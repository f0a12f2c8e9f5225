"""The λ_max probe: sharpness of the training loss against the stability thresholds."""

from __future__ import annotations

import logging
import math
import numbers

import torch
from torch import nn

from dynamics.distributed import sum_over_ranks

from dynamics.events import Callback, TrainState
from probes.backends import pyhessian_top_eigenvalue
from probes.hessian import (ESTIMATORS, HVP_METHODS, EigenEstimate, HessianUnsupportedError, check_batch, check_tol,
                            hessian_dim, is_integer, top_eigenvalue)
from probes.state import preserved_model_state
from probes.thresholds import adam_preconditioner, adam_threshold, eos_deviation, stability_thresholds

log = logging.getLogger(__name__)

BN_MODES = ("train", "eval")
BACKENDS = ("ours", "pyhessian")
STARTS = ("auto", "previous", "gradient")
# Under start="auto", the previous eigenvector starts the next solve only while the last
# two solves' eigenvectors had |cos| at least this. On a CIFAR-ResNet-20 under minibatch
# SGD (benchmarks/sharpness.py --compare-starts), Lanczos from the previous eigenvector
# needed 2 products fewer than from the loss gradient at |cos| 0.97, 0-1 fewer at
# 0.34-0.67, and 2 more at 0.02-0.05. Solving every 40 steps, |cos| stayed at 0.16-0.31.
MIN_WARM_COSINE = 0.5
# Under hvp_method="auto" the probe keeps the path that the first solve chose, and
# compares both paths again every this many solves. The comparison also catches a traced
# product whose cache key missed a changed value (see probes.linearized), for about 3%
# more work on a CIFAR-ResNet-20 (a double-backward graph and product every 10 solves).
AUTO_RECHECK = 10

__all__ = ["SharpnessProbe", "preserved_model_state"]


# Optimizer settings that the stability thresholds read (from the first parameter group).
THRESHOLD_SETTINGS = ("lr", "momentum", "nesterov", "dampening", "betas")


def _setting(value: object) -> object:
    """Return an optimizer setting as plain Python values: floats for tensors, tuples for lists such as ``betas``."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_setting(item) for item in value)
    return value


def _same_setting(a: object, b: object) -> bool:
    """Compare two settings from :func:`_setting`, floats to float32 precision (a float32 tensor lr of 0.1 is 0.1)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    return a == b


def _inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)


def _optimized_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Return the trainable parameters of ``model`` that ``optimizer`` updates, in the
    order of ``model.named_parameters()`` (the order of the Hessian's rows)."""
    optimized_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [p for _, p in model.named_parameters() if p.requires_grad and id(p) in optimized_ids]


class SharpnessProbe(Callback):
    """Measure λ_max on a fixed sharpness batch and compare it with the stability thresholds.

    Args:
        inputs, targets: the declared sharpness batch, kept fixed for the whole run and
            prepared like the training data but without augmentation.
        every_epochs: measure at the end of every this many epochs (0: only after the
            last epoch).
        every_steps: also measure after every this many optimizer steps (0: never).
        momentum: heavy-ball β in [0, 1), for the (2+2β)/h threshold of an optimizer
            other than ``torch.optim.SGD``, whose own β, ``nesterov`` and ``dampening``
            are read from its first parameter group instead.
        bn_mode: ``train`` evaluates BatchNorm with batch statistics, as in the loss the
            optimizer descends; ``eval`` uses running statistics. Buffers are restored.
        max_iter, tol: budget in Hessian-vector products and relative residual tolerance.
        seed: seed of the probe's own generator, for the Gaussian part of every start
            vector (:func:`probes.hessian.mixed_start`).
        start: what starts each solve after the first. ``previous``: the previous
            estimate's eigenvector (warm start). ``gradient``: the loss gradient, like the
            first solve. ``auto`` (default): the previous eigenvector while it stays
            close to the new one (|cos| ≥ 0.5 between the last two eigenvectors), else
            the gradient, because a turned eigenvector is a worse start than the gradient.
            Rows record the choice (``start``) and |cos| between the estimate's
            eigenvector and the previous estimate's (``eigenvector_cosine``).
        hvp_method: ``auto``, ``double_backward`` or ``forward_over_reverse``.
        estimator: ``lanczos`` (default) or ``power`` (shifted power iteration).
        backend: ``ours`` or ``pyhessian`` (eval-mode BatchNorm, power iteration).
        group: ``torch.distributed`` process group. Each rank passes its part of the
            sharpness batch, and Hessian-vector products are all-reduced, so every rank
            records λ_max of the union. A DDP-wrapped model is unwrapped for the solve.

    Rows go to the ``sharpness`` frame, one per threshold kind; h is the step size the
    optimizer took at the latest step (``state.measurement.effective_lr``). The Hessian
    is over the trainable parameters in the optimizer's ``param_groups``, because the
    others never move. Under Adam or AdamW the probe also measures the preconditioned
    sharpness λ_max(P^-1/2 H P^-1/2), P = diag(sqrt(v̂) + ε) from the optimizer's own
    state, against (2+2β1)/(h(1−β1))
    (row ``preconditioned=True``); the raw λ_max row against 2/h is kept and a warning
    notes that it is not the stability criterion for Adam. A model whose operations have no
    second derivative switches the probe off with a logged reason, recorded in the
    ``probe_events`` frame, and training goes on.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        every_epochs: int = 1,
        every_steps: int = 0,
        momentum: float = 0.0,
        bn_mode: str = "train",
        max_iter: int = 50,
        tol: float = 1e-3,
        seed: int = 0,
        chunk_size: int | None = None,
        hvp_method: str = "auto",
        estimator: str = "lanczos",
        backend: str = "ours",
        group=None,
        start: str = "auto",
    ) -> None:
        checks = [
            (bn_mode in BN_MODES, "bn_mode", bn_mode, BN_MODES),
            (hvp_method in HVP_METHODS, "hvp_method", hvp_method, HVP_METHODS),
            (estimator in ESTIMATORS, "estimator", estimator, ESTIMATORS),
            (backend in BACKENDS, "backend", backend, BACKENDS),
        ]
        for ok, name, value, allowed in checks:
            if not ok:
                raise ValueError(f"invalid {name}={value!r}: expected one of {allowed}")
        if not (is_integer(max_iter) and max_iter >= 1):
            raise ValueError(f"invalid max_iter={max_iter!r}: expected an integer >= 1 (Hessian-vector products per solve)")
        check_tol(tol)  # the solvers check it too, but only at the first solve, inside training
        check_batch(inputs, targets, chunk_size)
        for name, value in (("every_epochs", every_epochs), ("every_steps", every_steps)):
            if not (is_integer(value) and value >= 0):
                raise ValueError(f"invalid {name}={value!r}: expected an integer >= 0 (0 switches this cadence off)")
        if not is_integer(seed):
            raise ValueError(f"invalid seed={seed!r}: expected an integer, the seed of the probe's own generator")
        real = isinstance(momentum, numbers.Real) and not isinstance(momentum, bool)
        if not (real and math.isfinite(momentum) and 0 <= momentum < 1):
            raise ValueError(f"invalid momentum={momentum!r}: expected the SGD heavy-ball β, a number in [0, 1) "
                             "(0 without momentum)")
        if backend == "pyhessian" and bn_mode != "eval":
            log.info("the pyhessian backend evaluates BatchNorm in eval mode; bn_mode set to 'eval'")
            bn_mode = "eval"
        self.inputs, self.targets = inputs, targets
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.momentum = momentum
        self.bn_mode = bn_mode
        self.max_iter, self.tol = max_iter, tol
        self.chunk_size = chunk_size
        self.hvp_method, self.estimator, self.backend = hvp_method, estimator, backend
        self.requested_hvp_method = hvp_method  # "auto" is re-run every AUTO_RECHECK solves
        self.group = group  # torch.distributed: each rank passes its part of the sharpness batch
        self._batch_size: int | None = None
        self.generator = torch.Generator().manual_seed(seed)
        self.start = start  # checked by the setter, here and on later assignments
        self.previous: dict[bool, torch.Tensor | None] = {False: None, True: None}
        # |cos| between the last two eigenvectors, per preconditioning; NaN before the second solve.
        self.cosine: dict[bool, float] = {False: math.nan, True: math.nan}
        self.last_start = ""
        self._step_rows: tuple[int, list[dict]] = (-1, [])  # (step, rows) of the latest step-cadence solve
        self.last: EigenEstimate | None = None
        self.disabled_reason = ""
        self.estimates = 0
        self.unconverged = 0
        self._warned_adam = False
        self._warned_stateless = False
        self._warned_momentum = False
        self._warned_groups = False

    def _union_batch_size(self) -> int:
        """Return the sharpness batch size over every rank's part (the local size in a single process)."""
        if self._batch_size is None:
            self._batch_size = sum_over_ranks(len(self.targets), self.targets.device, self.group)
        return self._batch_size

    def measure(self, model: nn.Module, loss_fn: nn.Module, preconditioner: torch.Tensor | None = None,
                params: list[torch.Tensor] | None = None) -> EigenEstimate:
        """Estimate λ_max now (of P^-1/2 H P^-1/2 when a preconditioner is given), leaving the model as it was.

        The Hessian is over ``params`` (by default every parameter with ``requires_grad``),
        ordered as in ``model.named_parameters()``. The preconditioner follows that order.
        """
        preconditioned = preconditioner is not None
        if params is not None and not params:
            raise ValueError("params is empty: pass the parameters to take the Hessian over, or None for every "
                             "trainable parameter")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # DDP's gradient hooks must not see the solve; products are all-reduced instead
        with preserved_model_state(model, loss_fn):
            model.train(self.bn_mode == "train")
            if self.backend == "pyhessian":
                if preconditioned:
                    raise ValueError("the pyhessian backend has no preconditioned sharpness; use backend='ours'")
                trainable = {id(p) for p in model.parameters() if p.requires_grad}
                if params is not None and {id(p) for p in params} != trainable:
                    raise HessianUnsupportedError("the pyhessian backend takes the Hessian over every trainable "
                                                  "parameter, but the optimizer updates only some of them; use "
                                                  "backend='ours'")
                try:
                    estimate = pyhessian_top_eigenvalue(model, loss_fn, self.inputs, self.targets, self.max_iter,
                                                        self.tol)
                except (AssertionError, RuntimeError) as error:
                    # pyhessian asserts on a parameter the loss does not reach, among others.
                    raise HessianUnsupportedError(f"the pyhessian backend failed ({type(error).__name__}: {error}); "
                                                  "use backend='ours'") from error
            else:
                start = self._start_vector(preconditioned, hessian_dim(model, params))
                recheck = self.requested_hvp_method == "auto" and self.estimates % AUTO_RECHECK == 0
                estimate = top_eigenvalue(
                    model, loss_fn, self.inputs, self.targets,
                    max_iter=self.max_iter, tol=self.tol, start=start,
                    generator=self.generator, chunk_size=self.chunk_size, warn=False,
                    hvp_method="auto" if recheck else self.hvp_method, estimator=self.estimator,
                    preconditioner=preconditioner, group=self.group, params=params,
                )
                self.hvp_method = estimate.method.split("/")[-1]  # keep the path "auto" chose
        previous = self.previous[preconditioned]
        if previous is not None and previous.numel() == estimate.vector.numel():
            self.cosine[preconditioned] = abs(torch.dot(previous, estimate.vector)).item()
        self.previous[preconditioned] = estimate.vector
        self.last = estimate
        self.estimates += 1
        # pyhessian's negative value is the largest-magnitude eigenvalue: its backend warns, and max_iter cannot help.
        if not estimate.converged and not (self.backend == "pyhessian" and estimate.lambda_max < 0):
            self.unconverged += 1
            if self.unconverged == 1:
                log.warning(
                    "λ_max estimate %.6g did not converge in %d Hessian-vector products (residual %.3g, "
                    "tolerance %g·|λ|); the sharpness frame marks it converged=False. Raise max_iter to trust it",
                    estimate.lambda_max, estimate.hvp_count, estimate.residual, self.tol,
                )
        return estimate

    @property
    def start(self) -> str:
        """Start vector of each solve after the first: one of ``STARTS`` (see the class docstring)."""
        return self._start

    @start.setter
    def start(self, value: str) -> None:
        if value not in STARTS:
            raise ValueError(f"invalid start={value!r}: expected one of {STARTS}")
        self._start = value

    def __setstate__(self, state: dict) -> None:
        """Read pickles of older versions too: ``start`` was a plain attribute, and later
        attributes take their constructor defaults (before ``start`` existed, probes always
        started from the previous eigenvector). An invalid ``start`` raises ValueError."""
        state = dict(state)
        if "start" in state:
            state["_start"] = state.pop("start")
        defaults = {"_start": "previous", "cosine": {False: math.nan, True: math.nan}, "last_start": "",
                    "_step_rows": (-1, []), "group": None, "_batch_size": None, "_warned_stateless": False,
                    "_warned_momentum": False, "_warned_groups": False,
                    "requested_hvp_method": state.get("hvp_method", "auto")}
        self.__dict__.update({**defaults, **state})
        self.start = self._start  # through the setter: versions before it accepted any string

    def _start_vector(self, preconditioned: bool, dim: int) -> torch.Tensor | None:
        """Return the vector that starts the next solve over ``dim`` parameters, or None for the loss gradient.

        A previous eigenvector of another length (parameters unfrozen since, or newly
        given Adam state) cannot start the solve, so the gradient does.
        """
        previous = self.previous[preconditioned]
        turned = self.cosine[preconditioned] < MIN_WARM_COSINE  # False while NaN
        if previous is not None and previous.numel() != dim:
            self.previous[preconditioned] = previous = None
            self.cosine[preconditioned] = math.nan
        if previous is None or self.start == "gradient" or (self.start == "auto" and turned):
            self.last_start = "gradient"
            return None
        self.last_start = "previous"
        return previous

    def _row(self, state: TrainState, estimate: EigenEstimate, kind: str, threshold: float, preconditioned: bool) -> dict:
        m = state.measurement
        return {
            "run_id": state.run_id,
            "epoch": state.epoch,
            "step": state.step,
            "lambda_max": estimate.lambda_max,
            "lambda_2": estimate.lambda_2,
            "lambda_refined": estimate.lambda_refined,
            "preconditioned": preconditioned,
            "lr": m.lr if m is not None else math.nan,
            "effective_lr": m.effective_lr if m is not None else math.nan,
            "threshold_kind": kind,
            "threshold": threshold,
            "deviation": eos_deviation(estimate.lambda_max, threshold),
            "hvp_count": estimate.hvp_count,
            "converged": estimate.converged,
            "residual": estimate.residual,
            "batch_size": self._union_batch_size(),
            "bn_mode": self.bn_mode,
            "dropout": estimate.dropout,
            "estimator": estimate.method,
            "start": self.last_start if self.backend == "ours" else "random",
            "eigenvector_cosine": self.cosine[preconditioned],
        }

    def _record(self, state: TrainState) -> list[dict]:
        if self.disabled_reason:
            return []
        if state.loss_fn is None:
            raise ValueError("the sharpness probe needs the training loss, but the run has none: pass loss_fn= to "
                             "ProbeSession (the Trainer passes its own)")
        h = state.measurement.effective_lr if state.measurement is not None else math.nan
        inner = _inner_optimizer(state.optimizer)
        adam = isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))
        params = _optimized_params(state.model, inner)
        try:
            self._check_groups(inner, state.run_id)
            estimate = self.measure(state.model, state.loss_fn, params=params)
            rows = [self._row(state, estimate, kind, value, False)
                    for kind, value in stability_thresholds(h, **self._momentum(inner, state.run_id)).items()]
            if adam:
                if not self._warned_adam:
                    log.warning(
                        "%s: under Adam, raw λ_max against 2/h is not the stability criterion; compare the "
                        "preconditioned sharpness (rows with preconditioned=True) with (2+2β1)/(h(1-β1))%s",
                        state.run_id, ". The pyhessian backend cannot measure it, so those rows are left out; "
                        "use backend='ours' for them" if self.backend == "pyhessian" else "",
                    )
                    self._warned_adam = True
                # A parameter that has never had a gradient has no Adam state and has not moved, so the
                # preconditioned Hessian is taken over the parameters that have a second moment.
                moving = [p for p in params if "exp_avg_sq" in inner.state.get(p, {})]
                if len(moving) < len(params) and moving and not self._warned_stateless:
                    log.warning("%s: %d of %d optimized parameters have no Adam state (never a gradient), so the "
                                "preconditioned sharpness leaves them out", state.run_id, len(params) - len(moving),
                                len(params))
                    self._warned_stateless = True
                diagonal = adam_preconditioner(inner, moving) if self.backend == "ours" and moving else None
                if diagonal is not None:
                    beta1 = inner.param_groups[0]["betas"][0]
                    estimate = self.measure(state.model, state.loss_fn, diagonal, moving)
                    rows.append(self._row(state, estimate, "(2+2β1)/(h(1-β1))", adam_threshold(h, beta1), True))
        except HessianUnsupportedError as error:
            self.disabled_reason = str(error)
            log.error("%s: sharpness probe switched off at step %d: %s", state.run_id, state.step, error)
            state.recorder.append("probe_events", {
                "run_id": state.run_id, "epoch": state.epoch, "step": state.step,
                "probe": "sharpness", "event": "disabled", "reason": self.disabled_reason,
            })
            return []
        for row in rows:
            state.recorder.append("sharpness", row)
        return rows

    def _check_groups(self, optimizer: torch.optim.Optimizer, run_id: str) -> None:
        """Warn once when the parameter groups differ in a setting that the thresholds take from the first group.

        NOTE: with per-group step sizes the stability criterion is λ_max(D^1/2 H D^1/2) ≤ 2,
        with D the diagonal of each parameter's step size, which the probe does not measure.
        """
        if self._warned_groups:
            return
        # The first group's settings set the thresholds. Other groups matter only when they
        # contain a trainable parameter, because only those parameters are in the Hessian.
        first, *others = optimizer.param_groups
        groups = [first, *(group for group in others if any(p.requires_grad for p in group["params"]))]
        differing = {}
        for key in THRESHOLD_SETTINGS:
            values = [_setting(group.get(key)) for group in groups]
            if any(not _same_setting(value, values[0]) for value in values[1:]):
                differing[key] = values
        if differing:
            log.warning("%s: the optimizer's param_groups differ in %s; the thresholds use the first group's "
                        "values, so λ_max over all groups against them is not this optimizer's stability "
                        "criterion. Put a trainable group first, or give the groups equal step sizes and "
                        "momentum, to compare λ_max with them",
                        run_id, ", ".join(f"{key} {values}" for key, values in differing.items()))
            self._warned_groups = True

    def _momentum(self, optimizer: torch.optim.Optimizer, run_id: str) -> dict:
        """Return the momentum settings for :func:`stability_thresholds`, read from ``optimizer`` where it has them.

        ``torch.optim.SGD`` gives β, ``nesterov`` and ``dampening`` of its first group. The
        constructor's ``momentum`` serves only optimizers without these settings. Adam's
        threshold is the preconditioned row's; other optimizers get 2/h with a warning
        that it is not their criterion.
        """
        if isinstance(optimizer, torch.optim.SGD):
            group = optimizer.param_groups[0]
            beta = group.get("momentum", 0.0)
            if self.momentum and self.momentum != beta and not self._warned_momentum:
                log.warning("%s: the probe's momentum=%g differs from the optimizer's β=%g; the thresholds use "
                            "the optimizer's", run_id, self.momentum, beta)
                self._warned_momentum = True
            return {"momentum": beta, "nesterov": bool(group.get("nesterov", False)),
                    "dampening": group.get("dampening", 0.0)}
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            return {"momentum": 0.0}
        if not self._warned_momentum:
            log.warning("%s: the probe knows no stability threshold for %s; its rows compare λ_max with 2/h (and "
                        "(2+2β)/h with the probe's momentum=%g), which need not be this optimizer's criterion",
                        run_id, type(optimizer).__name__, self.momentum)
            self._warned_momentum = True
        return {"momentum": self.momentum}

    def after_step(self, state: TrainState) -> None:
        if self.every_steps and state.step % self.every_steps == 0:
            self._step_rows = (state.step, self._record(state))

    def on_epoch_end(self, state: TrainState) -> None:
        due = self.every_epochs and state.epoch % self.every_epochs == 0
        if due or state.epoch == state.epochs:
            step, rows = self._step_rows
            if step != state.step:  # else the step cadence has just measured these same parameters
                rows = self._record(state)
            if rows:
                state.epoch_row["lambda_max"] = rows[0]["lambda_max"]

    def state_dict(self) -> dict:
        return {
            "previous": {str(key): vector for key, vector in self.previous.items() if vector is not None},
            "cosine": {str(key): value for key, value in self.cosine.items()},
            "generator": self.generator.get_state(),
            "hvp_method": self.hvp_method,
            "estimates": self.estimates,
            "unconverged": self.unconverged,
            "disabled_reason": self.disabled_reason,
            "warned_adam": self._warned_adam,
            "warned_momentum": self._warned_momentum,
            "warned_stateless": self._warned_stateless,
            "warned_groups": self._warned_groups,
        }

    def load_state_dict(self, state: dict) -> None:
        self.previous = {False: None, True: None}
        for key, vector in state["previous"].items():
            self.previous[key == "True"] = vector
        self.cosine = {False: math.nan, True: math.nan}
        for key, value in state.get("cosine", {}).items():  # absent in checkpoints written before it existed
            self.cosine[key == "True"] = value
        self.generator.set_state(state["generator"].cpu())
        self.hvp_method = state["hvp_method"]
        self.estimates, self.unconverged = state["estimates"], state["unconverged"]
        self.disabled_reason, self._warned_adam = state["disabled_reason"], state["warned_adam"]
        # Absent in checkpoints written before these warnings were remembered across a resume.
        self._warned_momentum = state.get("warned_momentum", False)
        self._warned_stateless = state.get("warned_stateless", False)
        self._warned_groups = state.get("warned_groups", False)

    def on_train_end(self, state: TrainState) -> None:
        if self.unconverged:
            log.warning("%s: %d of %d λ_max estimates did not converge", state.run_id, self.unconverged, self.estimates)

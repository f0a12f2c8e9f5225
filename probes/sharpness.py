"""The λ_max probe: sharpness of the training loss against the stability thresholds."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from dynamics.events import Callback, TrainState
from probes.hessian import EigenEstimate, top_eigenvalue
from probes.thresholds import eos_deviation, stability_thresholds

log = logging.getLogger(__name__)

BN_MODES = ("train", "eval")


@contextmanager
def preserved_model_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag, every buffer and the global RNG on exit.

    Forward passes in train mode update BatchNorm running statistics, and dropout
    draws from the global generator. This block undoes both, so a probe that runs
    inside it leaves the training run as it found it.
    """
    modes = {module: module.training for module in model.modules()}
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class SharpnessProbe(Callback):
    """Measure λ_max on a fixed sharpness batch and compare it with 2/h and (2+2β)/h.

    Args:
        inputs, targets: the declared sharpness batch, kept fixed for the whole run and
            prepared like the training data but without augmentation.
        every_epochs: measure at the end of every this many epochs, and after the last.
        every_steps: also measure after every this many optimizer steps (0: never).
        momentum: heavy-ball β of the optimizer, for the (2+2β)/h threshold.
        bn_mode: ``train`` evaluates BatchNorm with batch statistics, as in the loss the
            optimizer descends; ``eval`` uses running statistics. Buffers are restored.
        max_iter, tol: Lanczos budget and relative residual tolerance.
        seed: seed of the probe's own generator for the first start vector; later
            estimates start from the previous eigenvector (warm start).

    Rows go to the ``sharpness`` frame, one per threshold kind. The step size h is the
    one the optimizer took at the latest step (``state.measurement.effective_lr``).
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
    ) -> None:
        if bn_mode not in BN_MODES:
            raise ValueError(f"invalid bn_mode={bn_mode!r}: expected one of {BN_MODES}")
        if every_epochs < 0 or every_steps < 0:
            raise ValueError(f"invalid cadence every_epochs={every_epochs}, every_steps={every_steps}: expected >= 0")
        self.inputs, self.targets = inputs, targets
        self.every_epochs, self.every_steps = every_epochs, every_steps
        self.momentum = momentum
        self.bn_mode = bn_mode
        self.max_iter, self.tol = max_iter, tol
        self.chunk_size = chunk_size
        self.generator = torch.Generator().manual_seed(seed)
        self.previous: torch.Tensor | None = None
        self.last: EigenEstimate | None = None
        self.estimates = 0
        self.unconverged = 0

    def measure(self, model: nn.Module, loss_fn: nn.Module) -> EigenEstimate:
        """Estimate λ_max now, leaving the model as it was."""
        with preserved_model_state(model):
            model.train(self.bn_mode == "train")
            estimate = top_eigenvalue(
                model,
                loss_fn,
                self.inputs,
                self.targets,
                max_iter=self.max_iter,
                tol=self.tol,
                start=self.previous,
                generator=self.generator,
                chunk_size=self.chunk_size,
                warn=False,
            )
        self.previous = estimate.vector
        self.last = estimate
        self.estimates += 1
        if not estimate.converged:
            self.unconverged += 1
            if self.unconverged == 1:
                log.warning(
                    "λ_max estimate %.6g did not converge in %d Hessian-vector products (residual %.3g, "
                    "tolerance %g·|λ|); the sharpness frame marks it converged=False. Raise max_iter to trust it",
                    estimate.lambda_max, estimate.hvp_count, estimate.residual, self.tol,
                )
        return estimate

    def _record(self, state: TrainState) -> None:
        estimate = self.measure(state.model, state.loss_fn)
        h = state.measurement.effective_lr if state.measurement is not None else float("nan")
        for kind, threshold in stability_thresholds(h, self.momentum).items():
            state.recorder.append(
                "sharpness",
                {
                    "run_id": state.run_id,
                    "epoch": state.epoch,
                    "step": state.step,
                    "lambda_max": estimate.lambda_max,
                    "lambda_2": estimate.lambda_2,
                    "lr": state.measurement.lr if state.measurement is not None else float("nan"),
                    "effective_lr": h,
                    "threshold_kind": kind,
                    "threshold": threshold,
                    "deviation": eos_deviation(estimate.lambda_max, threshold),
                    "hvp_count": estimate.hvp_count,
                    "converged": estimate.converged,
                    "residual": estimate.residual,
                    "batch_size": len(self.targets),
                    "bn_mode": self.bn_mode,
                },
            )

    def after_step(self, state: TrainState) -> None:
        if self.every_steps and state.step % self.every_steps == 0:
            self._record(state)

    def on_epoch_end(self, state: TrainState) -> None:
        due = self.every_epochs and state.epoch % self.every_epochs == 0
        if due or state.epoch == state.epochs:
            self._record(state)
            state.epoch_row["lambda_max"] = self.last.lambda_max

    def on_train_end(self, state: TrainState) -> None:
        if self.unconverged:
            log.warning("%s: %d of %d λ_max estimates did not converge", state.run_id, self.unconverged, self.estimates)

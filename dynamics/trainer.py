"""A generic supervised trainer that emits the events probes attach to."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dynamics.clipping import DeltaGClip, DeltaWarmup, NonFiniteGradientError
from dynamics.data import TensorLoader
from dynamics.distributed import all_reduce_sum, is_main_process
from dynamics.events import Callback, Recorder, TrainState
from dynamics.session import ProbeSession

log = logging.getLogger(__name__)


CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or belongs to another run."""


def _numpy_rng_state() -> dict:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["position"], state["has_gauss"], state["cached"]))


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_python_rng_state(state: list) -> None:
    random.setstate((state[0], tuple(state[1]), state[2]))


class DivergenceError(RuntimeError):
    """The training loss became non-finite or exceeded the configured bound."""

    def __init__(self, epoch: int, step: int, loss: float, reason: str) -> None:
        super().__init__(f"run diverged at epoch {epoch}, step {step}: {reason} (loss={loss})")
        self.epoch, self.step, self.loss, self.reason = epoch, step, loss, reason


def select_device(device: str | torch.device = "auto") -> torch.device:
    """Return the requested device, or for ``auto`` the first of cuda, mps, cpu present."""
    if str(device) != "auto":
        requested = device
        try:
            device = torch.device(device)
        except RuntimeError:
            device = None
        if device is None or device.type not in ("cpu", "cuda", "mps"):
            raise ValueError(f"invalid device={str(requested)!r}: expected auto, cpu, cuda, cuda:N or mps")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"invalid device={str(device)!r}: CUDA is not available here; use 'cpu' or 'auto'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"invalid device={str(device)!r}: MPS is not available here; use 'cpu' or 'auto'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class TrainConfig:
    """Settings of the training loop itself (the optimizer and model come built).

    ``milestones`` are epochs (1-based, counted as completed epochs) after which every
    group's learning rate is multiplied by ``lr_factor``. ``max_loss`` marks a run as
    diverged when a training batch's loss exceeds it; a non-finite loss always does.
    """

    epochs: int
    milestones: Sequence[int] = ()
    lr_factor: float = 0.1
    max_loss: float = math.inf
    progress: bool | None = None  # None: show the bar only on a terminal
    warmup_epochs: int | None = None  # δ-GClip only in the first epochs, then unclipped
    log_every: int = 1  # log the epoch line every this many epochs, and after the last
    nonfinite: str = "skip"  # a gradient with inf or NaN: "skip" the step, or "raise" NonFiniteGradientError
    autocast: str = "none"  # "bf16": forward and loss under bfloat16 autocast; gradients stay float32
    channels_last: bool = False  # feed 4-D inputs in channels-last memory format (convert the model too)
    compile: bool = False  # run forward passes through torch.compile; probes see the eager module

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"invalid epochs={self.epochs!r}: expected an integer >= 1")
        for milestone in self.milestones:
            if not 1 <= milestone <= self.epochs:
                raise ValueError(
                    f"invalid LR milestone {milestone}: expected an epoch in 1..{self.epochs} (epochs={self.epochs})"
                )
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"invalid lr_factor={self.lr_factor}: expected a number in (0, 1]")
        if self.nonfinite not in ("skip", "raise"):
            raise ValueError(f"invalid nonfinite={self.nonfinite!r}: expected 'skip' or 'raise'")
        if self.autocast not in ("none", "bf16"):
            raise ValueError(f"invalid autocast={self.autocast!r}: expected 'none' or 'bf16'")


@dataclass
class TrainResult:
    """Result of :meth:`Trainer.fit`: the recorded frames and how the run ended."""

    recorder: Recorder
    status: str  # "completed" or "diverged"
    wall_time: float
    reason: str = ""
    diverged_step: int | None = None
    extras: dict = field(default_factory=dict)


class Trainer:
    """Train ``model`` and call the callbacks at each event (see :mod:`dynamics.events`).

    Each step: forward, ``loss_fn`` (mean over the batch), backward, one global
    gradient-norm measurement, ``after_backward``, optimizer step, ``after_step``.
    The optimizer may be a :class:`DeltaGClip`, whose measurement is shared with the
    callbacks, or any ``torch.optim`` optimizer (then the clip factor is 1).

    With a ``scaler`` (``torch.amp.GradScaler``, for mixed precision) the loss is
    scaled for backward and the gradients are unscaled before the measurement, so
    norms, clipping and probes use true gradients. A step the scaler skips is
    recorded as skipped.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        train_loader: TensorLoader,
        test_loader: TensorLoader,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        callbacks: Iterable[Callback] = (),
        device: torch.device | str = "cpu",
        run_id: str = "",
        checkpoint_path: str | os.PathLike | None = None,
        scaler: "torch.amp.GradScaler | None" = None,
        checkpoint_interval: float = 30.0,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.optimizer = optimizer
        self.config = config
        self.callbacks = list(callbacks)
        self.device = torch.device(device)
        self.run_id = run_id
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        # Seconds between checkpoints: one is written at the end of the first epoch that
        # ends this long after the previous one (0: every epoch). A checkpoint contains every
        # row recorded so far, so per-epoch saves of a run with thousands of one-step
        # epochs (full-batch GD) would cost quadratic time.
        self.checkpoint_interval = checkpoint_interval
        self.scaler = scaler
        self.scheduler = None
        if config.milestones:
            self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=list(config.milestones), gamma=config.lr_factor
            )
        self.warmup = None
        if config.warmup_epochs is not None:
            if not isinstance(optimizer, DeltaGClip):
                raise ValueError("warmup_epochs needs a DeltaGClip optimizer")
            self.warmup = DeltaWarmup(optimizer, config.warmup_epochs)
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        # Forward passes go through ``self.forward``; probes get the eager ``self.model``, because
        # a compiled module has no double backward. Both share the parameters.
        self.forward = torch.compile(model) if config.compile else model

    def _autocast(self):
        enabled = self.config.autocast == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.config.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs


    @torch.no_grad()
    def evaluate(self, loader: TensorLoader) -> tuple[float, float]:
        """Return (mean loss, accuracy) of the model in eval mode over ``loader``."""
        was_training = self.model.training
        self.model.eval()
        total_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        count = 0
        for inputs, targets in loader:
            with self._autocast():
                outputs = self.forward(self._inputs(inputs))
                total_loss += self.loss_fn(outputs, targets).double() * len(targets)
            correct += (outputs.argmax(1) == targets).sum()
            count += len(targets)
        self.model.train(was_training)
        return total_loss.item() / count, correct.item() / count

    def checkpoint_state(self, state: TrainState) -> dict:
        """Collect everything needed to continue bit for bit after the current epoch."""
        return {
            "format": CHECKPOINT_FORMAT,
            "run_id": self.run_id,
            "epoch": state.epoch,
            "step": state.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "train_loader_rng": self.train_loader.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy_rng": _numpy_rng_state(),
            "python_rng": _python_rng_state(),
            "callbacks": [callback.state_dict() for callback in self.callbacks],
            "frames": state.recorder.frames,
            "elapsed": state.elapsed,
        }

    def save_checkpoint(self, state: TrainState) -> None:
        path = self.checkpoint_path
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(self.checkpoint_state(state), temporary)
        os.replace(temporary, path)  # a reader never sees a half-written checkpoint

    def load_checkpoint(self, state: TrainState) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` into this trainer and ``state``."""
        path = self.checkpoint_path
        try:
            checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as error:  # any unreadable file is reported the same way
            raise CheckpointError(f"corrupt checkpoint {path}: {error}; delete it to restart this run") from error
        if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("run_id") != self.run_id:
            raise CheckpointError(f"checkpoint {path} belongs to another run or format; delete it to restart this run")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.train_loader.generator.set_state(checkpoint["train_loader_rng"].cpu())
        torch.set_rng_state(checkpoint["torch_rng"].cpu())
        if checkpoint["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in checkpoint["cuda_rng"]])
        _set_numpy_rng_state(checkpoint["numpy_rng"])
        _set_python_rng_state(checkpoint["python_rng"])
        for callback, saved in zip(self.callbacks, checkpoint["callbacks"]):
            callback.load_state_dict(saved)
        state.recorder.frames = checkpoint["frames"]
        state.epoch, state.step = checkpoint["epoch"], checkpoint["step"]
        state.elapsed = checkpoint["elapsed"]
        log.info("resumed %s from %s after epoch %d", self.run_id or "run", path, state.epoch)

    def fit(self) -> TrainResult:
        """Train for ``config.epochs`` epochs, or until the loss diverges.

        With a ``checkpoint_path``, the state is saved at epoch ends (at most every
        ``checkpoint_interval`` seconds), and a run that finds a checkpoint there
        continues from it.
        """
        config = self.config
        self.session = ProbeSession(self.model, self.optimizer, self.callbacks, self.loss_fn, self.run_id,
                                    config.epochs, self.device)
        state = self.session.state
        self.state = state  # callers that catch an exception from fit() still reach the rows
        self.model.train()
        self.session.start()
        if self.checkpoint_path is not None and self.checkpoint_path.is_file():
            self.load_checkpoint(state)
        started = time.perf_counter() - state.elapsed
        last_saved = time.perf_counter()
        try:
            for epoch in range(state.epoch + 1, config.epochs + 1):
                self._train_epoch(state, epoch, started)
                state.elapsed = time.perf_counter() - started
                due = time.perf_counter() - last_saved >= self.checkpoint_interval
                if self.checkpoint_path is not None and due and epoch < config.epochs and is_main_process():
                    self.save_checkpoint(state)
                    last_saved = time.perf_counter()
        except DivergenceError as error:
            log.error("%s: %s", self.run_id or "run", error)
            self.session.finish()
            return TrainResult(state.recorder, "diverged", time.perf_counter() - started, str(error), error.step)
        self.session.finish()
        return TrainResult(state.recorder, "completed", time.perf_counter() - started)

    def _train_epoch(self, state: TrainState, epoch: int, started: float) -> None:
        config = self.config
        session = self.session
        if self.warmup is not None:
            self.warmup.set_epoch(epoch - 1)
        session.start_epoch(epoch)
        count = 0
        correct = torch.zeros((), device=self.device, dtype=torch.int64)  # summed on the device: no sync per step
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}/{config.epochs}",
            leave=False,
            disable=None if config.progress is None else not config.progress,
        )
        for inputs, targets in bar:
            with self._autocast():
                outputs = self.forward(self._inputs(inputs))
                loss = self.loss_fn(outputs, targets)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                # Unscale before measuring, so the norm, the clip decision and every
                # probe see the true gradient; step() below will not unscale again.
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()

            # The one host sync of a step: the divergence check needs the loss, and the clip
            # factor (a learning-rate multiplier) needs ‖g‖.
            session.measure(loss, inputs, targets)
            if not math.isfinite(state.loss) or state.loss > config.max_loss:
                reason = "non-finite loss" if not math.isfinite(state.loss) else f"loss above max_loss={config.max_loss}"
                state.recorder.append("steps", state.step_row)
                raise DivergenceError(epoch, state.step, state.loss, reason)

            session.after_backward()
            if state.measurement.skipped and config.nonfinite == "raise":
                state.recorder.append("steps", state.step_row)
                raise NonFiniteGradientError(
                    f"invalid gradient at epoch {epoch}, step {state.step}: norm {state.measurement.grad_norm}, the "
                    "gradient contains inf or NaN; lower the learning rate, or skip such steps (nonfinite='skip')"
                )
            if self.scaler is not None:
                # The scaler skips a step whose unscaled gradient contains inf or NaN. The
                # measurement already marks it skipped, and the scale shrinks.
                self.scaler.step(self.optimizer)
                self.scaler.update()
            elif state.measurement.skipped and not isinstance(self.optimizer, DeltaGClip):
                log.warning("step %d skipped: the gradient contains inf or NaN (norm %s)", state.step,
                            state.measurement.grad_norm)
            else:
                self.optimizer.step()  # δ-GClip skips (or raises on) a non-finite step itself
            session.after_step()

            correct += (outputs.detach().argmax(1) == targets).sum()
            count += len(targets)
        bar.close()

        test_loss, test_acc = self.evaluate(self.test_loader)
        lr = float(self.optimizer.param_groups[0]["lr"])
        # Under torch.distributed each rank saw its shard of the data; the accuracy is over all of them.
        totals = all_reduce_sum(torch.stack([correct.float(), torch.tensor(float(count), device=correct.device)]))
        correct_total, count_total = totals.tolist()
        row = session.end_epoch(train_acc=correct_total / count_total, test_loss=test_loss, test_acc=test_acc, lr=lr)
        if epoch % config.log_every == 0 or epoch == config.epochs:
            log.info(format_epoch_line(row, config.epochs, time.perf_counter() - started))
        if self.scheduler is not None:
            self.scheduler.step()


def format_epoch_line(row: dict, epochs: int, elapsed: float) -> str:
    """Format the one fixed-width log line per epoch; probe columns appear when present."""
    line = (
        f"epoch {row['epoch']:>4d}/{epochs:<4d} | train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}% "
        f"| test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:6.2f}% | lr {row['lr']:.3e}"
    )
    if "mean_effective_lr" in row:
        line += f" | mean h {row['mean_effective_lr']:.3e}"
    if "delta_active_fraction" in row:
        line += f" | δ-active {100 * row['delta_active_fraction']:5.1f}%"
    if "lambda_max" in row:
        line += f" | λmax {row['lambda_max']:.4g}"
    return line + f" | {row.get('epoch_time', 0.0):6.2f} s/epoch | {elapsed:7.1f} s total"

"""Probes and δ-GClip in any training loop: the step and epoch bookkeeping of the trainer.

:class:`Trainer` uses a :class:`ProbeSession` for every step, and a hand-written loop
can use one the same way, so both write the same frames::

    session = ProbeSession(model, optimizer, probes, loss_fn=loss_fn, run_id="my-run")
    for epoch in range(1, epochs + 1):
        session.start_epoch(epoch)
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            session.after_backward(loss, inputs, targets)   # measures ‖g‖ and the clip factor
            optimizer.step()                                 # δ-GClip reuses that measurement
            session.after_step()
        session.end_epoch(test_loss=..., test_acc=...)
    session.finish()
    frames = session.frames()                                # dict of pandas DataFrames

Under ``torch.distributed`` the recorded loss is the mean over the ranks, and ‖g‖ is
combined as the δ-GClip optimizer is configured. So every rank records the same rows,
and :meth:`ProbeSession.write` writes them on rank 0 only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn

from dynamics.clipping import DeltaGClip, StepMeasurement, global_grad_norm, unclipped_step
from dynamics.distributed import all_reduce_sum, is_distributed, is_main_process, world_size
from dynamics.events import Callback, Recorder, TrainState


def measure_loss_and_norm(loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> tuple[float, StepMeasurement]:
    """Return (loss averaged over ranks, the step's measurement), fetching both in one host sync.

    For a :class:`DeltaGClip` the measurement is also the one its next ``step`` uses.
    """
    if isinstance(optimizer, DeltaGClip):
        norm = optimizer.grad_norm()
    else:
        norm = global_grad_norm([p for group in optimizer.param_groups for p in group["params"]])
    value = loss.detach().float().reshape(())
    if is_distributed():
        value = all_reduce_sum(value.clone()) / world_size()
    loss_value, grad_norm = torch.stack([value, norm.to(value.device)]).tolist()
    if isinstance(optimizer, DeltaGClip):
        return loss_value, optimizer.measure(grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    lr = lr.item() if isinstance(lr, torch.Tensor) else float(lr)
    return loss_value, unclipped_step(grad_norm, lr)


class ProbeSession:
    """Emit the probe events of one training run and collect their rows.

    Args:
        model: the trained module (for DDP, the wrapped ``module``: probes such as
            the sharpness probe need its second derivatives).
        optimizer: the optimizer, usually a :class:`DeltaGClip`.
        callbacks: probes (:class:`dynamics.events.Callback` objects).
        loss_fn: the training loss, for probes that evaluate it (λ_max).
        run_id: the ``run_id`` column of every row.
        epochs: the planned number of epochs, for probes that act after the last one.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, callbacks: Iterable[Callback] = (),
                 loss_fn: nn.Module | None = None, run_id: str = "", epochs: int = 0,
                 device: torch.device | str | None = None) -> None:
        if device is None:
            first = next(model.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        self.callbacks = list(callbacks)
        self.state = TrainState(model=model, optimizer=optimizer, loss_fn=loss_fn, device=torch.device(device),
                                recorder=Recorder(), run_id=run_id, epochs=epochs)
        self.started = False
        self._measured = False  # after_backward measured the current step and after_step has not closed it
        self._epoch_started = time.perf_counter()
        self._loss_sum, self._count = 0.0, 0

    def emit(self, event: str) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(self.state)

    def start(self) -> None:
        """Emit ``on_train_start`` (once; the first :meth:`after_backward` calls it when needed)."""
        if not self.started:
            self.started = True
            self.emit("on_train_start")

    def start_epoch(self, epoch: int) -> None:
        """Begin epoch ``epoch`` (counted from 1): reset the epoch's loss sum and start its clock."""
        self.start()
        self.state.epoch = epoch
        self._epoch_started = time.perf_counter()
        self._loss_sum, self._count = 0.0, 0

    def measure(self, loss: torch.Tensor, inputs: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> StepMeasurement:
        """Count a step, measure its loss and ‖g‖, and open its row; :meth:`after_backward` then emits."""
        self.start()
        if self.state.epoch == 0:
            raise RuntimeError("ProbeSession: call start_epoch(epoch) before the epoch's first step (epochs count from 1)")
        self._measured = True
        state = self.state
        state.step += 1
        state.inputs, state.targets = inputs, targets
        state.loss, state.measurement = measure_loss_and_norm(loss, state.optimizer)
        state.step_row = {"run_id": state.run_id, "epoch": state.epoch, "step": state.step, "loss": state.loss,
                          "lr": state.measurement.lr}
        batch = len(targets) if targets is not None else 1
        self._loss_sum += state.loss * batch
        self._count += batch
        return state.measurement

    def after_backward(self, loss: torch.Tensor | None = None, inputs: torch.Tensor | None = None,
                       targets: torch.Tensor | None = None) -> StepMeasurement:
        """Measure the step (when ``loss`` is given) and emit ``after_backward``; call before ``optimizer.step()``."""
        if loss is not None:
            self.measure(loss, inputs, targets)
        self.emit("after_backward")
        return self.state.measurement

    def after_step(self) -> None:
        """Emit ``after_step`` and record the step's row; call after ``optimizer.step()``."""
        if not self._measured:
            raise RuntimeError("ProbeSession.after_step() called without after_backward(loss) for this step; call "
                               "after_backward(loss, inputs, targets) after loss.backward() and before optimizer.step()")
        self._measured = False
        self.emit("after_step")
        self.state.recorder.append("steps", self.state.step_row)

    def end_epoch(self, **metrics: Any) -> dict[str, Any]:
        """Emit ``on_epoch_end`` and record the epoch's row; return it.

        ``metrics`` are extra columns (``test_loss``, ``test_acc``, ...). ``train_loss``
        defaults to the batch-size-weighted mean of the epoch's step losses, and
        ``lr`` to η of the epoch's last step (a scheduler that already stepped for the
        next epoch does not change it).
        """
        state = self.state
        if state.measurement is not None:
            lr = state.measurement.lr
        else:
            lr = state.optimizer.param_groups[0]["lr"]
            lr = lr.item() if isinstance(lr, torch.Tensor) else float(lr)
        row = {"run_id": state.run_id, "epoch": state.epoch,
               "train_loss": self._loss_sum / self._count if self._count else float("nan")}
        row.update(metrics)
        row.setdefault("lr", lr)
        state.epoch_row = row
        self.emit("on_epoch_end")
        state.epoch_row["epoch_time"] = time.perf_counter() - self._epoch_started
        state.recorder.append("epochs", state.epoch_row)
        return state.epoch_row

    def finish(self) -> None:
        """Emit ``on_train_end``."""
        self.emit("on_train_end")

    def frames(self) -> dict[str, pd.DataFrame]:
        """Return every recorded frame as a DataFrame (``steps``, ``epochs``, ``sharpness``, ...)."""
        return {name: pd.DataFrame(rows) for name, rows in self.state.recorder.frames.items()}

    def write(self, directory: str | os.PathLike) -> list[Path]:
        """Write every frame as ``directory/FRAME.parquet`` on rank 0 only; return the paths written (none elsewhere)."""
        if not is_main_process():
            return []
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, frame in self.frames().items():
            path = directory / f"{name}.parquet"
            temporary = path.with_name(f".{path.name}.tmp")
            frame.to_parquet(temporary)
            os.replace(temporary, path)  # a reader never sees a half-written frame
            paths.append(path)
        return paths

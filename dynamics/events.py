"""The events a training run emits, and the rows that callbacks fill from them.

A callback (a probe) overrides any of these methods; the trainer calls them in this
order for every optimizer step and epoch:

1. ``on_train_start(state)``: once, before the first step.
2. ``after_backward(state)``: ``.grad`` contains g_t, ``state.measurement`` contains ‖g_t‖
   and the clip decision, and the parameters are still x_t.
3. ``after_step(state)``: the optimizer has moved the parameters to x_{t+1}.
4. ``on_epoch_end(state)``: the test set has been evaluated and the model is back
   in train mode. The LR schedule has not yet stepped.
5. ``on_train_end(state)``: once, after the last epoch or a divergence.

A callback adds columns to ``state.step_row`` (steps frame) or ``state.epoch_row``
(epochs frame), and whole rows to other frames with ``state.recorder.append``. It
must leave the training trajectory unchanged: parameters, ``.grad``, buffers, module
modes and every RNG that training draws from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dynamics.clipping import StepMeasurement


class Recorder:
    """Rows of named frames, appended as dicts and turned into DataFrames at the end."""

    def __init__(self) -> None:
        self.frames: dict[str, list[dict[str, Any]]] = {}

    def append(self, frame: str, row: dict[str, Any]) -> None:
        """Append a row; numpy scalars become Python numbers, so checkpoints load with weights_only."""
        clean = {key: value.item() if isinstance(value, np.generic) else value for key, value in row.items()}
        self.frames.setdefault(frame, []).append(clean)

    def rows(self, frame: str) -> list[dict[str, Any]]:
        return self.frames.get(frame, [])


@dataclass
class TrainState:
    """Training state a callback reads at an event. ``epoch`` and ``step`` count from 1."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    recorder: Recorder
    run_id: str = ""
    epoch: int = 0
    step: int = 0
    epochs: int = 0
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    loss: float = float("nan")
    elapsed: float = 0.0  # training seconds before this process, for resumed runs
    measurement: StepMeasurement | None = None
    step_row: dict[str, Any] = field(default_factory=dict)
    epoch_row: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class of everything that listens to a training run; every hook is a no-op."""

    def on_train_start(self, state: TrainState) -> None:
        pass

    def after_backward(self, state: TrainState) -> None:
        pass

    def after_step(self, state: TrainState) -> None:
        pass

    def on_epoch_end(self, state: TrainState) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Return what the callback needs to resume after a checkpoint (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

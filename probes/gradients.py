"""Gradient-norm, clipping-activity and update-magnitude probes.

All three read the one measurement the trainer takes per step
(``state.measurement``: ‖g_t‖, η, c_t, h_t and the two flags), so none of them
computes the gradient norm again.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dynamics.clipping import EPS
from dynamics.events import Callback, TrainState


def log_bins(low: float = 1e-4, high: float = 1e4, per_decade: int = 8) -> np.ndarray:
    """Return log-spaced bin edges from ``low`` to ``high``, ``per_decade`` bins a decade."""
    decades = math.log10(high) - math.log10(low)
    return np.logspace(math.log10(low), math.log10(high), int(round(decades * per_decade)) + 1)


class GradNormProbe(Callback):
    """Record ‖g_t‖ per step, its epoch mean, and an epoch histogram.

    The histogram uses fixed log-spaced edges (``edges``), so runs are comparable,
    plus an underflow bin [0, edges[0]) and an overflow bin [edges[-1], inf).
    Non-finite norms are counted apart, in a row whose bin edges are NaN.
    Rows go to the ``grad_hist`` frame; the step column is ``grad_norm``.
    """

    def __init__(self, edges: np.ndarray | None = None) -> None:
        self.edges = log_bins() if edges is None else np.asarray(edges, dtype=float)
        self.norms: list[float] = []

    def after_backward(self, state: TrainState) -> None:
        state.step_row["grad_norm"] = state.measurement.grad_norm
        self.norms.append(state.measurement.grad_norm)

    def on_epoch_end(self, state: TrainState) -> None:
        norms = np.asarray(self.norms, dtype=float)
        self.norms = []
        finite = norms[np.isfinite(norms)]
        state.epoch_row["mean_grad_norm"] = float(finite.mean()) if finite.size else math.nan
        edges = np.concatenate([[0.0], self.edges, [np.inf]])
        counts, _ = np.histogram(finite, bins=edges)
        for left, right, count in zip(edges[:-1], edges[1:], counts):
            state.recorder.append(
                "grad_hist",
                {"run_id": state.run_id, "epoch": state.epoch, "bin_left": left, "bin_right": right, "count": int(count)},
            )
        state.recorder.append(
            "grad_hist",
            {
                "run_id": state.run_id,
                "epoch": state.epoch,
                "bin_left": math.nan,
                "bin_right": math.nan,
                "count": int(norms.size - finite.size),
            },
        )


class ClipActivityProbe(Callback):
    """Record c_t, h_t and when clipping and the δ floor are active.

    Step columns: ``clip_factor``, ``effective_lr``, ``clip_active``, ``delta_active``
    and ``skipped`` (a gradient with inf or NaN: no step, and no clip or δ event).
    Epoch columns: ``clip_active_fraction``, ``delta_active_fraction`` (fractions of
    the epoch's steps), ``mean_effective_lr`` and ``skipped_steps``. An epoch is
    δ-active when ``delta_active_fraction`` > 0.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.steps = self.clipped = self.floored = self.skipped = 0
        self.effective_lr_sum = 0.0

    def after_backward(self, state: TrainState) -> None:
        m = state.measurement
        state.step_row.update(
            clip_factor=m.clip_factor,
            effective_lr=m.effective_lr,
            clip_active=m.clip_active,
            delta_active=m.delta_active,
            skipped=m.skipped,
        )
        self.steps += 1
        self.clipped += m.clip_active
        self.floored += m.delta_active
        self.skipped += m.skipped
        self.effective_lr_sum += m.effective_lr

    def on_epoch_end(self, state: TrainState) -> None:
        steps = max(self.steps, 1)
        state.epoch_row.update(
            clip_active_fraction=self.clipped / steps,
            delta_active_fraction=self.floored / steps,
            mean_effective_lr=self.effective_lr_sum / steps,
            skipped_steps=self.skipped,
        )
        self._reset()


class UpdateMagnitudeProbe(Callback):
    """Record the relative update magnitude and the measured relative displacement.

    Step columns:

    - ``param_norm``: ‖x_t‖ over the trainable parameters, before the step;
    - ``rum``: RUM_t = ‖h_t·g_t‖ / (‖x_t‖ + ε) = h_t‖g_t‖ / (‖x_t‖ + ε), the
      definition used in the δ-GClip literature, which ignores momentum, Adam's
      preconditioning and weight decay;
    - ``relative_update``: ‖x_{t+1} − x_t‖ / ‖x_t‖, the step the optimizer really
      took, momentum and weight decay included (needs a copy of the parameters; off
      with ``measure_displacement=False``).

    Epoch columns: ``mean_rum``, ``mean_relative_update``.
    """

    def __init__(self, measure_displacement: bool = True) -> None:
        self.measure_displacement = measure_displacement
        self.previous: list[torch.Tensor] | None = None
        self.rums: list[float] = []
        self.updates: list[float] = []

    @staticmethod
    def _params(state: TrainState) -> list[torch.Tensor]:
        return [p for group in state.optimizer.param_groups for p in group["params"] if p.requires_grad]

    @staticmethod
    def _norm(tensors: list[torch.Tensor]) -> float:
        return torch.stack(torch._foreach_norm(tensors, 2.0)).float().norm().item()

    @torch.no_grad()
    def after_backward(self, state: TrainState) -> None:
        params = self._params(state)
        param_norm = self._norm(params)
        m = state.measurement
        rum = m.effective_lr * m.grad_norm / (param_norm + EPS)
        state.step_row.update(param_norm=param_norm, rum=rum)
        self.rums.append(rum)
        if self.measure_displacement:
            self.previous = [p.detach().clone() for p in params]
            self._param_norm = param_norm

    @torch.no_grad()
    def after_step(self, state: TrainState) -> None:
        if not self.measure_displacement:
            return
        params = self._params(state)
        displacement = torch._foreach_sub([p.detach() for p in params], self.previous)
        relative = self._norm(displacement) / self._param_norm if self._param_norm > 0 else math.nan
        state.step_row["relative_update"] = relative
        self.updates.append(relative)
        self.previous = None

    def on_epoch_end(self, state: TrainState) -> None:
        # Skipped steps have RUM NaN (no step size); the means are over the steps taken.
        finite_rums = [r for r in self.rums if math.isfinite(r)]
        state.epoch_row["mean_rum"] = float(np.mean(finite_rums)) if finite_rums else math.nan
        state.epoch_row["mean_relative_update"] = float(np.mean(self.updates)) if self.updates else math.nan
        self.rums, self.updates = [], []

"""A PyTorch Lightning callback that runs the probes and records the same frames as our trainer.

Needs the ``lightning`` package (``pip install 'eos-dynamics[lightning]'``). Use it
with automatic optimization and one optimizer, which may be a
:class:`dynamics.DeltaGClip` returned by ``configure_optimizers``::

    callback = ProbeCallback([GradNormProbe(), ClipActivityProbe(), UpdateMagnitudeProbe()], run_id="run")
    lightning.Trainer(max_epochs=10, callbacks=[callback]).fit(module, loader)
    frames = callback.session.frames()

The step is measured after backward and before the optimizer step, the same point
as in :class:`dynamics.Trainer`, and δ-GClip's step reuses that measurement. The
epoch row gets ``train_loss`` (batch-size-weighted mean of the step losses) and
every metric the module logged that epoch, plus the probes' columns.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

try:
    from lightning.pytorch.callbacks import Callback as LightningCallback
except ImportError as error:  # lightning is an optional extra
    raise ImportError("missing package lightning, which probes.lightning needs: "
                      "pip install 'eos-dynamics[lightning]'") from error

from dynamics.events import Callback
from dynamics.session import ProbeSession


def _batch_parts(batch: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return None, None


class ProbeCallback(LightningCallback):
    """Attach probes to a Lightning run; after ``fit``, ``session`` contains the recorded frames.

    Args:
        probes: the probes (:class:`dynamics.events.Callback` objects).
        run_id: the ``run_id`` column of every row.
        loss_fn: the training loss, for probes that evaluate it (the sharpness probe);
            defaults to the module's ``loss_fn`` attribute when it has one.
    """

    def __init__(self, probes: Iterable[Callback] = (), run_id: str = "", loss_fn=None) -> None:
        self.probes = list(probes)
        self.run_id = run_id
        self.loss_fn = loss_fn
        self.session: ProbeSession | None = None
        self._loss: torch.Tensor | None = None
        self._batch: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def on_train_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"invalid optimizer count {len(trainer.optimizers)}: ProbeCallback supports one optimizer")
        if trainer.gradient_clip_val:
            raise ValueError(f"invalid gradient_clip_val={trainer.gradient_clip_val}: Lightning clips after the probes "
                             "measure ‖g‖, so the recorded step sizes would be wrong; clip with DeltaGClip instead "
                             "(delta=0 is GClip)")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(f"invalid accumulate_grad_batches={trainer.accumulate_grad_batches}: ProbeCallback "
                             "measures one backward per optimizer step; use accumulate_grad_batches=1")
        loss_fn = self.loss_fn if self.loss_fn is not None else getattr(pl_module, "loss_fn", None)
        self.session = ProbeSession(pl_module, trainer.optimizers[0], self.probes, loss_fn, self.run_id,
                                    trainer.max_epochs or 0, pl_module.device)
        self.session.start()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.session.start_epoch(trainer.current_epoch + 1)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batch = _batch_parts(batch)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        inputs, targets = self._batch
        self.session.after_backward(self._loss, inputs, targets)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.session.after_step()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        logged = {name: value.item() if isinstance(value, torch.Tensor) else value
                  for name, value in trainer.callback_metrics.items()}
        self.session.end_epoch(**logged)  # lr: η of the epoch's last step, even if a scheduler already stepped

    def on_train_end(self, trainer, pl_module) -> None:
        self.session.finish()

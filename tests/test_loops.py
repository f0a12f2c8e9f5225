"""Probes in other training loops: a plain loop with ProbeSession and Lightning with ProbeCallback.

Both must record the same frames as our Trainer on the same seed.
"""

import pandas as pd
import pytest
import torch
from torch import nn

from dynamics import DeltaGClip, TensorLoader, TrainConfig, Trainer
from dynamics.session import ProbeSession
from probes import ClipActivityProbe, GradNormProbe, UpdateMagnitudeProbe

EPOCHS = 2
PROBE_EPOCH_COLUMNS = ["epoch", "train_loss", "lr", "mean_grad_norm", "clip_active_fraction", "delta_active_fraction",
                       "mean_effective_lr", "skipped_steps", "mean_rum", "mean_relative_update"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def _optimizer(parameters):
    return DeltaGClip(torch.optim.SGD(parameters, lr=0.2, momentum=0.9), gamma=0.05, delta=0.3)


def _loader(digits):
    return TensorLoader(digits.train_x[:320], digits.train_y[:320], 64, shuffle=True, seed=0)


def _probes():
    return [GradNormProbe(), ClipActivityProbe(), UpdateMagnitudeProbe()]


@pytest.fixture(scope="module")
def reference(digits):
    model = _model()
    test = TensorLoader(digits.test_x, digits.test_y, 512)
    trainer = Trainer(model, nn.CrossEntropyLoss(), _loader(digits), test, _optimizer(model.parameters()),
                      TrainConfig(epochs=EPOCHS, progress=False), _probes(), run_id="run")
    result = trainer.fit()
    return {name: pd.DataFrame(result.recorder.rows(name)) for name in ("steps", "epochs", "grad_hist")}


def _assert_matches(frames, reference):
    pd.testing.assert_frame_equal(frames["steps"], reference["steps"], obj="steps")
    pd.testing.assert_frame_equal(frames["grad_hist"], reference["grad_hist"], obj="grad_hist")
    pd.testing.assert_frame_equal(frames["epochs"][PROBE_EPOCH_COLUMNS], reference["epochs"][PROBE_EPOCH_COLUMNS],
                                  obj="epochs")


def test_plain_loop_matches_trainer(digits, reference):
    model = _model()
    optimizer = _optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    session = ProbeSession(model, optimizer, _probes(), loss_fn=loss_fn, run_id="run", epochs=EPOCHS)
    loader = _loader(digits)
    for epoch in range(1, EPOCHS + 1):
        session.start_epoch(epoch)
        for inputs, targets in loader:
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            session.after_backward(loss, inputs, targets)
            optimizer.step()
            session.after_step()
        session.end_epoch()
    session.finish()
    frames = session.frames()
    _assert_matches(frames, reference)
    assert frames["steps"]["delta_active"].any()  # the δ floor binds in this setting


def test_lightning_callback_matches_trainer(digits, reference):
    import lightning  # in the test extra, so CI always runs this test

    from probes.lightning import ProbeCallback

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()
            self.loss_fn = nn.CrossEntropyLoss()

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return self.loss_fn(self.net(inputs), targets)

        def configure_optimizers(self):
            return _optimizer(self.parameters())

    callback = ProbeCallback(_probes(), run_id="run")
    trainer = lightning.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, callbacks=[callback],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=0)
    trainer.fit(Module(), train_dataloaders=_loader(digits))
    _assert_matches(callback.session.frames(), reference)


def test_session_writes_frames(tmp_path, digits):
    model = _model()
    optimizer = _optimizer(model.parameters())
    session = ProbeSession(model, optimizer, _probes(), run_id="run")
    session.start_epoch(1)
    inputs, targets = next(iter(_loader(digits)))
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    measurement = session.after_backward(loss, inputs, targets)
    optimizer.step()
    session.after_step()
    session.end_epoch(test_acc=0.5)
    paths = session.write(tmp_path)
    assert {p.name for p in paths} == {"steps.parquet", "epochs.parquet", "grad_hist.parquet"}
    epochs = pd.read_parquet(tmp_path / "epochs.parquet")
    assert epochs.loc[0, "test_acc"] == 0.5
    assert epochs.loc[0, "train_loss"] == pytest.approx(loss.item())
    assert optimizer.last == measurement  # δ-GClip's step used the session's measurement


def _lightning_module(scheduler: bool = False):
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            optimizer = _optimizer(self.parameters())
            if not scheduler:
                return optimizer
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}

    return Module()


def test_lightning_rejects_its_own_clipping(digits):
    import lightning

    from probes.lightning import ProbeCallback

    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[ProbeCallback(_probes())],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                gradient_clip_val=1.0)
    with pytest.raises(ValueError, match="invalid gradient_clip_val=1.0"):
        trainer.fit(_lightning_module(), train_dataloaders=_loader(digits))


def test_lightning_epoch_lr_is_the_rate_used(digits):
    """The fault: Lightning steps an epoch scheduler before on_train_epoch_end, so the row got the next epoch's η."""
    import lightning

    from probes.lightning import ProbeCallback

    callback = ProbeCallback(_probes())
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[callback],
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_lightning_module(scheduler=True), train_dataloaders=_loader(digits))
    frames = callback.session.frames()
    assert frames["epochs"]["lr"].tolist() == pytest.approx([0.2, 0.1])
    last_step_lr = frames["steps"].groupby("epoch")["lr"].last().tolist()
    assert frames["epochs"]["lr"].tolist() == pytest.approx(last_step_lr)


def test_session_rejects_misuse(digits):
    model = _model()
    optimizer = _optimizer(model.parameters())
    session = ProbeSession(model, optimizer, _probes())
    inputs, targets = next(iter(_loader(digits)))
    loss = nn.functional.cross_entropy(model(inputs), targets)
    loss.backward()
    with pytest.raises(RuntimeError, match="call start_epoch"):
        session.after_backward(loss, inputs, targets)
    session.start_epoch(1)
    with pytest.raises(RuntimeError, match="without after_backward"):
        session.after_step()

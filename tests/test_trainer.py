"""The trainer: probes are invisible, events fill the frames, divergence is reported."""

import copy
import logging

import pytest
import torch
from torch import nn

from dynamics.clipping import DeltaGClip
from dynamics.data import TensorLoader
from dynamics.models import CifarResNet
from dynamics.trainer import TrainConfig, Trainer, format_epoch_line, select_device
from probes import ClipActivityProbe, GradNormProbe, SharpnessProbe, UpdateMagnitudeProbe


def _fit(digits, probes, lr=0.1, epochs=2, optimizer="dgclip", max_loss=float("inf")):
    torch.manual_seed(0)
    model = CifarResNet(8, in_channels=1)
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    opt = DeltaGClip(base, gamma=0.1, delta=0.2) if optimizer == "dgclip" else base
    train = TensorLoader(digits.train_x[:512], digits.train_y[:512], 64, shuffle=True, seed=0)
    test = TensorLoader(digits.test_x, digits.test_y, 512)
    config = TrainConfig(epochs=epochs, milestones=[epochs], progress=False, max_loss=max_loss)
    result = Trainer(model, nn.CrossEntropyLoss(), train, test, opt, config, probes(digits), run_id="r").fit()
    return result, model


def _all_probes(digits):
    return [
        GradNormProbe(),
        ClipActivityProbe(),
        UpdateMagnitudeProbe(),
        SharpnessProbe(digits.train_x[:64], digits.train_y[:64], every_epochs=1, every_steps=3, momentum=0.9, max_iter=8),
    ]


def test_probes_do_not_change_the_trajectory(digits):
    """Every probe on, including λ_max after steps and epochs, gives bitwise the same run."""
    with_probes, model_a = _fit(digits, _all_probes)
    without, model_b = _fit(digits, lambda d: [])
    losses_a = [row["loss"] for row in with_probes.recorder.rows("steps")]
    losses_b = [row["loss"] for row in without.recorder.rows("steps")]
    assert len(losses_a) == 16
    assert losses_a == losses_b
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values()):
        assert torch.equal(a, b)
    assert len(with_probes.recorder.rows("sharpness")) == 2 * (16 // 3 + 2)  # two threshold kinds


def test_frames_have_the_documented_columns(digits):
    result, _ = _fit(digits, _all_probes)
    step = result.recorder.rows("steps")[0]
    for column in ("run_id", "epoch", "step", "loss", "grad_norm", "clip_factor", "lr", "effective_lr",
                   "clip_active", "delta_active", "rum", "relative_update", "param_norm"):
        assert column in step, column
    epoch = result.recorder.rows("epochs")[-1]
    for column in ("train_loss", "train_acc", "test_loss", "test_acc", "delta_active_fraction", "mean_grad_norm",
                   "mean_rum", "lr", "mean_effective_lr"):
        assert column in epoch, column
    hist = result.recorder.rows("grad_hist")
    assert sum(r["count"] for r in hist if r["epoch"] == 1) == 8  # every step of epoch 1, non-finite row included
    assert step["rum"] == pytest.approx(step["effective_lr"] * step["grad_norm"] / step["param_norm"], rel=1e-6)


def test_relative_update_matches_sgd_step_without_momentum(digits):
    """With no momentum and no weight decay the step is h·g, so RUM equals the displacement."""
    torch.manual_seed(0)
    model = CifarResNet(8, in_channels=1)
    opt = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.1), gamma=0.1, delta=0.2)
    train = TensorLoader(digits.train_x[:128], digits.train_y[:128], 64, seed=0)
    result = Trainer(model, nn.CrossEntropyLoss(), train, train, opt, TrainConfig(1, progress=False),
                     [ClipActivityProbe(), UpdateMagnitudeProbe()]).fit()
    for row in result.recorder.rows("steps"):
        assert row["relative_update"] == pytest.approx(row["rum"], rel=1e-4)


def test_divergence_is_reported_and_rows_kept(digits):
    result, _ = _fit(digits, lambda d: [GradNormProbe()], lr=1.0, optimizer="sgd", max_loss=3.0, epochs=3)
    assert result.status == "diverged"
    assert "max_loss=3.0" in result.reason
    assert result.recorder.rows("steps")[-1]["step"] == result.diverged_step


def test_epoch_line_has_units(caplog):
    row = {"epoch": 3, "train_loss": 0.5, "train_acc": 0.9, "test_loss": 0.6, "test_acc": 0.85, "lr": 0.1,
           "delta_active_fraction": 0.25, "epoch_time": 1.5}
    line = format_epoch_line(row, 10, 12.0)
    assert line.startswith("epoch    3/10")
    assert "acc  90.00%" in line
    assert "δ-active  25.0%" in line
    assert "s/epoch" in line


def test_select_device():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")


def test_milestone_beyond_last_epoch_rejected():
    with pytest.raises(ValueError, match="milestone 12"):
        TrainConfig(epochs=10, milestones=[12])


def test_grad_scaler_measures_unscaled_gradient():
    """With a loss scale of 2^16, the recorded norm must be the true 0.5, not 0.5·2^16."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    # loss = mean((w·x − y)²)/2 with x = 1, y = −0.5: ∂loss/∂w = w·x − y = 0.5 at w = 0.
    loss_fn = lambda outputs, targets: 0.5 * (outputs.squeeze(1) - targets).square().mean()  # noqa: E731
    inputs, targets = torch.ones(4, 1), torch.full((4,), -0.5)
    optimizer = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, delta=0.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loader = TensorLoader(inputs, targets, 4)
    trainer = Trainer(model, loss_fn, loader, loader, optimizer, TrainConfig(1, progress=False),
                      [GradNormProbe(), ClipActivityProbe()], scaler=scaler)
    row = trainer.fit().recorder.rows("steps")[0]
    assert row["grad_norm"] == pytest.approx(0.5)
    assert row["clip_active"] is False
    assert row["skipped"] is False
    assert model.weight.item() == pytest.approx(-0.05)


def test_grad_scaler_skipped_step_is_recorded():
    """A finite gradient of 1e35 overflows float32 once scaled by 2^16: the scaler skips that step."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    loss_fn = lambda outputs, targets: outputs.mean()  # noqa: E731
    inputs, targets = torch.full((2, 1), 1e35), torch.zeros(2)
    optimizer = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.1), gamma=1.0, delta=0.2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    loader = TensorLoader(inputs, targets, 2)
    trainer = Trainer(model, loss_fn, loader, loader, optimizer, TrainConfig(1, progress=False),
                      [ClipActivityProbe()], scaler=scaler)
    row = trainer.fit().recorder.rows("steps")[0]
    assert row["skipped"] is True
    assert row["clip_active"] is False
    assert model.weight.item() == 0.0
    assert scaler.get_scale() < 2.0**16


def test_nonfinite_gradient_raises_when_configured():
    from dynamics.clipping import NonFiniteGradientError

    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    # A finite loss whose gradient is inf: d/dw sqrt(w) at w = 0.
    loss_fn = lambda outputs, targets: outputs.sum() * 0 + model.weight.sqrt().sum()  # noqa: E731
    inputs = torch.ones(2, 1)
    loader = TensorLoader(inputs, torch.zeros(2), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, loss_fn, loader, loader, optimizer, TrainConfig(1, progress=False, nonfinite="raise"),
                      [ClipActivityProbe()])
    with pytest.raises(NonFiniteGradientError, match="contains inf or NaN"):
        trainer.fit()
    assert trainer.state.recorder.rows("steps")[0]["skipped"] is True
    assert model.weight.item() == 0.0


def test_checkpoint_interval_limits_saves(digits, tmp_path, monkeypatch):
    """Saving every one-step epoch of full-batch GD made a 1,500-step run 40x slower."""
    calls = []
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, state: calls.append(state.epoch))

    def fit(interval):
        calls.clear()
        torch.manual_seed(0)
        model = CifarResNet(8, in_channels=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = TensorLoader(digits.train_x[:64], digits.train_y[:64], 64)
        Trainer(model, nn.CrossEntropyLoss(), loader, loader, opt, TrainConfig(5, progress=False),
                checkpoint_path=tmp_path / "checkpoint.pt", checkpoint_interval=interval).fit()
        return list(calls)

    assert fit(0.0) == [1, 2, 3, 4]  # never after the last epoch: the run's frames follow
    assert fit(3600.0) == []


def _fit_with(digits, model, **options):
    torch.manual_seed(0)
    opt = DeltaGClip(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gamma=0.1, delta=0.2)
    train = TensorLoader(digits.train_x[:256], digits.train_y[:256], 64, shuffle=True, seed=0)
    test = TensorLoader(digits.test_x, digits.test_y, 512)
    config = TrainConfig(epochs=1, progress=False, **options)
    return Trainer(model, nn.CrossEntropyLoss(), train, test, opt, config, [GradNormProbe()], run_id="r").fit()


def _model(seed=0):
    torch.manual_seed(seed)
    return CifarResNet(8, in_channels=1)


def test_bf16_autocast_keeps_gradients_float32(digits):
    model = _model()
    result = _fit_with(digits, model, autocast="bf16")
    reference = _fit_with(digits, _model())
    norms = [row["grad_norm"] for row in result.recorder.rows("steps")]
    expected = [row["grad_norm"] for row in reference.recorder.rows("steps")]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert norms[0] == pytest.approx(expected[0], rel=0.05)  # bf16 rounding only
    assert norms != expected  # autocast really ran in bfloat16


def test_channels_last_gives_the_same_run(digits):
    model = _model().to(memory_format=torch.channels_last)
    result = _fit_with(digits, model, channels_last=True)
    reference = _fit_with(digits, _model())
    losses = [row["loss"] for row in result.recorder.rows("steps")]
    expected = [row["loss"] for row in reference.recorder.rows("steps")]
    assert losses == pytest.approx(expected, rel=1e-4)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_compiled_forward_matches_eager(digits):
    torch.manual_seed(0)
    compiled = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    eager = copy.deepcopy(compiled)
    result = _fit_with(digits, compiled, compile=True)
    reference = _fit_with(digits, eager)
    losses = [row["loss"] for row in result.recorder.rows("steps")]
    expected = [row["loss"] for row in reference.recorder.rows("steps")]
    assert losses == pytest.approx(expected, rel=1e-5)


def test_train_config_rejects_unknown_autocast():
    with pytest.raises(ValueError, match="invalid autocast='fp8'"):
        TrainConfig(epochs=1, autocast="fp8")

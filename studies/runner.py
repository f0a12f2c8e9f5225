"""Build a training run from a :class:`RunConfig`, execute it and store its frames."""

from __future__ import annotations

import logging
import subprocess
import time
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from dynamics.clipping import DeltaGClip, NonFiniteGradientError
from dynamics.data import ImageDataset, TensorLoader, load_dataset
from dynamics.losses import build_loss
from dynamics.models import build_model
from dynamics.trainer import TrainConfig, Trainer, TrainResult, select_device
from probes.gradients import ClipActivityProbe, GradNormProbe, UpdateMagnitudeProbe
from probes.sharpness import SharpnessProbe
from studies.config import RunConfig, StudyConfig
from studies.store import RunInUseError, RunStore

log = logging.getLogger(__name__)

EARLY_EPOCHS = 10  # "early RUM" is the mean RUM over the first 10 epochs


@lru_cache(maxsize=1)
def code_version() -> str:
    """Return the git commit of this checkout (with '+dirty'), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            return metadata.version("eos-dynamics")
        except metadata.PackageNotFoundError:
            return "unknown"


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Return the base optimizer, wrapped in δ-GClip unless the method is ``sgd``."""
    params = model.parameters()
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.clip_delta is None:
        return optimizer
    return DeltaGClip(optimizer, gamma=config.gamma, delta=config.clip_delta)


def sharpness_batch(dataset: ImageDataset, loader: TensorLoader, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the fixed sharpness batch: ``size`` training images chosen by ``seed``, not augmented."""
    if size > len(dataset.train_y):
        log.warning("sharpness batch of %d images requested, but the training set has %d; all of them are used",
                    size, len(dataset.train_y))
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset.train_y), generator=generator)[:size].to(dataset.train_y.device)
    return loader.prepare(dataset.train_x[index], augment=False), dataset.train_y[index]


def training_subset(dataset: ImageDataset, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first ``size`` images of a fixed permutation (seed 0), or all for size 0."""
    if size <= 0 or size >= len(dataset.train_y):
        return dataset.train_x, dataset.train_y
    index = torch.randperm(len(dataset.train_y), generator=torch.Generator().manual_seed(0))[:size]
    index = index.to(dataset.train_y.device)
    return dataset.train_x[index], dataset.train_y[index]


def _build_model(config: RunConfig, dataset: ImageDataset) -> nn.Module:
    if config.model == "mlp":
        in_features = dataset.train_x[0].numel()
        return build_model("mlp", in_features=in_features, hidden=tuple(config.hidden), num_classes=dataset.num_classes,
                           activation=config.activation)
    return build_model(config.model, depth=config.depth, width=config.width, in_channels=dataset.in_channels,
                       num_classes=dataset.num_classes)


def build_trainer(config: RunConfig, dataset: ImageDataset, device: torch.device, progress: bool | None = None,
                  checkpoint_path: Path | None = None, checkpoint_interval: float = 30.0) -> Trainer:
    """Build model, optimizer, loaders, probes and trainer for one run, seeded by ``config.seed``."""
    torch.manual_seed(config.seed)
    model = _build_model(config, dataset).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    train_x, train_y = training_subset(dataset, config.train_subset)
    train_loader = TensorLoader(
        train_x, train_y, min(config.batch_size, len(train_y)), shuffle=True, augment=dataset.augment,
        mean=dataset.mean, std=dataset.std, seed=config.seed,
    )
    test_loader = TensorLoader(dataset.test_x, dataset.test_y, 1024, mean=dataset.mean, std=dataset.std)
    subset = ImageDataset(dataset.name, train_x, train_y, dataset.test_x, dataset.test_y, dataset.num_classes, False)
    inputs, targets = sharpness_batch(subset, train_loader, config.sharpness_batch, config.seed + 1)
    probes = [
        GradNormProbe(),
        ClipActivityProbe(),
        UpdateMagnitudeProbe(),
        SharpnessProbe(
            inputs, targets,
            every_epochs=config.sharpness_every,
            every_steps=config.sharpness_every_steps,
            momentum=config.momentum if config.optimizer == "sgd" else 0.0,
            max_iter=config.sharpness_max_iter,
            tol=config.sharpness_tol,
            seed=config.seed + 2,
            hvp_method=config.sharpness_hvp,
        ),
    ]
    train_config = TrainConfig(
        epochs=config.epochs, milestones=config.milestones, lr_factor=config.lr_factor, progress=progress,
        log_every=config.log_every, max_loss=config.max_loss, nonfinite=config.nonfinite,
        autocast=config.autocast, channels_last=config.channels_last, compile=config.compile,
    )
    loss_fn = build_loss(config.loss)
    return Trainer(model, loss_fn, train_loader, test_loader, optimizer, train_config, probes, device, config.run_id,
                   checkpoint_path=checkpoint_path, checkpoint_interval=checkpoint_interval)


def summarize_run(config: RunConfig, result: TrainResult, frames: dict[str, pd.DataFrame], device: torch.device) -> dict:
    """Return the run's row of the ``runs`` frame, computed from its other frames."""
    steps, epochs, sharpness = frames["steps"], frames["epochs"], frames["sharpness"]
    row = {
        "run_id": config.run_id,
        "study": config.study,
        "model": config.model if config.model != "mlp" else "mlp" + "x".join(str(h) for h in config.hidden),
        "loss": config.loss,
        "depth": config.depth,
        "width": config.width,
        "dataset": config.dataset,
        "optimizer": config.optimizer,
        "method": config.method,
        "delta": np.nan if config.delta is None else config.delta,
        "gamma": config.gamma if config.method != "sgd" else np.nan,
        "lr": config.lr,
        "momentum": config.momentum,
        "weight_decay": config.weight_decay,
        "batch_size": config.batch_size,
        "epochs": config.epochs,
        "seed": config.seed,
        "autocast": config.autocast,
        "channels_last": config.channels_last,
        "compile": config.compile,
        "status": result.status,
        "reason": result.reason,
        "diverged_step": np.nan if result.diverged_step is None else result.diverged_step,
    }
    has_epochs = not epochs.empty
    row["final_test_acc"] = epochs["test_acc"].iloc[-1] if has_epochs else np.nan
    row["max_test_acc"] = epochs["test_acc"].max() if has_epochs else np.nan
    row["final_test_loss"] = epochs["test_loss"].iloc[-1] if has_epochs else np.nan
    row["final_train_loss"] = epochs["train_loss"].iloc[-1] if has_epochs else np.nan
    row["final_grad_norm"] = steps["grad_norm"].iloc[-1] if "grad_norm" in steps else np.nan
    row["mean_rum"] = steps["rum"].mean() if "rum" in steps else np.nan
    early = steps[steps["epoch"] <= EARLY_EPOCHS] if "rum" in steps else steps.iloc[:0]
    row["early_rum"] = early["rum"].mean() if "rum" in early else np.nan
    if "delta_active_fraction" in epochs:
        active = epochs.loc[epochs["delta_active_fraction"] > 0, "epoch"]
        row["delta_active_epochs"] = int(len(active))
        row["last_delta_active_epoch"] = int(active.max()) if len(active) else np.nan
        row["delta_active_step_fraction"] = steps["delta_active"].mean()
        row["clip_active_step_fraction"] = steps["clip_active"].mean()
    final = sharpness[sharpness["threshold_kind"] == "2/h"].tail(1) if not sharpness.empty else sharpness
    # Heavy ball, dampened or Nesterov: every momentum kind starts with "(2+2β)/" (probes.thresholds).
    momentum_rows = (sharpness[sharpness["threshold_kind"].str.startswith("(2+2β)/")].tail(1) if not sharpness.empty
                     else sharpness)
    row["final_threshold_momentum"] = momentum_rows["threshold"].iloc[0] if len(momentum_rows) else np.nan
    row["final_deviation_momentum"] = momentum_rows["deviation"].iloc[0] if len(momentum_rows) else np.nan
    # Adam's criterion: the preconditioned sharpness against (2+2β1)/(h(1-β1)).
    adam_rows = (sharpness[sharpness["preconditioned"].astype(bool)].tail(1)
                 if "preconditioned" in sharpness and not sharpness.empty else sharpness.iloc[:0])
    row["final_preconditioned_lambda_max"] = adam_rows["lambda_max"].iloc[0] if len(adam_rows) else np.nan
    row["final_threshold_adam"] = adam_rows["threshold"].iloc[0] if len(adam_rows) else np.nan
    events = frames.get("probe_events", pd.DataFrame())
    row["sharpness_disabled_reason"] = events["reason"].iloc[0] if not events.empty else ""
    for column, source in (("final_lambda_max", "lambda_max"), ("final_effective_lr", "effective_lr"),
                           ("final_threshold", "threshold"), ("final_deviation", "deviation")):
        row[column] = final[source].iloc[0] if len(final) else np.nan
    row["skipped_steps"] = int(steps["skipped"].sum()) if "skipped" in steps else 0
    row["wall_time"] = result.wall_time
    row["device"] = str(device)
    row["torch_version"] = torch.__version__
    row["code_version"] = code_version()
    return row


def _final_criterion(row: dict) -> str:
    """Describe a run's last sharpness against the threshold its optimizer is stable below."""
    if np.isfinite(row.get("final_threshold_adam", np.nan)):
        return (f"final preconditioned λ_max {row['final_preconditioned_lambda_max']:.4g} vs (2+2β1)/(h(1-β1)) "
                f"{row['final_threshold_adam']:.4g}")
    if np.isfinite(row.get("final_threshold_momentum", np.nan)):
        return f"final λ_max {row['final_lambda_max']:.4g} vs momentum threshold {row['final_threshold_momentum']:.4g}"
    return f"final λ_max {row['final_lambda_max']:.4g} vs 2/h {row['final_threshold']:.4g}"


def execute_run(config: RunConfig, dataset: ImageDataset, store: RunStore, progress: bool | None = None,
                checkpoint_interval: float = 30.0, device: str | None = None) -> dict:
    """Train one run, write its frames and status, and return its ``runs`` row.

    ``device`` overrides ``config.device`` (an executor placing runs on several GPUs);
    the run's config and id stay the same.
    """
    device = select_device(device or config.device)
    dataset.to(device)
    log.info("run %s: %s", config.run_id, config.to_dict())
    checkpoint = store.start_run(config.run_id, config.to_dict())
    trainer = build_trainer(config, dataset, device, progress, checkpoint, checkpoint_interval)
    try:
        result = trainer.fit()
    except NonFiniteGradientError as error:
        log.error("%s failed: %s", config.run_id, error)
        result = TrainResult(trainer.state.recorder, "failed", 0.0, str(error), trainer.state.step)
    frames = {name: pd.DataFrame(result.recorder.rows(name)) for name in ("steps", "epochs", "sharpness", "grad_hist", "probe_events")}
    row = summarize_run(config, result, frames, device)
    frames["runs"] = pd.DataFrame([row])
    store.write_run(
        config.run_id, config.to_dict(), frames,
        {"status": result.status, "reason": result.reason, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )
    checkpoint.unlink(missing_ok=True)
    return row


def run_study(
    study: StudyConfig, out: str | Path, progress: bool | None = None, dataset: ImageDataset | None = None,
    checkpoint_interval: float = 30.0,
) -> RunStore:
    """Run every run of ``study`` into ``out``, skipping runs already finished with the same config.

    ``dataset``, when given, is used for the runs whose dataset it is (the CLI loads and
    verifies it before writing anything). ``frames/`` then contains the finished runs of
    this grid only; runs of other grids left in ``out/runs`` are not collected.
    """
    store = RunStore(out)
    runs = study.runs()
    store.write_study(study.to_dict())
    datasets: dict[tuple, ImageDataset] = {}
    if dataset is not None:
        datasets[(study.base.dataset, study.base.data_root)] = dataset
    for index, config in enumerate(runs, 1):
        if store.finished(config.run_id, config.to_dict()):
            log.info("[%d/%d] %s already finished, skipped", index, len(runs), config.run_id)
            continue
        missing = store.missing_frames(config.run_id)
        if (store.run_dir(config.run_id) / "status.json").is_file() and missing:
            log.warning("[%d/%d] %s has status.json but its frame files %s are missing; training it again",
                        index, len(runs), config.run_id, ", ".join(f"{name}.parquet" for name in missing))
        key = (config.dataset, config.data_root)
        if key not in datasets:
            datasets[key] = load_dataset(config.dataset, config.data_root)
        log.info("[%d/%d] %s", index, len(runs), config.run_id)
        try:
            with store.run_lock(config.run_id):
                row = execute_run(config, datasets[key], store, progress, checkpoint_interval)
        except RunInUseError as error:
            log.warning("[%d/%d] %s", index, len(runs), error)
            continue
        log.info("[%d/%d] %s %s: final test acc %.4f, %s, %.1f s", index, len(runs), config.run_id, row["status"],
                 row["final_test_acc"], _final_criterion(row), row["wall_time"])
    store.collect({config.run_id: config.to_dict() for config in runs})
    return store

"""The width and δ-sweep studies: grids, ResNet-18, their reports, and δ* across studies."""

import numpy as np
import pandas as pd
import pytest
import torch

from dynamics.models import ResNet18, build_model
from reports.delta import comparison_table, delta_activity_table, early_epochs
from reports.tables import legend_methods, method_label
from studies.cli import main
from studies.config import RunConfig, StudyConfig
from studies.presets import build_study


def test_resnet18_matches_the_standard_cifar_variant():
    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    digits = build_model("resnet18", depth=18, width=1, in_channels=1, num_classes=10)
    assert digits(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_resnet18_rejects_other_depths():
    with pytest.raises(ValueError, match="invalid depth=20"):
        RunConfig(model="resnet18", depth=20)
    assert RunConfig(model="resnet18", depth=18, method="gclip", delta=None).run_id == "resnet18-w1-sgd-gclip-lr0.1-s0"


def test_adam_method_expands_to_bare_adam():
    study = build_study("delta", "quick", {"methods": ("sgd", "adam", "dgclip"), "deltas": (0.2,), "adam_lr": 3e-4})
    runs = {run.run_id: run for run in study.runs()}
    adam = runs["resnet18-w1-adam-sgd-lr0.0003-s0"]
    assert (adam.optimizer, adam.method, adam.delta, adam.lr) == ("adam", "sgd", None, 3e-4)
    assert runs["resnet18-w1-sgd-sgd-lr0.1-s0"].optimizer == "sgd"
    assert runs["resnet18-w1-sgd-dgclip-delta0.2-lr0.1-s0"].lr == 0.1
    assert study.to_dict()["adam_lr"] == 3e-4


def test_adam_runs_once_per_lr_grid():
    base = RunConfig(study="delta", model="resnet18", depth=18)
    study = StudyConfig("delta", base, depths=(18,), methods=("adam", "dgclip"), deltas=(0.2,), lrs=(0.05, 0.1))
    assert [run.optimizer for run in study.runs()].count("adam") == 1
    assert len(study.runs()) == 3


def test_study_grid_rejects_bad_methods():
    base = RunConfig(study="delta", model="resnet18", depth=18, optimizer="adam")
    with pytest.raises(ValueError, match="invalid methods"):
        StudyConfig("delta", base, methods=("sgd", "lion"))
    with pytest.raises(ValueError, match="appear twice"):
        StudyConfig("delta", base, depths=(18,), methods=("sgd", "adam"), adam_lr=0.1).runs()
    with pytest.raises(ValueError, match="invalid adam_lr"):
        StudyConfig("delta", base, methods=("adam",), adam_lr=0.0)


def test_presets_follow_the_reference_protocols():
    width = build_study("width", "paper")
    assert width.widths == (1, 2, 4, 8, 10)
    assert (width.base.epochs, width.base.milestones, width.base.gamma) == (100, (80,), 0.1)
    delta = build_study("delta", "paper")
    assert delta.deltas == (0.01, 0.03, 0.08, 0.2, 0.45, 0.9)
    assert (delta.base.model, delta.base.epochs, delta.base.milestones) == ("resnet18", 200, (100, 150))
    assert (delta.base.batch_size, delta.base.weight_decay, delta.adam_lr) == (128, 5e-4, 1e-3)
    assert len(delta.runs()) == 9  # SGD, Adam, GClip and six δ


def test_legend_methods_names_bare_adam():
    runs = pd.DataFrame({"method": ["sgd", "sgd", "dgclip"], "optimizer": ["sgd", "adam", "adam"]})
    assert legend_methods(runs)["method"].tolist() == ["sgd", "adam", "dgclip"]
    assert method_label("adam", None) == "Adam"


def _delta_frames():
    runs = pd.DataFrame({
        "run_id": ["s", "a", "d"], "method": ["sgd", "adam", "dgclip"], "optimizer": ["sgd", "adam", "sgd"],
        "delta": [np.nan, np.nan, 0.2], "lr": [0.1, 1e-3, 0.1], "epochs": [20, 20, 20], "status": ["completed"] * 3,
        "max_test_acc": [0.95, 0.93, 0.96], "final_test_acc": [0.94, 0.92, 0.955], "final_train_loss": [0.1, 0.2, 0.05],
        "delta_active_epochs": [0, 0, 3], "last_delta_active_epoch": [np.nan, np.nan, 7.0],
        "delta_active_step_fraction": [0.0, 0.0, 0.1],
    })
    epochs = pd.DataFrame({
        "run_id": np.repeat(["s", "a", "d"], 20), "epoch": np.tile(np.arange(1, 21), 3),
        "mean_rum": np.concatenate([np.arange(1, 21) * 1.0, np.full(20, 0.5), np.arange(20, 0, -1) * 1.0]),
    })
    return runs, epochs


def test_comparison_table_averages_rum_over_first_tenth():
    runs, epochs = _delta_frames()
    table = comparison_table(runs, epochs)
    assert table["method"].tolist() == ["δ=0.2", "SGD", "Adam"]  # best final accuracy first
    sgd = table.set_index("method").loc["SGD"]
    assert early_epochs(20) == 2
    assert sgd["rum_early"] == pytest.approx(1.5)  # epochs 1 and 2
    assert sgd["rum_overall"] == pytest.approx(10.5)
    assert sgd["final_test_acc"] == pytest.approx(94.0)


def test_delta_activity_table_lists_floored_runs():
    runs, _ = _delta_frames()
    table = delta_activity_table(runs)
    assert table["delta"].tolist() == [0.2]
    assert table.loc[0, "delta_active_epochs"] == 3
    assert table.loc[0, "last_delta_active_epoch"] == 7


def test_early_epochs_is_a_tenth_at_least_one():
    assert [early_epochs(e) for e in (1, 6, 200)] == [1, 1, 20]


@pytest.fixture(scope="module")
def width_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("width") / "width"
    args = ["study", "width", "--widths", "1,2", "--depths", "8", "--methods", "gclip,dgclip", "--deltas", "0.2,0.9",
            "--epochs", "1", "--sharpness-batch", "32", "--no-progress", "-q", "--out", str(out)]
    assert main(args) == 0
    return out


def test_width_study_reports_per_width(width_dir):
    stars = pd.read_csv(width_dir / "tables" / "delta_star.csv")
    assert stars["width"].tolist() == [1, 2]
    assert stars["delta_star"].isin([0.2, 0.9]).all()
    runs = pd.read_csv(width_dir / "tables" / "runs.csv")
    assert runs["delta_active_fraction"].between(0, 1).all()
    for name in ("accuracy_vs_delta", "effective_lr", "delta_star"):
        assert (width_dir / "figures" / f"{name}.png").stat().st_size > 1000


def test_delta_study_writes_comparison_tables(tmp_path):
    out = tmp_path / "delta"
    args = ["study", "delta", "--methods", "sgd,adam,dgclip", "--deltas", "0.9", "--epochs", "1", "--batch-size", "512",
            "--sharpness-batch", "16", "--no-progress", "-q", "--out", str(out)]
    assert main(args) == 0
    comparison = pd.read_csv(out / "tables" / "comparison.csv")
    assert sorted(comparison["method"]) == ["Adam", "SGD", "δ=0.9"]
    assert comparison["rum_early"].notna().all()
    activity = pd.read_csv(out / "tables" / "delta_activity.csv")
    assert activity["delta"].tolist() == [0.9]
    assert (out / "figures" / "effective_lr_phases.png").stat().st_size > 1000


def test_scaling_plots_delta_star_across_studies(width_dir, tmp_path):
    assert main(["scaling", str(width_dir), str(width_dir), "--out", str(tmp_path), "-q"]) == 0
    table = pd.read_csv(tmp_path / "tables" / "delta_star_scaling.csv")
    assert set(table["axis"]) == {"width"}
    assert table["width"].tolist() == [1, 2]  # a directory given twice counts once
    assert (tmp_path / "figures" / "delta_star_scaling.pdf").stat().st_size > 1000


def test_scaling_rejects_a_delta_study(tmp_path, capsys):
    runs = pd.DataFrame({"run_id": ["x"], "study": ["delta"], "method": ["sgd"], "optimizer": ["sgd"],
                         "status": ["completed"]})
    (tmp_path / "frames").mkdir()
    runs.to_parquet(tmp_path / "frames" / "runs.parquet")
    with pytest.raises(SystemExit) as exit_info:
        main(["scaling", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "needs depth or width studies" in capsys.readouterr().err

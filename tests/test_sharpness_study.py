"""The sharpness study: full-batch GD sharpens, then λ_max hovers at 2/η (edge of stability)."""

import pandas as pd
import pytest

from reports.render import render_report
from reports.sharpness import eos_summary_table
from studies.cli import main
from studies.presets import build_study
from studies.runner import run_study


@pytest.fixture(scope="module")
def eos_study(tmp_path_factory):
    """One quick-preset run at η = 0.08 (2/η = 25), shortened to 600 steps."""
    out = tmp_path_factory.mktemp("sharpness")
    study = build_study("sharpness", "quick", {"lrs": (0.08,), "epochs": 600, "log_every": 600})
    run_study(study, out, progress=False)
    render_report(out)
    return out


def test_gd_reaches_edge_of_stability(eos_study):
    frames = {name: pd.read_parquet(eos_study / "frames" / f"{name}.parquet") for name in ("runs", "sharpness")}
    summary = eos_summary_table(frames["sharpness"], frames["runs"]).iloc[0]
    assert summary["threshold"] == pytest.approx(2 / 0.08)
    assert summary["initial_lambda_max"] < 0.85 * summary["threshold"]  # starts well below 2/η
    assert summary["peak_lambda_max"] > summary["threshold"]  # progressive sharpening crosses it
    assert summary["final_ratio"] == pytest.approx(1.0, abs=0.10)  # then hovers at 2/η
    assert summary["converged_fraction"] == 1.0


def test_sharpness_report_files(eos_study):
    for name in ("eos_summary", "runs"):
        assert (eos_study / "tables" / f"{name}.md").is_file()
    for name in ("sharpness_trajectory", "train_loss"):
        assert (eos_study / "figures" / f"{name}.png").is_file()
    assert "## Table `eos_summary`" in (eos_study / "report.md").read_text()


def test_sharpness_cli_sweeps_step_sizes(tmp_path):
    out = tmp_path / "cli"
    assert main(["study", "sharpness", "--lr", "0.05,0.1", "--epochs", "4", "--no-progress", "-q", "--out", str(out)]) == 0
    runs = pd.read_parquet(out / "frames" / "runs.parquet")
    assert sorted(runs["lr"]) == [0.05, 0.1]
    assert set(runs["model"]) == {"mlp200x200"}
    assert set(runs["loss"]) == {"mse"}


def test_run_log_names_each_run_criterion(tmp_path, caplog):
    """The per-run log line compared λ_max with 2/h for every run: 40.5 against 25 under
    momentum 0.9 (whose edge is 47.5), and Adam's raw λ_max against 2/h."""
    caplog.set_level("INFO", logger="studies.runner")
    assert main(["study", "sharpness", "--methods", "sgd,adam", "--lr", "0.05", "--momentum", "0.9", "--epochs", "3",
                 "--no-progress", "-q", "--out", str(tmp_path / "out")]) == 0
    runs = pd.read_parquet(tmp_path / "out" / "frames" / "runs.parquet").set_index("optimizer")
    sgd, adam = runs.loc["sgd"], runs.loc["adam"]
    assert f"vs momentum threshold {sgd['final_threshold_momentum']:.4g}" in caplog.text
    assert sgd["final_threshold_momentum"] == pytest.approx(3.8 / 0.05)
    assert f"final preconditioned λ_max {adam['final_preconditioned_lambda_max']:.4g}" in caplog.text
    assert adam["final_threshold_adam"] == pytest.approx(38 / (adam["final_effective_lr"]))

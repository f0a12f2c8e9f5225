"""Damaged or out-of-date study directories, and study options that cannot apply."""

import json

import pandas as pd
import pytest

from reports.render import read_frames, render_report
from studies.cli import main
from studies.store import CorruptRunError, RunStore

ARGS = ["--depths", "8", "--methods", "gclip,dgclip", "--deltas", "0.2", "--epochs", "1", "--sharpness-every", "0",
        "--sharpness-batch", "32", "--no-progress", "-q"]


@pytest.fixture()
def study_dir(tmp_path):
    out = tmp_path / "study"
    assert main(["study", "depth", *ARGS, "--out", str(out)]) == 0
    return out


def test_report_rebuilds_out_of_date_frames(study_dir):
    """The fault: frames/ written while one run was still training elsewhere hid that run from every later report."""
    runs = pd.read_parquet(study_dir / "frames" / "runs.parquet")
    runs.iloc[:1].to_parquet(study_dir / "frames" / "runs.parquet")
    frames = read_frames(study_dir)
    assert len(frames["runs"]) == 2


def test_partial_report_names_missing_runs(study_dir):
    report = render_report(study_dir, expected_runs=["d8-w1-sgd-gclip-lr0.1-s0", "d8-w1-sgd-dgclip-delta0.5-lr0.1-s0"])
    text = report.read_text()
    assert "**Partial report**: 1 runs of the grid have not finished" in text
    assert "`d8-w1-sgd-dgclip-delta0.5-lr0.1-s0`" in text


def test_collect_names_a_corrupt_run_frame(study_dir):
    path = next(study_dir.glob("runs/*/steps.parquet"))
    path.write_text("junk")
    with pytest.raises(CorruptRunError, match=f"delete {path.parent}"):
        RunStore(study_dir).collect()


def test_corrupt_run_config_trains_the_run_again(study_dir):
    config = next(study_dir.glob("runs/*dgclip*/config.json"))
    config.write_text("{not json")
    assert main(["study", "depth", *ARGS, "--out", str(study_dir)]) == 0
    assert json.loads(config.read_text())["delta"] == 0.2


def test_corrupt_study_json_is_named(study_dir, capsys):
    (study_dir / "study.json").write_text("{")
    with pytest.raises(SystemExit):
        main(["study", "depth", *ARGS, "--out", str(study_dir)])
    assert "study.json is not valid JSON; delete it" in capsys.readouterr().err


def test_other_settings_name_the_difference(study_dir, capsys):
    with pytest.raises(SystemExit):
        main(["study", "depth", *ARGS, "--gamma", "0.5", "--out", str(study_dir)])
    assert "gamma: 0.1 there, 0.5 now" in capsys.readouterr().err


def test_grid_order_does_not_matter(tmp_path):
    out = tmp_path / "order"
    args = ["study", "depth", *ARGS[:4], "--deltas", "0.9,0.2", *ARGS[6:], "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "study.json").read_text())["deltas"] == [0.2, 0.9]
    args = ["study", "depth", *ARGS[:4], "--deltas", "0.2,0.9", *ARGS[6:], "--out", str(out)]
    assert main(args) == 0  # the same study, resumed


@pytest.mark.parametrize("args, message", [
    (["study", "delta", "--depths", "20"], "the delta study trains ResNet-18"),
    (["study", "depth", "--executor", "slurm"], "sbatch was not found"),
])
def test_inapplicable_options_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("studies.cli.shutil.which", lambda name: None)  # no SLURM here, whatever the machine has
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_scaling_rejects_a_file_as_out(study_dir, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(SystemExit):
        main(["scaling", str(study_dir), "--out", str(target)])
    assert "it is a file" in capsys.readouterr().err

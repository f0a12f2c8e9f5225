"""Study directories reused with other settings, damaged or interrupted, and options that change no run."""

import json
import logging
import shutil

import pandas as pd
import pytest

from studies.cli import main
from studies.presets import build_study
from studies.store import RunStore

FAST = ["--epochs", "3", "--no-progress", "-q"]
LOW_LR_RUN = "mlp200x200-sgd-sgd-lr0.05-s0"
HIGH_LR_RUN = "mlp200x200-sgd-sgd-lr0.08-s0"


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory):
    """A finished sharpness study of two 3-step runs (η = 0.05 and 0.08); tests work on copies of it."""
    out = tmp_path_factory.mktemp("inputs") / "study"
    assert main(["study", "sharpness", "--lr", "0.05,0.08", *FAST, "--out", str(out)]) == 0
    return out


@pytest.fixture()
def study_dir(finished_study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(finished_study, out)
    return out


def _report_runs(directory) -> pd.DataFrame:
    return pd.read_csv(directory / "tables" / "runs.csv")


def test_study_leaves_out_runs_of_another_grid(study_dir, caplog):
    """The fault: after study.json was deleted, a study with other step sizes collected the old runs as well."""
    caplog.set_level(logging.INFO, logger="studies.store")
    (study_dir / "study.json").unlink()
    assert main(["study", "sharpness", "--lr", "0.1", *FAST, "--out", str(study_dir)]) == 0
    new_run = "mlp200x200-sgd-sgd-lr0.1-s0"
    for name in ("runs", "steps", "sharpness"):
        frame = pd.read_parquet(study_dir / "frames" / f"{name}.parquet")
        assert set(frame["run_id"]) == {new_run}, name
    assert _report_runs(study_dir)["run_id"].tolist() == [new_run]
    assert "Runs: 1 (1 completed)." in (study_dir / "report.md").read_text()
    assert (study_dir / "runs" / LOW_LR_RUN / "status.json").is_file()  # kept on disk
    assert "outside the current grid" in caplog.text


def test_report_leaves_out_runs_of_another_grid(study_dir):
    """The fault: `eos report` reported every runs/*/status.json, not the grid of study.json."""
    study = json.loads((study_dir / "study.json").read_text())
    study["lrs"] = [0.05]
    (study_dir / "study.json").write_text(json.dumps(study))
    assert main(["report", str(study_dir)]) == 0  # frames/ still lists both runs
    assert _report_runs(study_dir)["run_id"].tolist() == [LOW_LR_RUN]
    shutil.rmtree(study_dir / "frames")
    assert main(["report", str(study_dir)]) == 0  # the per-run frames
    assert _report_runs(study_dir)["run_id"].tolist() == [LOW_LR_RUN]


def test_report_advises_rerun_for_corrupt_run_frame(study_dir, capsys):
    """The fault: the advice was to delete the file only, and the rerun then skipped the run."""
    shutil.rmtree(study_dir / "frames")
    (study_dir / "runs" / LOW_LR_RUN / "sharpness.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(study_dir)])
    assert exit_info.value.code == 2
    assert f"delete {study_dir / 'runs' / LOW_LR_RUN} and rerun" in capsys.readouterr().err


def test_report_marks_run_without_frame_file(study_dir, caplog):
    """The fault: a run whose frame file was deleted counted as finished, and its rows silently dropped out."""
    caplog.set_level(logging.WARNING)
    (study_dir / "runs" / LOW_LR_RUN / "sharpness.parquet").unlink()
    assert main(["report", str(study_dir)]) == 0
    report = (study_dir / "report.md").read_text()
    assert f"**Partial report**: 1 runs of the grid have not finished: `{LOW_LR_RUN}`" in report
    assert "sharpness.parquet are missing" in caplog.text


def test_run_without_frame_file_trains_again(study_dir, caplog):
    """The fault: the rerun skipped a run whose frame file was deleted, because its status.json still existed."""
    caplog.set_level(logging.WARNING)
    (study_dir / "runs" / LOW_LR_RUN / "sharpness.parquet").unlink()
    assert main(["study", "sharpness", "--lr", "0.05,0.08", *FAST, "--out", str(study_dir)]) == 0
    assert "sharpness.parquet are missing; training it again" in caplog.text
    assert (study_dir / "runs" / LOW_LR_RUN / "sharpness.parquet").is_file()
    sharpness = pd.read_parquet(study_dir / "frames" / "sharpness.parquet")
    assert set(sharpness["run_id"]) == {LOW_LR_RUN, HIGH_LR_RUN}
    assert "Partial report" not in (study_dir / "report.md").read_text()


def test_report_marks_interrupted_study_partial(study_dir):
    """The fault: `eos report` read no expected runs, so a report of an interrupted study looked complete."""
    shutil.rmtree(study_dir / "frames")
    shutil.rmtree(study_dir / "runs" / HIGH_LR_RUN)
    assert main(["report", str(study_dir)]) == 0
    report = (study_dir / "report.md").read_text()
    assert "Runs: 1 (1 completed)." in report
    assert f"**Partial report**: 1 runs of the grid have not finished: `{HIGH_LR_RUN}`" in report


@pytest.mark.parametrize("content, message", [
    ("{bad", "it is not valid JSON"),
    ("[]", "expected a JSON object, found a list"),
    ('{"name": "sharpness"}', "missing key 'base'"),
])
def test_report_rejects_damaged_study_file_first(study_dir, capsys, content, message):
    """The fault: a damaged study.json raised a traceback after tables and figures had been rewritten."""
    for name in ("tables", "figures"):
        shutil.rmtree(study_dir / name)
    (study_dir / "report.md").unlink()
    (study_dir / "study.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(study_dir)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"invalid study file {study_dir / 'study.json'}: {message}" in error
    assert "delete it and rerun the `eos study` command" in error
    for name in ("tables", "figures", "report.md"):
        assert not (study_dir / name).exists(), name


def test_report_names_frame_without_required_column(study_dir, capsys):
    """The fault: a collected frame without ``threshold_kind`` raised a bare KeyError."""
    path = study_dir / "frames" / "sharpness.parquet"
    pd.read_parquet(path).drop(columns="threshold_kind").to_parquet(path)
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(study_dir)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"invalid frame {path}: required columns ['threshold_kind'] are missing" in error
    assert "delete it and rerun the same `eos study` command" in error


@pytest.mark.parametrize("options, message", [
    (["--depths", "8"], "invalid --depths 8: it does not apply to the sharpness study, which trains an MLP"),
    (["--depths", "8,14"], "invalid --depths 8,14: it does not apply to the sharpness study"),
    (["--widths", "3"], "invalid --widths 3: it does not apply to the sharpness study"),
    (["--deltas", "0.5"], "invalid --deltas 0.5: δ is the floor of method dgclip, which this study does not run"),
    (["--deltas", "-0.1"], "invalid delta=-0.1: expected a number in [0, 1]"),
    (["--methods", "dgclip", "--deltas", "1.5"], "invalid delta=1.5: expected a number in [0, 1]"),
    (["--gamma", "7"], "invalid --gamma 7: γ is the clipping threshold of methods gclip and dgclip"),
    (["--adam-lr", "5"], "invalid --adam-lr 5: it sets the step size of method adam"),
    (["--optimizer", "adam", "--momentum", "0.5"], "invalid --momentum 0.5: heavy-ball momentum applies to --optimizer sgd"),
    (["--optimizer", "adamw", "--methods", "dgclip", "--momentum", "0"], "invalid --momentum 0:"),
    (["--methods", "adam", "--lr", "0.5,0.7"], "invalid --lr 0.5,0.7: every run of this study uses method adam"),
])
def test_sharpness_rejects_options_without_effect(tmp_path, capsys, options, message):
    """The fault: these options were accepted and stored, although no run of the study uses them."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "sharpness", *options, "--epochs", "1", "--no-progress", "-q", "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_build_study_rejects_delta_outside_unit_interval():
    with pytest.raises(ValueError, match="invalid delta=-0.1"):
        build_study("sharpness", "quick", {"deltas": (-0.1,)})


@pytest.mark.parametrize("arguments", [
    ["depth", "--depths", "8,14", "--widths", "1,2", "--deltas", "0.2", "--gamma", "0.5", "--momentum", "0.5"],
    ["width", "--depths", "8", "--widths", "1,2"],
    ["delta", "--widths", "1", "--deltas", "0.2", "--adam-lr", "3e-4", "--momentum", "0.8"],
    ["sharpness", "--optimizer", "adam", "--methods", "sgd,dgclip", "--deltas", "0.2", "--gamma", "2"],
])
def test_options_that_apply_are_accepted(tmp_path, capsys, arguments):
    assert main(["study", *arguments, "--status", "--out", str(tmp_path / "out")]) == 0
    assert "pending" in capsys.readouterr().out


def test_finished_needs_every_frame_file(study_dir):
    store = RunStore(study_dir)
    config = json.loads((store.run_dir(HIGH_LR_RUN) / "config.json").read_text())
    assert store.finished(HIGH_LR_RUN, config)
    (store.run_dir(HIGH_LR_RUN) / "steps.parquet").unlink()
    assert store.missing_frames(HIGH_LR_RUN) == ["steps"]
    assert not store.finished(HIGH_LR_RUN, config)


def test_status_names_missing_frame_files(study_dir, capsys):
    """The fault: --status called a run with a deleted frame file "finished with other settings"."""
    (RunStore(study_dir).run_dir(HIGH_LR_RUN) / "steps.parquet").unlink()
    assert main(["study", "sharpness", "--lr", "0.05,0.08", *FAST, "--status", "--out", str(study_dir)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if HIGH_LR_RUN in line)
    assert "stale" in line
    assert "frame files steps.parquet missing; reruns" in line


def test_resume_ignores_stored_settings_that_change_no_run(study_dir, capsys):
    """Studies written before --deltas without dgclip was rejected kept the δ grid in
    study.json, and every resume of them then failed with "different settings"."""
    study_file = study_dir / "study.json"
    study_file.write_text(json.dumps({**json.loads(study_file.read_text()), "deltas": [0.05]}))
    statuses = {path: path.read_bytes() for path in study_dir.glob("runs/*/status.json")}
    assert main(["study", "sharpness", "--lr", "0.05,0.08", *FAST, "--out", str(study_dir)]) == 0
    assert len(statuses) == 2
    assert {path: path.read_bytes() for path in statuses} == statuses  # both runs reused, not trained again


@pytest.mark.parametrize("command", ["study", "report"])
@pytest.mark.parametrize("damage", ["list", "directory"])
def test_study_file_not_an_object_exits_2(study_dir, capsys, command, damage):
    """A study.json that is a directory was ignored; one holding a list failed with an AttributeError."""
    study_file = study_dir / "study.json"
    study_file.unlink()
    if damage == "directory":
        study_file.mkdir()
    else:
        study_file.write_text("[1, 2]")
    frames = {path.name: path.read_bytes() for path in (study_dir / "frames").iterdir()}
    arguments = (["study", "sharpness", "--lr", "0.05,0.08", *FAST, "--out", str(study_dir)] if command == "study"
                 else ["report", str(study_dir)])
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert "study.json" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (study_dir / "frames").iterdir()} == frames


def test_resume_with_methods_in_another_order(tmp_path):
    """The same grid with --methods in another order was rejected as "different settings"."""
    out = tmp_path / "study"
    arguments = ["study", "sharpness", "--lr", "0.05", "--deltas", "0.5", *FAST, "--out", str(out)]
    assert main([*arguments[:2], "--methods", "sgd,dgclip", *arguments[2:]]) == 0
    statuses = {path: path.read_bytes() for path in out.glob("runs/*/status.json")}
    assert main([*arguments[:2], "--methods", "dgclip,sgd", *arguments[2:]]) == 0
    assert len(statuses) == 2
    assert {path: path.read_bytes() for path in statuses} == statuses


@pytest.mark.parametrize("option, value, message", [
    ("--weight-decay", "inf", "a finite number >= 0"),
    ("--checkpoint-interval", "nan", "a finite number of seconds"),
    ("--device", "xpu", "expected auto, cpu, cuda, cuda:N or mps"),
    ("--device", "meta", "expected auto, cpu, cuda, cuda:N or mps"),
])
def test_out_of_range_option_exits_2_before_writing(tmp_path, capsys, option, value, message):
    """Each of these was accepted: an infinite weight decay diverged every run, a NaN interval
    never wrote a checkpoint, and xpu or meta wrote study.json and then crashed."""
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "sharpness", option, value, *FAST, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_rerun_with_other_settings_keeps_the_finished_run(study_dir, caplog):
    """After study.json was deleted, a study with 2 epochs trained the 3-epoch run under the
    same run id again and overwrote its results without a word."""
    caplog.set_level(logging.WARNING, logger="studies.store")
    old = {path.name: path.read_bytes() for path in (study_dir / "runs" / LOW_LR_RUN).glob("*.json")}
    (study_dir / "study.json").unlink()
    assert main(["study", "sharpness", "--lr", "0.05", "--epochs", "2", "--no-progress", "-q", "--out",
                 str(study_dir)]) == 0
    moved_run = study_dir / "replaced" / f"{LOW_LR_RUN}-1"
    assert {path.name: path.read_bytes() for path in moved_run.glob("*.json")} == old
    assert (moved_run / "steps.parquet").is_file()
    assert json.loads((study_dir / "runs" / LOW_LR_RUN / "config.json").read_text())["epochs"] == 2
    assert "moved to" in caplog.text


def test_step_sizes_equal_in_run_ids_are_named(tmp_path, capsys):
    """Two step sizes that run ids write alike were reported as "the repeated method or optimizer"."""
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "sharpness", "--lr", "0.1,0.1000001", *FAST, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "agree to 6 significant digits" in capsys.readouterr().err

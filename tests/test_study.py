"""`eos study depth` and `eos report` end to end on a tiny configuration."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from studies.cli import main
from studies.config import RunConfig
from studies.presets import build_study

TINY = ["--depths", "8", "--deltas", "0.01,0.9", "--methods", "sgd,gclip,dgclip", "--epochs", "2",
        "--sharpness-batch", "32", "--sharpness-every", "1", "--batch-size", "256", "--no-progress", "-q"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "depth"
    assert main(["study", "depth", *TINY[:-1], "--out", str(out)]) == 0
    return out


def test_study_writes_every_frame(study_dir):
    for name, columns in {
        "runs": ["run_id", "depth", "method", "delta", "status", "final_test_acc", "mean_rum", "delta_active_epochs",
                 "last_delta_active_epoch", "final_lambda_max", "torch_version", "code_version", "device"],
        "steps": ["run_id", "epoch", "step", "loss", "grad_norm", "clip_factor", "effective_lr", "delta_active", "rum",
                  "relative_update", "param_norm"],
        "epochs": ["run_id", "epoch", "train_loss", "test_acc", "delta_active_fraction", "mean_grad_norm", "mean_rum"],
        "sharpness": ["run_id", "epoch", "step", "lambda_max", "threshold_kind", "threshold", "deviation", "hvp_count",
                      "converged", "residual", "batch_size"],
        "grad_hist": ["run_id", "epoch", "bin_left", "bin_right", "count"],
    }.items():
        frame = pd.read_parquet(study_dir / "frames" / f"{name}.parquet")
        assert not frame.empty, name
        assert set(columns) <= set(frame.columns), (name, set(columns) - set(frame.columns))
    runs = pd.read_parquet(study_dir / "frames" / "runs.parquet")
    assert sorted(runs["method"]) == ["dgclip", "dgclip", "gclip", "sgd"]
    assert (runs["status"] == "completed").all()
    sharpness = pd.read_parquet(study_dir / "frames" / "sharpness.parquet")
    assert set(sharpness["threshold_kind"]) == {"2/h", "(2+2β)/h"}
    assert (sharpness["batch_size"] == 32).all()


def test_study_writes_tables_figures_and_report(study_dir):
    for name in ("delta_star", "runs", "sharpness"):
        for suffix in ("csv", "md", "tex"):
            assert (study_dir / "tables" / f"{name}.{suffix}").stat().st_size > 0
    for name in ("eos_deviation", "effective_lr", "lambda_vs_threshold", "accuracy_vs_delta"):
        for suffix in ("png", "pdf"):
            assert (study_dir / "figures" / f"{name}.{suffix}").stat().st_size > 1000
    report = (study_dir / "report.md").read_text()
    assert report.count("![") == 5
    assert "## Table `delta_star`" in report


def test_report_reproduces_tables(study_dir):
    before = {p.name: p.read_text() for p in (study_dir / "tables").iterdir()}
    for path in (study_dir / "tables").iterdir():
        path.unlink()
    assert main(["report", str(study_dir)]) == 0
    after = {p.name: p.read_text() for p in (study_dir / "tables").iterdir()}
    assert after == before


def test_rerun_skips_finished_runs(study_dir, caplog):
    status = study_dir / "runs" / "d8-w1-sgd-gclip-lr0.1-s0" / "status.json"
    stamp = status.stat().st_mtime_ns
    assert main(["study", "depth", *TINY, "--out", str(study_dir)]) == 0
    assert status.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--depths", "8,10", "6n+2"),
        ("--deltas", "0.2,1.5", "delta=1.5"),
        ("--gamma", "0", "gamma=0.0"),
        ("--lr", "-1", "lr=-1.0"),
        ("--epochs", "0", "epochs=0"),
        ("--preset", "huge", "unknown preset 'huge'"),
        ("--depths", "8,,14", "invalid depth list"),
        ("--device", "tpu", "tpu"),
        ("--widths", "0", "width=0"),
        ("--milestones", "30", "milestones=(30,)"),
        ("--dataset", "mnist", "invalid choice: 'mnist'"),
        ("--optimizer", "lamb", "invalid choice: 'lamb'"),
        ("--momentum", "1.0", "momentum=1.0"),
    ],
)
def test_invalid_option_exits_2_and_writes_nothing(tmp_path, capsys, option, value, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "depth", option, value, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_cifar_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "depth", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_on_empty_directory_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no runs to report" in capsys.readouterr().err


def test_presets_match_the_protocol():
    paper = build_study("depth", "paper")
    assert paper.depths == (8, 20, 32, 44, 50)
    assert paper.deltas == (0.01, 0.03, 0.08, 0.2, 0.45, 0.9)
    assert (paper.base.epochs, paper.base.batch_size, paper.base.lr, paper.base.milestones) == (100, 128, 0.1, (80,))
    assert (paper.base.weight_decay, paper.base.gamma, paper.base.dataset) == (5e-4, 0.1, "cifar10")
    assert len(paper.runs()) == 5 * 7
    quick = build_study("depth", "quick")
    assert quick.depths == (8, 14, 20)
    assert quick.deltas == (0.01, 0.2, 0.9)
    assert set(quick.methods) == {"sgd", "gclip", "dgclip"}
    assert quick.base.dataset == "digits"


def test_run_config_round_trips_through_json():
    config = RunConfig(depth=14, method="gclip", delta=None, milestones=(3,), epochs=4)
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.run_id == "d14-w1-sgd-gclip-lr0.1-s0"


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "studies.cli", "study", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--deltas" in result.stdout


def test_study_without_dgclip_renders_report(tmp_path):
    """A grid with no δ-GClip run used to crash the accuracy-vs-δ figure on an empty log axis."""
    out = tmp_path / "gclip-only"
    args = ["study", "depth", "--depths", "8", "--methods", "gclip", "--epochs", "1", "--sharpness-every", "0",
            "--sharpness-batch", "16", "--batch-size", "512", "--no-progress", "-q", "--out", str(out)]
    assert main(args) == 0
    assert (out / "figures" / "accuracy_vs_delta.png").is_file()
    assert (out / "report.md").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "4", "--milestones", "1,1"], "each value may appear once (a repeated milestone"),
        (["--lr", "0.1,0.1"], "invalid lr list '0.1,0.1': each value may appear once"),
        (["--data-root", "/tmp"], "applies to --dataset cifar10 only"),
        (["--lr", "inf"], "a finite number > 0"),
        (["--deltas", "0.2,x"], "'x' is not a valid delta"),
        (["--methods", "sgd,lion"], "'lion' is not a valid method"),
    ],
)
def test_more_invalid_options_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "depth", *extra, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_out_below_a_file_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "depth", "--out", str(blocker / "sub" / "dir")])
    assert exit_info.value.code == 2
    assert "is a file" in capsys.readouterr().err


def test_corrupt_cifar_exits_2_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"not a pickle")
    (folder / "test_batch").write_bytes(b"not a pickle")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "depth", "--dataset", "cifar10", "--data-root", str(tmp_path / "cifar"), "--out", str(out)])
    assert exit_info.value.code == 2
    assert "corrupt CIFAR-10 batch" in capsys.readouterr().err
    assert not out.exists()


def test_out_with_other_study_settings_exits_2(study_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "depth", *TINY[:-1], "--epochs", "3", "--out", str(study_dir)])
    assert exit_info.value.code == 2
    assert "different settings" in capsys.readouterr().err


def test_report_on_corrupt_frame_exits_2(tmp_path, capsys):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "runs.parquet").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "corrupt frame" in capsys.readouterr().err


def test_latex_tables_escape_names_and_math(study_dir):
    latex = (study_dir / "tables" / "sharpness.tex").read_text()
    assert r"threshold\_2\_over\_h" in latex
    assert r"$\lambda_{\max}$" in latex
    assert "λ" not in latex


def test_directory_in_use_exits_2(tmp_path, capsys):
    from studies.store import RunStore

    out = tmp_path / "busy"
    with RunStore(out).lock():
        with pytest.raises(SystemExit) as exit_info:
            main(["study", "depth", *TINY, "--out", str(out)])
    assert exit_info.value.code == 2
    assert "in use by another" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_writes_leave_no_temporary_files(study_dir):
    leftovers = [p for p in study_dir.rglob(".*") if p.name != ".lock"]
    assert leftovers == []


def test_diverged_run_is_reported_and_study_goes_on(tmp_path):
    out = tmp_path / "diverge"
    args = ["study", "depth", "--depths", "8", "--methods", "sgd,gclip", "--lr", "5", "--max-loss", "5",
            "--epochs", "2", "--sharpness-every", "0", "--sharpness-batch", "16", "--no-progress", "-q",
            "--out", str(out)]
    assert main(args) == 0
    runs = pd.read_parquet(out / "frames" / "runs.parquet").set_index("method")
    assert runs.loc["sgd", "status"] == "diverged"
    assert "loss above max_loss=5.0" in runs.loc["sgd", "reason"]
    assert runs.loc["sgd", "diverged_step"] >= 1
    assert runs.loc["gclip", "status"] == "completed"  # clipping keeps the same step size stable
    assert "diverged" in (out / "tables" / "runs.md").read_text()


def test_nonfinite_raise_fails_the_run_and_keeps_rows(tmp_path, monkeypatch):
    """With --on-nonfinite raise, a NaN gradient fails that run; its rows and the study survive."""
    import studies.runner as runner

    original = runner.build_trainer

    def poisoned(*args, **kwargs):
        trainer = original(*args, **kwargs)
        first = trainer.params[0]
        first.register_hook(lambda grad: grad * float("nan"))
        return trainer

    monkeypatch.setattr(runner, "build_trainer", poisoned)
    out = tmp_path / "nan"
    args = ["study", "depth", "--depths", "8", "--methods", "gclip", "--epochs", "1", "--on-nonfinite", "raise",
            "--sharpness-every", "0", "--sharpness-batch", "16", "--no-progress", "-q", "--out", str(out)]
    assert main(args) == 0
    runs = pd.read_parquet(out / "frames" / "runs.parquet")
    assert runs["status"].tolist() == ["failed"]
    assert "contains inf or NaN" in runs["reason"].iloc[0]
    steps = pd.read_parquet(out / "frames" / "steps.parquet")
    assert steps["skipped"].tolist() == [True]


def test_sharpness_hvp_option_reaches_probe(tmp_path):
    """--sharpness-hvp forward_over_reverse is the product path of every λ_max row, and the
    estimates equal those of the default double-backward path."""
    frames = {}
    for method in ("double_backward", "forward_over_reverse"):
        out = tmp_path / method
        args = ["study", "depth", "--depths", "8", "--methods", "gclip", "--epochs", "1", "--sharpness-every", "1",
                "--sharpness-batch", "32", "--sharpness-hvp", method, "--no-progress", "-q", "--out", str(out)]
        assert main(args) == 0
        frames[method] = pd.read_parquet(out / "frames" / "sharpness.parquet")
    assert set(frames["forward_over_reverse"]["estimator"]) == {"lanczos/forward_over_reverse"}
    assert set(frames["double_backward"]["estimator"]) == {"lanczos/double_backward"}
    assert frames["forward_over_reverse"]["lambda_max"].tolist() == pytest.approx(
        frames["double_backward"]["lambda_max"].tolist(), rel=1e-4)


@pytest.mark.parametrize("options, message", [
    ({"sharpness_tol": 2.0}, "invalid sharpness_tol=2.0: expected a number in [0, 1)"),
    ({"sharpness_max_iter": 0}, "invalid sharpness_max_iter=0: expected an integer >= 1"),
])
def test_run_config_checks_sharpness_solver(options, message):
    """Out-of-range solver settings used to pass the config and fail only when a run built its probe."""
    with pytest.raises(ValueError) as error:
        RunConfig(**options)
    assert message in str(error.value)

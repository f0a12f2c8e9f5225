"""Executors: worker processes, submitit (its local cluster), interruption, resume and run states."""

import time

import pandas as pd
import pytest

from studies.cli import main
from studies.executors import SlurmOptions, run_states, submit_slurm
from studies.presets import build_study
from studies.store import RunInUseError, RunStore

GRID = {"depths": (8,), "widths": (1,), "methods": ("gclip", "dgclip"), "deltas": (0.2,), "epochs": 6,
        "milestones": (4,), "sharpness_every": 1, "sharpness_batch": 32}
ARGS = ["--depths", "8", "--widths", "1", "--methods", "gclip,dgclip", "--deltas", "0.2", "--epochs", "6",
        "--milestones", "4", "--sharpness-every", "1", "--sharpness-batch", "32", "--checkpoint-interval", "0",
        "--no-progress", "-q"]
IGNORED = ["epoch_time", "wall_time", "code_version", "reason"]


def _study():
    return build_study("width", "quick", dict(GRID))


def _frames(directory):
    frames = {}
    for name in ("runs", "steps", "epochs", "sharpness", "grad_hist"):
        frame = pd.read_parquet(directory / "frames" / f"{name}.parquet")
        frames[name] = frame.drop(columns=[c for c in IGNORED if c in frame]).reset_index(drop=True)
    return frames


def _args(out, *extra):
    return ["study", "width", *ARGS, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential") / "study"
    assert main(_args(out)) == 0
    return _frames(out)


def _assert_same(frames, reference):
    for name, frame in reference.items():
        pd.testing.assert_frame_equal(frames[name], frame, obj=name)


def test_worker_processes_match_sequential(reference, tmp_path):
    out = tmp_path / "jobs"
    assert main(_args(out, "--jobs", "2")) == 0
    _assert_same(_frames(out), reference)


def test_submitit_interrupt_then_resume(reference, tmp_path):
    out = tmp_path / "submitit"
    study = _study()
    RunStore(out).write_study(study.to_dict())
    options = SlurmOptions(cluster="local")
    jobs = submit_slurm(study, out, options, checkpoint_interval=0.0)
    assert len(jobs) == 2

    # Interrupt as soon as one run has written an epoch checkpoint, then wait for both tasks to stop.
    deadline = time.monotonic() + 120
    while not list(out.glob("runs/*/checkpoint.pt")):
        assert time.monotonic() < deadline, "no checkpoint appeared within 120 s"
        time.sleep(0.02)
    for job in jobs:
        job.cancel()
    for job in jobs:
        while not job.done():
            time.sleep(0.05)
    states = {row["run_id"]: row["state"] for row in run_states(study, out)}
    assert "interrupted" in states.values(), states

    # Finish with submitit's local cluster again: interrupted runs resume from their checkpoints.
    submit_slurm(study, out, SlurmOptions(cluster="local", wait=True), checkpoint_interval=0.0)
    assert {row["state"] for row in run_states(study, out)} == {"completed"}
    RunStore(out).collect()
    _assert_same(_frames(out), reference)


def test_cli_slurm_path_finishes_a_study(reference, tmp_path):
    out = tmp_path / "cli"
    assert main(_args(out, "--executor", "slurm", "--slurm-cluster", "local", "--wait")) == 0
    _assert_same(_frames(out), reference)
    assert (out / "report.md").is_file()


def test_status_lists_every_run(tmp_path, capsys):
    out = tmp_path / "status"
    assert main(_args(out, "--status")) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert "pending" in lines[0]
    assert lines[-1] == "2 pending"
    assert not out.exists()  # --status writes nothing


def test_locked_run_is_skipped(tmp_path):
    store = RunStore(tmp_path)
    with store.run_lock("r1"):
        assert store.run_in_use("r1")
        with pytest.raises(RunInUseError, match="another process"):
            with store.run_lock("r1"):
                pass
    assert not store.run_in_use("r1")


def test_jobs_flag_is_validated(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(_args(tmp_path / "bad", "--jobs", "0"))
    assert exit_info.value.code == 2
    assert "invalid --jobs 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(_args(tmp_path / "bad", "--jobs", "2", "--executor", "slurm"))
    assert "applies to --executor local" in capsys.readouterr().err


def test_slurm_options_are_validated():
    with pytest.raises(ValueError, match="invalid slurm time_min=0"):
        SlurmOptions(time_min=0)


def test_ctrl_c_leaves_queued_runs_pending(tmp_path):
    """SIGINT to the process group (a terminal's Ctrl-C) stops `--jobs` runs within seconds.

    The fault: leaving the process pool's `with` block waited for every queued run, so
    all of them trained after Ctrl-C.
    """
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "ctrl-c"
    args = ["study", "depth", "--depths", "8", "--deltas", "0.01,0.2,0.9", "--lr", "0.1,0.05", "--epochs", "3",
            "--jobs", "2", "--no-progress", "-q", "--out", str(out)]
    code = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
           "from studies.cli import main; sys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code, *args], start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("runs/*/status.json")):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no run finished within 120 s"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    started = time.monotonic()
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output
    assert time.monotonic() - started < 20
    finished = len(list(out.glob("runs/*/status.json")))
    assert finished < 10, "queued runs were trained after Ctrl-C"


def test_status_needs_only_out(tmp_path, capsys):
    out = tmp_path / "stored"
    assert main(_args(out)) == 0
    capsys.readouterr()
    assert main(["study", "width", "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "2 completed"

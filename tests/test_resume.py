"""Interrupted studies resume from the last epoch checkpoint and match an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [sys.executable, "-m", "studies.cli", "study", "depth", "--depths", "8", "--methods", "dgclip",
           "--deltas", "0.2", "--epochs", "4", "--sharpness-every", "2", "--sharpness-batch", "64",
           "--batch-size", "128", "--checkpoint-interval", "0", "--no-progress", "--out"]
TIMING = {"wall_time", "epoch_time"}


def _run(out: Path) -> str:
    result = subprocess.run(COMMAND + [str(out)], cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    return result.stderr


def _frames(out: Path) -> dict[str, pd.DataFrame]:
    frames = {}
    for name in ("runs", "steps", "epochs", "sharpness", "grad_hist"):
        frame = pd.read_parquet(out / "frames" / f"{name}.parquet")
        frames[name] = frame.drop(columns=[c for c in frame.columns if c in TIMING])
    return frames


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    _run(reference)

    process = subprocess.Popen(COMMAND + [str(interrupted)], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = interrupted / "runs" / "d8-w1-sgd-dgclip-delta0.2-lr0.1-s0" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_file(), "the run finished or failed before its first checkpoint"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (interrupted / "frames").exists()

    log = _run(interrupted)
    assert "resumed" in log  # the rerun continued from the checkpoint, not from scratch
    assert not checkpoint.exists()  # removed once the run finished
    expected, actual = _frames(reference), _frames(interrupted)
    for name in expected:
        pd.testing.assert_frame_equal(actual[name], expected[name], check_exact=True, obj=name)


def test_same_command_gives_identical_frames(tmp_path):
    """Two runs of the same command and seed on the CPU write the same frames, timing aside."""
    first, second = tmp_path / "first", tmp_path / "second"
    _run(first)
    _run(second)
    for name, frame in _frames(first).items():
        pd.testing.assert_frame_equal(_frames(second)[name], frame, check_exact=True, obj=name)

"""The run store: one directory per study, one sub-directory per run.

Layout::

    STUDY/
      study.json                  the study's grid and shared settings
      runs/RUN_ID/config.json     the run's full config
      runs/RUN_ID/FRAME.parquet   runs, steps, epochs, sharpness, grad_hist
      runs/RUN_ID/status.json     written last; marks the run as finished
      frames/FRAME.parquet        every run's rows of FRAME, concatenated
      replaced/RUN_ID-N/          a run trained with other settings, moved aside before its id was reused
      tables/, figures/, report.md (written by ``reports``)

Every file is written to a temporary name and renamed into place, so a reader never
sees a truncated file. A run counts as done only once ``status.json`` exists, and
only for the same config and with every frame file present. Runs that are not part of
the current grid (left by an earlier study in the same directory) stay on disk but are
left out of ``frames/``.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from reports.atomic import atomic_write_json, atomic_write_parquet

FRAMES = ("runs", "steps", "epochs", "sharpness", "grad_hist", "probe_events")

log = logging.getLogger(__name__)


class StudyInUseError(RuntimeError):
    """Another process is running a study in the same directory."""


class RunInUseError(RuntimeError):
    """Another process is training the same run."""


class CorruptRunError(RuntimeError):
    """A finished run's frame file cannot be read."""


@contextmanager
def _exclusive(path: Path, error: Exception) -> Iterator[None]:
    """Hold an ``fcntl`` lock on ``path`` or raise ``error``; the OS drops it when the holder dies, even by SIGKILL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise error from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


class RunStore:
    """Read and write the runs of one study directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the study directory, or raise :class:`StudyInUseError`.

        The lock is an ``fcntl`` lock on ``.lock``, so the operating system releases it
        when the holder exits, even after SIGKILL.
        """
        error = StudyInUseError(
            f"study directory {self.root} is in use by another `eos study`; wait for it to finish or pass another --out"
        )
        with _exclusive(self.root / ".lock", error):
            yield

    def run_lock(self, run_id: str):
        """Return a context that holds the lock of one run, or raises :class:`RunInUseError`."""
        error = RunInUseError(f"run {run_id} in {self.root} is being trained by another process; skipped here")
        return _exclusive(self.run_dir(run_id) / ".lock", error)

    def run_in_use(self, run_id: str) -> bool:
        """Return whether another process holds the run's lock."""
        path = self.run_dir(run_id) / ".lock"
        if not path.is_file():
            return False
        try:
            with self.run_lock(run_id):
                return False
        except RunInUseError:
            return True

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def _has_config(self, run_id: str, config: dict[str, Any]) -> bool:
        """Return whether the run's ``config.json`` exists and equals ``config`` as JSON."""
        path = self.run_dir(run_id) / "config.json"
        if not path.is_file():
            return False
        try:
            stored = json.loads(path.read_text())
        except ValueError:  # a corrupt config.json: the run is trained again and the file rewritten
            return False
        return stored == json.loads(json.dumps(config, default=str))

    def missing_frames(self, run_id: str) -> list[str]:
        """Return the names of the frames whose ``FRAME.parquet`` file is absent from the run's directory."""
        return [name for name in FRAMES if not (self.run_dir(run_id) / f"{name}.parquet").is_file()]

    def finished(self, run_id: str, config: dict[str, Any]) -> bool:
        """Return whether ``run_id`` finished (completed, diverged or failed) with exactly ``config``.

        A run whose ``status.json`` exists but whose frame files were deleted counts as
        not finished, so the study trains it again instead of reporting it without rows.
        """
        return (
            (self.run_dir(run_id) / "status.json").is_file()
            and self._has_config(run_id, config)
            and not self.missing_frames(run_id)
        )

    def grid_runs(self, grid: dict[str, dict[str, Any]]) -> list[str]:
        """Return the runs of ``grid`` (run id to config) that finished with their config, sorted by run id
        like :meth:`run_ids`, so the frames' row order does not depend on the grid's."""
        return [run_id for run_id in self.run_ids() if run_id in grid and self.finished(run_id, grid[run_id])]

    def log_left_out(self, grid: dict[str, dict[str, Any]]) -> None:
        """Log the finished runs outside ``grid``, and the runs of ``grid`` that have a status but miss frame files."""
        outside = [run_id for run_id in self.run_ids() if run_id not in grid]
        if outside:
            log.info("finished runs outside the current grid stay in %s but are left out of frames/ and the "
                     "report (%d): %s", self.root / "runs", len(outside), ", ".join(outside))
        for run_id in self.run_ids():
            missing = self.missing_frames(run_id)
            if run_id in grid and missing:
                log.warning("run %s has status.json but its frame files %s are missing, so it counts as not "
                            "finished; rerun the same `eos study` command to train it again", run_id,
                            ", ".join(f"{name}.parquet" for name in missing))

    def start_run(self, run_id: str, config: dict[str, Any]) -> Path:
        """Prepare a run directory and return its checkpoint path.

        A checkpoint left by an interrupted run is kept when ``config.json`` contains the
        same config, so the trainer resumes from it; otherwise it is deleted.
        """
        directory = self.run_dir(run_id)
        checkpoint = directory / "checkpoint.pt"
        if not self._has_config(run_id, config) and ((directory / "status.json").is_file() or checkpoint.is_file()):
            self._set_aside(run_id)
        (directory / "status.json").unlink(missing_ok=True)
        atomic_write_json(directory / "config.json", config)
        return checkpoint

    def _set_aside(self, run_id: str) -> None:
        """Move a run directory trained with other settings to ``replaced/RUN_ID-N`` before its run id is trained again.

        A run id leaves out settings such as the number of epochs. After study.json was
        deleted, a new grid can therefore reuse the id of a finished run, whose results
        are kept this way.
        """
        target = self.root / "replaced" / run_id
        for index in itertools.count(1):
            target = self.root / "replaced" / f"{run_id}-{index}"
            if not target.exists():
                break
        target.mkdir(parents=True)
        for entry in self.run_dir(run_id).iterdir():
            if entry.name != ".lock":  # the lock stays: this process may hold it while it trains the run
                os.replace(entry, target / entry.name)
        log.warning("run %s in %s was trained with other settings; it was moved to %s and is trained again with the "
                    "current ones", run_id, self.root / "runs", target)

    def write_study(self, study: dict[str, Any]) -> None:
        atomic_write_json(self.root / "study.json", study)

    def write_run(self, run_id: str, config: dict[str, Any], frames: dict[str, pd.DataFrame], status: dict) -> None:
        """Write a run's config and frames, then its status file last."""
        directory = self.run_dir(run_id)
        (directory / "status.json").unlink(missing_ok=True)
        atomic_write_json(directory / "config.json", config)
        for name, frame in frames.items():
            atomic_write_parquet(directory / f"{name}.parquet", frame)
        atomic_write_json(directory / "status.json", status)

    def run_ids(self) -> list[str]:
        runs = self.root / "runs"
        if not runs.is_dir():
            return []
        return sorted(p.name for p in runs.iterdir() if (p / "status.json").is_file())

    def _read_frame(self, path: Path) -> pd.DataFrame:
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise CorruptRunError(
                f"corrupt frame {path}: {error}; delete {path.parent} and rerun the same command to train that run again"
            ) from error

    def collect(self, grid: dict[str, dict[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
        """Concatenate the finished runs' frames into ``frames/`` and return them.

        With ``grid`` (run id to config, from ``StudyConfig.runs()``) only the runs of
        that grid that finished with their config are collected, so runs left in the
        directory by a study with other settings never mix into the frames. Without it,
        every run with a ``status.json`` is collected.
        """
        if grid is None:
            run_ids = self.run_ids()
        else:
            self.log_left_out(grid)
            run_ids = self.grid_runs(grid)
        frames = {}
        for name in FRAMES:
            parts = [
                self._read_frame(path)
                for run_id in run_ids
                if (path := self.run_dir(run_id) / f"{name}.parquet").is_file()
            ]
            parts = [part for part in parts if not part.empty]
            frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
            atomic_write_parquet(self.root / "frames" / f"{name}.parquet", frame)
            frames[name] = frame
        return frames

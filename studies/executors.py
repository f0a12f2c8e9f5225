"""Executors: where the runs of a study train.

- ``local``: in this process one after another, or with ``jobs`` > 1 in that many
  worker processes. The workers spread over the visible GPUs, several per GPU when
  ``jobs`` exceeds the GPU count, or share the CPU cores.
- ``slurm``: one SLURM array task per run, submitted through submitit. A task that
  is preempted or reaches its time limit is requeued and resumes from the run's
  last checkpoint. submitit's ``local`` cluster runs the same code path as
  subprocesses, which is how the tests exercise it.

Every executor writes into the same run store, and a run is written the same way
whichever executor trains it. So a study started with one executor can be finished
with another, and the study-wide frames are identical either way. A per-run lock
keeps two processes from training the same run at once.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studies.config import RunConfig, StudyConfig
from studies.store import RunInUseError, RunStore

log = logging.getLogger(__name__)

EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class SlurmOptions:
    """SLURM settings of ``--executor slurm``; ``cluster="local"`` runs the tasks as local subprocesses."""

    partition: str | None = None
    time_min: int = 24 * 60
    gpus_per_job: int = 1
    cpus_per_job: int = 4
    array_parallelism: int = 16
    cluster: str | None = "slurm"
    wait: bool = False

    def __post_init__(self) -> None:
        for name, value, low in (("time_min", self.time_min, 1), ("gpus_per_job", self.gpus_per_job, 0),
                                 ("cpus_per_job", self.cpus_per_job, 1), ("array_parallelism", self.array_parallelism, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"invalid slurm {name}={value!r}: expected an integer >= {low}")


def pending_runs(study: StudyConfig, store: RunStore) -> list[RunConfig]:
    """Return the runs of ``study`` that have not finished with their current config, in grid order."""
    return [config for config in study.runs() if not store.finished(config.run_id, config.to_dict())]


def _exit_with_parent(parent: int) -> None:
    """Exit this worker when its parent process is gone (killed by SIGKILL or SIGTERM, which it cannot clean up after).

    The run's lock dies with the worker, and its last checkpoint stays for the next attempt.
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the study process %d is gone; worker %d stops (its run resumes from its checkpoint)", parent, os.getpid())
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _init_worker(parent: int, level: int) -> None:
    """Set up a worker process: log like the parent, ignore Ctrl-C there (the parent handles it), watch the parent."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s",
                        datefmt="%H:%M:%S")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)


def train_one(config_data: dict[str, Any], out: str, checkpoint_interval: float = 30.0, device: str | None = None,
              threads: int | None = None, progress: bool | None = False) -> dict | None:
    """Train one run into the store at ``out``; the entry point of worker processes and SLURM tasks.

    Returns the run's ``runs`` row, or None when the run had already finished or
    another process is training it.
    """
    import torch

    from dynamics.data import load_dataset
    from studies.runner import execute_run

    if threads:
        torch.set_num_threads(threads)
    config = RunConfig.from_dict(config_data)
    store = RunStore(out)
    if store.finished(config.run_id, config.to_dict()):
        return None
    try:
        with store.run_lock(config.run_id):
            if store.finished(config.run_id, config.to_dict()):  # finished while we waited for the lock
                return None
            dataset = load_dataset(config.dataset, config.data_root)
            return execute_run(config, dataset, store, progress, checkpoint_interval, device=device)
    except RunInUseError as error:
        log.warning("%s", error)
        return None


def _devices(study: StudyConfig, jobs: int) -> list[str | None]:
    """Return the device of each worker slot: GPUs round-robin when several are visible, else the config's."""
    import torch

    requested = study.base.device
    if requested in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        count = torch.cuda.device_count()
        return [f"cuda:{slot % count}" for slot in range(jobs)]
    return [None] * jobs


def run_local(study: StudyConfig, out: Path, jobs: int, checkpoint_interval: float) -> None:
    """Train the pending runs of ``study`` in ``jobs`` worker processes (spawned, so CUDA works in them)."""
    store = RunStore(out)
    pending = pending_runs(study, store)
    if not pending:
        return
    import torch

    devices = _devices(study, jobs)
    # Workers keep this process's intra-op thread count: a CPU convolution split over
    # fewer threads rounds differently, and the frames must not depend on --jobs. On a
    # CPU, more jobs than cores therefore oversubscribe it; the gain of --jobs is on GPUs.
    threads = torch.get_num_threads()
    log.info("%d runs over %d worker processes (%d CPU threads each)", len(pending), jobs, threads)
    context = multiprocessing.get_context("spawn")
    failures = []
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                               initargs=(os.getpid(), logging.getLogger().getEffectiveLevel()))
    try:
        futures = {
            pool.submit(train_one, config.to_dict(), str(out), checkpoint_interval, devices[index % jobs], threads): config
            for index, config in enumerate(pending)
        }
        for done, future in enumerate(as_completed(futures), 1):
            config = futures[future]
            try:
                row = future.result()
            except Exception as error:  # a worker's failure must not stop the other runs
                log.error("run %s failed in its worker: %s: %s", config.run_id, type(error).__name__, error)
                failures.append(config.run_id)
                continue
            state = "skipped (finished or in use elsewhere)" if row is None else row["status"]
            log.info("[%d/%d] %s %s", done, len(pending), config.run_id, state)
    except BaseException:
        # Ctrl-C (or any error here) drops the queued runs, so they stay pending. The
        # workers are stopped too, and a run they were training resumes from its checkpoint.
        workers = list((pool._processes or {}).values())  # private, but the pool has no public way to stop them
        pool.shutdown(wait=False, cancel_futures=True)
        for process in workers:
            process.terminate()
        raise
    pool.shutdown(wait=True)
    if failures:
        raise RuntimeError(f"runs {failures} failed in their worker processes (see the log above); "
                           "rerun the same command to retry them")


class SlurmTask:
    """The callable submitit pickles for each array task; requeued from its checkpoint when preempted."""

    def __init__(self, out: str, checkpoint_interval: float) -> None:
        self.out, self.checkpoint_interval = out, checkpoint_interval

    def __call__(self, config_data: dict[str, Any]) -> dict | None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        return train_one(config_data, self.out, self.checkpoint_interval)

    def checkpoint(self, config_data: dict[str, Any]):
        """Requeue the same task; it resumes from ``runs/RUN_ID/checkpoint.pt`` (submitit calls this on preemption)."""
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmTask(self.out, self.checkpoint_interval), config_data)


def submit_slurm(study: StudyConfig, out: Path, options: SlurmOptions, checkpoint_interval: float) -> list:
    """Submit the pending runs of ``study`` as one submitit array; return the jobs.

    With ``options.wait`` this waits for every job and raises if one failed.
    """
    try:
        import submitit
    except ImportError:
        raise RuntimeError("missing package submitit, which --executor slurm needs: pip install 'eos-dynamics[cluster]'") from None
    store = RunStore(out)
    pending = pending_runs(study, store)
    if not pending:
        return []
    executor = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster=options.cluster)
    parameters: dict[str, Any] = {"timeout_min": options.time_min, "cpus_per_task": options.cpus_per_job,
                                  "name": f"eos-{study.name}"}
    if options.cluster != "local":
        parameters.update(gpus_per_node=options.gpus_per_job, slurm_array_parallelism=options.array_parallelism)
        if options.partition:
            parameters["slurm_partition"] = options.partition
    executor.update_parameters(**parameters)
    task = SlurmTask(str(out), checkpoint_interval)
    jobs = executor.map_array(task, [config.to_dict() for config in pending])
    log.info("submitted %d runs as jobs %s; logs in %s", len(jobs), ", ".join(job.job_id for job in jobs[:3])
             + (" ..." if len(jobs) > 3 else ""), out / "slurm")
    if options.wait:
        failures = []
        for job, config in zip(jobs, pending):
            try:
                job.result()
            except Exception as error:  # report every failed job, not only the first
                log.error("job %s (run %s) failed: %s", job.job_id, config.run_id, error)
                failures.append(config.run_id)
        if failures:
            raise RuntimeError(f"runs {failures} failed on the cluster; logs are in {out / 'slurm'}")
    return jobs


def run_states(study: StudyConfig, out: Path) -> list[dict[str, Any]]:
    """Return one row per run of ``study``: run id and state.

    States: ``completed``, ``diverged`` or ``failed`` (finished), ``running`` (a process
    holds the run's lock), ``interrupted`` (a checkpoint exists but no process trains the run),
    ``stale`` (finished with another config, or with frame files missing) and ``pending``.
    """
    store = RunStore(out)
    rows = []
    for config in study.runs():
        directory = store.run_dir(config.run_id)
        status_path = directory / "status.json"
        checkpoint = directory / "checkpoint.pt"
        row: dict[str, Any] = {"run_id": config.run_id, "detail": ""}
        if store.finished(config.run_id, config.to_dict()):
            try:
                status = json.loads(status_path.read_text())
            except ValueError:
                status = {"status": "corrupt", "finished": f"{status_path} is not valid JSON; delete it to train the run again"}
            row["state"] = status.get("status", "completed")
            row["detail"] = status.get("finished", "")
        elif store.run_in_use(config.run_id):
            row["state"] = "running"
        elif checkpoint.is_file():
            row["state"] = "interrupted"
            row["detail"] = "checkpoint of " + time.strftime("%Y-%m-%d %H:%M", time.localtime(checkpoint.stat().st_mtime))
        elif status_path.is_file():
            row["state"] = "stale"
            missing = store.missing_frames(config.run_id)
            row["detail"] = (f"frame files {', '.join(f'{name}.parquet' for name in missing)} missing; reruns" if missing
                             else "finished with other settings; reruns")
        else:
            row["state"] = "pending"
        rows.append(row)
    return rows

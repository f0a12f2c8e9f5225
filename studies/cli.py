"""The ``eos`` command: ``eos study KIND`` runs a study, ``eos report DIR`` re-renders one.

Every option is validated before anything is written; an invalid value exits with
status 2 and a message naming the value and the valid form.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from dynamics.data import DATASETS, DatasetError
from dynamics.models import check_depth
from studies.config import GRID_METHODS
from studies.presets import PRESETS, build_study

log = logging.getLogger("eos")

STUDY_KINDS = tuple(PRESETS)


LIST_EXAMPLES = {
    "depth": "8,14,20", "width": "1,2,4", "delta": "0.01,0.2,0.9", "method": "sgd,adam,gclip,dgclip",
    "milestone": "80,120", "lr": "0.05,0.1",
}


def _list_of(kind: Callable[[str], object], name: str) -> Callable[[str], tuple]:
    """Return an argparse type that parses a comma-separated list of ``kind``."""
    expected = f"expected comma-separated values like {LIST_EXAMPLES[name]}"

    def parse(text: str) -> tuple:
        items = [item.strip() for item in text.split(",")]
        if not text.strip() or any(not item for item in items):
            raise argparse.ArgumentTypeError(f"invalid {name} list {text!r}: empty item; {expected}")
        values = []
        for item in items:
            try:
                values.append(kind(item))
            except ValueError as error:
                detail = str(error) if name == "depth" and "6n+2" in str(error) else f"{item!r} is not a valid {name}"
                raise argparse.ArgumentTypeError(f"invalid {name} list {text!r}: {detail}; {expected}") from None
        if len(set(values)) != len(values):
            reason = " (a repeated milestone would multiply η by 0.1 twice)" if name == "milestone" else ""
            raise argparse.ArgumentTypeError(f"invalid {name} list {text!r}: each value may appear once{reason}")
        return tuple(values)

    return parse


def _depth(text: str) -> int:
    return check_depth(int(text)) * 6 + 2


def _method(text: str) -> str:
    if text not in GRID_METHODS:
        raise ValueError(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eos", description="Edge-of-stability studies of δ-GClip.")
    commands = parser.add_subparsers(dest="command", required=True)

    study = commands.add_parser("study", help="run a study into a directory and render its report")
    study.add_argument("kind", choices=STUDY_KINDS, help="which study to run")
    study.add_argument("--preset", default="quick",
                       help="named settings: quick (CPU minutes, the default) or paper (GPU hours)")
    study.add_argument("--out", type=Path, help="study directory (default: eos-results/KIND-PRESET)")
    study.add_argument("--depths", type=_list_of(_depth, "depth"), help="ResNet depths 6n+2, e.g. 8,14,20")
    study.add_argument("--widths", type=_list_of(int, "width"), help="width multipliers k >= 1, e.g. 1,2")
    study.add_argument("--deltas", type=_list_of(float, "delta"), help="δ-GClip floors in [0, 1], e.g. 0.01,0.2,0.9")
    study.add_argument("--methods", type=_list_of(_method, "method"), help="subset of sgd,adam,gclip,dgclip (adam: bare Adam at --adam-lr)")
    study.add_argument("--adam-lr", type=float, help="step size of the bare Adam baseline (method adam; default 1e-3)")
    study.add_argument("--gamma", type=float, help="clipping threshold γ > 0 (gradient-norm units)")
    study.add_argument("--lr", type=_list_of(float, "lr"), help="base learning rate η > 0; several values sweep it")
    study.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="optimizer that δ-GClip wraps")
    study.add_argument("--momentum", type=float, help="heavy-ball momentum β in [0, 1)")
    study.add_argument("--weight-decay", type=float, help="L2 weight decay >= 0")
    study.add_argument("--epochs", type=int,
                       help="training epochs >= 1 (in the sharpness study one epoch is one full-batch step); "
                            "without --milestones the preset's decay epochs are scaled to match")
    study.add_argument("--milestones", type=_list_of(int, "milestone"),
                       help="distinct epochs after which η is multiplied by 0.1")
    study.add_argument("--batch-size", type=int, help="training batch size")
    study.add_argument("--dataset", choices=DATASETS, help="digits (embedded) or cifar10")
    study.add_argument("--data-root", type=Path, help="folder holding cifar-10-batches-py/ (cifar10 only)")
    study.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-root when missing")
    study.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    study.add_argument("--seed", type=int, help="seed of model init, data order and probes")
    study.add_argument("--autocast", choices=("none", "bf16"),
                       help="bf16: forward passes under bfloat16 autocast (gradients, ‖g‖ and clipping stay float32)")
    study.add_argument("--channels-last", action="store_true", default=None,
                       help="channels-last memory format for model and images (faster convolutions on recent GPUs)")
    study.add_argument("--compile", action="store_true", default=None,
                       help="run forward passes through torch.compile (the sharpness probe uses the eager model)")
    study.add_argument("--max-loss", type=float, help="mark a run diverged when a batch loss exceeds this (default: inf)")
    study.add_argument("--on-nonfinite", dest="nonfinite", choices=("skip", "raise"),
                       help="a gradient with inf or NaN: skip the step (default) or fail the run")
    study.add_argument("--sharpness-every", type=int, help="measure λ_max every N epochs (0: only after the last)")
    study.add_argument("--sharpness-every-steps", type=int,
                       help="also measure λ_max every N optimizer steps (0: never; the sharpness study uses 25)")
    study.add_argument("--sharpness-batch", type=int,
                       help="training images in the fixed sharpness batch (at most the training set)")
    study.add_argument("--sharpness-hvp", choices=("double_backward", "forward_over_reverse", "auto"),
                       help="Hessian-vector product path (default double_backward, bitwise reproducible; "
                            "forward_over_reverse is faster per product after a one-time trace)")
    study.add_argument("--checkpoint-interval", type=float, default=30.0,
                       help="seconds between epoch-end checkpoints (0: after every epoch; default 30)")
    study.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="local: this machine (default); slurm: one SLURM array task per run, through submitit")
    study.add_argument("--jobs", type=int, default=1,
                       help="local executor: runs trained at once in worker processes, spread over the visible GPUs "
                            "(several per GPU when more jobs than GPUs) or the CPU cores (default 1: in this process)")
    study.add_argument("--partition", help="slurm: partition to submit to (default: the cluster's default)")
    study.add_argument("--time-min", type=int, default=24 * 60,
                       help="slurm: time limit per task in minutes; a task that reaches it is requeued and resumes")
    study.add_argument("--gpus-per-job", type=int, default=1, help="slurm: GPUs per task (default 1)")
    study.add_argument("--cpus-per-job", type=int, default=4, help="slurm: CPU cores per task (default 4)")
    study.add_argument("--array-parallelism", type=int, default=16,
                       help="slurm: tasks of the array allowed to run at once (default 16)")
    study.add_argument("--slurm-cluster", choices=("slurm", "local", "debug"), default="slurm",
                       help=argparse.SUPPRESS)  # submitit's local cluster runs tasks as subprocesses (tests)
    study.add_argument("--wait", action="store_true",
                       help="slurm: wait for every task, then collect the frames and render the report")
    study.add_argument("--status", action="store_true",
                       help="print each run's state (completed, running, interrupted, pending, ...) and exit; "
                            "with the --out of an existing study no other option is needed")
    study.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    study.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")

    report = commands.add_parser("report", help="re-render tables and figures of a study directory from its frames")
    report.add_argument("directory", type=Path, help="a study directory written by `eos study`")
    report.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")

    scaling = commands.add_parser("scaling", help="plot δ* against depth and width across depth and width studies")
    scaling.add_argument("directories", type=Path, nargs="+", help="study directories of `eos study depth|width`")
    scaling.add_argument("--out", type=Path, default=Path("eos-results/scaling"),
                         help="directory for tables/ and figures/ (default: eos-results/scaling)")
    scaling.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return parser


# Options whose parsed value overrides the preset field (or grid key) of the same name.
OVERRIDES = (
    "depths", "widths", "deltas", "methods", "gamma", "optimizer", "momentum", "weight_decay", "epochs",
    "milestones", "batch_size", "dataset", "device", "seed", "sharpness_every", "sharpness_batch", "max_loss",
    "nonfinite", "sharpness_every_steps", "adam_lr", "autocast", "channels_last", "compile", "sharpness_hvp",
)


def _settings_that_apply(study: dict) -> dict:
    """Return study.json contents as a comparable grid: methods in sorted order, and no δ grid without dgclip.

    The order of ``--methods`` changes no run. Studies written before ``--deltas`` without
    dgclip was rejected kept those values, which change no run either; neither may block
    a resume.
    """
    methods = study.get("methods", ())
    comparable = {key: value for key, value in study.items() if key != "deltas" or "dgclip" in methods}
    if isinstance(methods, list):
        comparable["methods"] = sorted(map(str, methods))
    return comparable


def _differing_settings(previous: dict, current: dict) -> str:
    """Name the settings that differ between two study.json contents, with both values."""
    def flat(study: dict) -> dict:
        base = study.get("base")
        return {**{k: v for k, v in study.items() if k != "base"}, **(base if isinstance(base, dict) else {})}

    flat_previous, flat_current = flat(previous), flat(current)
    names = sorted(name for name in set(flat_previous) | set(flat_current)
                   if flat_previous.get(name) != flat_current.get(name))
    return ", ".join(f"{name}: {flat_previous.get(name)!r} there, {flat_current.get(name)!r} now" for name in names)


def _reject_inapplicable_options(args: argparse.Namespace, study, parser: argparse.ArgumentParser) -> None:
    """Exit with status 2 when the user passed an option that changes no run of ``study``.

    Only options given on the command line are checked, because a preset may set the
    same fields for runs that do not use them.
    """
    methods = ",".join(study.methods)
    if study.base.model == "mlp":
        hidden = "x".join(str(size) for size in study.base.hidden)
        for option, values in (("--depths", args.depths), ("--widths", args.widths)):
            if values is not None:
                parser.error(f"invalid {option} {','.join(map(str, values))}: it does not apply to the {study.name} "
                             f"study, which trains an MLP (hidden layers {hidden}) and not a ResNet; drop {option}")
    if args.deltas is not None and "dgclip" not in study.methods:
        parser.error(f"invalid --deltas {','.join(map(str, args.deltas))}: δ is the floor of method dgclip, which "
                     f"this study does not run (methods {methods}); add dgclip to --methods or drop --deltas")
    if args.gamma is not None and not {"gclip", "dgclip"} & set(study.methods):
        parser.error(f"invalid --gamma {args.gamma:g}: γ is the clipping threshold of methods gclip and dgclip, "
                     f"which this study does not run (methods {methods}); add one to --methods or drop --gamma")
    if args.adam_lr is not None and "adam" not in study.methods:
        parser.error(f"invalid --adam-lr {args.adam_lr:g}: it sets the step size of method adam (bare Adam), which "
                     f"this study does not run (methods {methods}); add adam to --methods or drop --adam-lr "
                     "(with --optimizer adam, --lr sets Adam's step size)")
    if args.lr is not None and set(study.methods) == {"adam"}:
        parser.error(f"invalid --lr {','.join(f'{lr:g}' for lr in args.lr)}: every run of this study uses method adam "
                     "(bare Adam), whose step size is --adam-lr; pass --adam-lr or add another method to --methods")
    uses_sgd = study.base.optimizer == "sgd" and set(study.methods) != {"adam"}
    if args.momentum is not None and not uses_sgd:
        parser.error(f"invalid --momentum {args.momentum:g}: heavy-ball momentum applies to --optimizer sgd, but "
                     "every run of this study uses Adam or AdamW, which keep β1 = 0.9; drop --momentum")


def _prepare_study(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Build and validate the study; every failure exits with status 2 before any write."""
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    if args.data_root is not None:
        overrides["data_root"] = str(args.data_root)
    if args.lr is not None:
        if len(args.lr) == 1:
            overrides["lr"], overrides["lrs"] = args.lr[0], ()
        else:
            overrides["lrs"] = args.lr
    if "epochs" in overrides and "milestones" not in overrides:
        # Keep the preset's schedule shape: the decay at the same fraction of training.
        preset = PRESETS[args.kind].get(args.preset, {}).get("base", {})
        old_epochs, old_milestones = preset.get("epochs"), preset.get("milestones", ())
        if old_epochs:
            overrides["milestones"] = tuple(
                sorted({max(1, round(m * overrides["epochs"] / old_epochs)) for m in old_milestones})
            ) if overrides["epochs"] > 1 else ()
    if not (math.isfinite(args.checkpoint_interval) and args.checkpoint_interval >= 0):
        parser.error(f"invalid --checkpoint-interval {args.checkpoint_interval}: expected a finite number of "
                     "seconds >= 0")
    if args.jobs < 1:
        parser.error(f"invalid --jobs {args.jobs}: expected an integer >= 1")
    if args.jobs > 1 and args.executor != "local":
        parser.error(f"invalid --jobs {args.jobs}: it applies to --executor local; for slurm use --array-parallelism")
    if args.executor == "slurm" and args.slurm_cluster == "slurm" and not args.status and shutil.which("sbatch") is None:
        parser.error("invalid --executor slurm: sbatch was not found on this machine; run the command on a SLURM "
                     "login node, or use --executor local")
    milestones = overrides.get("milestones", ())
    if milestones:
        overrides["milestones"] = tuple(sorted(milestones))
    for name in ("depths", "widths", "deltas", "lrs"):  # a grid is a set: 0.9,0.2 is the study of 0.2,0.9
        if name in overrides:
            overrides[name] = tuple(sorted(overrides[name]))
    if args.kind == "delta" and args.depths is not None:
        parser.error(f"invalid --depths {','.join(map(str, args.depths))}: the delta study trains ResNet-18 (depth "
                     "18); drop --depths, or use --widths to scale its channels")
    try:
        study = build_study(args.kind, args.preset, overrides)
    except ValueError as error:
        parser.error(str(error))
    _reject_inapplicable_options(args, study, parser)
    try:
        runs = study.runs()
        from dynamics.trainer import select_device

        select_device(study.base.device)
    except ValueError as error:
        parser.error(str(error))
    if args.data_root is not None and study.base.dataset != "cifar10":
        parser.error(f"invalid --data-root {args.data_root}: it applies to --dataset cifar10 only "
                     f"(this study uses {study.base.dataset})")
    out = args.out or Path("eos-results") / f"{args.kind}-{args.preset}"
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            parser.error(f"invalid --out {out}: {path} is a file; pass a directory path")
        if path.exists():
            if not os.access(path, os.W_OK):
                parser.error(f"invalid --out {out}: {path} is not writable; pass a writable directory")
            break
    study_file = out / "study.json"
    if study_file.exists() and not study_file.is_file():
        parser.error(f"invalid --out {out}: {study_file} is not a file; remove it or pass a new --out")
    if study_file.is_file():
        fix = "delete it (finished runs are kept and reused when their settings match) or pass a new --out"
        try:
            previous = json.loads(study_file.read_text())
        except ValueError:
            parser.error(f"invalid --out {out}: {study_file} is not valid JSON; {fix}")
        if not isinstance(previous, dict):
            parser.error(f"invalid --out {out}: {study_file} holds a JSON {type(previous).__name__}, not an object; {fix}")
        previous, current = _settings_that_apply(previous), _settings_that_apply(json.loads(json.dumps(study.to_dict())))
        if previous != current:
            differing = _differing_settings(previous, current)
            parser.error(
                f"invalid --out {out}: it contains a study with different settings ({differing}; see {study_file}); "
                "rerun with the same options to resume it, or pass a new --out"
            )
    return study, runs, out


def print_status(study, out: Path) -> int:
    """Print one line per run of ``study``: its state in ``out`` and a detail."""
    from studies.executors import run_states

    rows = run_states(study, out)
    width = max(len(row["run_id"]) for row in rows)
    for row in rows:
        print(f"{row['run_id']:<{width}}  {row['state']:<11}  {row['detail']}".rstrip())
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    print(", ".join(f"{count} {state}" for state, count in sorted(counts.items())))
    return 0


def report_study(directory: Path, parser: argparse.ArgumentParser) -> Path:
    """Render the report of ``directory`` for the grid in its study.json and return the path of report.md.

    Runs outside that grid, or finished with other settings, are left out, and the
    report is marked partial when runs of the grid have not finished. A damaged
    study.json or frame exits with status 2 before anything is written.
    """
    from reports import ReportError, render_report
    from reports.render import STUDY_FILE_FIX, read_study_file
    from studies.config import StudyConfig
    from studies.store import RunStore

    expected = finished = None
    try:
        data = read_study_file(directory) if directory.is_dir() else None
        if data is None and directory.is_dir():
            log.warning("%s has no study.json: the report covers every finished run under runs/ and cannot mark "
                        "runs that have not finished", directory)
        if data is not None:
            try:
                grid = {config.run_id: config.to_dict() for config in StudyConfig.from_dict(data).runs()}
            except KeyError as error:
                raise ReportError(f"invalid study file {directory / 'study.json'}: missing key {error}; "
                                  f"{STUDY_FILE_FIX}") from error
            except (TypeError, ValueError, AttributeError) as error:
                raise ReportError(f"invalid study file {directory / 'study.json'}: {error}; {STUDY_FILE_FIX}") from error
            store = RunStore(directory)
            store.log_left_out(grid)
            expected = list(grid)
            # A directory holding frames/ but no runs/ (a copy of the results only) is reported from frames/.
            finished = store.grid_runs(grid) if (directory / "runs").is_dir() else None
        return render_report(directory, expected_runs=expected, finished_runs=finished)
    except ReportError as error:
        parser.error(str(error))


def _submit(study, out: Path, options, checkpoint_interval: float) -> bool:
    """Submit the pending runs to SLURM; return whether the caller should collect and render now."""
    from studies.executors import submit_slurm
    from studies.store import RunStore

    RunStore(out).write_study(study.to_dict())
    jobs = submit_slurm(study, out, options, checkpoint_interval)
    if jobs and not options.wait:
        print(f"submitted {len(jobs)} runs; `eos study ... --status` shows their state, and rerunning the same "
              "command after they finish collects the frames and renders the report")
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S", stream=sys.stderr,
    )
    if args.command == "report":
        print(report_study(args.directory, parser))
        return 0
    if args.command == "scaling":
        from reports import ReportError, render_scaling

        if args.out.exists() and not args.out.is_dir():
            parser.error(f"invalid --out {args.out}: it is a file; pass a directory path")
        try:
            path = render_scaling(args.directories, args.out)
        except ReportError as error:
            parser.error(str(error))
        print(path)
        return 0

    stored = args.out / "study.json" if args.out is not None else None
    if args.status and stored is not None and stored.is_file():
        # The directory's own study.json defines the grid, so --status needs only --out.
        from studies.config import StudyConfig

        try:
            return print_status(StudyConfig.from_dict(json.loads(stored.read_text())), args.out)
        except (ValueError, KeyError, TypeError) as error:
            parser.error(f"invalid --out {args.out}: {stored} cannot be read ({error}); pass the study's options "
                         "with --status, or delete the file")
    study, runs, out = _prepare_study(args, parser)
    if args.status:
        return print_status(study, out)
    slurm = None
    if args.executor == "slurm":
        from studies.executors import SlurmOptions

        try:
            slurm = SlurmOptions(partition=args.partition, time_min=args.time_min, gpus_per_job=args.gpus_per_job,
                                 cpus_per_job=args.cpus_per_job, array_parallelism=args.array_parallelism,
                                 cluster=args.slurm_cluster, wait=args.wait)
        except ValueError as error:
            parser.error(str(error))
    from studies.runner import run_study  # imports torch; after validation for a fast --help

    from dynamics.data import load_dataset

    # Load (and, for CIFAR-10, verify) the data before anything is written.
    try:
        dataset = load_dataset(study.base.dataset, study.base.data_root, download=args.download)
    except DatasetError as error:
        parser.error(str(error))
    from studies.store import RunStore, StudyInUseError

    log.info("study %s (preset %s): %d runs into %s", study.name, study.preset, len(runs), out)
    try:
        with RunStore(out).lock():
            if slurm is not None:
                if not _submit(study, out, slurm, args.checkpoint_interval):
                    return 0
            elif args.jobs > 1:
                from studies.executors import run_local

                RunStore(out).write_study(study.to_dict())
                run_local(study, out, args.jobs, args.checkpoint_interval)
            # Runs already finished are skipped here, so this only collects after a parallel executor.
            run_study(study, out, progress=False if args.no_progress else None, dataset=dataset,
                      checkpoint_interval=args.checkpoint_interval)
            from reports import render_report

            grid = {config.run_id: config.to_dict() for config in runs}
            expected = list(grid)
            finished = RunStore(out).grid_runs(grid)
            missing = [run_id for run_id in expected if run_id not in finished]
            if len(missing) == len(expected):
                log.warning("no run has finished yet: all %d are being trained by other processes; rerun the same "
                            "command after they finish", len(missing))
                return 1
            print(render_report(out, expected_runs=expected, finished_runs=finished))
            if missing:
                log.warning("the report is partial: %d runs are still being trained by another process (%s); rerun "
                            "the same command after they finish", len(missing), ", ".join(missing))
                return 1
    except StudyInUseError as error:
        parser.error(str(error))
    except RuntimeError as error:  # a worker or cluster task failed (its runs stay pending), or a frame is corrupt
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: finished runs and the last epoch checkpoint are kept in %s; "
                  "rerun the same command to resume", out)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

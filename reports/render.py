"""Render a study directory's tables, figures and ``report.md`` from its frames alone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from reports import delta as delta_report, figures, sharpness as sharpness_report, tables
from reports.atomic import atomic_write_text

log = logging.getLogger(__name__)

FRAME_NAMES = ("runs", "steps", "epochs", "sharpness", "grad_hist", "probe_events")

# Columns that the tables and figures read from every non-empty frame of that name.
REQUIRED_COLUMNS = {
    "runs": ("run_id", "status", "optimizer", "method"),
    "steps": ("run_id", "epoch", "step", "loss"),
    "epochs": ("run_id", "epoch"),
    "sharpness": ("run_id", "epoch", "step", "lambda_max", "threshold_kind", "threshold", "deviation", "converged"),
}

STUDY_FILE_FIX = ("delete it and rerun the `eos study` command that wrote this directory, which rewrites it and "
                  "reuses the finished runs; without it, `eos report` reports every finished run under runs/")


class ReportError(RuntimeError):
    """A study directory cannot be reported on: it is missing, damaged or has no finished runs."""


def _damaged_file_fix(path: Path) -> str:
    """Return how to repair a damaged frame file: a collected frame is rewritten, a run's frame needs its run again."""
    if path.parent.name == "frames":
        return ("delete it and rerun the same `eos study` command, which rewrites it from the runs' own frames "
                "under runs/ (`eos report` reads those while it is missing)")
    return f"delete {path.parent} and rerun the same `eos study` command to train that run again"


def _read_parquet(path: Path, name: str) -> pd.DataFrame:
    """Read the frame ``name`` from ``path``, or raise :class:`ReportError` naming the file and the fix if it is damaged."""
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ReportError(f"corrupt frame {path}: {error}; {_damaged_file_fix(path)}") from error
    missing = [column for column in REQUIRED_COLUMNS.get(name, ()) if column not in frame]
    if missing and not frame.empty:
        raise ReportError(f"invalid frame {path}: required columns {missing} are missing; {_damaged_file_fix(path)}")
    return frame


def _finished_runs(directory: Path, run_ids: list[str] | None) -> list[str]:
    """Return the runs with a ``runs/*/status.json``, restricted to ``run_ids`` when given."""
    finished = sorted(p.parent.name for p in directory.glob("runs/*/status.json"))
    return finished if run_ids is None else [run_id for run_id in finished if run_id in set(run_ids)]


def _current_collected_runs(directory: Path, run_ids: list[str] | None) -> pd.DataFrame | None:
    """Return ``frames/runs.parquet`` if it lists exactly the finished runs to report, else None."""
    path = directory / "frames" / "runs.parquet"
    if not path.is_file():
        return None
    collected = _read_parquet(path, "runs")
    finished = _finished_runs(directory, None)
    listed = sorted(collected["run_id"]) if "run_id" in collected else []
    if run_ids is not None:
        listed = [run_id for run_id in listed if run_id in set(run_ids)]
    return collected if not finished or listed == _finished_runs(directory, run_ids) else None


def read_frames(directory: Path, run_ids: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Read ``frames/*.parquet``, or concatenate ``runs/*/*.parquet`` when those are absent or out of date.

    The collected frames are out of date when runs finished after they were written
    (for example by SLURM tasks or worker processes of another command). With
    ``run_ids`` only the rows of those runs are returned, so runs of another grid
    left in the directory stay out of the report.
    """
    if not directory.exists():
        raise ReportError(f"study directory {directory} not found; pass the --out of an `eos study` command")
    if not directory.is_dir():
        raise ReportError(f"{directory} is a file; pass the study directory (the --out of `eos study`)")
    collected_runs = _current_collected_runs(directory, run_ids)
    finished = _finished_runs(directory, run_ids)
    frames = {}
    for name in FRAME_NAMES:
        path = directory / "frames" / f"{name}.parquet"
        if collected_runs is not None and path.is_file():
            frames[name] = collected_runs if name == "runs" else _read_parquet(path, name)
        else:
            run_paths = [directory / "runs" / run_id / f"{name}.parquet" for run_id in finished]
            parts = [_read_parquet(run_path, name) for run_path in run_paths if run_path.is_file()]
            parts = [part for part in parts if not part.empty]
            frames[name] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if run_ids is not None and "run_id" in frames[name]:
            frames[name] = frames[name][frames[name]["run_id"].isin(run_ids)].reset_index(drop=True)
    if frames["runs"].empty:
        detail = ("no run of the grid in study.json has finished" if run_ids is not None
                  else "expected frames/runs.parquet or runs/*/runs.parquet")
        raise ReportError(f"no runs to report in {directory}: {detail}; run `eos study ... --out DIR` first")
    frames["runs"] = tables.legend_methods(frames["runs"])
    return frames


def _star_lines(stars: pd.DataFrame, name: str) -> list[str] | str:
    """Name the δ* line of each row: ``name``, followed by optimizer and η when the study has several."""
    settings = tables.setting_columns(stars)
    if stars.empty or not settings or len(stars.drop_duplicates(settings)) <= 1:
        return name
    return [f"{name}, {tables.setting_label(**dict(zip(settings, row)))}" for row in stars[settings].itertuples(index=False)]


def _scaling_specs(frames: dict[str, pd.DataFrame], by: str) -> tuple[list, list]:
    """Tables and figures of a depth or width study; ``by`` names the scaled dimension."""
    runs = frames["runs"]
    stars = tables.delta_star_table(runs)
    table_specs = [
        ("delta_star", stars,
         f"Optimal δ* per {by}, optimizer and step size (best final test accuracy, ties to lower test loss), with "
         "the GClip and SGD baselines at the same step size and the δ-active step fraction of the δ* run."),
        ("runs", tables.runs_table(runs),
         "Every run: final test accuracy and loss, train loss, last gradient norm, mean and early RUM, δ-active "
         "epochs and the mean δ-active step fraction."),
        ("sharpness", tables.sharpness_table(runs),
         "Final λ_max against the stability threshold 2/h of the last step taken, and |λ_max − 2/h|."),
    ]
    empty = pd.DataFrame(columns=["run_id", "epoch", "step", "threshold_kind", "deviation", "lambda_max", "threshold"])
    sharpness = frames["sharpness"] if not frames["sharpness"].empty else empty
    epochs = frames["epochs"] if "mean_effective_lr" in frames["epochs"] else pd.DataFrame(columns=["run_id", "epoch", "mean_effective_lr"])
    figure_specs = [
        ("eos_deviation", figures.eos_deviation_figure(sharpness, runs, by=by),
         f"EoS deviation |λ_max − 2/h| over training, one panel per {by} and one line per method."),
        ("effective_lr", figures.effective_lr_figure(epochs, runs, by=by),
         f"Epoch mean of the effective step size h = η·c over training, per {by}."),
        ("lambda_vs_threshold", figures.lambda_vs_threshold_figure(sharpness, runs, by=by),
         "Every λ_max measurement against its threshold 2/h; points on the dashed line sit at the edge of stability."),
        ("accuracy_vs_delta", figures.accuracy_vs_delta_figure(runs, by=by),
         f"Final test accuracy against δ per {by}; GClip (dashed) and SGD (dotted) for reference."),
        ("delta_star", delta_report.delta_star_scaling_figure(stars.assign(axis=by, study=_star_lines(stars, by + " study")),
                                                             (by,)),
         f"δ* against {by}, one line per optimizer and step size."),
    ]
    return table_specs, figure_specs


def _delta_specs(frames: dict[str, pd.DataFrame]) -> tuple[list, list]:
    runs = frames["runs"]
    table_specs = [
        ("comparison", delta_report.comparison_table(runs, frames["epochs"]),
         "Every optimizer and δ: max and final test accuracy (%), RUM averaged over the first tenth of the epochs "
         "(early) and over all epochs (overall), and the final training loss; best final accuracy first."),
        ("delta_activity", delta_report.delta_activity_table(runs),
         "δ activity of each δ-GClip run: epochs with at least one step where the floor δ binds, the last such "
         "epoch, and the fraction of such steps."),
        ("runs", tables.runs_table(runs), "Every run with its final metrics."),
    ]
    figure_specs = [
        ("effective_lr_phases", delta_report.effective_lr_phases_figure(frames["steps"], runs),
         "Effective step size h = η·c per step in the first (left) and last (right) tenth of training; rolling "
         "median over 1% of the steps shown."),
        ("accuracy_vs_delta", figures.accuracy_vs_delta_figure(runs, by="model"),
         "Final test accuracy against δ; SGD, Adam and GClip as horizontal lines."),
    ]
    return table_specs, figure_specs


def _sharpness_specs(frames: dict[str, pd.DataFrame]) -> tuple[list, list]:
    runs, sharpness = frames["runs"], frames["sharpness"]
    table_specs = [
        ("eos_summary", sharpness_report.eos_summary_table(sharpness, runs),
         "Per run: its status, the first measured λ_max (at step initial_step), its peak, and its median over "
         "the last third of training against the stability threshold; final_ratio near 1 means the run sits at "
         "the edge of stability. A run that diverged before its first measurement has no values."),
        ("runs", tables.runs_table(runs), "Every run with its final metrics."),
    ]
    figure_specs = [
        ("sharpness_trajectory", sharpness_report.sharpness_trajectory_figure(sharpness, runs),
         "λ_max over steps (solid) against the run's stability threshold (dashed); shaded: the final phase."),
        ("train_loss", sharpness_report.train_loss_figure(frames["steps"], runs),
         "Training loss over steps, one line per run, labelled by step size (and by method when the study "
         "has several)."),
    ]
    return table_specs, figure_specs


def read_study_file(directory: Path) -> dict | None:
    """Return the contents of ``directory/study.json``, or None when there is none.

    Raises :class:`ReportError` naming the file and the fix when it is not a JSON object.
    """
    path = directory / "study.json"
    if path.exists() and not path.is_file():
        raise ReportError(f"invalid study file {path}: it is not a file; {STUDY_FILE_FIX}")
    if not path.is_file():
        return None
    try:
        study = json.loads(path.read_text())
    except ValueError as error:
        raise ReportError(f"invalid study file {path}: it is not valid JSON ({error}); {STUDY_FILE_FIX}") from error
    if not isinstance(study, dict):
        raise ReportError(f"invalid study file {path}: expected a JSON object, found a {type(study).__name__}; "
                          f"{STUDY_FILE_FIX}")
    return study


def render_report(directory: str | Path, expected_runs: list[str] | None = None,
                  finished_runs: list[str] | None = None) -> Path:
    """Write tables (CSV, Markdown, LaTeX), figures (PNG, PDF) and report.md; return report.md.

    With ``expected_runs`` (the run ids of the study's grid), only those runs are
    reported, and report.md names the ones that have not finished, so a partial report
    is marked as partial. ``finished_runs`` narrows the reported runs further to those
    that finished with the grid's settings (the caller checks their configs).
    Everything is read and checked before the first file is written.
    """
    directory = Path(directory)
    study = read_study_file(directory) if directory.is_dir() else None
    frames = read_frames(directory, finished_runs if finished_runs is not None else expected_runs)
    runs = frames["runs"]
    table_dir, figure_dir = directory / "tables", directory / "figures"
    kind = runs["study"].iloc[0] if "study" in runs else "depth"
    if kind == "sharpness":
        table_specs, figure_specs = _sharpness_specs(frames)
    elif kind == "delta":
        table_specs, figure_specs = _delta_specs(frames)
    else:
        table_specs, figure_specs = _scaling_specs(frames, "width" if kind == "width" else "depth")
    for name, table, caption in table_specs:
        tables.write_table(table, table_dir, name, caption)
    for name, fig, _ in figure_specs:
        figures.save_figure(fig, figure_dir, name)

    lines = [f"# Study report: {directory.name}", ""]
    if study is not None:
        base = study.get("base", {})
        if kind == "sharpness":
            grid = (f"model {base.get('model')} {base.get('hidden')}, loss {base.get('loss')}, "
                    f"step sizes {study.get('lrs') or [base.get('lr')]}, methods {study.get('methods')}")
        else:
            grid = (f"depths {study.get('depths')}, widths {study.get('widths')}, methods {study.get('methods')}, "
                    f"δ {study.get('deltas')}")
        lines += [f"Study `{study.get('name')}`, preset `{study.get('preset')}`: {grid}.", ""]
    counts = runs["status"].value_counts().to_dict()
    lines += [f"Runs: {len(runs)} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))}).", ""]
    missing = sorted(set(expected_runs or ()) - set(runs["run_id"]))
    if missing:
        lines += [f"**Partial report**: {len(missing)} runs of the grid have not finished: "
                  + ", ".join(f"`{run_id}`" for run_id in missing) + ".", ""]
    for name, table, caption in table_specs:
        lines += [f"## Table `{name}`", "", caption, "", tables.to_markdown(table), "",
                  f"Files: `tables/{name}.csv`, `tables/{name}.md`, `tables/{name}.tex`.", ""]
    for name, _, caption in figure_specs:
        lines += [f"## Figure `{name}`", "", caption, "", f"![{name}](figures/{name}.png)", "",
                  f"Files: `figures/{name}.png`, `figures/{name}.pdf`.", ""]
    report = directory / "report.md"
    atomic_write_text(report, "\n".join(lines))
    log.info("report written to %s", report)
    return report


def render_scaling(directories: list[str | Path], out: str | Path) -> Path:
    """Write δ* against depth and width across study directories: table ``delta_star_scaling`` and its figure.

    Each depth study contributes δ* per depth, each width study δ* per width; studies
    of other kinds are rejected. Returns the path of the figure's PNG.
    """
    parts = []
    for directory in dict.fromkeys(Path(d).resolve() for d in directories):  # each study once, in the given order
        runs = read_frames(directory)["runs"]
        kind = runs["study"].iloc[0] if "study" in runs else "depth"
        if kind not in ("depth", "width"):
            raise ReportError(f"invalid study {directory}: it contains a {kind} study, but δ* scaling needs depth or width studies")
        stars = tables.delta_star_table(runs)
        parts.append(stars.assign(axis=kind, study=_star_lines(stars, directory.name)))
    stars = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    out = Path(out)
    tables.write_table(stars, out / "tables", "delta_star_scaling",
                       "δ* (best final test accuracy) per depth and per width, from each study.")
    paths = figures.save_figure(delta_report.delta_star_scaling_figure(stars), out / "figures", "delta_star_scaling")
    log.info("δ* scaling written to %s", paths[0])
    return paths[0]

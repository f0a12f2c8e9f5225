"""Tables and figures of the sharpness study: λ_max over steps against each run's threshold.

The criterion of a run is the threshold its optimizer is stable below: the
preconditioned sharpness against (2+2β1)/(h(1−β1)) for Adam, λ_max against
the momentum edge for SGD with β > 0 ((2+2β)/h for heavy ball; see
``probes.thresholds`` for dampening and Nesterov), and λ_max against 2/h otherwise. The final
phase is the last third of the measured steps.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from reports.figures import PANEL_HEIGHT, STYLE, TEXT_WIDTH, log_mask, note_masked
from reports.tables import method_label

FINAL_FRACTION = 1 / 3
# The start of every momentum threshold kind: heavy ball, dampened and Nesterov SGD (probes.thresholds).
MOMENTUM_KIND = "(2+2β)/"


def criterion_rows(sharpness: pd.DataFrame) -> pd.DataFrame:
    """Keep, per run, the rows of the threshold that is its stability criterion."""
    if "run_id" not in sharpness:
        return sharpness  # a study that measured no run has a sharpness frame without columns
    parts = []
    for _, rows in sharpness.groupby("run_id", sort=False):
        if "preconditioned" in rows and rows["preconditioned"].any():
            parts.append(rows[rows["preconditioned"]])
        elif (momentum := rows["threshold_kind"].str.startswith(MOMENTUM_KIND)).any():
            parts.append(rows[momentum])
        else:
            parts.append(rows[rows["threshold_kind"] == "2/h"])
    return pd.concat(parts, ignore_index=True) if parts else sharpness.iloc[:0]


def run_rows(criteria: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """Return one run's rows of ``criteria`` sorted by step (none from a frame without columns)."""
    if criteria.empty:
        return criteria
    return criteria[criteria["run_id"] == run_id].sort_values("step")


def final_phase(rows: pd.DataFrame) -> pd.DataFrame:
    """Return the measurements in the last third of a run's measured steps."""
    start = rows["step"].min() + (1 - FINAL_FRACTION) * (rows["step"].max() - rows["step"].min())
    return rows[rows["step"] >= start]


def run_label(run: pd.Series) -> str:
    """Return ``SGD``/``Adam`` for a bare optimizer, or ``GClip``/``δ=0.2`` with the optimizer it wraps.

    A bare Adam run has method ``sgd``, or ``adam`` after ``legend_methods``.
    """
    optimizer = method_label(str(run["optimizer"]), None)
    if run["method"] in ("sgd", run["optimizer"]):
        return optimizer
    delta = None if pd.isna(run["delta"]) else run["delta"]
    return f"{method_label(run['method'], delta)} on {optimizer}"


SUMMARY_COLUMNS = [
    "run_id", "optimizer", "method", "lr", "status", "threshold_kind", "threshold", "initial_step",
    "initial_lambda_max", "peak_lambda_max", "final_median_lambda_max", "final_ratio", "measurements",
    "converged_fraction",
]


def eos_summary_table(sharpness: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per run: first measured, peak and final-phase median λ_max against the threshold.

    ``initial_lambda_max`` is the first measurement, taken at step ``initial_step``
    (the first step of the measurement cadence), not at initialization. A run without
    measurements, such as one that diverged before the first, keeps its row with
    its status and NaN values.
    """
    criteria = criterion_rows(sharpness)
    rows = []
    for _, run in runs.iterrows():
        row = {"run_id": run["run_id"], "optimizer": run["optimizer"], "method": run_label(run), "lr": run["lr"],
               "status": run["status"], "measurements": 0}
        group = run_rows(criteria, run["run_id"])
        if len(group):
            final = final_phase(group)
            threshold = float(final["threshold"].median())
            median = float(final["lambda_max"].median())
            row.update({
                "threshold_kind": group["threshold_kind"].iloc[0],
                "threshold": threshold,
                "initial_step": group["step"].iloc[0],
                "initial_lambda_max": float(group["lambda_max"].iloc[0]),
                "peak_lambda_max": float(group["lambda_max"].max()),
                "final_median_lambda_max": median,
                "final_ratio": median / threshold if threshold else math.nan,
                "measurements": len(group),
                "converged_fraction": float(group["converged"].mean()),
            })
        rows.append(row)
    table = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return table.astype({"initial_step": "Int64"})


def sharpness_trajectory_figure(sharpness: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """λ_max over steps, one panel per run, with its threshold dashed and the final phase shaded.

    A run without measurements gets a panel that names its status.
    """
    with plt.rc_context(STYLE):
        criteria = criterion_rows(sharpness)
        run_ids = list(runs["run_id"])
        ncols = max(1, min(len(run_ids), 3))
        nrows = max(1, math.ceil(len(run_ids) / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(TEXT_WIDTH, PANEL_HEIGHT * nrows + 0.3), squeeze=False)
        colors = sns.color_palette("colorblind", 2)
        for ax in axes.flat[len(run_ids):]:
            ax.set_visible(False)
        legend_drawn: set[tuple[str, str]] = set()  # each criterion's legend is drawn once, in its first panel
        for ax, (_, run) in zip(axes.flat, runs.iterrows()):
            momentum = run.get("momentum", 0.0)
            uses_momentum = run.get("optimizer", "sgd") == "sgd" and pd.notna(momentum) and momentum > 0
            ax.set_title(f"{run_label(run)}, η = {run['lr']:.3g}" + (f", β = {momentum:g}" if uses_momentum else ""))
            ax.set_xlabel("step")
            group = run_rows(criteria, run["run_id"])
            if group.empty:
                ax.text(0.5, 0.5, f"no $\\lambda_{{\\max}}$ measured\n(run {run['status']})", ha="center", va="center",
                        transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            # A line needs two points, so a single measurement is drawn as a marker.
            marker = "o" if len(group) == 1 else None
            values, masked = log_mask(group["lambda_max"])
            preconditioned = "preconditioned" in group and group["preconditioned"].any()
            label = r"preconditioned $\lambda_{\max}$" if preconditioned else r"$\lambda_{\max}$"
            ax.plot(group["step"], values, color=colors[0], marker=marker, markersize=3, label=label)
            ax.plot(group["step"], group["threshold"], color=colors[1], linestyle="--", marker=marker, markersize=3,
                    label=group["threshold_kind"].iloc[0])
            final = final_phase(group)
            ax.axvspan(final["step"].min(), final["step"].max(), color="0.9", zorder=0, label="final phase")
            note_masked(ax, masked)
            ax.grid(alpha=0.3, linewidth=0.5)
            criterion = (label, group["threshold_kind"].iloc[0])
            if criterion not in legend_drawn:
                legend_drawn.add(criterion)
                ax.legend(frameon=False, fontsize=6, loc="lower right")
        axes.flat[0].set_ylabel("sharpness")
        if not run_ids:
            axes.flat[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.flat[0].transAxes)
        fig.tight_layout()
        return fig


def train_loss_figure(steps: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """Training loss over steps, one line per run, on a log axis.

    Lines are labelled by step size, and also by method when the runs use several.
    """
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(TEXT_WIDTH / 2, PANEL_HEIGHT + 0.3))
        colors = sns.color_palette("colorblind", max(len(runs), 1))
        labels = [run_label(run) for _, run in runs.iterrows()]
        several_methods = len(set(labels)) > 1
        if "run_id" not in steps:
            steps = pd.DataFrame(columns=["run_id", "step", "loss"])  # no run logged a step
        masked_total = 0
        for color, method, (_, run) in zip(colors, labels, runs.iterrows()):
            rows = steps[steps["run_id"] == run["run_id"]]
            values, masked = log_mask(rows["loss"])
            masked_total += masked
            label = f"{method}, η = {run['lr']:.3g}" if several_methods else f"η = {run['lr']:.3g}"
            marker = "o" if len(rows) == 1 else None
            ax.plot(rows["step"], values, color=color, linewidth=0.8, marker=marker, markersize=3, label=label)
        if steps.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.set_yscale("log")
            ax.legend(frameon=False, fontsize=6)
        note_masked(ax, masked_total)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3, linewidth=0.5)
        fig.tight_layout()
        return fig

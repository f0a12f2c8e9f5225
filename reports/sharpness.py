"""Tables and figures of the sharpness study: λ_max over steps against each run's threshold.

The criterion of a run is the threshold its optimizer is stable below: the
preconditioned sharpness against (2+2β1)/(h(1−β1)) for Adam, λ_max against
(2+2β)/h for heavy-ball momentum β > 0, and λ_max against 2/h otherwise. The final
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


def criterion_rows(sharpness: pd.DataFrame) -> pd.DataFrame:
    """Keep, per run, the rows of the threshold that is its stability criterion."""
    parts = []
    for _, rows in sharpness.groupby("run_id", sort=False):
        if "preconditioned" in rows and rows["preconditioned"].any():
            parts.append(rows[rows["preconditioned"]])
        elif (rows["threshold_kind"] == "(2+2β)/h").any():
            parts.append(rows[rows["threshold_kind"] == "(2+2β)/h"])
        else:
            parts.append(rows[rows["threshold_kind"] == "2/h"])
    return pd.concat(parts, ignore_index=True) if parts else sharpness.iloc[:0]


def final_phase(rows: pd.DataFrame) -> pd.DataFrame:
    """Return the measurements in the last third of a run's measured steps."""
    start = rows["step"].min() + (1 - FINAL_FRACTION) * (rows["step"].max() - rows["step"].min())
    return rows[rows["step"] >= start]


def run_label(run: pd.Series) -> str:
    """Return ``SGD``/``ADAM`` for a bare optimizer, or ``GClip``/``δ=0.2`` with the optimizer it wraps."""
    if run["method"] == "sgd":
        return str(run["optimizer"]).upper()
    delta = None if pd.isna(run["delta"]) else run["delta"]
    return f"{method_label(run['method'], delta)} on {str(run['optimizer']).upper()}"


def eos_summary_table(sharpness: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per run: initial, peak and final-phase median λ_max against the threshold."""
    rows = []
    criteria = criterion_rows(sharpness) if not sharpness.empty else sharpness
    for run_id, group in criteria.groupby("run_id", sort=False):
        group = group.sort_values("step")
        run = runs[runs["run_id"] == run_id].iloc[0]
        final = final_phase(group)
        threshold = float(final["threshold"].median())
        median = float(final["lambda_max"].median())
        rows.append({
            "run_id": run_id,
            "optimizer": run["optimizer"],
            "method": run_label(run),
            "lr": run["lr"],
            "threshold_kind": group["threshold_kind"].iloc[0],
            "threshold": threshold,
            "initial_lambda_max": float(group["lambda_max"].iloc[0]),
            "peak_lambda_max": float(group["lambda_max"].max()),
            "final_median_lambda_max": median,
            "final_ratio": median / threshold if threshold else math.nan,
            "measurements": len(group),
            "converged_fraction": float(group["converged"].mean()),
        })
    return pd.DataFrame(rows)


def sharpness_trajectory_figure(sharpness: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """λ_max over steps, one panel per run, with its threshold dashed and the final phase shaded."""
    with plt.rc_context(STYLE):
        criteria = criterion_rows(sharpness) if not sharpness.empty else sharpness
        run_ids = list(dict.fromkeys(criteria["run_id"])) if not criteria.empty else []
        ncols = max(1, min(len(run_ids), 3))
        nrows = max(1, math.ceil(len(run_ids) / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(TEXT_WIDTH, PANEL_HEIGHT * nrows + 0.3), squeeze=False)
        colors = sns.color_palette("colorblind", 2)
        for ax in axes.flat[len(run_ids):]:
            ax.set_visible(False)
        for ax, run_id in zip(axes.flat, run_ids):
            group = criteria[criteria["run_id"] == run_id].sort_values("step")
            run = runs[runs["run_id"] == run_id].iloc[0]
            values, masked = log_mask(group["lambda_max"])
            label = "preconditioned λ_max" if group.get("preconditioned", pd.Series([False])).any() else r"$\lambda_{\max}$"
            ax.plot(group["step"], values, color=colors[0], label=label)
            ax.plot(group["step"], group["threshold"], color=colors[1], linestyle="--", label=group["threshold_kind"].iloc[0])
            final = final_phase(group)
            ax.axvspan(final["step"].min(), final["step"].max(), color="0.9", zorder=0, label="final phase")
            note_masked(ax, masked)
            ax.set_title(f"{run_label(run)}, η = {run['lr']:.3g}")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, linewidth=0.5)
        axes.flat[0].set_ylabel("sharpness")
        if run_ids:
            axes.flat[0].legend(frameon=False, fontsize=6, loc="lower right")
        else:
            axes.flat[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.flat[0].transAxes)
        fig.tight_layout()
        return fig


def train_loss_figure(steps: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """Training loss over steps, one line per run, on a log axis."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(TEXT_WIDTH / 2, PANEL_HEIGHT + 0.3))
        colors = sns.color_palette("colorblind", max(len(runs), 1))
        masked_total = 0
        for color, (_, run) in zip(colors, runs.iterrows()):
            rows = steps[steps["run_id"] == run["run_id"]]
            values, masked = log_mask(rows["loss"])
            masked_total += masked
            ax.plot(rows["step"], values, color=color, linewidth=0.8, label=f"η = {run['lr']:.3g}")
        ax.set_yscale("log")
        note_masked(ax, masked_total)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.legend(frameon=False, fontsize=6)
        fig.tight_layout()
        return fig



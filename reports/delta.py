"""Tables and figures of the δ sweep: optimizer comparison, δ activity, effective step size.

Conventions:

- "Early" is the first tenth of training (at least one epoch): epochs 1-20 of a
  200-epoch run. RUM early and RUM overall are means of the epoch-mean RUM over those
  epochs and over all epochs.
- "Late" is the last tenth of training.
- A run's ``method`` column has been passed through :func:`reports.tables.legend_methods`,
  so bare Adam reads ``adam``.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from reports.figures import (
    COLUMN_WIDTH, PANEL_HEIGHT, STYLE, TEXT_WIDTH, _legend, _linestyle, _method_keys, _palette, _select, _zorder, log_mask,
    note_masked,
)
from reports.tables import METHOD_ORDER, method_label


def early_epochs(epochs: int) -> int:
    """Return how many epochs count as early training: a tenth, at least one."""
    return max(1, math.ceil(epochs / 10))


def _ordered(runs: pd.DataFrame) -> pd.DataFrame:
    order = runs.assign(_method=runs["method"].map(METHOD_ORDER).fillna(9), _delta=runs["delta"].fillna(-1))
    return order.sort_values(["_method", "_delta"]).drop(columns=["_method", "_delta"])


def comparison_table(runs: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per run: max and final test accuracy (%), RUM early and overall, final train loss.

    Rows are sorted by final test accuracy, best first, like the reference's ResNet-18 table.
    """
    rows = []
    for _, run in _ordered(runs).iterrows():
        history = epochs[epochs["run_id"] == run["run_id"]] if "mean_rum" in epochs else epochs.iloc[:0]
        early = history[history["epoch"] <= early_epochs(int(run["epochs"]))]
        rows.append({
            "method": method_label(run["method"], None if pd.isna(run["delta"]) else run["delta"]),
            "optimizer": run["optimizer"],
            "lr": run["lr"],
            "max_test_acc": 100 * run["max_test_acc"],
            "final_test_acc": 100 * run["final_test_acc"],
            "rum_early": early["mean_rum"].mean() if len(early) else np.nan,
            "rum_overall": history["mean_rum"].mean() if len(history) else np.nan,
            "final_train_loss": run["final_train_loss"],
            "status": run["status"],
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values("final_test_acc", ascending=False, kind="stable").reset_index(drop=True)


def delta_activity_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return per δ-GClip run: δ, δ-active epochs, the last δ-active epoch and the δ-active step fraction."""
    floors = _ordered(runs[runs["method"] == "dgclip"])
    return pd.DataFrame({
        "method": [method_label("dgclip", d) for d in floors["delta"]],
        "delta": floors["delta"],
        "delta_active_epochs": floors.get("delta_active_epochs"),
        "last_delta_active_epoch": floors.get("last_delta_active_epoch"),
        "delta_active_fraction": floors.get("delta_active_step_fraction"),
        "epochs": floors["epochs"],
    }).reset_index(drop=True)


def effective_lr_phases_figure(steps: pd.DataFrame, runs: pd.DataFrame) -> plt.Figure:
    """Draw the per-step effective step size h in early (left) and late (right) training, one line per method.

    Each line is a rolling median over 1% of the phase's steps (at least 1), which keeps
    the level and hides single-step noise.
    """
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(TEXT_WIDTH, PANEL_HEIGHT + 0.4), sharey=True)
        columns = ["run_id", "method", "delta", "epochs"]
        data = steps.merge(runs[columns], on="run_id", how="inner") if "effective_lr" in steps else pd.DataFrame()
        if data.empty:
            for ax in axes:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            return fig
        keys = _method_keys(data)
        palette = _palette(keys)
        for ax, phase in zip(axes, ("early", "late")):
            masked_total = 0
            for key in keys:
                line = _select(data, key)
                total = int(line["epochs"].iloc[0])
                cut = early_epochs(total)
                line = line[line["epoch"] <= cut] if phase == "early" else line[line["epoch"] > total - cut]
                line = line.sort_values("step")
                window = max(1, len(line) // 100)
                values, masked = log_mask(line["effective_lr"].rolling(window, min_periods=1).median())
                masked_total += masked
                ax.plot(line["step"], values, label=method_label(*key), color=palette[key], linestyle=_linestyle(key[0]),
                        linewidth=1.0, zorder=_zorder(key[0]))
            ax.set_yscale("log")
            note_masked(ax, masked_total)
            ax.set_title(f"{phase} training")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0].set_ylabel("effective step size $h$")
        _legend(fig, list(axes))
        return fig


def delta_star_scaling_figure(stars: pd.DataFrame, axes_names: tuple[str, ...] = ("depth", "width")) -> plt.Figure:
    """Draw δ* against depth and against width (one panel each in ``axes_names``), one line per study.

    ``stars`` has the columns of :func:`reports.tables.delta_star_table` plus ``axis``
    (``depth`` or ``width``) and ``study`` (the study directory's name).
    """
    with plt.rc_context(STYLE):
        width = TEXT_WIDTH if len(axes_names) > 1 else COLUMN_WIDTH
        fig, axes = plt.subplots(1, len(axes_names), figsize=(width, PANEL_HEIGHT + 0.4), sharey=True, squeeze=False)
        axes = axes[0]
        studies = sorted(stars["study"].unique()) if not stars.empty else []
        colors = dict(zip(studies, sns.color_palette("colorblind", n_colors=max(len(studies), 1))))
        markers = dict(zip(studies, "o^sDvp<>h*" * 10))
        for ax, axis in zip(axes, axes_names):
            panel = stars[stars["axis"] == axis] if not stars.empty else stars
            for study, points in panel.groupby("study", sort=True):
                points = points.sort_values(axis)
                ax.plot(points[axis], points["delta_star"], marker=markers[study], markersize=4, linewidth=1.0,
                        color=colors[study], label=study)
            if not panel.empty:
                ax.set_xticks(sorted(panel[axis].unique()))
            if panel.empty:
                ax.text(0.5, 0.5, f"no {axis} study", ha="center", va="center", transform=ax.transAxes)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_title(f"δ* against {axis}")
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0].set_ylabel("δ* (best final test accuracy)")
        _legend(fig, list(axes))
        return fig


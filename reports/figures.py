"""Publication figures drawn from tidy frames; every function takes frames and returns a Figure.

Figures are sized for a two-column paper (6.75 in text width, 8 pt type) and use
seaborn's colour-blind palette. On log axes, non-positive and non-finite values are
masked, and each panel notes how many were.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from reports.atomic import atomic_path  # noqa: E402
from reports.tables import METHOD_ORDER, method_label, setting_columns, setting_label  # noqa: E402

TEXT_WIDTH = 6.75  # inches, two-column paper
COLUMN_WIDTH = 3.25
PANEL_HEIGHT = 2.1

STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "lines.linewidth": 1.2,
    "savefig.dpi": 200,
    "savefig.bbox": "tight",
}


def log_mask(values: pd.Series | np.ndarray) -> tuple[np.ndarray, int]:
    """Return the values with non-positive and non-finite entries set to NaN, and their count."""
    values = np.asarray(values, dtype=float)
    bad = ~np.isfinite(values) | (values <= 0)
    masked = values.copy()
    masked[bad] = np.nan
    return masked, int(bad.sum())


def note_masked(ax: plt.Axes, count: int) -> None:
    """Say in the panel how many values a log axis could not show."""
    if count:
        ax.text(0.98, 0.02, f"{count} non-positive or non-finite masked", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=6, color="0.35")


def _method_keys(frame: pd.DataFrame) -> list[tuple[str, float | None]]:
    """Return the (method, δ) pairs present, δ None for SGD and GClip, in legend order."""
    keys = {(m, None if pd.isna(d) else float(d)) for m, d in zip(frame["method"], frame["delta"])}
    return sorted(keys, key=lambda k: (METHOD_ORDER.get(k[0], 9), -1 if k[1] is None else k[1]))


def _select(frame: pd.DataFrame, key: tuple[str, float | None]) -> pd.DataFrame:
    delta = frame["delta"].isna() if key[1] is None else frame["delta"] == key[1]
    return frame[(frame["method"] == key[0]) & delta]


# Fixed colours, so a method has the same colour in every study: SGD and GClip first,
# then the δ values of the reference sweep; other δ values take the remaining colours.
STANDARD_DELTAS = (0.01, 0.03, 0.08, 0.2, 0.45, 0.9)


def _palette(keys: list[tuple[str, float | None]]) -> dict[tuple[str, float | None], tuple]:
    colors = sns.color_palette("colorblind", n_colors=10)
    fixed = {("sgd", None): colors[7], ("adam", None): colors[9], ("gclip", None): colors[3]}
    for index, delta in zip((0, 1, 2, 4, 5, 8), STANDARD_DELTAS):
        fixed[("dgclip", delta)] = colors[index]
    spare = [colors[6]]
    palette = {}
    for key in keys:
        if key in fixed:
            palette[key] = fixed[key]
        else:
            palette[key] = spare[len([k for k in palette if k not in fixed]) % len(spare)]
    return palette


def _linestyle(method: str) -> str:
    return {"sgd": ":", "adam": "-.", "gclip": "--"}.get(method, "-")


def _zorder(method: str) -> int:
    # Baselines are dashed and drawn on top, so a δ-GClip run identical to them
    # (a floor that never binds) does not hide them.
    return {"sgd": 4, "adam": 4, "gclip": 3}.get(method, 2)


def _panels(count: int, ncols_max: int = 3, sharey: bool = True):
    ncols = max(1, min(count, ncols_max))
    nrows = max(1, math.ceil(count / ncols))
    width = TEXT_WIDTH if ncols > 1 else COLUMN_WIDTH
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, PANEL_HEIGHT * nrows + 0.4), squeeze=False, sharey=sharey)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def _with_method(frame: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    columns = ["run_id", "depth", "width", "method", "delta"]
    if "run_id" not in frame:
        return pd.DataFrame(columns=columns)  # the frame of a study that measured nothing has no columns
    return frame.merge(runs[columns], on="run_id", how="inner")


def _legend(fig: plt.Figure, axes: list[plt.Axes]) -> None:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 8), frameon=False,
                   bbox_to_anchor=(0.5, 1.0 + 0.02))
        fig.tight_layout(rect=(0, 0, 1, 0.9))


def lines_by_panel(
    frame: pd.DataFrame, runs: pd.DataFrame, x: str, y: str, ylabel: str, xlabel: str = "epoch", log_y: bool = True,
    by: str = "depth",
) -> plt.Figure:
    """Draw ``y`` against ``x`` with one panel per value of ``by`` (depth or width) and one line per method."""
    with plt.rc_context(STYLE):
        data = _with_method(frame, runs)
        depths = sorted(data[by].unique()) if not data.empty else []
        fig, axes = _panels(len(depths) or 1)
        palette = _palette(_method_keys(data)) if not data.empty else {}
        for ax, depth in zip(axes, depths):
            panel = data[data[by] == depth]
            masked_total = 0
            for key in _method_keys(panel):
                line = _select(panel, key)
                line = line.groupby(x, as_index=False)[y].mean().sort_values(x)
                values, masked = (log_mask(line[y]) if log_y else (line[y].to_numpy(float), 0))
                masked_total += masked
                ax.plot(line[x], values, label=method_label(*key), color=palette[key], linestyle=_linestyle(key[0]),
                        marker="o", markersize=2, zorder=_zorder(key[0]))
            if log_y:
                ax.set_yscale("log")
            note_masked(ax, masked_total)
            ax.set_title(f"{by} {depth}")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0].set_ylabel(ylabel)
        if not depths:
            axes[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=axes[0].transAxes)
        _legend(fig, axes)
        return fig


def eos_deviation_figure(sharpness: pd.DataFrame, runs: pd.DataFrame, by: str = "depth") -> plt.Figure:
    """|λ_max − 2/h| over training: one panel per depth (or width), one line per method."""
    data = sharpness[sharpness["threshold_kind"] == "2/h"] if not sharpness.empty else sharpness
    return lines_by_panel(data, runs, "epoch", "deviation", r"$|\lambda_{\max} - 2/h|$", by=by)


def effective_lr_figure(epochs: pd.DataFrame, runs: pd.DataFrame, by: str = "depth") -> plt.Figure:
    """Epoch mean of the effective step size h_t: one panel per depth (or width), one line per method."""
    return lines_by_panel(epochs, runs, "epoch", "mean_effective_lr", "mean effective step size $h$", by=by)


def lambda_vs_threshold_figure(sharpness: pd.DataFrame, runs: pd.DataFrame, by: str = "depth") -> plt.Figure:
    """Every λ_max measurement against its 2/h, one colour per method, with the line λ = 2/h."""
    with plt.rc_context(STYLE):
        data = _with_method(sharpness[sharpness["threshold_kind"] == "2/h"], runs) if not sharpness.empty else sharpness
        fig, ax = plt.subplots(figsize=(COLUMN_WIDTH * 1.35, COLUMN_WIDTH * 0.85))
        if data.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            return fig
        keys = _method_keys(data)
        palette = _palette(keys)
        markers = dict(zip(sorted(data[by].unique()), "o^sDvp<>h*"))
        x_all, x_masked = log_mask(data["threshold"])
        y_all, y_masked = log_mask(data["lambda_max"])
        data = data.assign(_x=x_all, _y=y_all)
        for key in keys:
            for depth, marker in markers.items():
                points = _select(data, key)
                points = points[points[by] == depth]
                ax.scatter(points["_x"], points["_y"], s=12, marker=marker, color=palette[key], alpha=0.8, linewidths=0)
        finite_x, finite_y = x_all[np.isfinite(x_all)], y_all[np.isfinite(y_all)]
        if finite_x.size and finite_y.size:
            # The line λ = 2/h, drawn only over the range that contains data.
            low = max(finite_x.min(), finite_y.min()) / 1.2
            high = min(finite_x.max(), finite_y.max()) * 1.2
            if low < high:
                ax.plot([low, high], [low, high], color="0.3", linewidth=0.8, linestyle="--")
        handles = [plt.Line2D([], [], color=palette[key], marker="o", linestyle="", markersize=4, label=method_label(*key))
                   for key in keys]
        handles += [plt.Line2D([], [], color="0.4", marker=marker, linestyle="", markersize=4, label=f"{by} {depth}")
                    for depth, marker in markers.items()]
        handles.append(plt.Line2D([], [], color="0.3", linestyle="--", linewidth=0.8, label=r"$\lambda_{\max} = 2/h$"))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(r"stability threshold $2/h$")
        ax.set_ylabel(r"$\lambda_{\max}$")
        note_masked(ax, max(x_masked, y_masked))
        ax.grid(alpha=0.3, linewidth=0.5)
        ax.legend(handles=handles, frameon=False, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        return fig


def accuracy_vs_delta_figure(runs: pd.DataFrame, by: str = "depth") -> plt.Figure:
    """Final test accuracy against δ, one panel per depth (or width), baselines as horizontal lines."""
    with plt.rc_context(STYLE):
        completed = runs[runs["status"] == "completed"]
        depths = sorted(completed[by].unique())
        fig, axes = _panels(len(depths) or 1, sharey=True)
        palette = _palette([("sgd", None), ("adam", None), ("gclip", None)])
        settings = setting_columns(completed)
        groups = [key for key, _ in completed.groupby(settings)] if settings else [()]
        # One δ-GClip line per optimizer and step size, each with the baselines run at that setting.
        shades = dict(zip(groups, sns.color_palette("dark:0.6", n_colors=len(groups)) if len(groups) > 1 else ["0.15"]))
        widths = dict(zip(groups, np.linspace(1.0, 2.2, len(groups))[::-1]))
        for ax, depth in zip(axes, depths):
            panel = completed[completed[by] == depth]
            masked, drawn = 0, False
            for group, runs_at in (panel.groupby(settings) if settings else [((), panel)]):
                suffix = f" ({setting_label(**dict(zip(settings, group)))})" if len(groups) > 1 else ""
                delta_runs = runs_at[runs_at["method"] == "dgclip"].sort_values("delta")
                deltas, masked_here = log_mask(delta_runs["delta"])
                masked += masked_here
                if np.isfinite(deltas).any():
                    ax.plot(deltas, delta_runs["final_test_acc"], marker="o", markersize=3, color=shades[group],
                            label="δ-GClip" + suffix, zorder=2)
                    drawn = True
                for method in ("gclip", "sgd", "adam"):
                    baseline = runs_at[runs_at["method"] == method]
                    if len(baseline):
                        ax.axhline(baseline["final_test_acc"].iloc[0], color=palette[(method, None)],
                                   linestyle=_linestyle(method), linewidth=widths[group],
                                   label=method_label(method, None) + suffix, zorder=_zorder(method))
            if drawn:
                ax.set_xscale("log")
            else:
                ax.text(0.5, 0.5, "no δ-GClip run with δ > 0", ha="center", va="center", transform=ax.transAxes, fontsize=6)
            note_masked(ax, masked)
            ax.set_title(f"{by} {depth}")
            ax.set_xlabel("δ")
            ax.grid(alpha=0.3, linewidth=0.5)
        axes[0].set_ylabel("final test accuracy")
        if not depths:
            axes[0].text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=axes[0].transAxes)
        _legend(fig, axes)
        return fig


def save_figure(fig: plt.Figure, directory: Path, name: str) -> list[Path]:
    """Save ``fig`` as PNG and PDF and close it; return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.png", directory / f"{name}.pdf"]
    for path in paths:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=300, bbox_inches="tight")
    plt.close(fig)
    return paths

"""Tables built from the tidy frames of a study: δ* per depth, every run, final sharpness.

Conventions:

- δ* is the δ of the δ-GClip run with the best final test accuracy at a given depth,
  width, optimizer and step size η; ties go to the lower final test loss. Only
  completed runs compete, and the baselines come from the same depth, width,
  optimizer and η.
- The sharpness table compares the last λ_max with 2/h, where h is the step size of
  the last optimizer step before the measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reports.atomic import atomic_write_text

METHOD_ORDER = {"sgd": 0, "adam": 1, "adamw": 1, "gclip": 2, "dgclip": 3}


def legend_methods(runs: pd.DataFrame) -> pd.DataFrame:
    """Return ``runs`` with bare Adam and AdamW runs (method ``sgd``) relabelled ``adam`` or ``adamw``.

    A run's ``method`` records whether δ-GClip wraps the optimizer; ``sgd`` means it does
    not. Tables and figures name such a run after its optimizer.
    """
    if "optimizer" not in runs or "method" not in runs:
        return runs
    bare = (runs["method"] == "sgd") & runs["optimizer"].isin(["adam", "adamw"])
    return runs.assign(method=runs["method"].where(~bare, runs["optimizer"]))


def method_label(method: str, delta: float | None) -> str:
    """Return the legend label of a method: ``SGD``, ``Adam``, ``GClip`` or ``δ=0.2``."""
    if method == "dgclip" and delta is not None:
        return f"δ={delta:g}"
    return {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "gclip": "GClip"}.get(method, method)


def sort_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Order runs by depth, width, method (SGD, GClip, δ-GClip) and δ."""
    order = runs.assign(_method=runs["method"].map(METHOD_ORDER).fillna(9), _delta=runs["delta"].fillna(-1))
    return order.sort_values(["depth", "width", "_method", "_delta"]).drop(columns=["_method", "_delta"])


def setting_columns(runs: pd.DataFrame) -> list[str]:
    """Return the columns besides depth and width that δ* is chosen within: optimizer and step size.

    A column with a missing value is left out, since grouping would drop those runs.
    """
    return [column for column in ("optimizer", "lr") if column in runs and runs[column].notna().all()]


def setting_label(optimizer: str | None = None, lr: float | None = None) -> str:
    """Return a legend suffix such as ``SGD η=0.1`` for one optimizer and step size."""
    optimizer = optimizer if isinstance(optimizer, str) else None
    name = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}.get(optimizer, optimizer or "")
    return " ".join(part for part in (name, f"η={lr:g}" if lr is not None and pd.notna(lr) else "") if part)


def delta_star_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return one row per (depth, width, optimizer, η): δ*, its test accuracy and loss, and the baselines.

    Runs at different step sizes are not compared: δ* depends on η, and so do the baselines.
    """
    rows = []
    completed = runs[runs["status"] == "completed"]
    settings = setting_columns(runs)
    for key, group in completed.groupby(["depth", "width", *settings], sort=True):
        candidates = group[group["method"] == "dgclip"].sort_values(
            ["final_test_acc", "final_test_loss"], ascending=[False, True]
        )
        if candidates.empty:
            continue
        best = candidates.iloc[0]
        row = {
            **dict(zip(["depth", "width", *settings], key)),
            "delta_star": best["delta"],
            "test_acc": best["final_test_acc"],
            "test_loss": best["final_test_loss"],
            "delta_active_fraction": best.get("delta_active_step_fraction", np.nan),
        }
        for method in ("gclip", "sgd"):
            baseline = group[group["method"] == method]
            row[f"{method}_test_acc"] = baseline["final_test_acc"].iloc[0] if len(baseline) else np.nan
            row[f"{method}_test_loss"] = baseline["final_test_loss"].iloc[0] if len(baseline) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return every run with its final metrics, δ activity and RUM; δ* rows marked."""
    stars = delta_star_table(runs)
    keys = ["depth", "width", *setting_columns(runs)]
    star_keys = set(zip(*(stars[column] for column in [*keys, "delta_star"]))) if not stars.empty else set()
    table = sort_runs(runs)
    # An MLP's runs carry the ResNet defaults (depth 20, width 1) in the frame; its shape is in its model name.
    mlp = table["model"].astype(str).str.startswith("mlp") if "model" in table else pd.Series(False, index=table.index)
    return pd.DataFrame(
        {
            "run_id": table["run_id"],
            "model": table.get("model"),
            "depth": table["depth"].mask(mlp).astype("Int64"),
            "width": table["width"].mask(mlp).astype("Int64"),
            "optimizer": table.get("optimizer"),
            "lr": table.get("lr"),
            "method": [method_label(m, d) for m, d in zip(table["method"], table["delta"])],
            "delta": table["delta"],
            "delta_star": [
                method == "dgclip" and key in star_keys
                for method, key in zip(table["method"], zip(*(table[column] for column in [*keys, "delta"])))
            ],
            "test_acc": table["final_test_acc"],
            "max_test_acc": table["max_test_acc"],
            "test_loss": table["final_test_loss"],
            "train_loss": table["final_train_loss"],
            "grad_norm": table["final_grad_norm"],
            "mean_rum": table["mean_rum"],
            "early_rum": table["early_rum"],
            "delta_active_epochs": table.get("delta_active_epochs"),
            "last_delta_active_epoch": table.get("last_delta_active_epoch"),
            "delta_active_fraction": table.get("delta_active_step_fraction"),
            "status": table["status"],
        }
    ).reset_index(drop=True)


def sharpness_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Return final λ_max, h, 2/h and |λ_max − 2/h| per run, grouped by method then depth.

    2/h is the threshold of the reference tables; for heavy-ball momentum β the
    ``threshold_momentum`` columns give (2+2β)/h, the edge that momentum SGD obeys.
    """
    table = runs.assign(_method=runs["method"].map(METHOD_ORDER).fillna(9), _delta=runs["delta"].fillna(-1))
    table = table.sort_values(["_method", "_delta", "depth", "width"])
    return pd.DataFrame(
        {
            "method": [method_label(m, d) for m, d in zip(table["method"], table["delta"])],
            "depth": table["depth"],
            "width": table["width"],
            "delta": table["delta"],
            "lambda_max": table["final_lambda_max"],
            "h": table["final_effective_lr"],
            "threshold_2_over_h": table["final_threshold"],
            "deviation": table["final_deviation"],
            "momentum": table["momentum"],
            "threshold_momentum": table.get("final_threshold_momentum"),
            "deviation_momentum": table.get("final_deviation_momentum"),
        }
    ).reset_index(drop=True)


def write_table(table: pd.DataFrame, directory: Path, name: str, caption: str) -> list[Path]:
    """Write ``table`` as CSV, Markdown and LaTeX; return the three paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.{suffix}" for suffix in ("csv", "md", "tex")]
    atomic_write_text(paths[0], table.to_csv(index=False))
    atomic_write_text(paths[1], to_markdown(table) + "\n")
    latex = latex_cells(table).to_latex(
        index=False, float_format=lambda x: f"{x:.4g}", na_rep="--", caption=latex_text(caption), label=f"tab:{name}",
        escape=False,
    )
    atomic_write_text(paths[2], latex)
    return paths


LATEX_REPLACEMENTS = [
    ("λ_max", r"$\lambda_{\max}$"), ("λ1/λ2", r"$\lambda_1/\lambda_2$"), ("λ", r"$\lambda$"),
    ("δ*", r"$\delta^*$"), ("δ", r"$\delta$"), ("η", r"$\eta$"), ("β1", r"$\beta_1$"), ("β", r"$\beta$"),
    ("γ", r"$\gamma$"), ("·", r"$\cdot$"), ("−", "-"), ("|", r"$|$"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"),
    ("#", r"\#"), ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"),
    ("^", r"\textasciicircum{}"), ("\\", r"\textbackslash{}"),
]


def latex_text(text: str) -> str:
    """Rewrite a caption or cell with Unicode math and special characters for LaTeX."""
    placeholders = {}
    for index, (plain, latex) in enumerate(LATEX_REPLACEMENTS):
        # Distinct start and end marks: with one mark for both, the end of one token, a
        # digit of the text and the start of the next would read as another token.
        token = f"\x00{index}\x01"
        placeholders[token] = latex
        text = text.replace(plain, token)
    for token, latex in placeholders.items():
        text = text.replace(token, latex)
    return text


def latex_cells(table: pd.DataFrame) -> pd.DataFrame:
    """Return ``table`` with its column names and text cells rewritten by ``latex_text``."""
    table = table.rename(columns=lambda column: latex_text(str(column)))
    for column in table.select_dtypes(include=["object", "string"]).columns:
        table[column] = table[column].map(lambda value: latex_text(value) if isinstance(value, str) else value)
    return table


def to_markdown(table: pd.DataFrame) -> str:
    """Render a table as GitHub Markdown with 4 significant digits and '–' for missing values."""
    if table.empty:
        return "_no rows: no finished run has the data this table needs_"
    cells = table.astype(object).where(table.notna(), None)
    return cells.to_markdown(index=False, floatfmt=".4g", missingval="–")

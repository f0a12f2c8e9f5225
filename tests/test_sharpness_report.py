"""Sharpness-study report: runs without λ_max rows, labels, markers and LaTeX cells, on frames built by hand."""

import math

import numpy as np
import pandas as pd
import pytest

from reports.figures import eos_deviation_figure
from reports.render import render_report
from reports.sharpness import eos_summary_table, run_label, sharpness_trajectory_figure, train_loss_figure
from reports.tables import latex_text, legend_methods, write_table


def _runs(rows):
    """Return a sharpness-study runs frame from (run_id, optimizer, method, delta, lr, status) tuples."""
    frame = pd.DataFrame(rows, columns=["run_id", "optimizer", "method", "delta", "lr", "status"])
    frame["study"] = "sharpness"
    frame["depth"] = 20
    frame["width"] = 1
    for column in ("final_test_acc", "max_test_acc", "final_test_loss", "final_train_loss", "final_grad_norm",
                   "mean_rum", "early_rum"):
        frame[column] = np.nan
    return frame


def _sharpness(run_id, steps, lambdas, threshold=25.0, converged=None):
    """Return 2/h rows of one run's sharpness frame."""
    count = len(steps)
    return pd.DataFrame({
        "run_id": [run_id] * count,
        "epoch": steps,
        "step": steps,
        "lambda_max": lambdas,
        "preconditioned": [False] * count,
        "threshold_kind": ["2/h"] * count,
        "threshold": [threshold] * count,
        "converged": converged if converged is not None else [True] * count,
    })


def _texts(fig):
    return [text.get_text() for ax in fig.axes for text in ax.texts]


DIVERGED = [
    ("div-a", "sgd", "sgd", np.nan, 1.5, "diverged"),
    ("div-b", "sgd", "sgd", np.nan, 5.0, "diverged"),
]


def test_summary_without_sharpness_rows():
    """Every run diverged before its first measurement, so the sharpness frame had no columns (KeyError: 'run_id')."""
    table = eos_summary_table(pd.DataFrame(), _runs(DIVERGED))

    assert table["run_id"].tolist() == ["div-a", "div-b"]
    assert table["status"].tolist() == ["diverged", "diverged"]
    assert table["method"].tolist() == ["SGD", "SGD"]
    assert table["measurements"].tolist() == [0, 0]
    assert table["initial_lambda_max"].isna().all()
    assert table["final_ratio"].isna().all()


def test_summary_lists_unmeasured_runs():
    """A run without sharpness rows used to be left out, and the summary had no status column."""
    runs = _runs([
        ("ok", "sgd", "sgd", np.nan, 0.08, "completed"),
        ("div", "sgd", "sgd", np.nan, 1.5, "diverged"),
    ])
    sharpness = _sharpness("ok", [25, 50, 75, 100], [10.0, 30.0, 26.0, 24.0], converged=[True, True, True, False])

    table = eos_summary_table(sharpness, runs).set_index("run_id")

    assert table.index.tolist() == ["ok", "div"]
    assert table.loc["ok", "status"] == "completed"
    assert table.loc["ok", "threshold"] == 25.0
    assert table.loc["ok", "initial_lambda_max"] == 10.0
    assert table.loc["ok", "peak_lambda_max"] == 30.0
    assert table.loc["ok", "final_median_lambda_max"] == 25.0  # steps 75 and 100
    assert table.loc["ok", "final_ratio"] == 1.0
    assert table.loc["ok", "measurements"] == 4
    assert table.loc["ok", "converged_fraction"] == 0.75
    assert table.loc["div", "status"] == "diverged"
    assert table.loc["div", "measurements"] == 0
    assert math.isnan(table.loc["div", "peak_lambda_max"])


def test_summary_records_first_measured_step():
    """initial_lambda_max is the first measurement, at the first cadence step, not at initialization."""
    runs = _runs([("ok", "sgd", "sgd", np.nan, 0.08, "completed")])
    sharpness = _sharpness("ok", [50, 25, 75], [12.0, 11.0, 20.0])

    row = eos_summary_table(sharpness, runs).iloc[0]

    assert row["initial_step"] == 25
    assert row["initial_lambda_max"] == 11.0


@pytest.mark.parametrize(("optimizer", "method", "delta", "expected"), [
    ("sgd", "sgd", np.nan, "SGD"),
    ("adam", "sgd", np.nan, "Adam"),
    ("adamw", "sgd", np.nan, "AdamW"),
    ("sgd", "gclip", np.nan, "GClip on SGD"),
    ("sgd", "dgclip", 0.2, "δ=0.2 on SGD"),
    ("adam", "dgclip", 0.2, "δ=0.2 on Adam"),
    ("adamw", "gclip", np.nan, "GClip on AdamW"),
])
def test_run_label_names_optimizer(optimizer, method, delta, expected):
    """Bare Adam, relabelled method "adam" by legend_methods, was labelled "Adam on ADAM"."""
    runs = legend_methods(_runs([("r", optimizer, method, delta, 0.001, "completed")]))

    assert run_label(runs.iloc[0]) == expected


def test_summary_labels_bare_adam():
    runs = legend_methods(_runs([
        ("adam", "adam", "sgd", np.nan, 0.001, "completed"),
        ("adamw", "adamw", "sgd", np.nan, 0.001, "completed"),
    ]))
    sharpness = pd.concat([_sharpness("adam", [25], [30.0]), _sharpness("adamw", [25], [31.0])], ignore_index=True)

    table = eos_summary_table(sharpness, runs)

    assert table["method"].tolist() == ["Adam", "AdamW"]


def test_trajectory_names_unmeasured_runs():
    """With no sharpness rows the figure showed only "no data", hiding which runs diverged."""
    runs = _runs(DIVERGED)

    fig = sharpness_trajectory_figure(pd.DataFrame(), runs)

    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["SGD, η = 1.5", "SGD, η = 5"]
    assert _texts(fig) == ["no $\\lambda_{\\max}$ measured\n(run diverged)"] * 2


def test_trajectory_single_measurement_has_markers():
    """A run with one measurement was drawn as a line without markers, so its panel was blank."""
    runs = _runs([
        ("one", "sgd", "sgd", np.nan, 0.08, "completed"),
        ("div", "sgd", "sgd", np.nan, 1.5, "diverged"),
    ])
    sharpness = _sharpness("one", [25], [12.0])

    fig = sharpness_trajectory_figure(sharpness, runs)

    measured = fig.axes[0]
    assert [line.get_marker() for line in measured.lines] == ["o", "o"]
    assert measured.lines[0].get_ydata().tolist() == [12.0]
    assert measured.get_legend() is not None
    assert _texts(fig) == ["no $\\lambda_{\\max}$ measured\n(run diverged)"]


def test_train_loss_labels_method():
    """Runs with the same η but different methods all had the legend entry "η = 0.08"."""
    runs = _runs([
        ("sgd", "sgd", "sgd", np.nan, 0.08, "completed"),
        ("gclip", "sgd", "gclip", np.nan, 0.08, "completed"),
        ("dgclip", "sgd", "dgclip", 0.2, 0.08, "completed"),
    ])
    steps = pd.DataFrame({"run_id": ["sgd", "sgd", "gclip", "gclip", "dgclip"], "step": [1, 2, 1, 2, 1],
                          "loss": [0.5, 0.4, 0.5, 0.3, 0.5]})

    fig = train_loss_figure(steps, runs)

    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["SGD, η = 0.08", "GClip on SGD, η = 0.08", "δ=0.2 on SGD, η = 0.08"]
    assert fig.axes[0].lines[2].get_marker() == "o"  # one logged step


def test_train_loss_labels_step_size_only():
    runs = _runs([
        ("a", "sgd", "sgd", np.nan, 0.05, "completed"),
        ("b", "sgd", "sgd", np.nan, 0.08, "completed"),
    ])
    steps = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "step": [1, 2, 1, 2], "loss": [0.5, 0.4, 0.5, 0.3]})

    fig = train_loss_figure(steps, runs)

    labels = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert labels == ["η = 0.05", "η = 0.08"]


def test_train_loss_without_steps():
    fig = train_loss_figure(pd.DataFrame(), _runs(DIVERGED))

    assert _texts(fig) == ["no data"]


def test_eos_deviation_without_sharpness_rows():
    """A sharpness frame without columns raised KeyError: 'run_id' in the merge with the runs frame."""
    fig = eos_deviation_figure(pd.DataFrame(), _runs(DIVERGED))

    assert _texts(fig) == ["no data"]


def test_latex_table_escapes_cells(tmp_path):
    """LaTeX cells kept raw δ and β, which only the captions converted to math."""
    table = pd.DataFrame({
        "method": ["δ=0.2 on Adam", "Adam"],
        "threshold_kind": ["(2+2β)/h", "(2+2β1)/(h(1-β1))"],
        "note": ["50% of a_b & c", "{x} λ"],
    })

    write_table(table, tmp_path, "cells", "Cells with δ.")

    latex = (tmp_path / "cells.tex").read_text()
    assert r"$\delta$=0.2 on Adam & (2+2$\beta$)/h & 50\% of a\_b \& c \\" in latex
    assert r"Adam & (2+2$\beta_1$)/(h(1-$\beta_1$)) & \{x\} $\lambda$ \\" in latex
    assert r"method & threshold\_kind & note \\" in latex
    assert r"\caption{Cells with $\delta$.}" in latex
    assert "δ" not in latex
    assert "β" not in latex
    assert "λ" not in latex
    assert (tmp_path / "cells.csv").read_text().splitlines()[1] == "δ=0.2 on Adam,(2+2β)/h,50% of a_b & c"


def test_report_lists_runs_diverged_before_measurement(tmp_path):
    """`eos study sharpness --lr 1.5,5` diverged before step 25, and rendering its report raised KeyError: 'run_id'."""
    frames = tmp_path / "frames"
    frames.mkdir()
    _runs(DIVERGED).to_parquet(frames / "runs.parquet")
    steps = pd.DataFrame({"run_id": ["div-a", "div-b"], "epoch": [1, 1], "step": [1, 1], "loss": [0.6, np.inf]})
    steps.to_parquet(frames / "steps.parquet")

    report = render_report(tmp_path).read_text()

    summary = pd.read_csv(tmp_path / "tables" / "eos_summary.csv")
    assert summary["run_id"].tolist() == ["div-a", "div-b"]
    assert summary["status"].tolist() == ["diverged", "diverged"]
    assert summary["initial_lambda_max"].isna().all()
    assert "| div-a" in report
    for name in ("sharpness_trajectory", "train_loss"):
        assert (tmp_path / "figures" / f"{name}.png").is_file()


def test_latex_text_keeps_digits_between_escapes():
    """With one mark for both ends of a placeholder, "_2_" read as the placeholder of
    the third replacement and came out as "13$\\lambda$13"."""
    assert latex_text("threshold_2_over_h") == r"threshold\_2\_over\_h"
    assert latex_text("a_13_b") == r"a\_13\_b"


def test_trajectory_legend_for_each_criterion():
    """A study of Adam and momentum SGD runs drew one legend, Adam's, in the first panel.
    The SGD panels' dashed line was (2+2β)/h without a legend, and their titles gave no β."""
    runs = pd.DataFrame({"run_id": ["adam", "sgd"], "optimizer": ["adam", "sgd"], "method": ["sgd", "sgd"],
                         "delta": [float("nan")] * 2, "lr": [0.001, 0.05], "momentum": [0.0, 0.9],
                         "status": ["completed"] * 2})
    rows = []
    for step in (1, 2, 3):
        rows.append({"run_id": "adam", "step": step, "lambda_max": 5e3, "threshold": 3.8e4, "preconditioned": True,
                     "threshold_kind": "(2+2β1)/(h(1-β1))"})
        rows.append({"run_id": "sgd", "step": step, "lambda_max": 40.0, "threshold": 76.0, "preconditioned": False,
                     "threshold_kind": "(2+2β)/h"})
    figure = sharpness_trajectory_figure(pd.DataFrame(rows), runs)
    legends = [[text.get_text() for text in ax.get_legend().get_texts()] if ax.get_legend() else None
               for ax in figure.axes[:2]]
    assert legends == [[r"preconditioned $\lambda_{\max}$", "(2+2β1)/(h(1-β1))", "final phase"],
                       [r"$\lambda_{\max}$", "(2+2β)/h", "final phase"]]
    assert figure.axes[1].get_title().endswith("β = 0.9")

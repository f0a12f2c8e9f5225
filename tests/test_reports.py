"""Reports: δ* selection, log-axis masking, and independence from torch."""

import subprocess
import sys

import numpy as np
import pandas as pd

from reports.figures import accuracy_vs_delta_figure, eos_deviation_figure, log_mask
from reports.tables import delta_star_table, runs_table, to_markdown


def _runs(rows):
    columns = ["run_id", "depth", "width", "method", "delta", "status", "final_test_acc", "final_test_loss"]
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("max_test_acc", "final_train_loss", "final_grad_norm", "mean_rum", "early_rum"):
        frame[column] = 0.0
    return frame


def test_delta_star_breaks_ties_by_lower_test_loss():
    runs = _runs([
        ("a", 8, 1, "dgclip", 0.2, "completed", 0.91, 0.30),
        ("b", 8, 1, "dgclip", 0.45, "completed", 0.91, 0.28),
        ("c", 8, 1, "dgclip", 0.9, "diverged", 0.99, 0.01),  # diverged runs never win
        ("d", 8, 1, "gclip", np.nan, "completed", 0.89, 0.37),
        ("e", 20, 1, "dgclip", 0.2, "completed", 0.93, 0.25),
    ])
    table = delta_star_table(runs)
    assert table["delta_star"].tolist() == [0.45, 0.2]
    assert table.loc[0, "gclip_test_acc"] == 0.89
    assert np.isnan(table.loc[1, "gclip_test_acc"])
    marked = runs_table(runs)
    assert marked.loc[marked["delta_star"], "delta"].tolist() == [0.45, 0.2]


def test_log_mask_counts_nonpositive_and_nonfinite():
    masked, count = log_mask(pd.Series([1.0, 0.0, -2.0, np.inf, np.nan, 3.0]))
    assert count == 4
    assert masked[0] == 1.0
    assert masked[5] == 3.0
    assert np.isnan(masked[1:5]).all()


def test_figure_says_how_many_values_were_masked():
    runs = _runs([("a", 8, 1, "dgclip", 0.2, "completed", 0.9, 0.3)])
    sharpness = pd.DataFrame({
        "run_id": ["a"] * 3, "epoch": [1, 2, 3], "threshold_kind": ["2/h"] * 3, "deviation": [1.0, 0.0, np.nan],
    })
    fig = eos_deviation_figure(sharpness, runs)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "2 non-positive or non-finite masked" in texts


def test_markdown_shows_missing_values_as_dash():
    assert "–" in to_markdown(pd.DataFrame({"a": [1.0, np.nan]}))


def test_reports_never_import_torch():
    code = "import sys, reports, reports.figures, reports.tables; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_runs_table_blanks_mlp_depth():
    """The frame keeps the ResNet defaults for an MLP's runs; the table showed them as its
    depth 20 and width 1."""
    runs = _runs([("mlp-a", 20, 1, "sgd", np.nan, "completed", 0.97, 0.07),
                  ("resnet-b", 8, 2, "sgd", np.nan, "completed", 0.90, 0.30)])
    runs["model"] = ["mlp200x200", "resnet"]
    table = runs_table(runs).set_index("run_id")
    assert table.loc["mlp-a", "model"] == "mlp200x200"
    assert pd.isna(table.loc["mlp-a", "depth"])
    assert pd.isna(table.loc["mlp-a", "width"])
    assert (table.loc["resnet-b", "depth"], table.loc["resnet-b", "width"]) == (8, 2)
    assert "–" in to_markdown(runs_table(runs))


def test_atomic_writes_follow_the_umask(tmp_path):
    """mkstemp's 0600 used to survive the rename, so collaborators could not read any result."""
    import os
    import stat

    from reports.atomic import atomic_path, atomic_write_json, atomic_write_parquet

    previous = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "study.json", {"a": 1})
        atomic_write_parquet(tmp_path / "runs.parquet", pd.DataFrame({"a": [1]}))
        with atomic_path(tmp_path / "figure.png") as temporary:
            temporary.write_bytes(b"png")
    finally:
        os.umask(previous)
    for name in ("study.json", "runs.parquet", "figure.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_atomic_writes_leave_umask_alone(tmp_path, monkeypatch):
    """Reading the umask used to set it to 0 for a moment, so a file that another thread
    created meanwhile was writable by everyone."""
    import os
    import stat

    from reports.atomic import atomic_write_json

    def set_umask(mask):
        raise AssertionError(f"os.umask({mask:#o}) called during an atomic write")

    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", set_umask)
        atomic_write_json(tmp_path / "study.json", {"a": 1})
    finally:
        monkeypatch.undo()
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "study.json").stat().st_mode) == 0o640
    assert [path.name for path in tmp_path.iterdir()] == ["study.json"]


def test_atomic_write_long_name(tmp_path):
    """Temporary names carried 16 random characters where mkstemp used 8, so a 241-character
    file name, which mkstemp had handled, went past the 255-byte limit of the file system."""
    from reports.atomic import atomic_write_json

    target = tmp_path / ("r" * 241)
    atomic_write_json(target, {"a": 1})
    assert target.exists()


def test_delta_star_is_chosen_per_step_size():
    """δ* was chosen across step sizes: at η = 0.3 δ = 0.2 won, and it was marked δ* at
    η = 0.02 too, next to the GClip baseline of η = 0.02."""
    runs = _runs([
        ("a", 8, 1, "dgclip", 0.2, "completed", 0.767, 0.6),
        ("b", 8, 1, "dgclip", 0.9, "completed", 0.925, 0.3),
        ("c", 8, 1, "gclip", np.nan, "completed", 0.122, 2.3),
        ("d", 8, 1, "dgclip", 0.2, "completed", 0.950, 0.2),
        ("e", 8, 1, "dgclip", 0.9, "completed", 0.900, 0.3),
        ("f", 8, 1, "gclip", np.nan, "completed", 0.922, 0.3),
    ])
    runs["optimizer"], runs["lr"] = "sgd", [0.02, 0.02, 0.02, 0.3, 0.3, 0.3]
    stars = delta_star_table(runs)
    assert stars[["lr", "delta_star", "gclip_test_acc"]].values.tolist() == [[0.02, 0.9, 0.122], [0.3, 0.2, 0.922]]
    marked = runs_table(runs)
    assert sorted(marked.loc[marked["delta_star"], "run_id"]) == ["b", "d"]
    figure = accuracy_vs_delta_figure(runs)
    labels = sorted(line.get_label() for line in figure.axes[0].get_lines())
    assert labels == ["GClip (SGD η=0.02)", "GClip (SGD η=0.3)", "δ-GClip (SGD η=0.02)", "δ-GClip (SGD η=0.3)"]


def test_delta_star_with_missing_step_size():
    """Grouping by a step size that is NaN dropped every run: an empty δ* table, and a figure
    saying there was no δ-GClip run. Without optimizer and lr columns the δ* line names crashed."""
    from reports.render import _star_lines

    runs = _runs([("a", 8, 1, "dgclip", 0.1, "completed", 0.90, 0.3),
                  ("b", 8, 1, "gclip", np.nan, "completed", 0.85, 0.35)])
    runs["optimizer"], runs["lr"] = "sgd", np.nan
    assert delta_star_table(runs)[["delta_star", "gclip_test_acc"]].values.tolist() == [[0.1, 0.85]]
    labels = [line.get_label() for line in accuracy_vs_delta_figure(runs).axes[0].get_lines()]
    assert labels == ["δ-GClip", "GClip"]
    assert _star_lines(delta_star_table(runs.drop(columns=["optimizer", "lr"])), "depth study") == "depth study"

"""Figures fit for a paper: tick labels that never overlap, point labels that never collide,
one x position per model size, x ranges fitted to the data, titles that name run and dataset."""
import numpy as np
import pandas as pd
import pytest

from src.visualization import plots


@pytest.fixture
def kept(monkeypatch):
    """The figure each plotting function draws, kept open for the test to measure."""
    figs = []

    def save(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        figs.append(fig)
        return path
    monkeypatch.setattr(plots, "_save", save)
    yield figs
    for f in figs:
        plots.plt.close(f)


def _boxes(fig, texts):
    r = fig.canvas.get_renderer()
    return [t.get_window_extent(r) for t in texts if t.get_text() and t.get_visible()]


def _overlapping(boxes) -> list:
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1]


def _size_table():
    """Sizes a few percent apart (0.15 and 0.167 M: '0.150.167' before), and four students of one
    size at nearly one accuracy (their labels printed over each other before)."""
    rows = [("teacher", "teacher", "kd", 1.73e6, 0.92), ("ta_plain_cnn6", "assistant", "kd", 0.167e6, 0.88),
            ("ta_plain_cnn4", "assistant", "kd", 0.15e6, 0.87)]
    rows += [(f"student_{m}", "student", m, 0.02e6, 0.80 + 0.001 * k) for k, m in enumerate(["scratch", "kd", "takd", "takd"])]
    df = pd.DataFrame(rows, columns=["stage", "role", "method", "params", "test_accuracy_mean"])
    return df.assign(run="plain", flops=df["params"] * 50, ci_low=df["test_accuracy_mean"] - 0.01,
                     ci_high=df["test_accuracy_mean"] + 0.01, seeds=1)


def test_accuracy_vs_size_ticks_and_labels_never_overlap(kept, tmp_path):
    table = _size_table()
    plots.accuracy_vs_size(table, "params", "parameters (M)", tmp_path / "a.png", scale=1e6, title="plain on CIFAR-10")
    fig = kept[0]
    ax = fig.axes[0]
    assert not _overlapping(_boxes(fig, ax.get_xticklabels()))
    notes = [t for t in ax.texts if t.get_text()]
    assert len(notes) == len(table) and not _overlapping(_boxes(fig, notes))
    xs = {round(float(line.get_xdata()[0]), 9) for line in ax.lines if len(line.get_xdata()) == 1}
    assert len(xs) == table["params"].nunique()  # one x position per model size
    lo, hi = ax.get_xlim()
    assert lo > 0.02 / 1.5 and hi < 1.73 * 1.5  # the range is fitted to the data
    assert "plain on CIFAR-10" in ax.get_title()


def test_assistant_sweep_labels_and_the_direct_kd_interval(kept, tmp_path):
    pts = pd.DataFrame({"path": ["plain_cnn6", "plain_cnn4", "plain_cnn8_plain_cnn4", "plain_cnn6_plain_cnn4"],
                        "assistant_params": [0.167e6, 0.15e6, 0.15e6, 0.15e6],
                        "acc": [80.1, 80.2, 80.15, 80.3], "lo": [79.0, 79.1, 79.0, 79.2], "hi": [81.2, 81.3, 81.2, 81.4]})
    refs = {"teacher": (92.0, 91.5, 92.5), "direct KD": (79.9, 70.0, 89.0), "scratch": (78.0, 77.0, 79.0)}
    plots.assistant_sweep(pts, refs, tmp_path / "s.png", "plain on CIFAR-10: " + "a long verdict " * 12)
    fig = kept[0]
    ax = fig.axes[0]
    notes = [t for t in ax.texts if t.get_text()]
    assert len(notes) == 4 and not _overlapping(_boxes(fig, notes))
    assert not _overlapping(_boxes(fig, ax.get_xticklabels()))
    assert not ax.patches or all(p.get_width() < 0.5 * np.diff(ax.get_xlim())[0] for p in ax.patches)  # no full-width band
    r = fig.canvas.get_renderer()
    assert ax.title.get_window_extent(r).width <= fig.bbox.width  # a long title wraps


def test_overlap_check_can_fail(kept, tmp_path):
    """The measure used above does see two labels printed over each other."""
    fig, ax = plots.plt.subplots()
    a, b = ax.text(0.5, 0.5, "student_kd"), ax.text(0.5, 0.5, "student_takd")
    fig.canvas.draw()
    assert _overlapping(_boxes(fig, [a, b]))
    plots.declutter(ax, [ax.annotate("student_kd", (0.5, 0.5), xytext=(5, 0), textcoords="offset points"),
                         ax.annotate("student_takd", (0.5, 0.5), xytext=(5, 0), textcoords="offset points")])
    assert not _overlapping(_boxes(fig, ax.texts[2:4]))
    plots.plt.close(fig)

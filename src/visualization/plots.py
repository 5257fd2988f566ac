"""Figures for the report: each function takes tables (pandas) or arrays and writes one PNG.

Readable at a glance: one message per figure, labelled axes with units, legends where needed.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DPI = 110


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def training_curves(curves: dict, path: Path) -> Path:
    """curves: {stage label: DataFrame of epoch_log rows (several seeds stacked, column 'seed')}.
    Two rows of panels: loss and accuracy against epoch, train dashed and val solid, mean ± std over seeds."""
    n = len(curves)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n, 6), squeeze=False)
    for j, (label, df) in enumerate(curves.items()):
        g = df.groupby("epoch")
        for row, metric, unit in ((0, "loss", "loss (train: KD objective, val: CE)"), (1, "accuracy", "accuracy (%)")):
            ax = axes[row, j]
            for split, style in (("train", "--"), ("val", "-")):
                col = f"{split}_{metric}"
                scale = 100 if metric == "accuracy" else 1
                mean, std = g[col].mean() * scale, g[col].std().fillna(0) * scale
                ax.plot(mean.index, mean.values, style, label=split, marker="o", ms=3)
                ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(label, fontsize=9)
            ax.legend(fontsize=7)
    return _save(fig, path)


def confusion_matrix_plot(matrix: np.ndarray, classes: list, title: str, path: Path) -> Path:
    """Row-normalised confusion matrix: cell (i, j) = share of class i predicted as j."""
    c = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * c + 2), max(3.5, 0.5 * c + 1.5)))
    im = ax.imshow(matrix * 100, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(c), classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(c), classes, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    if c <= 12:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, f"{matrix[i, j] * 100:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if matrix[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="% of the true class")
    return _save(fig, path)


METHOD_ORDER = {"scratch": 0, "kd": 1, "takd": 2}


def accuracy_vs_size(table: pd.DataFrame, x: str, xlabel: str, path: Path, scale: float = 1.0) -> Path:
    """Test accuracy (mean ± std over seeds) against parameters or FLOPs (divided by `scale`),
    one point per model and method, log x axis with plain tick labels."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, sub in sorted(table.groupby("method"), key=lambda kv: METHOD_ORDER.get(kv[0], 9)):
        xs = sub[x] / scale
        ax.errorbar(xs, sub["test_accuracy_mean"] * 100, yerr=sub["test_accuracy_std"].fillna(0) * 100,
                    fmt="o", capsize=3, label=method.upper())
        for xv, (_, r) in zip(xs, sub.iterrows()):
            ax.annotate(f"{r['run']}: {r['stage']}" if table["run"].nunique() > 1 else r["stage"],
                        (xv, r["test_accuracy_mean"] * 100), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ticks = sorted(set(round(float(v), 3) for v in table[x] / scale))  # one labelled tick per model size
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def method_bars(table: pd.DataFrame, path: Path) -> Path:
    """Student test accuracy by method (scratch / KD / TAKD), mean ± std over seeds, per run."""
    table = table.assign(_o=table["method"].map(METHOD_ORDER).fillna(9)).sort_values(["run", "_o"], kind="stable")
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(table)), 4))
    labels = [f"{r['run']}\n{r['method'].upper()}" for _, r in table.iterrows()]
    colors = {"scratch": "#999999", "kd": "#4c72b0", "takd": "#dd8452"}
    means = (table["test_accuracy_mean"] * 100).to_numpy()
    stds = (table["test_accuracy_std"].fillna(0) * 100).to_numpy()
    ax.bar(range(len(table)), means, yerr=stds, capsize=4, color=[colors.get(m, "#55a868") for m in table["method"]])
    for i, (v, e) in enumerate(zip(means, stds)):
        ax.text(i, v + e, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(table)), labels, fontsize=8)
    ax.set_ylabel("student test accuracy (%)")
    lo = max(0.0, float(means.min()) - 10)
    ax.set_ylim(lo, min(100.0, float((means + stds).max()) + 5) + 2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def schedules(lr: dict, alpha: dict, path: Path) -> Path:
    """Learning rate (log scale) and KD alpha against epoch, per stage."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, s in lr.items():
        a.plot(s.index, s.values, marker="o", ms=3, label=label)
    a.set_yscale("log")
    a.set_xlabel("epoch")
    a.set_ylabel("learning rate at epoch end")
    a.set_title("learning rate", fontsize=9)
    for label, s in alpha.items():
        b.plot(s.index, s.values, marker="o", ms=3, label=label)
    b.set_xlabel("epoch")
    b.set_ylabel("alpha (weight of the KD term)")
    b.set_ylim(-0.02, 1.02)
    b.set_title("KD alpha", fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return _save(fig, path)


def image_gallery(images: dict, path: Path) -> Path:
    """Attention-map PNGs side by side, titled by stage."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 5), squeeze=False)
    for ax, (label, p) in zip(axes[0], images.items()):
        ax.imshow(plt.imread(p))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    return _save(fig, path)

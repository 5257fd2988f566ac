"""Figures for the report: each function takes tables (pandas) or arrays and writes one PNG.

Readable at a glance: one message per figure, labelled axes with units, every error bar or band
says what it is, and axes never zoom so far that a handful of test images looks like a trend.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D

DPI = 120
METHOD_ORDER = {"scratch": 0, "kd": 1, "takd": 2, "dkd": 3, "dist": 4, "fitnet": 5, "at": 6, "dense": 7}
METHOD_COLORS = {"scratch": "#7f7f7f", "kd": "#4c72b0", "takd": "#dd8452", "dkd": "#55a868", "dist": "#c44e52",
                 "fitnet": "#8172b3", "at": "#937860", "dense": "#da8bc3"}
# One colour per stage for up to 20 stages (matplotlib's tab10, then Dark2 and two of Set1): a study
# with its baselines and four methods via an assistant has more than ten, and tab10 alone repeats.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
           "#377eb8", "#ffff33"]
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P")]
MIN_ACC_SPAN = 10.0  # percentage points: the accuracy axes show at least this range


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.08)  # nothing outside the axes is cut off
    plt.close(fig)
    return path


def wrap_title(text: str, width: int) -> str:
    """A title over as many lines as it needs, so that it never runs off the figure."""
    return "\n".join(textwrap.wrap(text, width)) if text else ""


def _renderer(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def fit_log_ticks(ax, values, pad_px: float = 4.0) -> list:
    """A tick at each model size on a log x axis, dropping those whose labels would touch a label
    already kept (sizes a few percent apart, such as 0.15 and 0.167, would print as '0.150.167')."""
    ticks = sorted(set(float(f"{v:.3g}") for v in values))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    r = _renderer(ax.figure)
    kept, last = [], None
    for t, label in zip(ticks, ax.get_xticklabels()):
        box = label.get_window_extent(r)
        if last is None or box.x0 >= last.x1 + pad_px:
            kept.append(t)
            last = box
    ax.set_xticks(kept, [f"{t:g}" for t in kept], fontsize=8)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    return kept


def fit_log_xlim(ax, values, left: float = 1.3, right: float = 1.3) -> None:
    """The x range of a log axis fitted to the data: a fixed factor of margin on each side."""
    lo, hi = min(values), max(values)
    ax.set_xlim(lo / left, hi * right)


def declutter(ax, annotations: list, pad_px: float = 1.5, steps: int = 60) -> None:
    """Move point labels (annotations in offset points) so that none overlaps another, a label
    never leaves the axes on the right (it flips to the left of its point), and one that had to
    move away from its point is tied to it by a thin line."""
    if not annotations:
        return
    fig = ax.figure
    r = _renderer(fig)
    axbox = ax.get_window_extent(r)
    to_pt = 72.0 / fig.dpi
    placed = []
    for a in sorted(annotations, key=lambda a: -a.get_window_extent(r).y1):  # from the top down
        start = tuple(a.xyann)
        for _ in range(steps):
            box = a.get_window_extent(r)
            if box.x1 > axbox.x1 and a.get_horizontalalignment() != "right":
                a.set_horizontalalignment("right")
                a.xyann = (-abs(a.xyann[0]), a.xyann[1])
                continue
            hit = [p for p in placed if box.x0 < p.x1 + pad_px and p.x0 < box.x1 + pad_px
                   and box.y0 < p.y1 + pad_px and p.y0 < box.y1 + pad_px]
            if not hit:
                break
            below = min(p.y0 for p in hit) - pad_px - box.y1  # pixels to move down, under every label it hits
            a.xyann = (a.xyann[0], a.xyann[1] + below * to_pt)
        placed.append(a.get_window_extent(r))
        if abs(a.xyann[1] - start[1]) > 6:  # moved away from its point: a thin line back to it
            ax.annotate("", xy=a.xy, xycoords=a.xycoords, xytext=a.xyann, textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="#999999", shrinkA=0, shrinkB=3))
    fig.canvas.draw()


def _epoch_axis(ax, n_epochs: int) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=8))
    ax.set_xlim(0.5, max(n_epochs, 1) + 0.5)
    ax.grid(alpha=0.3)


def _band(ax, g, col, scale, style, label, n_seeds, color=None):
    mean = g[col].mean() * scale
    line, = ax.plot(mean.index, mean.values, linestyle=style, label=label, marker="o", ms=3, color=color)
    if n_seeds > 1:
        std = g[col].std().fillna(0) * scale
        ax.fill_between(mean.index, mean - std, mean + std, alpha=0.15, color=line.get_color())


PANELS = [("val_accuracy", 100, "validation accuracy (%)"), ("train_accuracy", 100, "train accuracy (%, training targets)"),
          ("val_loss", 1, "validation CE (nats, hard labels; log scale)"),
          ("train_ce", 1, "train CE (nats, training targets; log scale)"),
          ("train_kd", 1, "train KD term T²·KL (nats, stages with a teacher; log scale)")]


def training_curves(curves: dict, path: Path, num_classes: int = 0, title: str = "") -> Path:
    """curves: {stage label: DataFrame of epoch_log rows joined with epoch_terms (several seeds stacked,
    column 'seed')}. One panel per quantity against epoch, every stage a line in the same colour in
    every panel, on shared axes (so that stages are compared on one scale): validation and train
    accuracy (with the chance level), validation CE against hard labels, train CE against the
    training targets (label smoothing and mixup included: not the same quantity), the KD term.
    Several seeds: the mean, shaded ±1 std."""
    colors = PALETTE
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.6 + 0.12 * len(curves)))
    axes = axes.ravel()
    n_epochs = max(int(df["epoch"].max()) for df in curves.values())
    n_seeds = max(df["seed"].nunique() for df in curves.values())
    for j, (label, df) in enumerate(curves.items()):
        g = df.groupby("epoch")
        color, style = colors[j % len(colors)], STYLES[(j // len(colors)) % len(STYLES)][0]
        for ax, (col, scale, _) in zip(axes, PANELS):
            if col in df and df[col].notna().any():
                _band(ax, g, col, scale, style, label, n_seeds, color)
    for ax, (col, _, panel) in zip(axes, PANELS):
        ax.set_title(panel, fontsize=9)
        _epoch_axis(ax, n_epochs)
        if col.endswith("accuracy") and num_classes:
            ax.axhline(100 / num_classes, color="#999999", lw=1, ls=":", label=None)
            ax.annotate(f"chance {100 / num_classes:.0f}%", (n_epochs + 0.45, 100 / num_classes), fontsize=7,
                        color="#777777", xytext=(0, 3), textcoords="offset points", ha="right")
            ax.set_ylim(0, 100)
        elif ax.lines:
            ax.set_yscale("log")
    axes[0].sharey(axes[1])
    handles, labels = axes[0].get_legend_handles_labels()
    legend = axes[5]
    legend.axis("off")
    what = f" (mean of {n_seeds} seeds, shaded ±1 std)" if n_seeds > 1 else ""
    legend.legend(handles, labels, loc="center", fontsize=8, title=f"stage (model){what}", title_fontsize=8,
                  frameon=False)
    if title:
        fig.suptitle(wrap_title(title, 140), fontsize=10)
    return _save(fig, path)


def confusion_matrix_plot(matrix: np.ndarray, classes: list, title: str, path: Path) -> Path:
    """Row-normalised confusion matrix: cell (i, j) = share of class i predicted as j."""
    c = len(classes)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.55 * c + 2.5), max(4, 0.55 * c + 1.8)))
    im = ax.imshow(matrix * 100, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(c), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(c), classes, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    if c <= 12:
        for i in range(c):
            for j in range(c):
                ax.text(j, i, f"{matrix[i, j] * 100:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if matrix[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="% of the true class")
    return _save(fig, path)


def _acc_limits(lo: float, hi: float) -> tuple[float, float]:
    """At least MIN_ACC_SPAN points around the data, inside [0, 100]."""
    mid, span = (lo + hi) / 2, max(hi - lo, MIN_ACC_SPAN)
    low, high = max(0.0, mid - span / 2 - 1), min(100.0, mid + span / 2 + 1)
    return (low, high) if high > low else (0.0, 100.0)


ROLE_COLORS = {"teacher": "#2ca02c", "assistant": "#9467bd"}


def _kind(r) -> tuple[str, str]:
    """(legend label, colour): teachers and assistants by their role, students by their method."""
    role = str(r.get("role") or "")
    if role in ROLE_COLORS:
        return role, ROLE_COLORS[role]
    method = str(r["method"])
    return f"student: {method.upper()}", METHOD_COLORS.get(method, "#55a868")


def accuracy_vs_size(table: pd.DataFrame, x: str, xlabel: str, path: Path, scale: float = 1.0,
                     title: str = "") -> Path:
    """Test accuracy against parameters or FLOPs (divided by `scale`), log x axis with a tick at
    every model size whose label has room. Teachers and assistants are coloured by their role,
    students by their method; one marker shape per run; models of one size share one x position
    (their labels are moved apart, never their points); error bars are the 95% interval (t over
    seeds, or the binomial interval of the test set for one seed)."""
    fig, ax = plt.subplots(figsize=(7.4, 4.8))
    runs = list(dict.fromkeys(table["run"]))
    seen_labels, notes = set(), []
    sizes = table[x].to_numpy(float) / scale
    for i, (_, r) in enumerate(table.iterrows()):
        label, color = _kind(r)
        marker = STYLES[runs.index(r["run"]) % len(STYLES)][1]
        label = label if len(runs) == 1 else f"{r['run']}: {label}"
        y = r["test_accuracy_mean"] * 100
        ax.errorbar([sizes[i]], [y], yerr=[[max(0, y - r["ci_low"] * 100)], [max(0, r["ci_high"] * 100 - y)]],
                    fmt=marker, color=color, capsize=0, elinewidth=1.2, ms=6, alpha=0.9,
                    label=None if label in seen_labels else label)
        seen_labels.add(label)
        if len(runs) == 1:  # one run: name the stages beside their points
            notes.append(ax.annotate(r["stage"], (sizes[i], y), fontsize=7, xytext=(6, 0), textcoords="offset points",
                                     va="center"))
    ax.set_xscale("log")
    fit_log_xlim(ax, sizes)
    ax.set_ylim(*_acc_limits(float((table["ci_low"] * 100).min()), float((table["ci_high"] * 100).max())))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3, which="major")
    if title:
        ax.set_title(wrap_title(title, 80), fontsize=9)
    n_seeds = int(table["seeds"].max())
    what = f"95% t interval over {n_seeds} seeds" if n_seeds > 1 else "95% binomial interval of the test set"
    ax.legend(fontsize=8, title=f"bars: {what}", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fit_log_ticks(ax, sizes)
    declutter(ax, notes)
    return _save(fig, path)


def method_points(table: pd.DataFrame, path: Path, note: str = "", title: str = "") -> Path:
    """Student test accuracy by method (scratch / KD / TAKD) per run: points with 95% intervals
    (t over seeds; one seed: the binomial interval of the test set), on an axis of at least
    MIN_ACC_SPAN points, individual seeds as small dots."""
    table = table.assign(_o=table["method"].map(METHOD_ORDER).fillna(9)).sort_values(["run", "_o"], kind="stable")
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 * len(table) + 1.5), 4.2))
    xs = np.arange(len(table))
    for i, (_, r) in enumerate(table.iterrows()):
        color = METHOD_COLORS.get(r["method"], "#55a868")
        y = r["test_accuracy_mean"] * 100
        ax.errorbar([i], [y], yerr=[[y - r["ci_low"] * 100], [r["ci_high"] * 100 - y]], fmt="o", color=color,
                    capsize=0, elinewidth=2, ms=8)
        values = r.get("seed_values", []) or []
        for v in values if len(values) > 1 else []:
            ax.plot([i + 0.12], [v * 100], ".", color=color, alpha=0.6)
        ax.annotate(f"{y:.2f}", (i, y), xytext=(14, 0), textcoords="offset points", va="center", fontsize=8)
    labels = [f"{r['method'].upper()}\n{_wrap_name(r['stage'])}" + (f"\n{r['run']}" if table["run"].nunique() > 1 else "")
              for _, r in table.iterrows()]
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlim(-0.6, len(table) - 0.4)
    ax.set_ylim(*_acc_limits(float((table["ci_low"] * 100).min()), float((table["ci_high"] * 100).max())))
    ax.set_ylabel("student test accuracy (%)")
    n_seeds = int(table["seeds"].max())
    what = f"95% t interval over {n_seeds} seeds (dots: seeds)" if n_seeds > 1 else "95% binomial interval (test-set size)"
    ax.set_title((wrap_title(title, 70) + "\n" if title else "") + f"bars: {what}" + (f"\n{note}" if note else ""),
                 fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def method_comparison(table: pd.DataFrame, path: Path, root: str, title: str = "") -> Path:
    """Student test accuracy per method (x), distilled from the teacher `root` directly (circles)
    and via an assistant (squares, one shade per assistant), 95% intervals (t over seeds, or the
    binomial interval of the test set), individual seeds as dots; scratch as a reference line."""
    fam = table["method"].replace({"takd": "kd"})
    order = sorted(set(fam) - {"scratch"}, key=lambda m: METHOD_ORDER.get(m, 99))
    vias = sorted({t for t in table["teacher"].fillna("") if t and t != root})
    fig, ax = plt.subplots(figsize=(max(5.5, 1.1 * len(order) + 3.5), 4.4))
    shown = set()
    for (_, r), m in zip(table.iterrows(), fam):
        y, lo, hi = r["test_accuracy_mean"] * 100, r["ci_low"] * 100, r["ci_high"] * 100
        if m == "scratch":
            ax.axhline(y, color=METHOD_COLORS["scratch"], ls="--", lw=1.2, label=f"scratch: {y:.2f}")
            continue
        teacher = str(r.get("teacher") or "")
        k = 0 if teacher == root else 1 + vias.index(teacher) if teacher in vias else 0
        x = order.index(m) + (k - len(vias) / 2) * 0.22
        marker = "o" if k == 0 else STYLES[k % len(STYLES)][1] if k > 1 else "s"
        label = "from the teacher" if k == 0 else f"via {teacher}"
        ax.errorbar([x], [y], yerr=[[max(0, y - lo)], [max(0, hi - y)]], fmt=marker, ms=7, capsize=0, elinewidth=2,
                    color=METHOD_COLORS.get(m, "#55a868"), mfc="white" if k else METHOD_COLORS.get(m, "#55a868"),
                    label=None if label in shown else label)
        shown.add(label)
        values = r.get("seed_values", []) or []
        for v in values if len(values) > 1 else []:
            ax.plot([x + 0.07], [v * 100], ".", color=METHOD_COLORS.get(m, "#55a868"), alpha=0.6)
    ax.set_xticks(range(len(order)), [m.upper() for m in order], fontsize=9)
    ax.set_xlim(-0.7, len(order) - 0.3)
    ax.set_ylim(*_acc_limits(float((table["ci_low"] * 100).min()), float((table["ci_high"] * 100).max())))
    ax.set_ylabel("student test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    n_seeds = int(table["seeds"].max())
    what = f"95% t interval over {n_seeds} seeds (dots: seeds)" if n_seeds > 1 else "95% binomial interval (test-set size)"
    ax.set_title((wrap_title(title, 80) + "\n" if title else "") + f"bars: {what}", fontsize=8)
    proxies = [Line2D([], [], ls="", marker="o", color="#555555", label="from the teacher")]
    proxies += [Line2D([], [], ls="", marker="s" if k == 0 else STYLES[(k + 1) % len(STYLES)][1], color="#555555",
                       mfc="white", label=f"via {v}") for k, v in enumerate(vias)]
    proxies += [h for h, lab in zip(*ax.get_legend_handles_labels()) if lab.startswith("scratch")]
    ax.legend(handles=proxies, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _wrap_name(name: str, width: int = 16) -> str:
    """A long stage name over several lines, broken after its underscores."""
    return "\n".join(textwrap.wrap(name.replace("_", "_ "), width)).replace("_ ", "_").replace(" ", "")


def _grouped(series: dict) -> list:
    """[(series, 'a = b')]: identical series are drawn once and named together, so none hides another."""
    groups: dict = {}
    for label, s in series.items():
        key = tuple(np.round(np.asarray(s.values, float), 9)) + tuple(np.round(np.asarray(s.index, float), 6))
        groups.setdefault(key, (s, []))[1].append(label)
    return [(s, _names(names)) for s, names in groups.values()]


def _names(names: list) -> str:
    """'a = b', or for many stages '5 stages: a, b, c, ...' wrapped to fit a legend."""
    text = " = ".join(names) if len(names) <= 2 else f"{len(names)} stages: " + ", ".join(names)
    return "\n".join(textwrap.wrap(text, 70))


def schedules(lr: dict, alpha: dict, path: Path, title: str = "") -> Path:
    """lr: {stage: Series of the LR of every optimizer step, index = epochs completed at that step
    (fractional, from 0)}; alpha: {stage: Series per epoch, index 1..N}, drawn as a step over each
    epoch. Both panels share one axis of epochs completed, 0..N. Identical schedules are drawn
    once and named together; the legends sit below the panels."""
    lr_groups, alpha_groups = _grouped(lr), _grouped(alpha)
    lines = max(sum(label.count("\n") + 1 for _, label in g) for g in (lr_groups, alpha_groups) if g) if lr or alpha else 1
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6 + 0.16 * lines))
    for k, (s, label) in enumerate(lr_groups):
        a.plot(s.index, s.values, linestyle=STYLES[k % len(STYLES)][0], lw=1.6, label=label)
    a.set_yscale("log")
    a.set_ylabel("learning rate")
    a.set_title("learning rate of every optimizer step, as applied", fontsize=9)
    for k, (s, label) in enumerate(alpha_groups):
        ls, marker = STYLES[k % len(STYLES)]
        x = np.append(np.asarray(s.index, float) - 1, float(s.index[-1]))
        y = np.append(s.values, s.values[-1])
        b.step(x, y, where="post", linestyle=ls, lw=1.6, label=label)
        b.plot(x[:-1] + 0.5, s.values, marker, ms=4, color=b.lines[-1].get_color())
    b.set_ylabel("alpha (weight of the KD term)")
    top = max([float(np.nanmax(np.asarray(v.values, float))) for v in alpha.values() if len(v)] + [1.0])
    b.set_ylim(-0.02 * top, 1.02 * top)  # a method with its own weights (FitNets: 100) keeps its scale
    b.set_title("KD alpha, one value per epoch (0: no teacher)", fontsize=9)
    n = max([len(s) for s in alpha.values()] + [1])
    for ax in (a, b):
        ax.set_xlabel("epochs completed")
        ax.grid(alpha=0.3)
        ax.set_xlim(0, n)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, nbins=8))
    if title:
        fig.suptitle(wrap_title(title, 140), fontsize=10)
    return _save(fig, path)


def readable_image(path: Path) -> bool:
    """Whether matplotlib reads the PNG at `path` (an empty or cut file does not)."""
    try:
        plt.imread(path)
    except (OSError, ValueError, SyntaxError):
        return False
    return True


def image_gallery(images: dict, path: Path) -> Path:
    """Attention-map PNGs side by side at their own size (each carries its title and colour bar)."""
    arrays = [plt.imread(p) for p in images.values()]
    h = max(a.shape[0] for a in arrays)
    w = sum(a.shape[1] for a in arrays)
    fig = plt.figure(figsize=(w / 100, h / 100))
    x = 0
    for arr in arrays:
        ax = fig.add_axes([x / w, 1 - arr.shape[0] / h, arr.shape[1] / w, arr.shape[0] / h])
        ax.imshow(arr, interpolation="nearest")
        ax.axis("off")
        x += arr.shape[1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def assistant_sweep(points: pd.DataFrame, refs: dict, path: Path, title: str) -> Path:
    """Student test accuracy against the size of the assistant that taught it (one point per
    path, 95% interval bars; paths whose last assistants have one size share its x position and
    their labels are moved apart), with the teacher, the scratch student and the directly
    distilled student as reference lines; the direct-KD interval is a bar at the left edge, so it
    covers no point.

    points: path, assistant_params, acc, lo, hi (accuracies in %); refs: {name: (acc, lo, hi)}."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    colors = {"teacher": "#2ca02c", "scratch": METHOD_COLORS["scratch"], "direct KD": METHOD_COLORS["kd"]}
    sizes = points["assistant_params"].to_numpy(float) / 1e6
    ax.set_xscale("log")
    fit_log_xlim(ax, sizes, left=1.6, right=1.4)
    for name, (acc, lo, hi) in refs.items():
        color = colors.get(name, "#555555")
        ax.axhline(acc, color=color, ls="--" if name != "direct KD" else "-", lw=1.2,
                   label=f"{name}: {acc:.2f}" + (" (bar at the left: its 95% interval)" if name == "direct KD" else ""))
        if name == "direct KD":
            ax.errorbar([ax.get_xlim()[0] * 1.12], [acc], yerr=[[acc - lo], [hi - acc]], fmt="none", color=color,
                        capsize=3, elinewidth=1.5)
    yerr = np.vstack([points["acc"] - points["lo"], points["hi"] - points["acc"]]).clip(min=0)
    ax.errorbar(sizes, points["acc"], yerr=yerr, fmt="o", color=METHOD_COLORS["takd"],
                capsize=3, elinewidth=1.5, ms=7, alpha=0.9, label="student via assistant (95% interval)")
    notes = [ax.annotate(r["path"], (x, r["acc"]), fontsize=7, xytext=(7, 0), textcoords="offset points", va="center")
             for x, (_, r) in zip(sizes, points.iterrows())]
    values = [*points["lo"], *points["hi"], *[v for ref in refs.values() for v in ref]]
    ax.set_ylim(*_acc_limits(min(values), max(values)))
    ax.set_xlabel("assistant parameters (millions, log scale; the last assistant of each path)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(wrap_title(title, 80), fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fit_log_ticks(ax, sizes)
    declutter(ax, notes)
    return _save(fig, path)

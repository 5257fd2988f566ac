"""The answer to "does the assistant help, and by how much?", from one or more run folders.

    python -m src.report RUN_DIR [RUN_DIR ...] [--out DIR]

Writes report.md and figures/ (PNG) into RUN_DIR (one run) or --out (several runs, default
./report). Tables come from the runs' CSVs through pandas; figures from the same tables.
A run folder made with --seeds holds seed_<n>/ sub-runs: numbers are mean ± std over them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from src.distillation.config import load_config
from src.utils.logger import read_epoch_csv
from src.utils.metrics import normalized_confusion
from src.utils.training_guards import schedule_kd_alpha
from src.visualization import plots

METRICS = ["val_accuracy", "last_val_accuracy", "test_accuracy", "test_precision", "test_recall", "test_f1_score",
           "peak_gpu_memory_mb", "train_seconds", "img_per_s"]
PROTOCOL = """## Reporting protocol

- Model selection uses the validation split only (carved from the training set with a fixed seed).
- The test split is measured once per model, on its best-validation checkpoint (`best.pt`).
- "last-epoch val" shows the validation accuracy of the final epoch beside the selected one.
- Precision, recall and F1 are macro averages: every class counts equally.
- With several seeds, each cell is mean ± sample standard deviation over seeds; differences
  (TAKD − KD, KD − scratch) are computed per seed on the student and then averaged.
"""


def seed_runs(run: Path) -> list[tuple[int, Path]]:
    """[(seed, run folder)] for a --seeds run, or [(seed, run)] for a single run."""
    meta = run / "seeds.json"
    if meta.exists():
        return [(s, run / f"seed_{s}") for s in json.loads(meta.read_text())["seeds"] if (run / f"seed_{s}" / "summary.csv").exists()]
    if (run / "summary.csv").exists():
        return [(load_config(run / "config.yaml").seed, run)]
    raise FileNotFoundError(f"{run}: no summary.csv (and no seeds.json): not a finished run folder")


def fmt(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """'92.31 ± 0.12' (scaled), or '92.31' when there is no spread to show."""
    if pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def collect(runs: list[Path]) -> pd.DataFrame:
    frames = []
    labels = {}
    for run in runs:
        pairs = seed_runs(run)
        cfg = load_config(pairs[0][1] / "config.yaml")
        label = cfg.name if cfg.name not in labels.values() else f"{cfg.name} ({run.name})"
        labels[run] = label
        for seed, path in pairs:
            df = pd.read_csv(path / "summary.csv")
            df["seed"], df["run"], df["run_dir"] = seed, label, str(path)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    g = rows.groupby(["run", "stage"], sort=False)
    out = g[["model", "method", "params", "flops"]].first()
    for m in METRICS:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std()  # NaN with one seed
    out["seeds"] = g["seed"].nunique()
    return out.reset_index()


def differences(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run: TAKD − KD and KD − scratch of the student's test accuracy, paired by seed."""
    out = []
    for run, sub in rows.groupby("run", sort=False):
        acc = sub.pivot_table(index="seed", columns="stage", values="test_accuracy")
        for name, a, b in (("TAKD − KD", "student", "student_kd"), ("KD − scratch", "student_kd", "student_scratch")):
            if a in acc and b in acc:
                d = acc[a] - acc[b]
                out.append({"run": run, "difference": name, "mean": d.mean(), "std": d.std(), "seeds": len(d)})
    return pd.DataFrame(out)


def _table_md(table: pd.DataFrame) -> str:
    header = ("| run | stage | model | method | params (M) | GFLOPs/img | val acc (%) | last-epoch val (%) | "
              "test acc (%) | macro P (%) | macro R (%) | macro F1 (%) | peak GPU (MB) | train time (s) | img/s |")
    lines = [header, "|" + "---|" * 15]
    for _, r in table.iterrows():
        cells = [r["run"], r["stage"], r["model"], r["method"].upper(), f"{r['params'] / 1e6:.2f}",
                 f"{r['flops'] / 1e9:.3f}"]
        cells += [fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in
                  ("val_accuracy", "last_val_accuracy", "test_accuracy", "test_precision", "test_recall", "test_f1_score")]
        cells += [fmt(r["peak_gpu_memory_mb_mean"], r["peak_gpu_memory_mb_std"], 1, 0),
                  fmt(r["train_seconds_mean"], r["train_seconds_std"], 1, 1), fmt(r["img_per_s_mean"], r["img_per_s_std"], 1, 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _figures(rows: pd.DataFrame, table: pd.DataFrame, fig_dir: Path) -> list[Path]:
    made = []
    for run, sub in rows.groupby("run", sort=False):
        safe = "".join(ch if ch.isalnum() else "_" for ch in run)
        curves, lr, alpha = {}, {}, {}
        first_dir = Path(sub.iloc[0]["run_dir"])
        cfg = load_config(first_dir / "config.yaml")
        for stage in sub["stage"].unique():
            parts = []
            for _, r in sub[sub["stage"] == stage].iterrows():
                logs = read_epoch_csv(Path(r["run_dir"]) / stage / "epoch_log.csv")
                if logs:
                    parts.append(pd.DataFrame(logs).assign(seed=r["seed"]))
            if not parts:
                continue
            df = pd.concat(parts)
            curves[f"{stage} ({sub[sub['stage'] == stage].iloc[0]['model']})"] = df
            first = df[df["seed"] == df["seed"].iloc[0]].set_index("epoch")
            lr[stage] = first["learning_rate"]
            st = cfg.stage(stage)
            n = int(first.index.max())
            alpha[stage] = pd.Series([schedule_kd_alpha(e, n, cfg.kd.alpha_start, cfg.kd.alpha_end) if st.teacher else 0.0
                                      for e in range(1, n + 1)], index=range(1, n + 1))
        if curves:
            made.append(plots.training_curves(curves, fig_dir / f"{safe}_curves.png"))
            made.append(plots.schedules(lr, alpha, fig_dir / f"{safe}_schedules.png"))
        classes = json.loads((first_dir / "classes.json").read_text()) if (first_dir / "classes.json").exists() else None
        for stage in sub["stage"].unique():
            pred = Path(first_dir) / stage / "test_predictions.csv"
            if pred.exists():
                yp = pd.read_csv(pred, usecols=["y_true", "y_pred"]).to_numpy()
                n_cls = int(max(yp.max() + 1, 2))
                classes = classes or [str(i) for i in range(n_cls)]
                m = normalized_confusion(yp[:, 0], yp[:, 1], len(classes))
                made.append(plots.confusion_matrix_plot(m, classes, f"{run}: {stage} (test, best checkpoint)",
                                                        fig_dir / f"{safe}_confusion_{stage}.png"))
        gallery = {}
        for stage in sub["stage"].unique():
            pngs = sorted((first_dir / stage / "attention").glob("epoch_*.png"))
            if pngs:
                gallery[f"{stage}: {pngs[-1].stem}"] = pngs[-1]
        if gallery:
            made.append(plots.image_gallery(gallery, fig_dir / f"{safe}_attention_gallery.png"))
    made.append(plots.accuracy_vs_size(table, "params", "parameters (millions, log scale)",
                                       fig_dir / "accuracy_vs_params.png", scale=1e6))
    made.append(plots.accuracy_vs_size(table, "flops", "forward GFLOPs per image (log scale)",
                                       fig_dir / "accuracy_vs_flops.png", scale=1e9))
    students = table[table["stage"].isin(["student", "student_kd", "student_scratch"])]
    if len(students):
        made.append(plots.method_bars(students, fig_dir / "methods.png"))
    return made


def write_report(runs: list[Path], out: Path | None = None) -> Path:
    runs = [Path(r) for r in runs]
    out = Path(out) if out else (runs[0] if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(runs)
    table = aggregate(rows)
    diffs = differences(rows)
    figs = _figures(rows, table, out / "figures")
    seeds = sorted(rows["seed"].unique())
    lines = ["# Distillation report", "",
             f"Runs: {', '.join(str(r) for r in runs)}  ", f"Seeds: {', '.join(str(s) for s in seeds)}", "",
             "## Results per model and method", "",
             "Accuracy, precision, recall and F1 in %; cells are mean ± std over seeds.", "", _table_md(table), ""]
    if len(diffs):
        lines += ["## Does the assistant help?", "", "Student test accuracy differences, percentage points "
                  "(paired by seed):", "", "| run | difference | mean ± std (pp) | seeds |", "|---|---|---|---|"]
        for _, d in diffs.iterrows():
            lines.append(f"| {d['run']} | {d['difference']} | {fmt(d['mean'], d['std'])} | {d['seeds']} |")
        lines.append("")
    else:
        lines += ["Run with `--baselines` to add the scratch and direct-KD students and the differences.", ""]
    lines += [PROTOCOL, "## Figures", ""]
    lines += [f"![{p.stem}](figures/{p.name})" if p.parent == out / "figures" else f"![{p.stem}]({p})" for p in figs]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    table.to_csv(out / "report_table.csv", index=False)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.report", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        path = write_report(args.runs, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

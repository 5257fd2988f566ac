"""The answer to "does the assistant help, and by how much?", from one or more run folders.

    python -m src.report RUN_DIR [RUN_DIR ...] [--out DIR]

Writes report.md, report_table.csv and figures/ (PNG) into RUN_DIR (one run) or --out (several
runs, default ./report). Tables come from the runs' CSVs through pandas; figures from the same
tables. A run folder made with --seeds holds seed_<n>/ sub-runs (listed in its seeds.json):
numbers are then means over seeds with 95% intervals, and differences are tested per seed.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from ..data.sources import SOURCES
from ..distillation.methods import kd_alpha
from ..distillation.recipe import lr_schedule
from ..models import is_vit
from ..utils.errors import UserError
from ..utils.logger import read_epoch_csv, terms_columns_of
from ..runs.runfolder import RunFolder
from ..utils.metrics import normalized_confusion
from ..runs.runlock import claim
from ..utils.stats import t_interval, wilson_interval
from . import glance, tuning
from .compare import Paired, paired_differences
from ..visualization import plots

METRICS = ["val_accuracy", "last_val_accuracy", "test_accuracy", "test_precision", "test_recall", "test_f1_score",
           "peak_gpu_memory_mb", "train_seconds", "compile_seconds", "img_per_s"]
PLAN = ["micro_batch", "batch_size", "grad_checkpointing", "label_smoothing", "precision"]
METHOD_RANK = {"scratch": 0, "kd": 1}  # A − B puts the plainer method second
PROTOCOL = """## Reporting protocol

- Model selection uses the validation split only (carved from the training set with a fixed seed);
  the test split is measured once per model, on its best-validation checkpoint (`best.pt`).
  "last-epoch val" shows the final epoch's validation accuracy beside the selected one.
- Precision, recall and F1 are macro averages: every class counts equally.
- Train metrics are measured on the augmented batches while training; under mixup / cutmix they
  are scored against the mixed target's larger share (its argmax), not the unmixed label.
- Precision, recall and F1 average over the classes present in the evaluated split.
- `train_loss` in epoch_log.csv is the whole objective (1 − α)·CE + α·T²·KL; epoch_terms.csv has
  its terms. The curves plot the training CE against the targets the model was trained on (label
  smoothing and mixup / cutmix's soft targets included, on augmented images) beside the validation
  CE (hard labels, no smoothing, eval mode): not the same quantity, so a gap between them is not
  overfitting alone. The KD term is apart. `learning_rate` is the mean LR of the epoch's optimizer steps.
- Warm-up is capped at 20% of a stage's steps, so a short run still reaches its peak LR and decays.
- Label smoothing is 0 for a stage that another stage distils from (smoothed teachers transfer
  less, Müller et al. 2019, "When does label smoothing help?"); students use train.label_smoothing.
- Seeds: each stage's initial weights and data order come from (seed, stream name); the scratch,
  KD and TAKD students share one stream, so within a seed they start from the same weights and see
  the same batches: the comparison changes only the teacher. Two students are compared when they
  share model, seed stream and recipe (data, training and KD settings, LR) and differ only in what
  taught them; every such pair of a chain is reported.
- The three student variants share one plan (micro-batch, checkpointing): with batch norm,
  micro-batches would change the batch statistics, so the planner keeps the full batch whenever
  it fits (with gradient checkpointing if needed).
- Differences are paired by seed. Per seed: exact McNemar test on the test images one model gets
  right and the other wrong, and a paired bootstrap 95% interval (2,000 resamples of the test
  images). Over seeds: mean with a Student-t interval. The per-seed tests of a report are
  tested together, so their p-values are adjusted with Holm's method across all of them; the
  over-seed intervals of a report are read together too, so each is drawn at Bonferroni's level
  1 - 0.05 / m (m such intervals: all hold at once with 95%). A difference is called significant
  only when the adjusted p < 0.05 (per seed) or the corrected interval excludes 0 (over seeds);
  the same difference on every seed gives no interval (no spread to estimate the noise from) and
  reads undecided.
  Predictions are paired on the test file id.
"""
DEMO_NOTE = ("> **Pipeline check, not a result.** This run trains on toy data (scikit-learn's 8×8 digits, as the demo presets do; a few "
             "epochs): its numbers show that every stage, file and figure is produced; they say nothing about "
             "how well distillation works. For research numbers use the CIFAR presets (see the README).")


def seed_runs(run: RunFolder | Path) -> list[tuple[int, RunFolder]]:
    """[(seed, run folder)] of the finished seeds of a --seeds run, or [(seed, run)] for a single run."""
    folder = RunFolder.of(run)
    if folder.is_multi_seed:
        return list(folder.seed_runs(finished_only=True))
    if folder.finished:
        return [(folder.config().seed, folder)]
    if folder.is_run:  # started, not finished: say how to finish it
        chain = "vit" if any(is_vit(s.model) for s in folder.config().stages) else "cnn"
        raise FileNotFoundError(f"{folder.path} is not finished (no summary.csv yet): finish it with "
                                f"bash {chain}_distillation/train_{chain}.sh --resume {folder.path}, then build the report")
    raise FileNotFoundError(f"{folder.path}: no summary.csv (and no seeds.json): not a finished run folder")


def fmt(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    """'92.31 ± 0.12' (scaled), or '92.31' when there is no spread to show."""
    if pd.isna(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _correct(folder: RunFolder, stage: str) -> np.ndarray | None:
    path = folder.stage(stage).predictions
    if not path.exists():
        return None
    df = pd.read_csv(path, usecols=["y_true", "y_pred"])
    return (df["y_true"] == df["y_pred"]).to_numpy()


def is_demo(cfg) -> bool:
    """A pipeline check, not a result: a run on a data source registered as a toy (scikit-learn's
    8x8 digits), whatever the run is named and whichever models it swapped in."""
    source = SOURCES.get(cfg.data.source)
    return bool(source is not None and source.toy)


def chance_bar(classes: int) -> float:
    """Below this test accuracy a model is not clearly above chance: twice chance, or chance plus
    10 points when there are few classes."""
    chance = 1.0 / max(1, classes)
    return min(2 * chance, chance + 0.10)


ONE_CLASS_SHARE = 0.8    # a model that gives one class to this share of the test images predicts one class
RISING_POINTS = 0.01     # validation accuracy up by more than this over the last fifth of the epochs: still rising


def top_class_share(predictions: Path) -> float:
    """The share of the test images given the most frequent predicted class (1.0: a collapse)."""
    return float(pd.read_csv(predictions, usecols=["y_pred"])["y_pred"].value_counts(normalize=True).iloc[0])


def stage_problems(rows: pd.DataFrame) -> dict:
    """{run: {stage: [reasons]}}: what makes a stage's results meaningless, checked before any
    verdict: a stage that teaches another one not clearly above chance, a model that predicts
    (nearly) one class, a stage whose validation accuracy was still rising at its last epoch."""
    problems = {}
    for run, sub in rows.groupby("run", sort=False):
        teaching = {t for ts in sub["teacher"].fillna("") for t in str(ts).split("+") if t}
        for stage, st in sub.groupby("stage", sort=False):
            reasons = []
            folder = st.iloc[0]["folder"]
            classes = len(folder.classes() or []) or 10
            acc = float(st["test_accuracy"].mean())
            if stage in teaching and acc < chance_bar(classes):
                reasons.append(f"{stage} teaches at {100 * acc:.1f}% test accuracy, not clearly above chance "
                               f"({100 / classes:.0f}%)")
            shares = [top_class_share(r["folder"].stage(stage).predictions) for _, r in st.iterrows()
                      if r["folder"].stage(stage).predictions.exists()]
            if shares and max(shares) >= ONE_CLASS_SHARE:
                reasons.append(f"{stage} predicts one class for {100 * max(shares):.0f}% of the test images")
            rising = still_rising(folder.stage(stage))
            if rising:
                reasons.append(f"{stage}: validation accuracy still rising at its last epoch ({rising})")
            if reasons:
                problems.setdefault(run, {})[stage] = reasons
    return problems


def sanity(rows: pd.DataFrame) -> dict:
    """{run: [reasons]}: stage_problems of every stage of a run, in one list."""
    return {run: [r for reasons in stages.values() for r in reasons] for run, stages in stage_problems(rows).items()}


def affected(rows: pd.DataFrame, problems: Optional[dict] = None) -> dict:
    """{run: {stage: [reasons]}}: the problems a stage's results inherit, its own and those of
    every stage that taught it or its teachers (a teacher at chance spoils all it taught, and
    what those taught); a stage missing here is sound. `problems`: stage_problems(rows)."""
    problems = stage_problems(rows) if problems is None else problems
    out = {}
    for run, sub in rows.groupby("run", sort=False):
        own = problems.get(run, {})
        teachers = {st: [t for t in str(ts).split("+") if t] for st, ts in zip(sub["stage"], sub["teacher"].fillna(""))}

        def inherited(stage, seen=()):  # the teachers' reasons first, root first, then the stage's own
            found = []
            for t in teachers.get(stage, []):
                if t not in seen:
                    found += [r for r in inherited(t, (*seen, stage)) if r not in found]
            return found + [r for r in own.get(stage, []) if r not in found]
        spoiled = {st: inherited(st) for st in teachers}
        spoiled = {st: r for st, r in spoiled.items() if r}
        if spoiled:
            out[run] = spoiled
    return out


def spoiled_everywhere(rows: pd.DataFrame, spoiled: dict, run: str) -> bool:
    """Every distilled stage of `run` is affected (so is every comparison, each of which has one):
    the run as a whole says nothing about distillation."""
    sub = rows[rows["run"] == run]
    distilled = set(sub[sub["teacher"].fillna("") != ""]["stage"])
    return not distilled or distilled <= set(spoiled.get(run, {}))


BRIEF = [(re.compile(r"^(\S+) teaches at .* not clearly above chance"), "near chance"),
         (re.compile(r"^(\S+) predicts one class"), "one class"),
         (re.compile(r"^(\S+): validation accuracy still rising"), "still improving")]


def brief(reasons: list) -> str:
    """sanity()'s reasons in a few words, for a figure title: 'near chance: teacher, ta_x; one
    class: student_kd; still improving: ta_x'."""
    groups: dict = {}
    for reason in reasons:
        for pattern, words in BRIEF:
            m = pattern.match(reason)
            if m:
                groups.setdefault(words, []).append(m.group(1))
                break
        else:
            groups.setdefault(reason, [])
    return "; ".join(f"{w}: {', '.join(names)}" if names else w for w, names in groups.items())


def still_rising(stage) -> str:
    """'+3.1 points over its last 2 of 10 epochs' when the last epoch is the best one and the
    curve rose over the last fifth of the epochs; '' otherwise (or when the stage was not trained)."""
    if not stage.epoch_log.exists():
        return ""
    val = [r["val_accuracy"] for r in read_epoch_csv(stage.epoch_log)]
    if len(val) < 2 or val[-1] < max(val):
        return ""
    k = max(1, round(0.2 * len(val)))
    rise = val[-1] - val[-1 - k]
    return f"+{100 * rise:.1f} points over its last {k} of {len(val)} epochs" if rise > RISING_POINTS else ""


def collect(runs: list) -> pd.DataFrame:
    """One row per stage and seed of every run (RunFolder or path), with its folder (`folder`:
    the RunFolder every later reader takes its files from; `run_dir`: its path, for the tables)."""
    frames = []
    labels = {}
    for run in map(RunFolder.of, runs):
        pairs = seed_runs(run)
        cfg = pairs[0][1].config()
        label = cfg.name if cfg.name not in labels.values() else f"{cfg.name} ({run.path.name})"
        labels[run.path] = label
        for seed, folder in pairs:
            df = with_stream_and_recipe(pd.read_csv(folder.summary_csv), folder)
            env = folder.env()
            df["seed"], df["run"], df["run_dir"] = seed, label, str(folder.path.resolve())
            df["folder"] = [folder] * len(df)
            df["device"], df["demo"] = str(env.get("device", "")), is_demo(cfg)
            df["dataset"] = dataset_label(cfg.data)
            frames.append(df)
    return pd.concat(frames, ignore_index=True)


def dataset_label(d) -> str:
    """The data a run trained on, for titles: 'CIFAR-10', or an image folder's (or tarball's)
    name, with the train subset when there is one."""
    name = SOURCES[d.source].title if d.source in SOURCES and d.source != "imagefolder" else None
    if name is None:
        name = Path(str(d.root)).name
        for suffix in (".tar.gz", ".tgz", ".tar"):
            name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name + (f" ({d.max_train_samples:,} train images)" if d.max_train_samples else "")


def with_stream_and_recipe(df: pd.DataFrame, folder: RunFolder) -> pd.DataFrame:
    """Runs from before summary.csv named each stage's seed stream and recipe: taken from
    stage.json (the initial-weights seed stands for the stream; the recipe counts as shared)."""
    df = df.copy()
    if "seed_stream" not in df:
        df["seed_stream"] = [str(folder.stage(st).summary().get("init_seed", st)) if folder.stage(st).finished else st
                             for st in df["stage"]]
    if "recipe" not in df:
        df["recipe"] = ""
    if "method_label" not in df:
        df["method_label"] = df["method"]
    df["teacher"] = df["teacher"].fillna("") if "teacher" in df else ""
    return df


def comparisons(stages: pd.DataFrame) -> list[tuple[str, str, str]]:
    """[(name, A, B)]: every pair of stages (rows of one run and seed) that share model, seed
    stream and recipe and differ in what taught them, A − B with the plainer method as B
    (scratch, then KD from the teacher, then the rest in chain order)."""
    out = []
    order = {st: i for i, st in enumerate(stages["stage"])}
    for _, group in stages.groupby(["model", "seed_stream", "recipe"], sort=False):
        if len(group) < 2:
            continue
        tags = _tags(group)
        ranked = sorted(group.itertuples(), key=lambda r: (-METHOD_RANK.get(r.method, 2), not r.stage.endswith("_tuned"),
                                                           order[r.stage]))  # a tuned stage is A against its declared one
        for i, a in enumerate(ranked):
            for b in ranked[i + 1:]:
                out.append((f"{tags[a.stage]} − {tags[b.stage]}", a.stage, b.stage))
    return out


def _tags(group: pd.DataFrame) -> dict:
    """Short names: scratch, KD, TAKD, DENSE, ...; with the teachers where two would read alike."""
    base = {r.stage: {"scratch": "scratch", "kd": "KD"}.get(r.method, str(r.method).upper())
            + (" tuned" if r.stage.endswith("_tuned") else "") for r in group.itertuples()}
    counts = pd.Series(list(base.values())).value_counts()
    return {r.stage: base[r.stage] + (f" via {r.teacher}" if counts[base[r.stage]] > 1 else "")
            for r in group.itertuples()}


def aggregate(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per run and stage: means and std over seeds, and a 95% interval of test accuracy
    (t over seeds; one seed: the binomial interval of its test set)."""
    for col in PLAN + ["compile_seconds"]:
        if col not in rows:
            rows[col] = np.nan
    g = rows.groupby(["run", "stage"], sort=False)
    if "role" not in rows:
        rows["role"] = ""
    out = g[["model", "role", "method", "method_label", "teacher", "params", "flops", "device", "demo"] + PLAN].first()
    for m in METRICS:
        out[f"{m}_mean"] = g[m].mean()
        out[f"{m}_std"] = g[m].std()  # NaN with one seed
    out["seeds"] = g["seed"].nunique()
    out = out.reset_index()
    lows, highs, values = [], [], []
    for _, r in out.iterrows():
        sub = rows[(rows["run"] == r["run"]) & (rows["stage"] == r["stage"])]
        accs = sub["test_accuracy"].to_numpy(float)
        values.append(list(accs))
        if len(accs) > 1:
            _, lo, hi = t_interval(accs)
            lo, hi = max(lo, 0.0), min(hi, 1.0)  # an accuracy stays in [0, 1]
        else:
            correct = _correct(sub.iloc[0]["folder"], r["stage"])
            n = len(correct) if correct is not None else 0
            lo, hi = wilson_interval(int(round(accs[0] * n)), n) if n else (accs[0], accs[0])
        lows.append(lo)
        highs.append(hi)
    out["ci_low"], out["ci_high"], out["seed_values"] = lows, highs, values
    return out


def differences(rows: pd.DataFrame) -> pd.DataFrame:
    """Per run and comparison (every pair `comparisons` finds in the chain): one row per seed
    (McNemar, bootstrap interval) and one over seeds (t interval), by the one pipeline of compare.py."""
    pairs = []
    for run, sub in rows.groupby("run", sort=False):
        first_seed = sub[sub["seed"] == sub["seed"].iloc[0]]
        seeds = [(seed, ss.iloc[0]["folder"], set(ss["stage"])) for seed, ss in sub.groupby("seed")]
        for name, a, b in comparisons(first_seed):
            pairs.append(Paired(run, name, a, b, [(seed, folder) for seed, folder, stages in seeds
                                                  if a in stages and b in stages]))
    return paired_differences(pairs)


def _pp(v: float) -> str:
    return f"{v * 100:+.2f}"


def _diff_md(diffs: pd.DataFrame, problems: Optional[dict] = None) -> list[str]:
    """The differences table; `problems`: affected(), whose stages' rows read "not interpretable"."""
    lines = ["| run | difference | seed | Δ test acc (pp) | 95% interval (pp) | only A right / only B right | "
             "McNemar p (Holm) | verdict |", "|" + "---|" * 8]
    for _, d in diffs.iterrows():
        over = str(d["seed"]).startswith("mean")
        counts = "" if over else f"{int(d['only_a'])} / {int(d['only_b'])}"
        p = "" if over else f"{d['p_value']:.3g} ({d['p_holm']:.3g})"
        verdict = ("**significant**" if d["significant"] else "not significant") + (
            f" ({100 * d['level']:.1f}% t interval, Bonferroni{_family_words(d)})" if over
            else f" (Holm-adjusted p {'<' if d['significant'] else '≥'} 0.05)")
        if over and pd.isna(d["low"]):
            verdict = "undecided (the same difference on every seed: no spread to estimate the noise from)"
        spoiled = (problems or {}).get(d["run"], {})
        if d["a"] in spoiled or d["b"] in spoiled:  # a broken stage in the pair, or in the chain that taught it
            verdict = f"not interpretable (see above; the test alone: {verdict.replace('**', '')})"
        lines.append(f"| {d['run']} | {d['difference']} | {d['seed']} | {_pp(d['mean'])} | "
                     f"[{_pp(d['low'])}, {_pp(d['high'])}] | {counts} | {p} | {verdict} |")
    return lines


def _family_words(d) -> str:
    """' over the N over-seed comparisons of this report', or nothing for a row that does not say (an older table)."""
    family = d.get("family")
    return "" if family is None or pd.isna(family) else f" over the {int(family)} over-seed comparisons of this report"


def _table_md(table: pd.DataFrame) -> str:
    header = ("| run | stage | model | role | method | params (M) | GFLOPs/img | batch (micro) | ckpt | val acc (%) | "
              "last-epoch val (%) | test acc (%) | test 95% interval (%) | macro P (%) | macro R (%) | macro F1 (%) | "
              "peak GPU reserved (MB) | train (s) | compile (s) | img/s |")
    lines = [header, "|" + "---|" * 20]
    for _, r in table.iterrows():
        micro = r["micro_batch"]
        batch = f"{int(r['batch_size'])}" + (f" ({int(micro)})" if pd.notna(micro) and micro != r["batch_size"] else "") \
            if pd.notna(r["batch_size"]) else ""
        cells = [r["run"], r["stage"], r["model"], r.get("role") or "", r["method"].upper(), f"{r['params'] / 1e6:.2f}",
                 f"{r['flops'] / 1e9:.3f}", batch, "yes" if r["grad_checkpointing"] is True else "no"]
        cells += [fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in ("val_accuracy", "last_val_accuracy", "test_accuracy")]
        cells.append(f"[{r['ci_low'] * 100:.2f}, {r['ci_high'] * 100:.2f}]")
        cells += [fmt(r[f"{m}_mean"], r[f"{m}_std"]) for m in ("test_precision", "test_recall", "test_f1_score")]
        on_gpu = str(r["device"]).startswith("cuda")
        cells.append(fmt(r["peak_gpu_memory_mb_mean"], r["peak_gpu_memory_mb_std"], 1, 0) if on_gpu else "n/a (CPU)")
        if not r["train_seconds_mean"] and not r["img_per_s_mean"]:  # a checkpoint handed in: nothing trained here
            cells += ["loaded", "–", "loaded"]
        else:
            cells += [fmt(r["train_seconds_mean"], r["train_seconds_std"], 1, 1),
                      fmt(r["compile_seconds_mean"], r["compile_seconds_std"], 1, 1) if r["compile_seconds_mean"] else "–",
                      fmt(r["img_per_s_mean"], r["img_per_s_std"], 1, 0)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _stage_logs(run: RunFolder, stage: str) -> pd.DataFrame | None:
    folder = run.stage(stage)
    logs = read_epoch_csv(folder.epoch_log)
    if not logs:
        return None
    df = pd.DataFrame(logs)
    if folder.terms.exists():
        df = df.merge(pd.DataFrame(read_epoch_csv(folder.terms, terms_columns_of(folder.terms))), on="epoch", how="left")
    else:  # a run from before epoch_terms.csv: the objective is the CE only without a teacher
        df["train_ce"], df["train_kd"], df["steps"] = df["train_loss"], np.nan, np.nan
    return df


def _logged_schedule(run: RunFolder, stage: str):
    """(LR per optimizer step indexed by fractional epoch, alpha per epoch) as the run applied and
    logged them (schedule.csv), or None for a run from before that file."""
    path = run.stage(stage).schedule
    if not path.exists():
        return None
    df = pd.read_csv(path)
    if df.empty:
        return None
    per_epoch = df.groupby("epoch")["step"].transform("count")
    first_step = df.groupby("epoch")["step"].transform("min")
    position = df["epoch"] - 1 + (df["step"] - first_step) / per_epoch  # epochs completed at that step
    alpha = df.groupby("epoch")["alpha"].first()
    return pd.Series(df["lr"].to_numpy(), index=position.to_numpy()), alpha


def _recomputed_schedule(cfg, st, lr: float, first: pd.DataFrame):
    n = int(first.index.max())
    steps = first["steps"].iloc[0]
    lr_series = None
    if pd.notna(steps) and steps > 0:
        per_step = lr_schedule(lr, cfg.train, n, int(steps))
        lr_series = pd.Series(per_step, index=np.arange(len(per_step)) / steps)
    alpha = pd.Series([kd_alpha(cfg, st, e, n) if st.teachers else 0.0
                       for e in range(1, n + 1)], index=range(1, n + 1))
    return lr_series, alpha


def figure_title(rows: pd.DataFrame, problems: dict, partly: Sequence = ()) -> str:
    """'run on dataset' (or the runs and datasets of a comparison), and 'not interpretable' with
    its reasons where a run is broken ('partly not interpretable' where only some of its stages
    are: the runs in `partly`)."""
    runs = list(dict.fromkeys(rows["run"]))
    sets = list(dict.fromkeys(rows["dataset"])) if "dataset" in rows else []
    title = f"{', '.join(runs)} on {', '.join(sets)}" if sets else ", ".join(runs)
    words = {run: "partly not interpretable" if run in partly else "not interpretable" for run in runs}
    broken = [f"{run} {words[run]}: " + brief(problems[run]) if len(runs) > 1 else f"{words[run]}: " + brief(problems[run])
              for run in runs if problems.get(run)]
    return title + (f" ({' | '.join(broken)})" if broken else "")


def _figures(rows: pd.DataFrame, table: pd.DataFrame, fig_dir: Path, problems: Optional[dict] = None,
             partly: Sequence = ()) -> list[Path]:
    """Every figure of the report: per run its curves, schedules, confusion matrices and attention
    gallery; then accuracy against size, and the students' methods over every run."""
    made, problems = [], problems or {}
    for run, sub in rows.groupby("run", sort=False):
        made += _run_figures(run, sub, fig_dir, figure_title(sub, problems, partly))
    title = figure_title(rows, problems, partly)
    made.append(plots.accuracy_vs_size(table, "params", "parameters (millions, log scale)",
                                       fig_dir / RunFolder.FIG_PARAMS, scale=1e6, title=title))
    made.append(plots.accuracy_vs_size(table, "flops", "forward GFLOPs per image (log scale)",
                                       fig_dir / RunFolder.FIG_FLOPS, scale=1e9, title=title))
    return made + _method_figures(rows, table, fig_dir, title)


def _run_figures(run: str, sub: pd.DataFrame, fig_dir: Path, title: str) -> list[Path]:
    """One run's curves and schedules (every seed), confusion matrices and attention gallery (its
    first seed's folder)."""
    made = []
    safe = "".join(ch if ch.isalnum() else "_" for ch in run)
    folder, first_seed = sub.iloc[0]["folder"], sub.iloc[0]["seed"]
    curves, lr, alpha = _curves_and_schedules(sub, folder, first_seed)
    if curves:
        n_classes = len(folder.classes() or [])
        made.append(plots.training_curves(curves, fig_dir / RunFolder.FIG_CURVES.format(run=safe), n_classes, title=title))
        made.append(plots.schedules({k: v for k, v in lr.items() if v is not None}, alpha,
                                    fig_dir / RunFolder.FIG_SCHEDULES.format(run=safe), title=title))
    classes = folder.classes()
    for stage in sub["stage"].unique():
        pred = folder.stage(stage).predictions
        if pred.exists():
            yp = pd.read_csv(pred, usecols=["y_true", "y_pred"]).to_numpy()
            names = classes or [str(i) for i in range(int(max(yp.max() + 1, 2)))]
            m = normalized_confusion(yp[:, 0], yp[:, 1], len(names))
            seeds_note = f", seed {first_seed}" + (f" of {sub['seed'].nunique()}" if sub["seed"].nunique() > 1 else "")
            made.append(plots.confusion_matrix_plot(m, names, f"{run}: {stage} (test, best checkpoint{seeds_note})",
                                                    fig_dir / RunFolder.FIG_CONFUSION.format(run=safe, stage=stage)))
    gallery = {}
    for stage in sub["stage"].unique():
        pngs = [p for p in sorted(folder.stage(stage).attention.glob("epoch_*.png")) if plots.readable_image(p)]
        if pngs:  # the latest map that reads (one cut by a full disk or an older version's kill is passed over)
            gallery[stage] = pngs[-1]
    if gallery:
        made.append(plots.image_gallery(gallery, fig_dir / RunFolder.FIG_GALLERY.format(run=safe)))
    return made


def _curves_and_schedules(sub: pd.DataFrame, first: RunFolder, first_seed) -> tuple[dict, dict, dict]:
    """Per stage its epoch logs over seeds ({"stage (model)": frame}) and its LR and alpha per
    step (logged, or recomputed from the config for a run from before schedule.csv)."""
    curves, lr, alpha = {}, {}, {}
    cfg = first.config()
    for stage in sub["stage"].unique():
        parts = []
        for _, r in sub[sub["stage"] == stage].iterrows():
            df = _stage_logs(r["folder"], stage)
            if df is not None:
                parts.append(df.assign(seed=r["seed"]))
        if not parts:
            continue
        df = pd.concat(parts)
        srow = sub[sub["stage"] == stage].iloc[0]
        taught = f" ← {srow['teacher']}" if isinstance(srow.get("teacher"), str) and srow["teacher"] else ""
        curves[f"{stage} ({srow['model']}){taught}"] = df  # the TAKD student with its path: student ← ta_...
        logged = _logged_schedule(first, stage)
        if logged is not None:
            lr[stage], alpha[stage] = logged
        else:
            first_log = df[df["seed"] == first_seed].set_index("epoch")
            lr[stage], alpha[stage] = _recomputed_schedule(cfg, cfg.stage(stage), float(srow["lr"]), first_log)
    return curves, lr, alpha


def _method_figures(rows: pd.DataFrame, table: pd.DataFrame, fig_dir: Path, title: str) -> list[Path]:
    """The compared students by method, and (one run with methods beyond KD) direct against via."""
    compared = {st for run, sub in rows.groupby("run", sort=False)
                for _, a, b in comparisons(sub[sub["seed"] == sub["seed"].iloc[0]]) for st in (a, b)}
    students = table[table["stage"].isin(compared)]
    if not len(students):
        return []
    missing = "" if {"scratch", "kd"} <= set(students["method"]) else "scratch and KD students: run with --baselines"
    made = [plots.method_points(students, fig_dir / RunFolder.FIG_METHODS, note=missing, title=title)]
    if set(students["method"]) - {"scratch", "kd", "takd", "dense"} and rows["run"].nunique() == 1:
        root = str(rows[rows["role"] == "teacher"]["stage"].iloc[0]) if (rows["role"] == "teacher").any() \
            else str(rows["stage"].iloc[0])
        made.append(plots.method_comparison(students, fig_dir / RunFolder.FIG_METHODS_VIA, root, title=title))
    return made


def _path_of(stage: str, teachers: dict) -> list:
    """The stages above `stage` along its first teachers, root first: [teacher, ta_x, stage]."""
    path = [stage]
    while teachers.get(path[0]):
        path.insert(0, teachers[path[0]].split("+")[-1])
    return path


COMPARED_METHODS = ("dkd", "dist", "fitnet", "at")  # src/distillation/methods/: compared by --methods, not as paths


def sweep_answer(rows: pd.DataFrame, table: pd.DataFrame, diffs: pd.DataFrame, problems: Optional[dict] = None) -> list:
    """Per run with a directly distilled student and at least one taught through an assistant:
    [(run, points, refs, verdict lines)]. Every student compared with the direct-KD one (the
    tests come from `differences`, Holm-corrected across the report). `problems`: affected()."""
    answers = []
    for run, sub in rows.groupby("run", sort=False):
        first = sub[sub["seed"] == sub["seed"].iloc[0]]
        teachers = dict(zip(first["stage"], first["teacher"].fillna("")))
        t_run = table[table["run"] == run].set_index("stage")
        run_diffs = diffs[diffs["run"] == run] if len(diffs) else diffs
        for _, group in first.groupby(["model", "seed_stream", "recipe"], sort=False):
            kd = group[group["method"] == "kd"]
            # the assistant paths: students taught through an assistant by KD (takd), dense guidance or a
            # method of one's own; the field's methods (--methods) are compared with each other apart
            taught = group[~group["method"].isin(["kd", "scratch", *COMPARED_METHODS])
                           & group["stage"].map(lambda st: len(_path_of(st, teachers)) > 2)]
            if kd.empty or taught.empty:
                continue
            kd_stage = kd.iloc[0]["stage"]
            pts = pd.DataFrame([_sweep_point(st, taught, teachers, t_run, run_diffs, kd_stage)
                                for st in taught["stage"]]).sort_values("assistant_params")
            clash = pts["path"].duplicated(keep=False)  # one model with other settings (a narrower ViT): name the stages
            pts.loc[clash, "path"] = [" → ".join(a.removeprefix("ta_") for a in _path_of(st, teachers)[1:-1])
                                      for st in pts.loc[clash, "stage"]]
            verdict = _sweep_verdict(pts, sub["seed"].nunique() > 1)
            spoiled = (problems or {}).get(run, {})
            reasons = list(dict.fromkeys(r for st in [kd_stage, *taught["stage"]] for r in spoiled.get(st, [])))
            if reasons:  # a broken stage in the answer or in the chain that taught it: no verdict, whatever the tests say
                verdict = f"not interpretable: {'; '.join(reasons)} (the tests alone: {verdict})"
                pts["verdict"] = "not interpretable"
            answers.append((run, pts, _sweep_refs(group, t_run, teachers[kd_stage], kd_stage), verdict))
    return answers


def _sweep_point(st: str, taught: pd.DataFrame, teachers: dict, t_run: pd.DataFrame, run_diffs: pd.DataFrame,
                 kd_stage: str) -> dict:
    """One assistant path: its label, assistant size, accuracy and its test against direct KD."""
    path = _path_of(st, teachers)
    several = teachers[st].split("+")
    model = lambda stage: t_run.loc[stage, "model"] if stage in t_run.index else stage  # noqa: E731
    label = (" → ".join(model(a) for a in path[1:-1]) if len(several) == 1
             else f"{taught.set_index('stage').loc[st, 'method']}: {' + '.join(several)}")
    r = t_run.loc[st]
    d = run_diffs[(run_diffs["a"] == st) & (run_diffs["b"] == kd_stage)] if len(run_diffs) else run_diffs
    per_seed = d[d["p_value"].notna()] if len(d) else d
    over = d[d["p_value"].isna()] if len(d) else d
    beats = bool(len(per_seed)) and bool((per_seed["significant"] & (per_seed["mean"] > 0)).all()) and (
        over.empty or bool((over["low"] > 0).all()))
    worse = bool(len(per_seed)) and bool((per_seed["significant"] & (per_seed["mean"] < 0)).all())
    mean = float(over["mean"].iloc[0]) if len(over) else float(per_seed["mean"].mean()) if len(per_seed) else np.nan
    return {"path": label, "stage": st, "assistant": path[-2],
            "assistant_params": float(t_run.loc[path[-2], "params"]),
            "acc": r["test_accuracy_mean"] * 100, "lo": r["ci_low"] * 100, "hi": r["ci_high"] * 100,
            "delta_pp": mean * 100, "p_holm_max": float(per_seed["p_holm"].max()) if len(per_seed) else np.nan,
            "verdict": "beats direct KD" if beats else "worse than direct KD" if worse
            else "not distinguishable from direct KD"}


def _sweep_refs(group: pd.DataFrame, t_run: pd.DataFrame, root: str, kd_stage: str) -> dict:
    """The reference lines of the sweep figure: teacher, direct KD and scratch (mean, low, high in %)."""
    refs = {}
    for name, stage in (("teacher", root), ("direct KD", kd_stage),
                        ("scratch", next(iter(group[group["method"] == "scratch"]["stage"]), None))):
        if stage in t_run.index:
            r = t_run.loc[stage]
            refs[name] = (r["test_accuracy_mean"] * 100, r["ci_low"] * 100, r["ci_high"] * 100)
    return refs


def _sweep_verdict(pts: pd.DataFrame, several_seeds: bool) -> str:
    winners = pts[pts["verdict"] == "beats direct KD"]
    if len(winners):
        return ("assistant path(s) " + ", ".join(winners["path"]) + " beat direct KD at p < 0.05 after "
                "Holm's correction" + (" in every seed" if several_seeds else ""))
    return "no assistant beats direct KD at p < 0.05 after Holm's correction"


def _sweep_md(answers: list) -> list:
    lines = ["## Which assistant helps?", ""]
    for run, pts, refs, verdict in answers:
        ref_text = "; ".join(f"{k} {v[0]:.2f}%" for k, v in refs.items())
        lines += [f"**{run}**: {verdict}. References: {ref_text}.", "",
                  "| path (assistants) | last assistant params (M) | student test acc (%) | 95% interval (%) | "
                  "Δ vs direct KD (pp) | largest Holm p over seeds | verdict |", "|" + "---|" * 7]
        for _, p in pts.iterrows():
            lines.append(f"| {p['path']} | {p['assistant_params'] / 1e6:.2f} | {p['acc']:.2f} | "
                         f"[{p['lo']:.2f}, {p['hi']:.2f}] | {p['delta_pp']:+.2f} | {p['p_holm_max']:.3g} | {p['verdict']} |")
        lines.append("")
    return lines


def _broken_md(problems: dict, partly: Sequence, spoiled: dict) -> list:
    """The banner over a report with broken stages: the whole run, or the comparisons they are in."""
    lines = []
    for run, reasons in problems.items():
        if run not in partly:
            lines += [f"> **{run}: not interpretable.** Its comparisons say nothing about distillation, whatever "
                      f"their p-values: " + "; ".join(reasons) + ". Train longer (or fix the recipe) before "
                      "reading any verdict below.", ""]
        else:
            names = ", ".join(spoiled.get(run, {}))
            lines += [f"> **{run}: partly not interpretable.** " + "; ".join(reasons) + f". Comparisons that "
                      f"involve {names} say nothing about distillation, whatever their p-values (they read \"not "
                      "interpretable\" below); the others stand.", ""]
    return lines


def write_report(runs: list, out: Path | None = None) -> Path:
    """report.md, its tables and figures for finished run folders (RunFolder or path), in `out`
    (default: the one run's folder, or ./report for several)."""
    runs = [RunFolder(RunFolder.of(r).path.resolve()) for r in runs]
    out = Path(out) if out else (runs[0].path if len(runs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(runs)
    table = aggregate(rows)
    diffs = differences(rows)
    problems = sanity(rows)
    spoiled = affected(rows)
    partly = [run for run in problems if not spoiled_everywhere(rows, spoiled, run)]
    figs = _figures(rows, table, out / RunFolder.FIGURES, problems, partly)
    answers = sweep_answer(rows, table, diffs, spoiled)
    for run, pts, refs, verdict in answers:
        safe = "".join(ch if ch.isalnum() else "_" for ch in run)
        broken = verdict.startswith("not interpretable")
        figs.insert(0, plots.assistant_sweep(pts, refs, out / RunFolder.FIGURES / RunFolder.FIG_SWEEP.format(run=safe),
                                             figure_title(rows[rows["run"] == run], problems if broken else {})
                                             + ("" if broken else f": {verdict}")))
    seeds = sorted(rows["seed"].unique())
    lines = ["# Distillation report", ""]
    if rows["demo"].any():
        lines += [DEMO_NOTE, ""]
    lines += _broken_md(problems, partly, spoiled)
    lines += glance.runs_table(rows)
    lines += [f"Runs: {', '.join(str(r.path) for r in runs)}  ", f"Seeds: {', '.join(str(s) for s in seeds)}", "",
              "## Results per model and method", "",
              "Accuracy, precision, recall and F1 in %; cells are mean ± std over seeds; the test interval is the "
              "95% t interval over seeds (one seed: the binomial interval of the test set). img/s is over the whole "
              "run's training; compile time is apart from training time. Times and img/s depend on whatever "
              "else the machine was doing: compare them within a run, on an otherwise idle machine.", "",
              _table_md(table), ""]
    if (table["seeds"] == 2).any():
        lines += ["With two seeds a 95% t interval uses t = 12.7 (one degree of freedom): it is nearly "
                  "uninformative; three or more seeds narrow it quickly.", ""]
    if answers:
        lines += _sweep_md(answers)
    lines += glance.section(rows, table)
    if len(diffs):
        lines += ["## Does the assistant help?", "",
                  "Student test-accuracy differences in percentage points, A − B on the same test images:", ""]
        lines += _diff_md(diffs, spoiled) + [""]
        if not diffs["significant"].any():
            lines += ["None of these differences is statistically significant: at this test-set size and number of "
                      "seeds, the methods cannot be told apart.", ""]
    else:
        lines += ["Run with `--baselines` to add the scratch and direct-KD students and the paired tests.", ""]
    tuned_lines, tuned_figs = tuning.section(rows, table, diffs, out / RunFolder.FIGURES)
    lines += tuned_lines
    figs += tuned_figs
    lines += [PROTOCOL, "## Figures", ""]
    lines += [f"![{p.stem}]({RunFolder.FIGURES}/{p.name})" if p.parent == out / RunFolder.FIGURES else f"![{p.stem}]({p})" for p in figs]
    path = out / RunFolder.REPORT
    path.write_text("\n".join(lines) + "\n")
    table.drop(columns=["seed_values"]).to_csv(out / RunFolder.REPORT_TABLE, index=False)
    if len(diffs):
        diffs.to_csv(out / RunFolder.REPORT_DIFFS, index=False)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False,
        prog="python -m src.report",
        description="Build report.md, report_table.csv and figures/ from finished run folders: one row per model "
                    "and method, paired significance tests between the scratch, KD and TAKD students, curves, "
                    "schedules, confusion matrices, accuracy against size, attention maps.")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="a run folder (with summary.csv) or a --seeds run folder (with seeds.json); several to compare")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write (default: the run folder itself for one run, ./report for several)")
    args = p.parse_args(argv)
    runs = [Path(r).resolve() for r in args.runs]
    target = args.out.resolve() if args.out else (runs[0] if len(runs) == 1 else Path("report").resolve())
    try:  # the folder written (a run's own, by default) is claimed: never while its training writes it
        with claim(target, "writing its report") if target.is_dir() or args.out else contextlib.nullcontext():
            path = write_report(runs, target)
    except (FileNotFoundError, ValueError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

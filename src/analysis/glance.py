"""The methods at a glance: one compact table per run with several distillation methods, method x
{from the teacher, via each assistant}, each cell the test accuracy's mean [95% interval] over
seeds and its difference to KD on the same path; the pairwise tests follow it in the report.
A student far below the one trained from scratch gets a line naming the term that dominated
its loss (measured from its epoch_terms.csv, not assumed)."""
from __future__ import annotations

import pandas as pd

FAR_BELOW = 0.10  # a student this far (10 points) below scratch: its loss is worth a look


def _cell(r, kd) -> str:
    text = f"{100 * r['test_accuracy_mean']:.2f} [{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]"
    if kd is not None and r["stage"] != kd["stage"]:
        text += f" (KD {100 * (r['test_accuracy_mean'] - kd['test_accuracy_mean']):+.2f})"
    return text


def dominant_term(folder, stage: str, method: str = "") -> str:
    """'its fitnet term (weight 100) was 18x its cross-entropy over the first third of its epochs',
    from the stage's epoch_terms.csv (each term times its weight, as the loss adds them), or ''."""
    path = folder.stage(stage).terms
    if not path.exists():
        return ""
    head = pd.read_csv(path)
    head = head.head(max(1, len(head) // 3))
    terms = [c for c in head.columns if c.startswith("train_") and c not in ("train_ce", "train_seconds", "train_loss")]
    if "train_ce" not in head or not terms or "alpha" not in head:
        return ""
    weight = float(head["alpha"].mean())
    own = weight > 1  # a method's own weight (FitNets' 100, AT's 1000) beside CE at 1; KD's alpha mixes the two
    distil = float(sum((head[c].abs() * head["alpha"]).mean() for c in terms))
    ce = float(head["train_ce"].abs().mean()) * (1.0 if own else max(1e-12, 1 - weight))
    if not ce or distil <= 2 * ce:
        return ""
    return (f"its {method or 'distillation'} term (weight {weight:g}) was {distil / ce:.0f}x its cross-entropy over "
            f"the first third of its epochs")


def section(rows: pd.DataFrame, table: pd.DataFrame) -> list:
    """Markdown lines: the table per run with at least one method beside KD; [] otherwise."""
    lines = []
    for run, sub in table.groupby("run", sort=False):
        taught = sub[sub["method"].notna() & ~sub["method"].isin(["scratch"]) & (sub["role"] != "assistant")
                     & (sub["role"] != "teacher")]
        methods = [m for m in dict.fromkeys(taught["method"]) if m not in ("kd", "takd", "dense")]
        if not methods:
            continue
        first = rows[rows["run"] == run].iloc[0]["folder"]
        teacher = first.config().stages[0].name
        paths = [teacher] + [t for t in dict.fromkeys(taught["teacher"]) if t and t != teacher and "+" not in t]
        kd_of = {p: next((r for _, r in taught.iterrows() if r["method"] in ("kd", "takd") and r["teacher"] == p
                          and not r["stage"].endswith("_tuned")), None) for p in paths}
        head = ["method"] + ["from the teacher" if p == teacher else f"via {p}" for p in paths]
        lines += [f"### {run}: the methods at a glance", "",
                  "Test accuracy (%), mean [95% t interval] over seeds; in brackets the difference to KD on the same "
                  "path. The paired tests follow below.", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        scratch = sub[(sub["method"] == "scratch") & ~sub["role"].isin(["teacher", "assistant"])]  # the student alone
        if len(scratch):
            s = scratch.iloc[0]
            lines.append(f"| scratch | {_cell(s, None)} |" + " |" * (len(paths) - 1))
        for m in ["kd", *methods]:
            cells = []
            for p in paths:
                hit = taught[(taught["teacher"] == p) & (taught["method"].isin(["kd", "takd"] if m == "kd" else [m]))
                             & ~taught["stage"].str.endswith("_tuned")]
                cells.append(_cell(hit.iloc[0], kd_of[p]) if len(hit) else "–")
            lines.append(f"| {m.upper() if m != 'kd' else 'KD'} | " + " | ".join(cells) + " |")
        lines.append("")
        if len(scratch):
            floor = scratch.iloc[0]["test_accuracy_mean"] - FAR_BELOW
            for _, r in taught[taught["test_accuracy_mean"] < floor].iterrows():
                why = dominant_term(first, r["stage"], r["method"])
                lines.append(f"- {r['stage']} ({r['method']}) ends {100 * (scratch.iloc[0]['test_accuracy_mean'] - r['test_accuracy_mean']):.1f} "
                             f"points below scratch" + (f": {why}; its weight swamps the labels in a run this short "
                                                        f"(see the method's weight in docs/methods.md)" if why else ""))
            lines.append("")
    return lines


def runs_table(rows: pd.DataFrame) -> list:
    """Several runs compared (`python -m src.report A B --out DIR`): one row per run with what a
    researcher sorts by: dataset, epochs, T, the KD weight, the methods' own weights, seeds, and the
    teacher's and assistants' test accuracy (mean over seeds)."""
    if rows["run"].nunique() < 2:
        return []
    lines = ["## The runs compared", "",
             "| run | dataset | epochs | T | KD weight (alpha) | methods' weights | seeds | teacher acc (%) | "
             "assistant acc (%) |", "|" + "---|" * 9]
    for run, sub in rows.groupby("run", sort=False):
        cfg = sub.iloc[0]["folder"].config()
        kd = cfg.kd
        alpha = f"{kd.alpha_start:g}" if kd.alpha_start == kd.alpha_end else f"{kd.alpha_start:g} → {kd.alpha_end:g}"
        weights = sorted({f"{s.method} {', '.join(f'{k}={v}' for k, v in s.method_args.items())}"
                          for s in cfg.stages if s.method and s.method_args})
        acc = lambda role: ", ".join(f"{st} {100 * g['test_accuracy'].mean():.2f}"  # noqa: E731
                                     for st, g in sub[sub["role"] == role].groupby("stage", sort=False)) or "–"
        lines.append(f"| {run} | {sub.iloc[0]['dataset']} | {cfg.train.epochs} | {kd.temperature:g} | {alpha} | "
                     f"{'; '.join(weights) or 'defaults'} | {sub['seed'].nunique()} | {acc('teacher')} | "
                     f"{acc('assistant')} |")
    return lines + [""]

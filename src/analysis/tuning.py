"""The report's section on a search (src/experiment/search.py): per tuned stage, the declared
values against the tuned ones on validation and test, the paired comparisons after tuning, and
the search's figures (optimisation history, parameter importance) from
optuna.visualization.matplotlib, in the report's style."""
from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from ..spec.names import DIRECT_KD, path_student



def tuned_records(rows: pd.DataFrame) -> dict:
    """{run: {tuned stage: record}} from each run's config (`tuned:`, written by the search); each
    record also names the folders where its journal may lie now (`_dirs`: the seed's run folder and
    the study's, for a run folder moved since)."""
    out = {}
    for run, sub in rows.groupby("run", sort=False):
        folder = sub.iloc[0]["folder"]
        cfg = folder.config()
        if cfg.tuned:
            dirs = [str(folder.path), str(folder.path.parent)]
            out[run] = {name: {**rec, "_dirs": dirs} for name, rec in cfg.tuned.items()}
    return out


def _mean(table: pd.DataFrame, run: str, stage: str, metric: str) -> float:
    hit = table[(table["run"] == run) & (table["stage"] == stage)]
    return float(hit[f"{metric}_mean"].iloc[0]) if len(hit) else float("nan")


def _values(rec: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in rec["values"].items())


def _over_seeds(diffs: pd.DataFrame, run: str, a: str, b: str):
    """The comparison a - b over seeds (else its one seed's row), or None."""
    if not len(diffs):
        return None
    hit = diffs[(diffs["run"] == run) & (diffs["a"] == a) & (diffs["b"] == b)]
    over = hit[hit["seed"].astype(str).str.startswith("mean")]
    return (over if len(over) else hit).iloc[0] if len(hit) else None


def survives(diffs: pd.DataFrame, run: str, records: dict) -> list:
    """Whether the assistant's gain over KD survives equal tuning: TAKD tuned - KD tuned, when both
    were tuned with the same number of trials."""
    kd = next((n for n, r in records.items() if r["from"] == DIRECT_KD), None)
    via = [n for n, r in records.items() if r["from"] == "student" or r["from"].startswith(path_student(""))]
    lines = []
    for takd in via:
        if kd is None or records[takd]["trials"] != records[kd]["trials"]:
            continue
        row = _over_seeds(diffs, run, takd, kd)
        if row is None:
            continue
        ci = f"[{100 * row['low']:+.2f}, {100 * row['high']:+.2f}]"
        verdict = ("the gain survives equal tuning" if row["significant"] and row["mean"] > 0 else
                   "KD is ahead after equal tuning" if row["significant"] else
                   "no significant difference after equal tuning")
        lines.append(f"- **{takd} − {kd}** (each tuned with {records[kd]['trials']} trials on validation): "
                     f"{100 * row['mean']:+.2f} points {ci} ({row['seed']}): {verdict}.")
    return lines


def section(rows: pd.DataFrame, table: pd.DataFrame, diffs: pd.DataFrame, fig_dir: Path) -> tuple[list, list]:
    """(markdown lines, figure paths) of the search, or ([], []) for runs without one."""
    tuned = tuned_records(rows)
    if not tuned:
        return [], []
    lines, figs = ["## Tuned on validation", "",
                   "Each tuned stage's knobs were searched with Optuna (TPE, median pruning) on the first seed's "
                   "validation split; the search never read the test split. `<stage>_tuned` trained with the best "
                   "values beside the declared `<stage>`, on the same seeds and seed stream, so each pair is a "
                   "paired comparison. Accuracy in %, mean over seeds.", "",
                   "| run | stage | tuned values | trials (complete / pruned / failed) | best trial (seed) | "
                   "val declared → tuned | test declared → tuned |", "|" + "---|" * 7], []
    for run, records in tuned.items():
        for name, rec in records.items():
            base = rec["from"]
            val = f"{100 * _mean(table, run, base, 'val_accuracy'):.2f} → {100 * _mean(table, run, name, 'val_accuracy'):.2f}"
            test = f"{100 * _mean(table, run, base, 'test_accuracy'):.2f} → {100 * _mean(table, run, name, 'test_accuracy'):.2f}"
            lines.append(f"| {run} | {base} | {_values(rec)} | {rec['trials']} ({rec['complete']} / {rec['pruned']} / "
                         f"{rec['failed']}) | #{rec['best_trial']} ({rec['seed']}) | {val} | {test} |")
            figs += study_figures(rec, fig_dir, f"{run}: {base}")
        answer = survives(diffs, run, records)
        if answer:
            lines += ["", "Does the assistant's gain over KD survive equal tuning?", ""] + answer
    lines += ["", "Knobs and ranges: " + "; ".join(f"{r['from']}: {', '.join(r['knobs'])}"
                                                   for recs in tuned.values() for r in recs.values()), ""]
    return lines, figs


def study_figures(rec: dict, fig_dir: Path, title: str) -> list:
    """The study's optimisation history and parameter importance as PNGs ([] when its storage is gone)."""
    import matplotlib.pyplot as plt  # the report's figures are drawn by src/visualization, which set the backend
    import optuna  # the search's engine: read only where a run was tuned
    from optuna.visualization import matplotlib as ovm
    from ..distillation.trial import journal_of, open_storage  # the same storage the search wrote
    spec = journal_of(rec["storage"], rec.get("_dirs", []))
    if spec is None:  # the journal is gone (a copy of the results without RUN/tune): the tables stand alone
        return []
    try:
        study = optuna.load_study(study_name=rec["study"], storage=open_storage(spec))
    except Exception:  # noqa: BLE001 (a database gone, or a journal without this study: the tables stand)
        return []
    fig_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(ch if ch.isalnum() else "_" for ch in f"{title}")
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib figures experimental
        for kind, draw in (("history", ovm.plot_optimization_history), ("importance", ovm.plot_param_importances)):
            if kind == "importance" and len(rec["values"]) < 2:
                continue  # one knob: its importance is 1 by definition
            try:
                ax = draw(study)
            except (ValueError, RuntimeError):  # too few complete trials for importances
                continue
            ax = ax[0] if hasattr(ax, "__len__") else ax
            for loc in ("left", "center", "right"):  # optuna's own title, whichever side it took
                ax.set_title("", loc=loc)
            ax.set_title(f"{title}: {'validation accuracy per trial' if kind == 'history' else 'knob importance (fANOVA)'}",
                         fontsize=10)
            if kind == "importance":
                if ax.get_legend() is not None:
                    ax.get_legend().remove()
                ax.set_xlabel("share of the validation accuracy's variance")
                ax.set_ylabel("knob")
            ax.set_facecolor("white")  # the report's figures: white, light grid (optuna draws in ggplot's grey)
            ax.grid(True, alpha=0.3, color="#999999")
            if kind == "history":
                from matplotlib.ticker import MaxNLocator  # with pyplot, only where a search is reported
                ax.set_xlabel("trial")
                ax.set_ylabel("best validation accuracy of the trial")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.legend(["trial", "best so far"], loc="lower right", fontsize=8)
            fig = ax.figure
            fig.patch.set_facecolor("white")
            fig.set_size_inches(6.4, 4.0)
            fig.tight_layout()
            path = fig_dir / f"tune_{safe}_{kind}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            out.append(path)
    return out

"""The one statistics pipeline: paired comparisons of two stages on the same test images.

Every reader of finished runs (the report, the TAKD reproduction's tables) names its comparisons,
A - B over a list of seed folders, and gets the same rows back:
- one row per seed: the difference in accuracy (a fraction), its bootstrap interval, the exact
  McNemar test on the images only one of them got right;
- one row over seeds (two or more): the mean difference with a Student-t interval, all such
  intervals Bonferroni-corrected together (`family` of them at level 1 - 0.05 / family);
- Holm's correction across every per-seed test of the call (`p_holm`, `significant`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from ..runs.runfolder import RunFolder
from ..utils.stats import ALPHA, bootstrap_diff_ci, holm, mcnemar_exact, paired_correct, simultaneous_t_intervals


@dataclass(frozen=True)
class Paired:
    """A - B, stage against stage, in each of `seeds` ([(seed, that seed's RunFolder)])."""
    run: str
    name: str
    a: str
    b: str
    seeds: Sequence[tuple]


def _seed_row(p: Paired, seed, folder: RunFolder):
    files = [folder.stage(st).predictions for st in (p.a, p.b)]
    if not all(f.exists() for f in files):
        return None
    # the same images, joined on the file id (rows of another image or label are refused)
    ca, cb = paired_correct(*(pd.read_csv(f, usecols=["file", "y_true", "y_pred"]) for f in files))
    test = mcnemar_exact(ca, cb)
    lo, hi = bootstrap_diff_ci(ca, cb, seed=int(seed))
    return {"run": p.run, "difference": p.name, "a": p.a, "b": p.b, "seed": str(seed),
            "mean": float(ca.mean() - cb.mean()), "low": lo, "high": hi, "only_a": test["only_a"],
            "only_b": test["only_b"], "p_value": test["p_value"], "n_test": len(ca),
            "significant": test["p_value"] < ALPHA}


def corrections(groups: Sequence[Sequence[float]], p_values: Sequence[Sequence[float]]) -> tuple[list, float, list]:
    """The corrections for comparisons read together, on plain numbers: each group's mean over
    seeds with its Bonferroni-corrected t interval ([(mean, low, high)], a group of fewer than two
    values gives NaN bounds and does not count), the per-interval alpha, and Holm's adjustment of
    every p-value across all groups, returned in the groups' shape."""
    intervals, alpha = simultaneous_t_intervals(groups)
    flat = holm([p for ps in p_values for p in ps]) if any(len(ps) for ps in p_values) else []
    adjusted, i = [], 0
    for ps in p_values:
        adjusted.append(list(flat[i:i + len(ps)]))
        i += len(ps)
    return intervals, alpha, adjusted


def paired_differences(pairs: Sequence[Paired]) -> pd.DataFrame:
    """Rows per seed and over seeds for every comparison (see the module's docstring), in the
    order given; a seed lacking either stage's predictions is left out of that comparison."""
    out = []
    for p in pairs:
        per_seed = [r for r in (_seed_row(p, seed, folder) for seed, folder in p.seeds) if r is not None]
        out += per_seed
        if len(per_seed) > 1:
            out.append({"run": p.run, "difference": p.name, "a": p.a, "b": p.b, "seed": f"mean of {len(per_seed)}",
                        "per_seed": [r["mean"] for r in per_seed], "p_value": np.nan})
    over = [r for r in out if "per_seed" in r]  # read together: Bonferroni-corrected t intervals
    tested = [r for r in out if "per_seed" not in r]  # several tests at once: Holm's correction across all of them
    intervals, alpha, adjusted = corrections([r.pop("per_seed") for r in over], [[r["p_value"] for r in tested]])
    for r, (mean, lo, hi) in zip(over, intervals):
        r.update(mean=mean, low=lo, high=hi, level=1 - alpha, family=len(over), significant=bool(lo > 0 or hi < 0))
    for r, p in zip(tested, adjusted[0]):
        r.update(p_holm=p, significant=p < ALPHA)
    return pd.DataFrame(out)


def rows_of(df: pd.DataFrame, p: Paired) -> tuple[pd.DataFrame, dict | None]:
    """One comparison's per-seed rows and its over-seeds row (None with fewer than two seeds)."""
    if not len(df):
        return df, None
    mine = df[(df["run"] == p.run) & (df["difference"] == p.name) & (df["a"] == p.a) & (df["b"] == p.b)]
    over = mine[mine["seed"].astype(str).str.startswith("mean of")]
    return mine[~mine.index.isin(over.index)], (over.iloc[0].to_dict() if len(over) else None)

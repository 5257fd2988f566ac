"""The TAKD paper's tables as data, and how our numbers are compared with them.

Kept apart from reproduce_takd.py so that the comparison (intervals, paired tests, Holm's
correction, the verdict in words) is plain functions that tests can feed made-up numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from src.utils.stats import ALPHA, holm, paired_correct, t_interval  # noqa: F401 (paired_correct: re-exported)

PAPER = "Mirzadeh et al. 2020, Improved Knowledge Distillation via Teacher Assistant (AAAI)"

# Published test accuracies (%). Table 1: no KD (NOKD), baseline KD (BLKD) and TAKD for plain CNN
# 10 -> 4 -> 2 and ResNet 110 -> 20 -> 8. The assistant-size tables (plain CNN assistants 4, 6, 8;
# ResNet assistants 14, 20, 32, 56) share their Table-1 entry; the other entries are left empty
# until they are transcribed from the paper, and a row without a published number is still run
# and reported, with no comparison to the paper.
PUBLISHED = {
    ("table1", "plain", "cifar10"): {"NOKD": 70.16, "BLKD": 72.57, "TAKD": 73.51},
    ("table1", "plain", "cifar100"): {"NOKD": 41.09, "BLKD": 44.57, "TAKD": 44.92},
    ("table1", "resnet", "cifar10"): {"NOKD": 88.52, "BLKD": 88.65, "TAKD": 88.98},
    ("table1", "resnet", "cifar100"): {"NOKD": 61.37, "BLKD": 61.41, "TAKD": 61.82},
}
PUBLISHED_SOURCE = {"table1": f"{PAPER}, Table 1", "assistants": f"{PAPER}, the assistant-size tables"}

VERDICTS = ("reproduced", "within noise", "not reproduced", "reversed", "undecided")


def published(table: str, family: str, dataset: str, row: str, table1_assistant: Optional[str] = None,
              assistant: Optional[str] = None) -> Optional[float]:
    """The paper's number for a row, or None where it is not transcribed."""
    t1 = PUBLISHED.get(("table1", family, dataset), {})
    if table == "table1":
        return t1.get(row)
    if row in ("NOKD", "BLKD"):
        return t1.get(row)
    return t1.get("TAKD") if assistant is not None and assistant == table1_assistant else None


def verdict(paper_gap: Optional[float], mean: float, lo: float, hi: float) -> str:
    """Our difference (mean with its 95% interval over seeds, in points) against the paper's gap.

    - reproduced: our interval excludes 0 on the paper's side;
    - reversed: our interval excludes 0 on the other side;
    - not reproduced: our interval holds 0 but not the paper's gap;
    - within noise: our interval holds both 0 and the paper's gap (too wide to tell);
    - undecided: no interval (one seed).
    Without a published gap the words say only whether our difference is significant."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    if lo > 0 or hi < 0:
        if paper_gap is None or paper_gap == 0:
            return "significant" if paper_gap is None else "reversed"
        return "reproduced" if (lo > 0) == (paper_gap > 0) else "reversed"
    if paper_gap is not None and not lo <= paper_gap <= hi:
        return "not reproduced"
    return "within noise"


VERDICT_WORDS = {
    "reproduced": "reproduced: our 95% interval excludes 0 on the paper's side",
    "reversed": "reversed: our 95% interval excludes 0 on the other side from the paper",
    "not reproduced": "not reproduced: our 95% interval holds 0 but not the paper's gap",
    "within noise": "within noise: our 95% interval holds both 0 and the paper's gap",
    "undecided": "undecided: one seed gives no interval",
    "significant": "significant (no published gap to compare)",
}


@dataclass
class Comparison:
    """A minus B on the same test images, one entry per seed."""
    name: str
    diffs: Sequence[float]            # accuracy(A) - accuracy(B) per seed, in points
    p_values: Sequence[float]         # exact McNemar per seed
    paper_gap: Optional[float]        # published A - B, in points


def summarise(comparisons: list) -> list:
    """For every comparison: mean difference and t interval over seeds, per-seed p-values adjusted
    with Holm's method across every test of the report, how many seeds stay significant, and the
    verdict against the paper."""
    flat = [p for c in comparisons for p in c.p_values]
    adjusted = iter(holm(flat)) if flat else iter(())
    out = []
    for c in comparisons:
        adj = [next(adjusted) for _ in c.p_values]
        mean, lo, hi = t_interval(c.diffs) if len(c.diffs) else (float("nan"),) * 3
        v = verdict(c.paper_gap, mean, lo, hi)
        out.append({"comparison": c.name, "paper_gap": c.paper_gap, "mean": mean, "lo": lo, "hi": hi,
                    "seeds": len(c.diffs), "diffs": list(c.diffs), "p": list(c.p_values), "p_holm": adj,
                    "significant_seeds": int(sum(p < ALPHA for p in adj)), "verdict": v, "words": VERDICT_WORDS[v]})
    return out

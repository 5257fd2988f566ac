"""The TAKD paper's tables as data, and how our numbers are compared with them.

Kept apart from reproduce_takd.py so that the verdicts are plain functions that tests can feed
made-up numbers. The statistics are the toolkit's one pipeline (src/analysis/compare.py): the
per-seed differences and McNemar tests come from its `paired_differences`, the Bonferroni-corrected
intervals and Holm's correction from its `corrections`; this file adds only the paper's numbers
and the verdict against them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from src.analysis.compare import corrections
from src.utils.stats import ALPHA, paired_correct  # noqa: F401 (paired_correct: re-exported)

PAPER = "Mirzadeh et al. 2020, Improved Knowledge Distillation via Teacher Assistant (AAAI)"

# Published test accuracies (%). Table 1: no KD (NOKD), baseline KD (BLKD) and TAKD for plain CNN
# 10 -> 4 -> 2 and ResNet 110 -> 20 -> 8. The assistant-size tables: TAKD through each assistant
# (plain CNN student 2, teacher 10, assistants 8 / 6 / 4; ResNet student 8, teacher 110, assistants
# 56 / 32 / 20 / 14). Table 1's TAKD row is Table 1's own number: it need not equal the
# assistant-size table's entry for Table 1's assistant (ResNet CIFAR-10: Table 1 prints 88.98, the
# assistant-size table 88.90 for ResNet 20), so each table is read from itself.
PUBLISHED = {
    ("table1", "plain", "cifar10"): {"NOKD": 70.16, "BLKD": 72.57, "TAKD": 73.51},
    ("table1", "plain", "cifar100"): {"NOKD": 41.09, "BLKD": 44.57, "TAKD": 44.92},
    ("table1", "resnet", "cifar10"): {"NOKD": 88.52, "BLKD": 88.65, "TAKD": 88.98},
    ("table1", "resnet", "cifar100"): {"NOKD": 61.37, "BLKD": 61.41, "TAKD": 61.82},
}
PUBLISHED_ASSISTANTS = {  # (family, dataset) -> assistant -> TAKD test accuracy through it
    ("plain", "cifar10"): {"plain_cnn8": 72.75, "plain_cnn6": 73.15, "plain_cnn4": 73.51},
    ("plain", "cifar100"): {"plain_cnn8": 44.28, "plain_cnn6": 44.57, "plain_cnn4": 44.92},
    ("resnet", "cifar10"): {"cifar_resnet56": 88.70, "cifar_resnet32": 88.73, "cifar_resnet20": 88.90,
                            "cifar_resnet14": 88.98},
    ("resnet", "cifar100"): {"cifar_resnet56": 61.47, "cifar_resnet32": 61.55, "cifar_resnet20": 61.82,
                             "cifar_resnet14": 61.50},
}
PUBLISHED_SOURCE = {"table1": f"{PAPER}, Table 1",
                    "assistants": f"{PAPER}, the assistant-size tables (Table 2 plain CNN, Table 3 ResNet)"}


def published(family: str, dataset: str, row: str, assistant: Optional[str] = None,
              table: str = "assistants") -> Optional[float]:
    """The paper's number for a row: NOKD and BLKD from Table 1; TAKD from Table 1 itself when
    `table` is table1 (its own assistant), else through `assistant` from the assistant-size table
    (None where the paper has no such entry). The assistant names are the CIFAR-10 model names
    (plain_cnn4, cifar_resnet20); a CIFAR-100 plain CNN's `_cifar100` suffix is ignored."""
    if row in ("NOKD", "BLKD") or (row == "TAKD" and table == "table1"):
        return PUBLISHED.get(("table1", family, dataset), {}).get(row)
    if assistant is None:
        return None
    return PUBLISHED_ASSISTANTS.get((family, dataset), {}).get(assistant.removesuffix("_cifar100"))


VERDICTS = ("reproduced", "smaller than published", "larger than published", "reversed", "not reproduced",
            "within noise", "undecided", "significant", "not significant", "differs from a published 0",
            "consistent with a published 0")


def verdict(paper_gap: Optional[float], lo: float, hi: float) -> str:
    """Our difference's interval [lo, hi] (points; corrected for the comparisons read with it)
    against the paper's gap:

    - reproduced: the interval excludes 0 on the paper's side and holds the paper's gap;
    - smaller / larger than published: it excludes 0 on the paper's side, and the paper's gap lies
      beyond its far / near end (our effect is real and on the paper's side, but of another size);
    - reversed: it excludes 0 on the other side;
    - not reproduced: it holds 0 but not the paper's gap;
    - within noise: it holds both 0 and the paper's gap (too wide to tell);
    - undecided: no interval (one seed, or the same difference on every seed: no spread).
    A published gap of exactly 0: "differs from a published 0" or "consistent with a published 0".
    No published gap: only whether ours is significant."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    excludes_zero = lo > 0 or hi < 0
    if paper_gap is None:
        return "significant" if excludes_zero else "not significant"
    if paper_gap == 0:
        return "differs from a published 0" if excludes_zero else "consistent with a published 0"
    holds_gap = lo <= paper_gap <= hi
    if not excludes_zero:
        return "within noise" if holds_gap else "not reproduced"
    if (lo > 0) != (paper_gap > 0):
        return "reversed"
    if holds_gap:
        return "reproduced"
    return "smaller than published" if abs(paper_gap) > max(abs(lo), abs(hi)) else "larger than published"


VERDICT_WORDS = {
    "reproduced": "reproduced: our interval excludes 0 on the paper's side and holds the paper's gap",
    "smaller than published": "smaller than published: our interval excludes 0 on the paper's side but lies "
                              "between 0 and the paper's gap",
    "larger than published": "larger than published: our interval excludes 0 on the paper's side and lies beyond "
                             "the paper's gap",
    "reversed": "reversed: our interval excludes 0 on the other side from the paper",
    "not reproduced": "not reproduced: our interval holds 0 but not the paper's gap",
    "within noise": "within noise: our interval holds both 0 and the paper's gap",
    "undecided": "undecided: no interval (one seed, or the same difference on every seed, which leaves "
                 "no spread to estimate the noise from)",
    "significant": "significant: our interval excludes 0 (no published gap to compare)",
    "not significant": "not significant: our interval holds 0 (no published gap to compare)",
    "differs from a published 0": "differs from a published 0: the paper reports no difference, our interval "
                                  "excludes 0",
    "consistent with a published 0": "consistent with a published 0: the paper reports no difference and our "
                                     "interval holds 0",
}


@dataclass
class Comparison:
    """A minus B on the same test images, one entry per seed."""
    name: str
    diffs: Sequence[float]            # accuracy(A) - accuracy(B) per seed, in points
    p_values: Sequence[float]         # exact McNemar per seed
    paper_gap: Optional[float]        # published A - B, in points


def not_comparable(epochs: int, teacher_epochs: int, paper_epochs: int) -> Optional[str]:
    """Why a run cannot be set against the paper's numbers (None when it can): its length."""
    if epochs == paper_epochs and teacher_epochs == paper_epochs:
        return None
    if teacher_epochs != epochs:
        return f"not comparable: {teacher_epochs} teacher and {epochs} student epochs of {paper_epochs}"
    return f"not comparable: {epochs} of {paper_epochs} epochs"


def summarise(comparisons: list, incomparable: Optional[str] = None) -> list:
    """For every comparison: the mean difference over seeds with a Student-t interval corrected
    for the number of comparisons in the report (Bonferroni: each at 1 - 0.05 / m, so that all m
    hold together at 95%), the per-seed McNemar p-values adjusted with Holm's method across every
    test of the report, how many seeds stay significant, and the verdict read from the corrected
    interval: against the paper's gap, or, when the run is `incomparable` (another length than the
    paper's), our own significance only, with the reason in place of the paper's verdict."""
    intervals, alpha, adjusted = corrections([c.diffs for c in comparisons], [c.p_values for c in comparisons])
    out = []
    for c, (mean, lo, hi), adj in zip(comparisons, intervals, adjusted):
        base = verdict(None if incomparable else c.paper_gap, lo, hi)
        v = f"{base} ({incomparable})" if incomparable else base
        words = VERDICT_WORDS[base] + (f"; {incomparable}" if incomparable else "")
        out.append({"comparison": c.name, "paper_gap": c.paper_gap, "mean": mean, "lo": lo, "hi": hi,
                    "level": 1 - alpha, "seeds": len(c.diffs), "diffs": list(c.diffs), "p": list(c.p_values),
                    "p_holm": adj, "significant_seeds": int(sum(p < ALPHA for p in adj)), "verdict": v,
                    "words": words})
    return out

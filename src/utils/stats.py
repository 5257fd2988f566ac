"""Is a difference in test accuracy real? Paired tests on the same test images, and intervals over seeds.

- Per seed, two models evaluated on the same N test images: the exact McNemar test on the
  discordant pairs (b = images only A gets right, c = only B gets right; under "no difference"
  b ~ Binomial(b + c, 1/2)), and a paired bootstrap 95% interval of acc(A) - acc(B).
- Over seeds: the mean difference with a Student-t 95% interval (n - 1 degrees of freedom); when
  several such intervals are read together, each at Bonferroni's level 1 - 0.05 / m.
At 92% on 10,000 images one accuracy alone has a binomial standard error of about 0.27 points,
the size of a typical TAKD - KD gap: hence these, and the plain words when nothing is significant.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
BOOTSTRAP_SAMPLES = 2000


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """Exact two-sided McNemar test for paired correctness vectors (bool [N] each)."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"paired predictions needed: {a.shape} vs {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(only_a, n, 0.5).pvalue)
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def bootstrap_diff_ci(correct_a: np.ndarray, correct_b: np.ndarray, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = 0) -> tuple[float, float]:
    """Paired percentile bootstrap 95% interval of acc(A) - acc(B): images resampled with replacement."""
    d = np.asarray(correct_a, float) - np.asarray(correct_b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(samples, len(d)))
    means = d[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(lo), float(hi)


def t_interval(values, alpha: float = ALPHA) -> tuple[float, float, float]:
    """(mean, low, high): Student-t (1 - alpha) interval of the mean (95% by default); low = high =
    NaN for fewer than 2 values."""
    v = np.asarray(values, float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(1 - alpha / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def simultaneous_t_intervals(groups) -> tuple[list, float]:
    """Student-t intervals for several means read together, Bonferroni-corrected so that all of
    them hold their true mean at once with probability >= 95%: each at level 1 - ALPHA / m, m
    the number of intervals (groups of fewer than 2 values give NaN bounds and do not count).
    Returns ([(mean, low, high)], the per-interval alpha). Holm's step-down procedure corrects
    tests, not intervals (it has no matching simultaneous intervals), so intervals that are read
    for more than "is it 0?" (does it hold a published gap?) take Bonferroni's level.
    A group whose values are all equal (the same difference on every seed) has no spread to
    estimate the noise from: its t interval would have zero width and "exclude 0" on no evidence,
    so its bounds are NaN too (read as undecided), though it still counts in m."""
    groups = [list(g) for g in groups]
    m = max(1, sum(len(g) > 1 for g in groups))
    alpha = ALPHA / m
    nan3 = (float("nan"),) * 3
    return [(float(np.mean(g)),) + nan3[1:] if len(g) > 1 and np.ptp(np.asarray(g, float)) == 0
            else t_interval(g, alpha) if g else nan3 for g in groups], alpha


def wilson_interval(correct: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of one accuracy measured on n test images (the test set's own sampling error)."""
    if n == 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(1 - ALPHA / 2)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def holm(p_values) -> list:
    """Holm's step-down adjustment of several p-values tested together (family-wise error at
    ALPHA): the k-th smallest is multiplied by (m - k + 1), made monotone, capped at 1.
    Compare the adjusted values with ALPHA."""
    p = np.asarray(list(p_values), float)
    m = len(p)
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def paired_correct(pred_a, pred_b) -> tuple[np.ndarray, np.ndarray]:
    """Correctness of two students on the same test images, joined on the file id; rows whose
    labels differ are refused (they are not the same image)."""
    merged = pd.merge(pred_a[["file", "y_true", "y_pred"]], pred_b[["file", "y_true", "y_pred"]], on="file",
                      suffixes=("_a", "_b"), validate="one_to_one")
    if len(merged) != len(pred_a) or len(merged) != len(pred_b):
        raise ValueError(f"the two prediction files hold different images ({len(pred_a)} and {len(pred_b)} rows, "
                         f"{len(merged)} shared)")
    if (merged["y_true_a"] != merged["y_true_b"]).any():
        raise ValueError("the two prediction files give different labels for the same image")
    return ((merged["y_pred_a"] == merged["y_true_a"]).to_numpy(), (merged["y_pred_b"] == merged["y_true_b"]).to_numpy())

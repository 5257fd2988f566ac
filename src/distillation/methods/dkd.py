"""DKD: decoupled knowledge distillation (Zhao et al., CVPR 2022).

KD split into the target-class part and the non-target part, each weighted on its own:

    b_s, b_t   = [p(target), sum of the non-target p] of student and teacher at temperature T
    TCKD       = T^2 KL(b_t || b_s)
    NCKD       = T^2 KL(q_t || q_s),  q = softmax over the non-target classes at temperature T
    DKD        = alpha TCKD + beta NCKD
    loss       = CE + min(t / warmup, 1) * DKD,   t = epochs done once this batch is taken

Defaults are mdistiller's CIFAR-100 ones, whatever the chain's kd.temperature (KD's own setting):
  - T = 4, alpha 1, CE weight 1, warm-up 20 epochs: mdistiller/engine/cfg.py (CFG.DKD.T = 4.0,
    CFG.DKD.ALPHA = 1.0, CFG.DKD.CE_WEIGHT = 1.0, CFG.DKD.WARMUP = 20) and every configs/cifar100/dkd/*.yaml;
  - beta 8: the most common of the CIFAR-100 pairs' values (configs/cifar100/dkd/*.yaml: 8 on 5 of
    the 11 pairs, 6 on four, 2 on two); a pair of other models may want another.
A stage sets any of them in method_args (`temperature`, `alpha`, `beta`, `warmup`, `ce_weight`).
The CE/KD mix is DKD's own, not the chain's alpha schedule.

TCKD's non-target mass is the sum of the non-target probabilities (as mdistiller's cat_mask), not
1 - p(target): in float32, 1 - p loses every digit once p(target) rounds towards 1 (a student
margin of 60 logits at T = 4 is off by 1%, 70 by 40%).

The warm-up is mdistiller's staircase: during epoch e (1-based) the weight is min(e / warmup, 1),
constant within the epoch. A warm-up that is not a whole number of epochs (a short run keeping
the paper's share of training: 20 of 240 epochs is 1.25 of 15) keeps the staircase with a step of
1/k epoch, k the smallest whole number that makes the warm-up a whole number of steps (1.25 -> a
quarter epoch: 0.2, 0.4, ..., 1.0); with whole epochs (k = 1) it equals mdistiller's at every batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import math

from . import Method, register
from ...utils.errors import ConfigError


def steps_per_epoch(warmup: float, most: int = 1000) -> int:
    """k: the smallest whole number of steps per epoch that makes `warmup` a whole number of steps
    (1 for whole epochs, 4 for 1.25); 0 when none up to `most` does (the weight then rises with
    every batch)."""
    return next((k for k in range(1, most + 1) if abs(warmup * k - round(warmup * k)) < 1e-9), 0)


def warmup_weight(progress: float, warmup: float) -> float:
    """The KD weight after `progress` epochs (this batch included) of a `warmup`-epoch staircase."""
    if warmup <= 0:
        return 1.0
    k = steps_per_epoch(warmup)
    if not k:
        return min(progress / warmup, 1.0)
    return min(math.ceil(progress * k - 1e-9) / (k * warmup), 1.0)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple:
    """(TCKD, NCKD), each batch-mean and multiplied by T^2."""
    T = temperature
    gt = F.one_hot(targets, student_logits.shape[1]).bool()
    p_s, p_t = F.softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1)
    b_s = torch.stack([p_s[gt], p_s.masked_fill(gt, 0.0).sum(1)], 1).clamp_min(1e-12)
    b_t = torch.stack([p_t[gt], p_t.masked_fill(gt, 0.0).sum(1)], 1)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean") * T * T
    masked = torch.finfo(student_logits.dtype).min  # the target class left out of the non-target softmax
    log_q_s = F.log_softmax((student_logits / T).masked_fill(gt, masked), 1).masked_fill(gt, 0.0)
    q_t = F.softmax((teacher_logits / T).masked_fill(gt, masked), 1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * T * T
    return tckd, nckd


@register("dkd")
class DKD(Method):
    """Decoupled KD from one teacher: CE + warm-up * (alpha TCKD + beta NCKD)."""
    min_teachers = max_teachers = 1
    own_weights = True
    terms = ("ce", "kd", "tckd", "nckd")
    default_temperature = 4.0  # mdistiller's CFG.DKD.T

    def __init__(self, teachers=(), teacher_names=(), *, alpha: float = 1.0, beta: float = 8.0, warmup: float = 20,
                 ce_weight: float = 1.0, **kw):
        super().__init__(teachers, teacher_names, **kw)
        if warmup < 0 or alpha < 0 or beta < 0:
            raise ConfigError(f"method dkd: alpha, beta and warmup must be >= 0 (got {alpha}, {beta}, {warmup})")
        self.alpha, self.beta, self.warmup, self.ce_weight = float(alpha), float(beta), float(warmup), float(ce_weight)

    def weights(self) -> tuple:
        return self.ce_weight, warmup_weight(self.progress(), self.warmup)

    def distill(self, student_logits, teacher_logits, targets):
        tckd, nckd = dkd_terms(student_logits, teacher_logits[0], targets, self.temperature)
        return {"kd": self.alpha * tckd + self.beta * nckd, "tckd": tckd, "nckd": nckd}

    def describe(self) -> str:
        return (f"dkd from {self.teacher_names[0]} (T {self.temperature:g}, alpha {self.alpha:g}, beta {self.beta:g}, "
                f"warm-up {self.warmup:.3g} epochs)")

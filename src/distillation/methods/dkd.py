"""DKD: decoupled knowledge distillation (Zhao et al., CVPR 2022).

KD split into the target-class part and the non-target part, each weighted on its own:

    b_s, b_t   = [p(target), 1 - p(target)] of student and teacher at temperature T
    TCKD       = T^2 KL(b_t || b_s)
    NCKD       = T^2 KL(q_t || q_s),  q = softmax over the non-target classes at temperature T
    DKD        = alpha TCKD + beta NCKD
    loss       = CE + min(t / warmup, 1) * DKD,   t = epochs done once this batch is taken

Defaults are the paper's CIFAR-100 ones (mdistiller's configs): alpha 1, beta 8, warm-up 20 epochs,
CE weight 1; T is the chain's kd.temperature (4 in the presets, as in the paper). The CE/KD mix
is DKD's own, not the chain's alpha schedule.

The warm-up may be a fraction of an epoch or not a whole number of epochs (a short run keeping the
paper's share of training: 20 of 240 epochs is 1.25 of 15). mdistiller holds the weight at
epoch / warmup for a whole epoch (a staircase); here it rises with every batch and meets the
staircase at each epoch's end (t = epoch), so a 20-epoch warm-up gives the paper's weights at
the epoch boundaries, and a warm-up of 1.25 epochs still starts near 0 rather than at full weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from src.distillation.methods import Method, register
from src.utils.errors import ConfigError


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
              temperature: float) -> tuple:
    """(TCKD, NCKD), each batch-mean and multiplied by T^2."""
    T = temperature
    gt = F.one_hot(targets, student_logits.shape[1]).bool()
    p_s, p_t = F.softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1)
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1).clamp_min(1e-12)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
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

    def __init__(self, teachers=(), teacher_names=(), *, alpha: float = 1.0, beta: float = 8.0, warmup: float = 20,
                 ce_weight: float = 1.0, **kw):
        super().__init__(teachers, teacher_names, **kw)
        if warmup < 0 or alpha < 0 or beta < 0:
            raise ConfigError(f"method dkd: alpha, beta and warmup must be >= 0 (got {alpha}, {beta}, {warmup})")
        self.alpha, self.beta, self.warmup, self.ce_weight = float(alpha), float(beta), float(warmup), float(ce_weight)

    def weights(self) -> tuple:
        ramp = 1.0 if self.warmup == 0 else min(self.progress() / self.warmup, 1.0)
        return self.ce_weight, ramp

    def distill(self, student_logits, teacher_logits, targets):
        tckd, nckd = dkd_terms(student_logits, teacher_logits[0], targets, self.temperature)
        return {"kd": self.alpha * tckd + self.beta * nckd, "tckd": tckd, "nckd": nckd}

    def describe(self) -> str:
        return (f"dkd from {self.teacher_names[0]} (alpha {self.alpha:g}, beta {self.beta:g}, "
                f"warm-up {self.warmup:.3g} epochs)")

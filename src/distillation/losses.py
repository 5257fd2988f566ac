"""Distillation loss (Hinton et al., 2015), one code path for plain training and KD.

Conventions, written once:
    loss = (1 - alpha) * CE(student, y) + alpha * T^2 * KL(p_teacher^T || p_student^T)
- alpha weights the KD term (schedule_kd_alpha: 0.9 at epoch 1 -> 0.5 at the last epoch);
- p^T = softmax(logits / T); KL is summed over classes and averaged over the batch
  ("batchmean"), then multiplied by T^2 so its gradients keep their scale as T changes;
- with no teacher (teacher_logits=None) the loss is the CE alone: a baseline is the same code
  with the teacher switched off.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def task_ce(student_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against int64 [B] labels (with label smoothing) or float [B, C] soft targets
    (mixup / cutmix, whose smoothing is already in the targets), in float32."""
    return F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing if targets.dim() == 1 else 0.0)


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher^T || p_student^T), summed over classes, averaged over the batch."""
    s, t = student_logits.float(), teacher_logits.float()
    return F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                    reduction="batchmean", log_target=True) * (temperature ** 2)


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
            alpha: float = 0.0, temperature: float = 4.0, label_smoothing: float = 0.0) -> dict:
    """The single-teacher objective (the `kd` method's, src/distillation/methods/), as a function.
    Args:
        student_logits: [B, C]; teacher_logits: [B, C] or None (computed under no_grad by the caller).
        targets: int64 [B] class indices, or float [B, C] soft targets (mixup / cutmix).
    Returns {'loss', 'task_loss', 'kd_loss'}: scalars; 'loss' is the one to back-propagate.
    """
    task = task_ce(student_logits, targets, label_smoothing)
    if teacher_logits is None or alpha == 0.0:
        zero = task.new_zeros(())
        return {"loss": task, "task_loss": task, "kd_loss": zero}
    kd = kd_term(student_logits, teacher_logits, temperature)
    return {"loss": (1.0 - alpha) * task + alpha * kd, "task_loss": task, "kd_loss": kd}

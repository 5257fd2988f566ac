"""Attention transfer (Zagoruyko and Komodakis, ICLR 2017), as in the CRD benchmark (RepDistiller):

    a(f)      = normalize(mean over channels of f^2, flattened)      f: [B, C, H, W] -> [B, H*W]
    AT        = sum over paired stages of mean((a(f_s) - a(f_t))^2)
    loss      = CE + 1000 AT

The stages: every stage output of the student paired with the teacher's stage output of the same
spatial size (RepDistiller: the outputs of the residual groups), or `student_layers` /
`teacher_layers` in method_args. No KL term (RepDistiller's `-a 0 -b 1000`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import Method, register
from ._features import paired_stages
from ...utils.errors import ConfigError


def attention_map(f: torch.Tensor, p: int = 2) -> torch.Tensor:
    return F.normalize(f.float().pow(p).mean(1).flatten(1), dim=1)


@register("at")
class AT(Method):
    min_teachers = max_teachers = 1
    own_weights = True
    terms = ("ce", "kd")
    features = {"student": [], "teacher": []}  # set per instance from the models' shapes

    def __init__(self, teachers=(), teacher_names=(), *, student: Optional[nn.Module] = None,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None,
                 at_weight: float = 1000.0, ce_weight: float = 1.0, p: int = 2, **kw):
        super().__init__(teachers, teacher_names, student=student, **kw)
        if student_layers or teacher_layers:
            if len(student_layers or []) != len(teacher_layers or []):
                raise ConfigError("method 'at': student_layers and teacher_layers pair up: give as many of each")
            s_names, t_names = list(student_layers), list(teacher_layers)
        else:
            if student is None:
                raise ConfigError("method 'at' finds its stages in the student: build it with the student")
            pairs = paired_stages("at", student, self.teachers[0], self.image_size)
            s_names, t_names = [p_[0] for p_ in pairs], [p_[1] for p_ in pairs]
        self.features = {"student": s_names, "teacher": t_names}
        self.at_weight, self.ce_weight, self.p = float(at_weight), float(ce_weight), int(p)

    def weights(self) -> tuple:
        return self.ce_weight, self.at_weight

    def distill(self, student_logits, teacher_logits, features):
        total = student_logits.new_zeros(())
        for f_s, f_t in zip(features["student"], features["teacher"][0]):
            if f_s.shape[-2:] != f_t.shape[-2:]:
                f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[-2:])
            total = total + (attention_map(f_s, self.p) - attention_map(f_t, self.p)).pow(2).mean()
        return total

    def describe(self) -> str:
        pairs = ", ".join(f"{s}->{t}" for s, t in zip(self.features["student"], self.features["teacher"]))
        return f"at from {self.teacher_names[0]} ({pairs}, weight {self.at_weight:g})"

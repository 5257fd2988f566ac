"""FitNets hints (Romero et al., ICLR 2015), trained jointly with the task as in the CRD
benchmark (RepDistiller) and mdistiller:

    r         = a 1x1 convolution + batch norm + ReLU from the student's channels to the teacher's
    hint      = mean((r(f_s) - f_t)^2)      f_s, f_t: one stage's output of student and teacher
    loss      = CE + 100 hint

The stage: by default the middle of the stage outputs that student and teacher share in size
(RepDistiller's hint layer 2 of a CIFAR ResNet: layer2), else `student_layer` / `teacher_layer`
in method_args; a student map larger than the teacher's is average-pooled to its size. The
regressor is built from the student's and teacher's shapes, trained with the student and
averaged with it across ranks. No KL term (RepDistiller's `-a 0 -b 100`).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import nn

from . import Method, register
from ._features import paired_stages, pick
from ...utils.errors import ConfigError


@register("fitnet")
class FitNet(Method):
    min_teachers = max_teachers = 1
    own_weights = True
    terms = ("ce", "kd")
    features = {"student": [], "teacher": []}  # set per instance from the models' shapes

    def __init__(self, teachers=(), teacher_names=(), *, student: Optional[nn.Module] = None,
                 student_layer: Optional[str] = None, teacher_layer: Optional[str] = None,
                 hint_weight: float = 100.0, ce_weight: float = 1.0, **kw):
        super().__init__(teachers, teacher_names, student=student, **kw)
        if student is None:
            raise ConfigError("method 'fitnet' sizes its regressor from the student: build it with the student")
        s, t, s_shape, t_shape = pick("fitnet", paired_stages("fitnet", student, self.teachers[0], self.image_size)
                                      if not (student_layer or teacher_layer) else [],
                                      student_layer, teacher_layer, student, self.teachers[0], self.image_size)
        self.features = {"student": [s], "teacher": [t]}
        self.shapes = (s_shape, t_shape)
        self.regressor = nn.Sequential(nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False), nn.BatchNorm2d(t_shape[0]),
                                       nn.ReLU(inplace=True))
        self.hint_weight, self.ce_weight = float(hint_weight), float(ce_weight)

    def weights(self) -> tuple:
        return self.ce_weight, self.hint_weight

    def distill(self, student_logits, teacher_logits, features):
        f_s, f_t = features["student"][0], features["teacher"][0][0]
        r = self.regressor(f_s.to(self.regressor[0].weight.dtype))
        if r.shape[-2:] != f_t.shape[-2:]:
            r = F.adaptive_avg_pool2d(r, f_t.shape[-2:])
        return F.mse_loss(r.float(), f_t.float())

    def describe(self) -> str:
        s, t = self.features["student"][0], self.features["teacher"][0]
        return f"fitnet from {self.teacher_names[0]} (hint: student {s} -> teacher {t}, weight {self.hint_weight:g})"

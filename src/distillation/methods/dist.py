"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

KL's exact match replaced by Pearson correlations of the softened probabilities, which the
paper makes for large teacher-student gaps, the question TAKD asks:

    y_s, y_t  = softmax(z / T) of student and teacher, [B, C]
    inter     = T^2 (1 - mean_i pearson(y_s[i, :], y_t[i, :]))   each image's relation between classes
    intra     = T^2 (1 - mean_c pearson(y_s[:, c], y_t[:, c]))   each class's relation across the batch
    DIST      = beta inter + gamma intra
    loss      = CE + DIST

Defaults are the authors' CIFAR ones, whatever the chain's kd.temperature (KD's own setting):
  - beta = gamma = 1: the authors' loss class (hunto/DIST_KD, losses/dist_kd.py, DIST.__init__);
  - T = 4 and a DIST weight of 2 (CE + 2 (inter + intra)): their CIFAR config
    (hunto/DIST_KD, configs/strategies/distill/dist_cifar.yaml: `tau: 4`, `kd_loss_weight: 2`);
  - CE weight 1 (their `ori_loss_weight: 1`).
A stage sets any of them in method_args (`temperature`, `beta`, `gamma`, `ce_weight`, `kd_weight`).
The CE/KD mix is DIST's own, not the chain's alpha schedule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Method, register

EPS = 1e-8  # the authors' cosine-similarity epsilon


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b, [rows]."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> tuple:
    """(inter, intra), each multiplied by T^2."""
    T = temperature
    y_s, y_t = F.softmax(student_logits / T, 1), F.softmax(teacher_logits / T, 1)
    inter = (1 - pearson_rows(y_s, y_t).mean()) * T * T
    intra = (1 - pearson_rows(y_s.t(), y_t.t()).mean()) * T * T
    return inter, intra


@register("dist")
class DIST(Method):
    """DIST from one teacher: CE + beta inter + gamma intra."""
    min_teachers = max_teachers = 1
    own_weights = True
    terms = ("ce", "kd", "inter", "intra")
    default_temperature = 4.0  # dist_cifar.yaml's tau

    def __init__(self, teachers=(), teacher_names=(), *, beta: float = 1.0, gamma: float = 1.0,
                 ce_weight: float = 1.0, kd_weight: float = 2.0, **kw):
        super().__init__(teachers, teacher_names, **kw)
        self.beta, self.gamma, self.ce_weight, self.kd_weight = float(beta), float(gamma), float(ce_weight), float(kd_weight)

    def weights(self) -> tuple:
        return self.ce_weight, self.kd_weight

    def distill(self, student_logits, teacher_logits):
        inter, intra = dist_terms(student_logits, teacher_logits[0], self.temperature)
        return {"kd": self.beta * inter + self.gamma * intra, "inter": inter, "intra": intra}

    def describe(self) -> str:
        return (f"dist from {self.teacher_names[0]} (T {self.temperature:g}, weight {self.kd_weight:g}, "
                f"beta {self.beta:g}, gamma {self.gamma:g})")

"""DeiT: distillation through attention, with a distillation token (Touvron et al., ICML 2021).

The student is a vision transformer with a second token beside the class token and a second head
on it (timm's `deit_*_distilled_patch16_*`, `VisionTransformerDistilled`). The class head learns
from the labels, the distillation head from the teacher; at test time the two heads' logits are
averaged (timm's forward in eval mode), so the accuracy reported is the paper's "DeiT⚗" one.

    z_cls, z_dist = the student's class-head and distillation-head logits
    hard (the paper's default):  loss = 1/2 CE(z_cls, y) + 1/2 CE(z_dist, argmax z_t)
    soft:                        loss = (1 - lambda) CE(z_cls, y) + lambda tau^2 KL(p_t^tau || p_dist^tau) / C

Defaults are the paper's (section 5.2): the hard variant with weights 1/2 and 1/2; the soft one
with tau 3 and lambda 0.1 (the chain's kd.temperature and alpha schedule are not used: the weights
are DeiT's own). The KL is at the authors' scale: their losses.py (DistillationLoss, soft branch)
sums the KL over the batch and the classes and divides by batch x classes (`/ outputs_kd.numel()`),
so their lambda = 0.1 weighs tau^2 KL / C, C the number of classes; the batch-mean KL of the
paper's formula with the same lambda would be C times stronger.
Not included: the paper's label smoothing of the teacher's hard label (its section 5.2 option).

    stages:
      - {name: student, model: deit_tiny_distilled_patch16_224, teacher: assistant, method: deit}
      - {..., method: deit, method_args: {variant: soft}}
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import kd_term, task_ce
from . import Method, bare_module, register
from ...utils.errors import ConfigError

DEFAULTS = {"hard": {"alpha": 0.5, "tau": 1.0}, "soft": {"alpha": 0.1, "tau": 3.0}}


def deit_term(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, variant: str, tau: float) -> torch.Tensor:
    """The distillation head's term: CE to the teacher's argmax (hard) or tau^2 KL at tau (soft)."""
    if variant == "hard":
        return F.cross_entropy(dist_logits, teacher_logits.argmax(1))
    return kd_term(dist_logits, teacher_logits, tau) / dist_logits.shape[1]  # the authors' / (batch x classes)


@register("deit")
class DeiT(Method):
    """DeiT's distillation token from one teacher: CE on the class head, KD on the distillation head."""
    min_teachers = max_teachers = 1
    own_weights = True
    features = {"student": ["head", "head_dist"]}   # timm VisionTransformerDistilled: the two heads' logits
    terms = ("ce", "kd")

    def __init__(self, teachers=(), teacher_names=(), *, variant: str = "hard", alpha=None, tau=None,
                 student=None, **kw):
        super().__init__(teachers, teacher_names, student=student, **kw)
        if variant not in DEFAULTS:
            raise ConfigError(f"method deit: variant must be 'hard' or 'soft', got {variant!r}")
        self.variant = variant
        self.alpha = float(DEFAULTS[variant]["alpha"] if alpha is None else alpha)
        self.tau = float(DEFAULTS[variant]["tau"] if tau is None else tau)
        if not 0.0 <= self.alpha <= 1.0 or self.tau <= 0:
            raise ConfigError(f"method deit: alpha must be in [0, 1] and tau > 0 (got {self.alpha}, {self.tau})")
        if student is not None and not hasattr(bare_module(student), "head_dist"):
            raise ConfigError("method deit needs a student with a distillation token and head (timm's "
                              "deit_*_distilled_patch16_* models, e.g. deit_tiny_distilled_patch16_224, "
                              f"ViT-Tiny's shape with the token); got a {type(bare_module(student)).__name__}")

    def weights(self) -> tuple:
        return 1.0 - self.alpha, self.alpha

    def loss(self, student_logits, targets, teacher_logits, alpha) -> dict:
        """CE on the class head and the KD term on the distillation head (not on the averaged
        logits the forward returns, which are what accuracy is measured on)."""
        feats = self._batch_features
        if feats is None or not feats["student"]:
            raise ConfigError("method deit: the student's heads were not seen in this step (is it a "
                              "deit_*_distilled model?)")
        cls_logits, dist_logits = (f.float() for f in feats["student"])
        ce = task_ce(cls_logits, targets, self.label_smoothing)
        if not teacher_logits:
            return {"loss": ce, "ce": ce}
        kd = deit_term(dist_logits, teacher_logits[0].float(), self.variant, self.tau)
        ce_w, kd_w = self.weights()
        return {"loss": ce_w * ce + kd_w * kd, "ce": ce, "kd": kd}

    def describe(self) -> str:
        extra = f", tau {self.tau:g}" if self.variant == "soft" else ""
        return f"deit ({self.variant}) from {self.teacher_names[0]} (weight {self.alpha:g}{extra})"

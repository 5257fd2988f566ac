"""The recipe of a stage's optimizer update, in one place: optimizer and LR schedule.

`make_optimizer` is a table of torch optimizers (AdamW, SGD with Nesterov or plain momentum), fused
where torch has a kernel for the device: one kernel per step, and the `found_inf` skip the sync-free
NaN guard relies on. No weight decay on biases and norms (1-D parameters) unless `decay_all`. The planner's probe,
the stage and the benchmarks all build theirs here.

`make_scheduler` is a LambdaLR over optimizer steps with `lr_multiplier`: linear warm-up (capped
at MAX_WARMUP_FRACTION of the stage), then cosine, step or constant. The LR each step used is
logged by the epoch loop (schedule.csv); figures plot those logged values, not a recomputation.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Union

import torch
from torch import nn

OPTIMIZERS = {
    "adamw": lambda groups, lr, momentum, nesterov, **kw: torch.optim.AdamW(groups, lr=lr, **kw),
    "sgd": lambda groups, lr, momentum, nesterov, **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum,
                                                                        nesterov=nesterov and momentum > 0, **kw),
}


def _parameters(modules: Union[nn.Module, Iterable[nn.Module]]) -> list:
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    seen, params = set(), []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def make_optimizer(modules: Union[nn.Module, Iterable[nn.Module]], lr: float, weight_decay: float,
                   device: torch.device, kind: str = "adamw", momentum: float = 0.9, nesterov: bool = True,
                   decay_all: bool = False) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters of `modules` (the student, and the method's own
    modules when it has any): `kind` from OPTIMIZERS, fused where torch has it. Biases and norms
    (1-D parameters) are not decayed unless `decay_all`."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    params = _parameters(modules)
    groups = [{"params": [p for p in params if p.ndim > 1 or decay_all], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1 and not decay_all], "weight_decay": 0.0}]
    try:
        return OPTIMIZERS[kind](groups, lr, momentum, nesterov, fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch without a fused kernel for this device
        return OPTIMIZERS[kind](groups, lr, momentum, nesterov)


def stage_optimizer(modules, lr: float, train, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `train` (a TrainConfig) asks for."""
    return make_optimizer(modules, lr, train.weight_decay, device, train.optimizer, train.momentum, train.nesterov,
                          train.decay_all)


def make_scheduler(optimizer: torch.optim.Optimizer, train, steps_per_epoch: int,
                   epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The stage's LR schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(train, steps_per_epoch, epochs))


def optimizer_factory(train, device: torch.device) -> Callable:
    """modules, lr -> the stage's optimizer (what the planner probes with)."""
    return lambda modules, lr: stage_optimizer(modules, lr, train, device)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then cosine decay to min_ratio."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


MAX_WARMUP_FRACTION = 0.2


def warmup_steps_for(warmup_epochs: float, steps_per_epoch: int, total_steps: int) -> int:
    """Configured warm-up in steps, capped at MAX_WARMUP_FRACTION of the run so a short run
    (`--epochs 3` on a preset with 5 warm-up epochs) still reaches its peak LR and decays."""
    return min(int(round(warmup_epochs * steps_per_epoch)), int(MAX_WARMUP_FRACTION * total_steps))


def lr_multiplier(train, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """The LR multiplier of every optimizer step of a stage (for LambdaLR), from `train`'s
    schedule: linear warm-up (capped at MAX_WARMUP_FRACTION of the stage), then
    - cosine: cosine decay to train.min_lr_ratio;
    - step: times train.lr_gamma after each epoch listed in train.lr_milestones (80, 120: epochs
      1-80 at the base LR, 81-120 at a tenth, the rest at a hundredth);
    - constant: the base LR throughout."""
    total = epochs * steps_per_epoch
    warmup = warmup_steps_for(train.warmup_epochs, steps_per_epoch, total)
    if train.schedule == "cosine":
        return warmup_cosine(total, warmup, train.min_lr_ratio)
    bounds = [m * steps_per_epoch for m in train.lr_milestones] if train.schedule == "step" else []
    gamma = train.lr_gamma

    def f(step: int) -> float:
        ramp = (step + 1) / warmup if warmup > 0 and step < warmup else 1.0
        return ramp * gamma ** sum(step >= b for b in bounds)
    return f


def lr_schedule(base_lr: float, train, epochs: int, steps_per_epoch: int) -> list:
    """The LR of every optimizer step of a stage, as its scheduler applies it (for the figures)."""
    f = lr_multiplier(train, steps_per_epoch, epochs)
    return [base_lr * f(s) for s in range(epochs * steps_per_epoch)]


def set_base_lr(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float) -> None:
    """A new base LR (--resume --lr) from the next step, on the same schedule."""
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = lr, lr * factor

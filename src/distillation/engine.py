"""One epoch of training or evaluation, for every stage of every chain.

The teacher (if any) runs its forward under torch.no_grad() here and hands logits to the pure
loss function; the student is the only module that ever sees .train() or a backward pass.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from src.distillation import distributed as dist
from src.distillation.losses import kd_loss
from src.utils.errors import NonFiniteLossError
from src.utils.metrics import classification_metrics
from src.utils.training_guards import validate_loss


def native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer). Turing cards such as the GTX 1660 only emulate it, slowly."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.is_bf16_supported()


@dataclass
class Precision:
    """Mixed-precision policy: bf16 where the GPU supports it, fp16 + GradScaler otherwise, fp32 on CPU."""
    device_type: str
    dtype: Optional[torch.dtype]

    @classmethod
    def choose(cls, device: torch.device, amp: bool) -> "Precision":
        if not amp or device.type != "cuda":
            return cls(device.type, None)
        return cls("cuda", torch.bfloat16 if native_bf16() else torch.float16)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


@dataclass
class StepContext:
    """Everything a training epoch needs besides the data."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    scaler: Optional[torch.amp.GradScaler] = None
    teacher: Optional[nn.Module] = None
    temperature: float = 4.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    micro_batch: Optional[int] = None     # split each batch into micro-batches (gradient accumulation)
    mixup: Optional[Callable] = None      # timm Mixup: (x, y) -> (x, soft targets)
    num_classes: int = 0
    should_stop: Callable[[], bool] = field(default=lambda: False)


class StopRequested(Exception):
    """Raised between steps when should_stop() turned true (Ctrl-C / SIGTERM)."""


def _progress(loader, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=len(loader), desc=desc, unit="batch", leave=False, dynamic_ncols=True, disable=None)


def train_one_epoch(ctx: StepContext, loader, alpha: float, desc: str = "train", progress: bool = True) -> dict:
    """Train ctx.model for one pass over `loader`. Returns mean loss, macro metrics, lr, img/s.

    validate_loss runs on every step: a NaN/Inf raises NonFiniteLossError with the step number
    (counted within this epoch, from 0) before any backward pass or optimizer step is taken.
    """
    model, opt = ctx.model, ctx.optimizer
    model.train()
    if ctx.teacher is not None:
        ctx.teacher.eval()
    bar = _progress(loader, desc, progress)
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    preds, labels = [], []
    seen, t0 = 0, time.perf_counter()
    for step, (x, y) in enumerate(loader):
        opt.zero_grad(set_to_none=True)
        targets = y
        if ctx.mixup is not None:
            x, targets = ctx.mixup(x, y)
        chunks = [x.shape[0]] if not ctx.micro_batch else [ctx.micro_batch] * (x.shape[0] // ctx.micro_batch) + (
            [x.shape[0] % ctx.micro_batch] if x.shape[0] % ctx.micro_batch else [])
        start = 0
        step_loss = 0.0
        for k, n in enumerate(chunks):
            xs, ts = x[start:start + n], targets[start:start + n]
            start += n
            # DDP: all-reduce gradients once per optimizer step, on the last micro-batch only
            sync = model.no_sync() if k < len(chunks) - 1 and hasattr(model, "no_sync") else nullcontext()
            teacher_logits = None
            if ctx.teacher is not None and alpha > 0:
                with torch.no_grad(), ctx.precision.autocast():
                    teacher_logits = ctx.teacher(xs)
            with sync:
                with ctx.precision.autocast():
                    logits = model(xs)
                losses = kd_loss(logits, ts, teacher_logits, alpha, ctx.temperature, ctx.label_smoothing)
                loss = losses["loss"] * (n / x.shape[0])
                validate_loss(loss, step=step)
                if ctx.scaler is not None:
                    ctx.scaler.scale(loss).backward()
                else:
                    loss.backward()
            step_loss = step_loss + loss.detach()
            preds.append(logits.detach().argmax(1))
        labels.append(y)
        if ctx.grad_clip > 0 or ctx.scaler is not None:
            if ctx.scaler is not None:
                ctx.scaler.unscale_(opt)
            if ctx.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        if ctx.scaler is not None:
            ctx.scaler.step(opt)
            ctx.scaler.update()
        else:
            opt.step()
        ctx.scheduler.step()
        loss_sum += step_loss * x.shape[0]
        seen += x.shape[0]
        if bar is not None:
            bar.update(1)
            if step % 10 == 0 or step == len(loader) - 1:
                elapsed = time.perf_counter() - t0
                correct = (preds[-1] == y).float().mean().item() if not chunks[1:] else float("nan")
                bar.set_postfix(loss=f"{float(step_loss):.3f}", acc=f"{correct:.3f}", img_s=f"{seen / elapsed:.0f}")
        if dist.any_rank(ctx.should_stop()):
            if bar is not None:
                bar.close()
            raise StopRequested(step)
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t0
    y_true = dist.gather_array(torch.cat(labels).cpu().numpy())
    y_pred = dist.gather_array(torch.cat(preds).cpu().numpy())
    out = classification_metrics(y_true, y_pred, ctx.num_classes or None)
    seen = int(dist.all_reduce_sum(seen))
    out["loss"] = dist.all_reduce_sum(float(loss_sum)) / max(seen, 1)
    out["img_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    out["lr"] = opt.param_groups[0]["lr"]
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, num_classes: int = 0,
             return_predictions: bool = False) -> dict:
    """Mean cross-entropy and macro metrics over `loader` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    preds, labels = [], []
    for x, y in loader:
        with precision.autocast():
            logits = model(x)
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
        n += y.shape[0]
        preds.append(logits.argmax(1))
        labels.append(y)
    model.train(was_training)
    y_true = dist.gather_array(torch.cat(labels).cpu().numpy())
    y_pred = dist.gather_array(torch.cat(preds).cpu().numpy())
    out = classification_metrics(y_true, y_pred, num_classes or None)
    out["loss"] = dist.all_reduce_sum(loss_sum) / max(dist.all_reduce_sum(n), 1)
    if not math.isfinite(out["loss"]):
        raise NonFiniteLossError(f"non-finite validation loss ({out['loss']})", step=-1, value=out["loss"])
    if return_predictions:
        out["y_true"], out["y_pred"] = y_true, y_pred
    return out


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up, then cosine decay to min_ratio."""
    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f

"""One epoch of training or evaluation, for every stage of every chain.

The teacher (if any) runs its forward under torch.no_grad() here and hands logits to the pure
loss function; the student is the only module that ever sees .train() or a backward pass.

The training step never waits for the GPU: the loss check (the NaN/Inf guard, validate_loss) keeps a device-side
flag that the fused optimizer reads to skip its update (`found_inf`), and the host reads the
flag once every `nan_check_every` steps. Metrics are gathered on the device and read once per
epoch; the progress display reads the loss only when it redraws.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from src.distillation import distributed as dist
from src.distillation.losses import kd_loss
from src.utils.devices import synchronize
from src.utils.errors import NonFiniteLossError
from src.utils.logger import get_console, is_verbose
from src.utils.metrics import classification_metrics
from src.utils.training_guards import LossWatch, check_grad_norm, freeze_teacher, validate_loss

log = get_console()


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
    def choose(cls, device: torch.device, amp: bool, amp_dtype: str = "auto") -> "Precision":
        """`amp_dtype`: auto (bf16 where native, else fp16) | bf16 | fp16. fp16 on a bf16 card takes
        the GradScaler path the Turing cards take (the GPU smoke test forces it this way)."""
        if not amp or device.type != "cuda":
            return cls(device.type, None)
        if amp_dtype == "fp16":
            return cls("cuda", torch.float16)
        if amp_dtype == "bf16":
            return cls("cuda", torch.bfloat16)
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


def prepare_teacher(model: nn.Module, device: torch.device, precision: Precision, channels_last: bool,
                    compile_model: bool = False, verbose: bool = False) -> nn.Module:
    """A frozen teacher ready for the student's steps: on `device`, channels_last for CNNs, and under
    bf16 its convolution and linear weights cast to bf16 once (autocast would cast them again on
    every forward; the logits are the same). Norm layers keep fp32. Optionally compiled."""
    model = freeze_teacher(model.to(device), verbose=verbose)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if precision.dtype == torch.bfloat16:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.to(torch.bfloat16)
    return torch.compile(model) if compile_model else model


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
    nan_check_every: int = 50             # host reads the non-finite flag this often (fused optimizers)
    teacher_logits: Optional[torch.Tensor] = None  # [N, C] the frozen teacher's logits for every training image


class StopRequested(Exception):
    """Raised between steps when should_stop() turned true (Ctrl-C / SIGTERM)."""


class Progress:
    """A tqdm bar on a terminal; elsewhere (a file, a pipe) one line every `every_s` seconds.
    The loss shown is read from the device (a synchronisation) at most once a second."""

    postfix_every_s = 1.0

    def __init__(self, total: int, desc: str, enabled: bool, every_s: float = 30.0):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.bar = None
        self.lines = enabled and not sys.stdout.isatty()
        if enabled and not self.lines:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)
        self.t0 = self.last = time.perf_counter()

    @property
    def wants_update(self) -> bool:
        return self.bar is not None or (self.lines and time.perf_counter() - self.last >= self.every_s)

    def update(self, step: int, seen: int, loss: Callable[[], float]) -> None:
        """Called after every step; `loss` is read (a host sync) only when something is shown."""
        if self.bar is not None:
            self.bar.update(1)
            now = time.perf_counter()
            if now - self.last >= self.postfix_every_s or step == self.total - 1:
                self.bar.set_postfix(loss=f"{loss():.3f}", img_s=f"{seen / max(now - self.t0, 1e-9):.0f}")
                self.last = now
        elif self.wants_update:
            now = time.perf_counter()
            elapsed = now - self.t0
            eta = elapsed / (step + 1) * (self.total - step - 1)
            log.info(f"    {self.desc}: step {step + 1}/{self.total}, loss {loss():.4f}, "
                     f"{seen / max(elapsed, 1e-9):,.0f} img/s, {eta:.0f}s left")
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def total_grad_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients (what clipping computes), without touching them."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    get_total_norm = getattr(nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _chunks(n: int, micro: Optional[int]) -> list:
    if not micro or micro >= n:
        return [n]
    return [micro] * (n // micro) + ([n % micro] if n % micro else [])


def train_one_epoch(ctx: StepContext, loader, alpha: float, desc: str = "train", progress: bool = True) -> dict:
    """Train ctx.model for one pass over `loader`.

    Returns the mean objective `loss` and its terms `ce` (task cross-entropy against the training
    targets) and `kd` (T^2 * KL, unweighted), macro metrics, `lr_first` / `lr_last` / `lr_mean`
    (the LRs the epoch's optimizer steps used), `seconds` and `img_per_s` (after the GPU finished).

    Train metrics are scored against the labels the model was trained on: under mixup / cutmix,
    the soft target's larger share (its argmax), not the label of the unmixed image.

    Non-finite loss (the NaN/Inf guard, validate_loss): no optimizer step is ever taken on it. With a fused optimizer
    and no GradScaler the check is a device-side flag (`found_inf` makes the fused update a
    no-op, and the flag stays set until the host reads it every `nan_check_every` steps);
    otherwise the host checks every step. Either way NonFiniteLossError names the first bad step
    (counted within this epoch, from 0).
    """
    model, opt = ctx.model, ctx.optimizer
    model.train()
    if ctx.teacher is not None:
        ctx.teacher.eval()
    device = next(p.device for p in model.parameters())
    deferred = getattr(opt, "_step_supports_amp_scaling", False) and ctx.scaler is None
    watch = LossWatch(device, verbose=is_verbose()) if deferred else None
    bar = Progress(len(loader), desc, progress)
    sums = torch.zeros(3, device=device)  # objective, ce, kd: summed over images
    preds, labels, lrs = [], [], []
    seen, n_steps = 0, len(loader)
    synchronize(device)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        opt.zero_grad(set_to_none=True)
        targets = y
        if ctx.mixup is not None:
            x, targets = ctx.mixup(x, y)
        chunks = _chunks(x.shape[0], ctx.micro_batch)
        start = 0
        step_sums = torch.zeros(3, device=device)
        for k, n in enumerate(chunks):
            part = slice(start, start + n)
            xs, ts = x[part], targets[part]
            start += n
            # DDP: all-reduce gradients once per optimizer step, on the last micro-batch only
            sync = model.no_sync() if k < len(chunks) - 1 and hasattr(model, "no_sync") else nullcontext()
            teacher_logits = None
            if ctx.teacher is not None and alpha > 0:
                if ctx.teacher_logits is not None:  # computed once: the inputs are the same every epoch
                    teacher_logits = ctx.teacher_logits[loader.batch_index[part]]
                else:
                    with torch.no_grad(), ctx.precision.autocast():
                        teacher_logits = ctx.teacher(xs)
            with sync:
                with ctx.precision.autocast():
                    logits = model(xs)
                losses = kd_loss(logits, ts, teacher_logits, alpha, ctx.temperature, ctx.label_smoothing)
                loss = losses["loss"] * (n / x.shape[0])
                if ctx.scaler is not None:
                    ctx.scaler.scale(loss).backward()
                else:
                    loss.backward()
            step_sums += torch.stack([losses["loss"], losses["task_loss"], losses["kd_loss"]]).detach() * n
            preds.append(logits.detach().argmax(1))
        labels.append(targets.argmax(1) if targets.dim() == 2 else y)
        step_loss = step_sums[0] / x.shape[0]
        # optimizer update, watched: a non-finite loss or gradient norm never reaches the weights
        if ctx.scaler is not None:
            ctx.scaler.unscale_(opt)
        grad_norm = None
        if ctx.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        elif ctx.scaler is None:  # watched even without clipping (the scaler skips non-finite gradients itself)
            grad_norm = total_grad_norm(model)
        if deferred:
            opt.found_inf = watch.update(step_loss, step, reduce=dist.all_reduce_max_ if dist.state().enabled else None,
                                         grad_norm=grad_norm)
        else:  # host checks: raise before the optimizer step
            validate_loss(step_loss, step=step, verbose=is_verbose())
            if grad_norm is not None:
                check_grad_norm(grad_norm, step, float(step_loss), verbose=is_verbose())
        if ctx.scaler is not None:
            ctx.scaler.step(opt)
            ctx.scaler.update()
        else:
            opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        ctx.scheduler.step()
        sums += step_sums
        seen += x.shape[0]
        if deferred and ((step + 1) % ctx.nan_check_every == 0 or step == n_steps - 1):
            watch.check()  # one host read; raises NonFiniteLossError naming the first bad step
        bar.update(step, seen, lambda: float(step_loss))
        if dist.any_rank(ctx.should_stop()):
            bar.close()
            if deferred:
                watch.check()
            raise StopRequested(step)
    bar.close()
    synchronize(device)
    elapsed = time.perf_counter() - t0
    y_true = dist.gather_array(torch.cat(labels).cpu().numpy())
    y_pred = dist.gather_array(torch.cat(preds).cpu().numpy())
    out = classification_metrics(y_true, y_pred, ctx.num_classes or None)
    seen = int(dist.all_reduce_sum(seen))
    totals = [dist.all_reduce_sum(float(v)) / max(seen, 1) for v in sums.cpu()]
    out.update(loss=totals[0], ce=totals[1], kd=totals[2] if ctx.teacher is not None and alpha > 0 else float("nan"))
    out["seconds"] = elapsed
    out["img_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    out["lr_first"], out["lr_last"] = (lrs[0], lrs[-1]) if lrs else (float("nan"),) * 2
    out["lr_mean"] = sum(lrs) / len(lrs) if lrs else float("nan")
    out["steps"], out["lrs"] = len(lrs), lrs
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, num_classes: int = 0,
             return_predictions: bool = False) -> dict:
    """Mean cross-entropy and macro metrics over `loader` (eval mode, no gradients).
    With `return_predictions`: y_true, y_pred [N] and the logits [N, C] (float32, CPU)."""
    was_training = model.training
    model.eval()
    device = next(p.device for p in model.parameters())
    losses, preds, labels, all_logits, index, seen = [], [], [], [], [], 0
    for x, y in loader:
        with precision.autocast():
            logits = model(x)
        losses.append(torch.nn.functional.cross_entropy(logits.float(), y, reduction="none"))
        preds.append(logits.argmax(1))
        labels.append(y)
        idx = getattr(loader, "batch_index", None)  # a plain iterable of batches (tests) counts positions
        index.append(idx if idx is not None else torch.arange(seen, seen + len(y)))
        seen += len(y)
        if return_predictions:
            all_logits.append(logits.float())
    model.train(was_training)
    # every rank's images, gathered rank by rank, then put back in dataset order (a distributed
    # sampler's padding repeats a few images: each counts once)
    gathered = [dist.gather_array(torch.cat(t).cpu().numpy()) for t in (index, labels, preds, losses)]
    if return_predictions:
        gathered.append(dist.gather_array(torch.cat(all_logits).cpu().numpy()))
    _, y_true, y_pred, loss, *logits_np = in_dataset_order(*gathered)
    out = classification_metrics(y_true, y_pred, num_classes or None)
    out["loss"] = float(loss.sum()) / max(len(loss), 1)
    if not math.isfinite(out["loss"]):
        raise NonFiniteLossError(f"non-finite validation loss ({out['loss']})", step=-1, value=out["loss"])
    if return_predictions:
        out["y_true"], out["y_pred"], out["logits"] = y_true, y_pred, logits_np[0]
    return out


def in_dataset_order(index, *arrays) -> tuple:
    """(index, *arrays) sorted by the dataset index, each image once (its first occurrence)."""
    import numpy as np
    index = np.asarray(index)
    _, first = np.unique(index, return_index=True)  # sorted by index, first occurrence of each
    return (index[first], *(np.asarray(a)[first] for a in arrays))


MAX_TEACHER_CACHE_BYTES = 1 << 30


@torch.no_grad()
def teacher_logits_table(teacher: nn.Module, loader, precision: Precision) -> Optional[torch.Tensor]:
    """The frozen teacher's logits [N, C] for every image of the training split, in index order,
    when the loader presents each image identically in every epoch (no augmentation, no
    erasing; the caller rules out mixup): the teacher's forward then runs once per stage instead
    of once per epoch, with the same inputs, precision and eval mode as the online forward.
    None when that does not hold, or the table would pass MAX_TEACHER_CACHE_BYTES."""
    if not getattr(loader, "same_inputs_every_epoch", False):
        return None
    n = len(loader.labels)
    table = None
    teacher.eval()
    for x, idx in loader.in_order():
        with precision.autocast():
            logits = teacher(x)
        if table is None:
            if n * logits.shape[1] * logits.element_size() > MAX_TEACHER_CACHE_BYTES:
                return None
            table = torch.empty(n, logits.shape[1], dtype=logits.dtype, device=logits.device)
        table[idx] = logits
    return table


def compile_warmup(ctx: StepContext, sample: torch.Tensor) -> float:
    """Compile ctx.model (forward and backward) and the teacher on one micro-batch of `sample`
    before training, so the compilation is timed apart from the epochs. Weights, buffers
    (batch-norm statistics), gradients and RNG states are left exactly as they were.
    Returns the seconds it took."""
    model = ctx.model
    device = sample.device
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    synchronize(device)
    t0 = time.perf_counter()
    model.train()
    if ctx.teacher is not None:
        with torch.no_grad(), ctx.precision.autocast():
            ctx.teacher(sample)
    with ctx.precision.autocast():
        out = model(sample)
    out.float().sum().backward()
    synchronize(device)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for b, saved in zip(model.buffers(), saved_buffers):
            b.copy_(saved)
    model.zero_grad(set_to_none=True)
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return seconds


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

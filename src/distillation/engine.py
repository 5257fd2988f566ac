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

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed as dist
from .methods import KD, Method, Scratch
from ..utils.checkpoint import rng_state, set_rng_state
from ..utils.devices import GiB, synchronize
from ..utils.errors import NonFiniteLossError
from ..utils.logger import get_console, is_verbose
from ..utils.metrics import classification_metrics
from ..utils.training_guards import LossWatch, check_grad_norm, freeze_teacher, validate_loss

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
    """Everything a training epoch needs besides the data. What a step computes is `method`'s
    (src/distillation/methods/); `teacher` / `temperature` / `label_smoothing` are a shorthand
    for the plain cases: method = kd from `teacher`, or scratch without one."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: Precision
    scaler: Optional[torch.amp.GradScaler] = None
    method: Optional[Method] = None
    teacher: Optional[nn.Module] = None
    temperature: float = 4.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    micro_batch: Optional[int] = None     # split each batch into micro-batches (gradient accumulation)
    mixup: Optional[Callable] = None      # timm Mixup: (x, y) -> (x, soft targets)
    num_classes: int = 0
    should_stop: Callable[[], bool] = field(default=lambda: False)
    nan_check_every: int = 50             # host reads the non-finite flag this often (fused optimizers)
    checkpoint_every_s: float = 0.0       # > 0: save_partial(state) this often inside an epoch (and on a stop)
    save_partial: Optional[Callable[[dict], None]] = None

    def __post_init__(self):
        if self.method is None:
            self.method = (KD([self.teacher], temperature=self.temperature, label_smoothing=self.label_smoothing)
                           if self.teacher is not None else Scratch(label_smoothing=self.label_smoothing))

    @property
    def parameters(self) -> list:
        """What the optimizer updates: the student's parameters, then the method's own."""
        return [*self.model.parameters(), *self.method.parameters()]


class StopRequested(Exception):
    """Raised between micro-batches when should_stop() turned true (Ctrl-C / SIGTERM). `saved`
    says what was saved and where the run will continue (set by the stage)."""

    def __init__(self, step=None, saved: str = ""):
        super().__init__(step)
        self.step, self.saved = step, saved


class Progress:
    """A tqdm bar on a terminal; elsewhere (a file, a pipe) one line every `every_s` seconds.
    The loss shown is read from the device (a synchronisation) at most once a second."""

    postfix_every_s = 1.0

    def __init__(self, total: int, desc: str, enabled: bool, every_s: float = 30.0):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.bar = None
        self.lines = enabled and not sys.stdout.isatty()
        if enabled and not self.lines:
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


def total_grad_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients (what clipping computes), without touching them."""
    params = params.parameters() if isinstance(params, nn.Module) else params
    grads = [p.grad for p in params if p.grad is not None]
    get_total_norm = getattr(nn.utils, "get_total_norm", None)  # torch >= 2.6
    if get_total_norm is not None:
        return get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _chunks(n: int, micro: Optional[int]) -> list:
    if not micro or micro >= n:
        return [n]
    return [micro] * (n // micro) + ([n % micro] if n % micro else [])


class _EpochTally:
    """What an epoch accumulates on the device (term sums over images, predictions, labels) and
    the LRs its optimizer steps used; read on the host once, at the end."""

    def __init__(self, names: tuple, device: torch.device):
        self.names, self.device = names, device
        self.sums = torch.zeros(len(names), device=device)
        self.nan = torch.full((), float("nan"), device=device)
        self.preds, self.labels, self.lrs, self.seen = [], [], [], 0
        self.step_losses = []  # 0-d device tensors, read once at the end of the epoch

    def stack(self, terms: dict) -> torch.Tensor:
        """The step's terms in `names` order; a term the method did not compute this step is NaN."""
        return torch.stack([terms[k] if k in terms else self.nan for k in self.names]).detach()

    def state(self, next_step: int, seconds: float) -> dict:
        """What a resumed epoch needs to end exactly as an uninterrupted one (CPU tensors)."""
        cat = lambda xs: torch.cat(xs).cpu() if xs else torch.zeros(0, dtype=torch.long)  # noqa: E731
        return {"next_step": next_step, "seconds": seconds, "names": list(self.names), "sums": self.sums.cpu(),
                "preds": cat(self.preds), "labels": cat(self.labels), "lrs": list(self.lrs), "seen": self.seen,
                "step_losses": torch.stack(self.step_losses).cpu() if self.step_losses else torch.zeros(0)}

    def load(self, state: dict) -> None:
        if list(state["names"]) != list(self.names):
            raise ValueError(f"the saved epoch has terms {state['names']}, this method {list(self.names)}")
        self.sums = state["sums"].to(self.device)
        self.preds = [state["preds"].to(self.device)] if len(state["preds"]) else []
        self.labels = [state["labels"].to(self.device)] if len(state["labels"]) else []
        self.lrs, self.seen = list(state["lrs"]), int(state["seen"])
        self.step_losses = list(state["step_losses"].to(self.device).unbind(0))


def forward_backward(ctx: StepContext, x: torch.Tensor, targets: torch.Tensor, alpha: float,
                     index: Optional[torch.Tensor], tally: _EpochTally) -> torch.Tensor:
    """Phase 1 of a step: the method's forward and backward over the batch's micro-batches
    (DDP all-reduces once, on the last). Returns the terms summed over the batch's images."""
    model, method = ctx.model, ctx.method
    chunks = _chunks(x.shape[0], ctx.micro_batch)
    step_sums = torch.zeros(len(tally.names), device=tally.device)
    start = 0
    for k, n in enumerate(chunks):
        if k > 0 and not dist.state().enabled and ctx.should_stop():  # between micro-batches (the caller undoes the step)
            raise StopRequested()
        part = slice(start, start + n)
        start += n
        sync = model.no_sync() if k < len(chunks) - 1 and hasattr(model, "no_sync") else nullcontext()
        with sync:
            logits, terms = method.step(model, x[part], targets[part], alpha, ctx.precision,
                                        index[part] if index is not None else None)
            loss = terms["loss"] * (n / x.shape[0])
            if ctx.scaler is not None:
                ctx.scaler.scale(loss).backward()
            else:
                loss.backward()
        step_sums += tally.stack(terms) * n
        tally.preds.append(logits.detach().argmax(1))
    return step_sums


class _StepUndo:
    """What a step changes before its optimizer update, kept to undo it: batch-norm statistics
    (and other buffers), the random streams and the method's own state."""

    def __init__(self, model: nn.Module, method, n_preds: int):
        self.model, self.method, self.n_preds = model, method, n_preds
        self.buffers = [b.detach().clone() for b in model.buffers()]
        self.rng, self.method_state = rng_state(), {k: v.clone() if torch.is_tensor(v) else v
                                                      for k, v in method.state_dict().items()}

    def restore(self, tally) -> None:
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), self.buffers):
                b.copy_(saved)
        set_rng_state(self.rng)
        self.method.load_state_dict(self.method_state)
        del tally.preds[self.n_preds:]


def optimizer_update(ctx: StepContext, step: int, step_loss: torch.Tensor, watch: Optional[LossWatch]) -> None:
    """Phase 2 of a step: the optimizer update, watched: a non-finite loss or gradient norm never
    reaches the weights. With a fused optimizer and no GradScaler the watch is a device-side flag
    (`found_inf` makes the update a no-op; the host reads it every `nan_check_every` steps);
    otherwise the host checks before the update."""
    opt = ctx.optimizer
    if ctx.scaler is not None:
        ctx.scaler.unscale_(opt)
    grad_norm = None
    if ctx.grad_clip > 0:
        grad_norm = nn.utils.clip_grad_norm_(ctx.parameters, ctx.grad_clip)
    elif ctx.scaler is None:  # watched even without clipping (the scaler skips non-finite gradients itself)
        grad_norm = total_grad_norm(ctx.parameters)
    if watch is not None:
        opt.found_inf = watch.update(step_loss, step, reduce=dist.all_reduce_max_ if dist.state().enabled else None,
                                     grad_norm=grad_norm)
    else:
        validate_loss(step_loss, step=step, verbose=is_verbose())
        if grad_norm is not None:
            check_grad_norm(grad_norm, step, float(step_loss), verbose=is_verbose())
    if ctx.scaler is not None:
        ctx.scaler.step(opt)
        ctx.scaler.update()
    else:
        opt.step()


def epoch_metrics(ctx: StepContext, tally: _EpochTally, elapsed: float) -> dict:
    """Phase 3, once per epoch: gathered macro metrics; `loss` (the mean objective) and every term
    the method declares (`ce`: task cross-entropy against the training targets, `kd`: the
    unweighted KD term, NaN when no teacher taught this epoch), means over images; `lr_first` /
    `lr_last` / `lr_mean` / `lrs` (the LRs the optimizer steps used), `step_losses` (this rank's
    objective at every step), `seconds` and `img_per_s` (after the device finished)."""
    y_true = dist.gather_array(torch.cat(tally.labels).cpu().numpy())
    y_pred = dist.gather_array(torch.cat(tally.preds).cpu().numpy())
    out = classification_metrics(y_true, y_pred, ctx.num_classes or None)
    seen = int(dist.all_reduce_sum(tally.seen))
    out.update({name: dist.all_reduce_sum(float(v)) / max(seen, 1) for name, v in zip(tally.names, tally.sums.cpu())})
    lrs = tally.lrs
    out["seconds"] = elapsed
    out["img_per_s"] = seen / elapsed if elapsed > 0 else 0.0
    out["lr_first"], out["lr_last"] = (lrs[0], lrs[-1]) if lrs else (float("nan"),) * 2
    out["lr_mean"] = sum(lrs) / len(lrs) if lrs else float("nan")
    out["steps"], out["lrs"] = len(lrs), lrs
    out["step_losses"] = torch.stack(tally.step_losses).cpu().tolist() if tally.step_losses else []
    return out


def train_step(ctx: StepContext, loader, x: torch.Tensor, y: torch.Tensor, step: int, alpha: float,
               tally: _EpochTally, watch: Optional[LossWatch], save: Optional[Callable[[int], str]]) -> torch.Tensor:
    """One optimizer step: the method's forward and backward over the micro-batches, the watched
    update, the schedule. A stop between micro-batches undoes the step (batch-norm statistics,
    random streams, the method's state) and saves the epoch up to its start. Returns the loss."""
    method = ctx.method
    undo = _StepUndo(ctx.model, method, len(tally.preds)) if save is not None and ctx.micro_batch else None
    ctx.optimizer.zero_grad(set_to_none=True)
    method.begin_step(step, len(loader))
    method.begin_batch()
    targets = y
    if ctx.mixup is not None:
        x, targets = ctx.mixup(x, y)
    index = loader.batch_index if method.cached is not None else None
    try:
        step_sums = forward_backward(ctx, x, targets, alpha, index, tally)
    except StopRequested:
        if undo is None:
            raise StopRequested(step) from None
        undo.restore(tally)
        ctx.optimizer.zero_grad(set_to_none=True)
        raise StopRequested(step, save(step)) from None
    tally.labels.append(targets.argmax(1) if targets.dim() == 2 else y)
    step_loss = step_sums[0] / x.shape[0]
    tally.step_losses.append(step_loss.detach())
    optimizer_update(ctx, step, step_loss, watch)
    tally.lrs.append(ctx.optimizer.param_groups[0]["lr"])
    ctx.scheduler.step()
    tally.sums += step_sums
    tally.seen += x.shape[0]
    return step_loss


def train_one_epoch(ctx: StepContext, loader, alpha: float, desc: str = "train", progress: bool = True,
                    resume: Optional[dict] = None) -> dict:
    """Train ctx.model for one pass over `loader`; returns the epoch's metrics (epoch_metrics).

    Train metrics are scored against the labels trained on (under mixup / cutmix, the soft
    target's larger share). No optimizer step is taken on a non-finite loss or gradient norm
    (optimizer_update); NonFiniteLossError names the first bad step (from 0 within the epoch).
    Every `ctx.checkpoint_every_s` and on a stop, `ctx.save_partial` receives the epoch so far;
    `resume` (that state) skips the steps already taken (an epoch's batches are fixed by the
    loader's seed and epoch), so the epoch ends as it would have without the interruption.
    """
    ctx.model.train()
    ctx.method.eval_teachers()
    device = next(p.device for p in ctx.model.parameters())
    deferred = getattr(ctx.optimizer, "_step_supports_amp_scaling", False) and ctx.scaler is None
    watch = LossWatch(device, verbose=is_verbose()) if deferred else None
    tally = _EpochTally(("loss", *ctx.method.terms), device)
    first, before = (int(resume["next_step"]), float(resume["seconds"])) if resume else (0, 0.0)
    if resume:
        tally.load(resume)
    bar, n_steps = Progress(len(loader), desc, progress), len(loader)
    synchronize(device)
    t0 = last_save = time.perf_counter()

    def save(next_step: int) -> str:
        if deferred:
            watch.check()  # nothing non-finite may reach a checkpoint
        return ctx.save_partial(tally.state(next_step, before + time.perf_counter() - t0)) or ""
    saver = save if ctx.save_partial is not None else None
    try:
        for step, (x, y) in enumerate(loader):
            if step < first:  # taken before the interruption: the same batch, skipped
                continue
            step_loss = train_step(ctx, loader, x, y, step, alpha, tally, watch, saver)
            if deferred and ((step + 1) % ctx.nan_check_every == 0 or step == n_steps - 1):
                watch.check()  # one host read; raises NonFiniteLossError naming the first bad step
            bar.update(step, tally.seen, lambda: float(step_loss))
            if step == n_steps - 1:  # the epoch is complete: the stage saves it, then honours a stop
                continue
            if dist.any_rank(ctx.should_stop()):
                if deferred:
                    watch.check()
                raise StopRequested(step + 1, saver(step + 1) if saver else "")
            if saver and ctx.checkpoint_every_s > 0 and time.perf_counter() - last_save >= ctx.checkpoint_every_s:
                saver(step + 1)
                last_save = time.perf_counter()
    finally:
        bar.close()
    synchronize(device)
    return epoch_metrics(ctx, tally, before + time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, precision: Precision, num_classes: int = 0,
             return_predictions: bool = False) -> dict:
    """Mean cross-entropy and macro metrics over `loader` (eval mode, no gradients).
    With `return_predictions`: y_true, y_pred [N] and the logits [N, C] (float32, CPU)."""
    was_training = model.training
    model.eval()
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
    index = np.asarray(index)
    _, first = np.unique(index, return_index=True)  # sorted by index, first occurrence of each
    return (index[first], *(np.asarray(a)[first] for a in arrays))


MAX_TEACHER_CACHE_BYTES = GiB  # frozen teachers' logits of a whole training split are cached up to this size


def compile_warmup(ctx: StepContext, sample: torch.Tensor) -> float:
    """Compile ctx.model (forward and backward) and the method's teachers on one micro-batch of `sample`
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
    if ctx.method.teachers:
        ctx.method.teacher_logits(sample, ctx.precision)  # every active teacher's forward (compiled with it)
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

"""Fit each stage into a VRAM budget and pick its fastest settings by measuring, not guessing.

- `apply_vram_budget` caps this process at `train.vram_budget_gb` (default 6) with
  torch.cuda.set_per_process_memory_fraction, so a 24 or 80 GB card behaves like the user's 6 GB one.
- `probe_plan` runs a few real training steps (the stage's model, every frozen teacher of it, its method and optimizer) for
  candidate settings and keeps one that stays under the budget minus a safety margin:
  * LayerNorm models (ViTs): the fastest of "largest micro-batch without checkpointing" and
    "largest micro-batch with checkpointing" (gradient accumulation is exact for them);
  * BatchNorm models (ResNets): micro-batching changes the batch-norm statistics, so the full
    batch is kept whenever it fits, with gradient checkpointing if that is what makes it fit;
    micro-batches only when even that does not fit;
  * ViT-Base always keeps checkpointing (the ViT-Base guard, enforce_gradient_checkpointing): only its micro-batch grows, and the step
    without checkpointing is measured at the chosen micro-batch, for the guard's report.
- With train.compile=auto, torch.compile (student and teacher) is then measured against eager at
  the chosen setting and kept only when it pays off over the stage: at least 5% faster, and the
  training time it saves over the stage's images more than the compilation costs. A stage whose
  eager training would take under COMPILE_MIN_STAGE_S is not even probed (a probe compiles).
On a CPU the configured batch is used as is; compile=auto is measured there too.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Optional

import torch

from .engine import Precision, prepare_teacher
from .methods import KD, Dense, Method, Scratch
from .recipe import make_optimizer
from ..models import count_flops, has_batchnorm, shape_only
from ..utils.devices import GiB, cuda_index, peak_reserved_bytes, reset_peak_reserved, synchronize
from ..utils.errors import ConfigError
from ..utils.logger import get_console
from ..utils.training_guards import cleanup_training_state, enforce_gradient_checkpointing, requires_gradient_checkpointing

SAFETY_MARGIN_GIB = 0.5   # room for a real card's CUDA context and fragmentation
MIN_MICRO_BATCH = 8
COMPILE_MIN_GAIN = 1.05   # compiled must be at least this much faster than eager ...
COMPILE_MIN_STAGE_S = 60.0  # ... and no compile probe for a stage whose eager training takes less than
#                             this: compiling a model takes tens of seconds, which such a stage cannot win back
CPU_FLOPS_BOUND = 2e12     # training FLOP/s no CPU of a student's laptop exceeds: a lower bound on a stage's time
log = get_console()


def apply_vram_budget(device: torch.device, budget_gb: float) -> dict:
    """Cap the process at `budget_gb` of GPU memory on `device` (no-op on CPU, or when the card is smaller)."""
    if device.type != "cuda" or budget_gb <= 0:
        return {"capped": False}
    index = cuda_index(device)  # torch refuses an un-indexed torch.device("cuda") here
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, budget_gb * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return {"capped": fraction < 1.0, "budget_gib": budget_gb, "card_gib": round(total / GiB, 1), "fraction": fraction,
            "device": f"cuda:{index}"}


def default_method(teachers) -> Method:
    """The probe's method when none is given: kd from one teacher, dense from several, else scratch."""
    teachers = [] if teachers is None else [teachers] if isinstance(teachers, torch.nn.Module) else list(teachers)
    return Scratch() if not teachers else KD(teachers) if len(teachers) == 1 else Dense(teachers)


def measure_steps(model, teachers, micro: int, image_size: int, num_classes: int, precision: Precision,
                  channels_last: bool, steps: int = 3, warmup: int = 2, full_batch: Optional[int] = None,
                  method: Optional[Method] = None, optimizer_factory: Optional[Callable] = None) -> dict:
    """Run `warmup + steps` optimizer steps on random data; return img/s and peak reserved GiB.

    Each step is the stage's: `method.step` (every frozen teacher's forward, the student's, the
    terms; default: default_method(teachers)) and the stage's optimizer (`optimizer_factory(modules,
    lr)`; default fused AdamW). One optimizer step covers `full_batch` images in micro-batches of
    `micro` (as training does). Raises torch.cuda.OutOfMemoryError when it does not fit.
    """
    device = next(p.device for p in model.parameters())
    full_batch = full_batch or micro
    n_micro = max(1, full_batch // micro)
    method = method if method is not None else default_method(teachers)
    if optimizer_factory is None:
        optimizer_factory = lambda modules, lr: make_optimizer(modules, lr, 0.0, device, "adamw")  # noqa: E731
    opt = optimizer_factory([model, method], 1e-4)
    x = torch.randn(micro, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (micro,), device=device)
    model.train()

    index = torch.arange(micro, device=device) if method.cached is not None else None  # cached logits: no teacher forward

    def step():
        opt.zero_grad(set_to_none=True)
        method.begin_batch()
        for _ in range(n_micro):
            method.step(model, x, y, 0.5, precision, index)[1]["loss"].backward()
        opt.step()

    try:
        for _ in range(warmup):
            step()
        synchronize(device)
        reset_peak_reserved(device)  # a no-op on CPU
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        elapsed = time.perf_counter() - t0
        peak = peak_reserved_bytes(device) / GiB
    finally:
        opt.state.clear()
    return {"img_per_s": steps * n_micro * micro / elapsed, "peak_reserved_gib": peak}


def _fresh(builder, grad_ckpt: bool, name: str, device, channels_last: bool):
    model = builder().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if grad_ckpt:
        enforce_gradient_checkpointing(model, name, verbose=False, force=True)
    return model


def _release(model, device):
    for m in model if isinstance(model, list) else [model]:
        if m is not None:
            cleanup_training_state(model=m, verbose=False, device=device)


def _frozen(teacher_builder, device, precision, channels_last, compile_model: bool = False) -> list:
    """Every frozen model of the stage, prepared as training prepares them (`teacher_builder`
    returns one model or a list of them)."""
    if teacher_builder is None:
        return []
    built = teacher_builder()
    built = built if isinstance(built, (list, tuple)) else [built]
    return [prepare_teacher(t, device, precision, channels_last, compile_model=compile_model) for t in built]


class StepSpec:
    """What the probe's steps compute: the stage's method (`method_builder(teachers, student)`, built
    around the frozen models and the student) and its optimizer; defaults: kd / dense / scratch by
    the number of teachers, fused AdamW."""

    def __init__(self, method_builder: Optional[Callable] = None, optimizer_factory: Optional[Callable] = None):
        self.method_builder, self.optimizer_factory = method_builder, optimizer_factory

    def measure(self, model, teachers: list, micro: int, image_size: int, num_classes: int, precision, channels_last,
                **kw) -> dict:
        method = self.method_builder(teachers, model) if self.method_builder is not None else None
        if method is not None:
            method = method.to(next(model.parameters()).device)
        return measure_steps(model, teachers, micro, image_size, num_classes, precision, channels_last,
                             method=method, optimizer_factory=self.optimizer_factory, **kw)


class _Prober:
    """One trial = a fresh model, a few measured steps, the model released; OOM counts as 'does not fit'."""

    def __init__(self, builder, teacher, name, image_size, num_classes, device, precision, channels_last, batch, limit,
                 spec: Optional[StepSpec] = None):
        self.builder, self.teacher, self.name, self.spec = builder, teacher, name, spec or StepSpec()
        self.image_size, self.num_classes, self.device = image_size, num_classes, device
        self.precision, self.channels_last, self.batch, self.limit = precision, channels_last, batch, limit
        self.trials: list = []

    def __call__(self, micro: int, ckpt: bool) -> dict:
        model = None
        try:
            model = _fresh(self.builder, ckpt, self.name, self.device, self.channels_last)
            m = self.spec.measure(model, self.teacher, micro, self.image_size, self.num_classes, self.precision,
                                  self.channels_last, full_batch=self.batch)
            fits = m["peak_reserved_gib"] <= self.limit
        except torch.cuda.OutOfMemoryError:
            m, fits = {"img_per_s": 0.0, "peak_reserved_gib": float("inf")}, False
        finally:
            _release(model, self.device)
            torch.cuda.empty_cache()
        trial = {"micro_batch": micro, "grad_ckpt": ckpt, **m, "fits": fits}
        self.trials.append(trial)
        return trial

    def largest_fitting(self, ckpt: bool) -> Optional[dict]:
        micro = self.batch
        while micro >= min(MIN_MICRO_BATCH, self.batch):
            trial = self(micro, ckpt)
            if trial["fits"]:
                return trial
            micro //= 2
        return None

    def find(self, model_name: str, batchnorm: bool, forced: bool) -> tuple[Optional[dict], str]:
        if forced:
            return self.largest_fitting(True), "checkpointing required (the ViT-Base guard, enforce_gradient_checkpointing): largest micro-batch that fits"
        if batchnorm:
            for ckpt in (False, True):
                full = self(self.batch, ckpt)
                if full["fits"]:
                    return full, ("BatchNorm model: full batch" + (" with checkpointing" if ckpt else "")
                                  + " (micro-batches would change the batch statistics)")
            return self.largest_fitting(True), "BatchNorm model: the full batch does not fit even with checkpointing"
        options = [t for t in (self.largest_fitting(False), self.largest_fitting(True)) if t is not None]
        best = max(options, key=lambda t: t["img_per_s"]) if options else None
        return best, "fastest of the largest micro-batches with and without checkpointing"


def probe_plan(plan, *, model_builder, teacher_builder, model_name: str, image_size: int, num_classes: int,
               device: torch.device, precision: Precision, channels_last: bool, budget_gb: float,
               compile_mode: str = "auto", images_to_train: Optional[int] = None, spec: Optional[StepSpec] = None):
    """Return a copy of `plan` with micro_batch / grad_checkpointing / compile chosen by measurement,
    and `ckpt_memory` (peak reserved with and without checkpointing at the chosen micro-batch)
    when checkpointing is on. `images_to_train` (the stage's epochs x images per epoch) lets the
    compile decision weigh the time compiling saves against what it costs. `teacher_builder`
    returns the stage's frozen model(s), all in memory during every trial; `spec` is the stage's
    method and optimizer."""
    spec = spec or StepSpec()
    if device.type != "cuda":
        return _probe_cpu(plan, model_builder, teacher_builder, model_name, image_size, num_classes, device,
                          channels_last, compile_mode, images_to_train, spec)
    limit = max(0.5, budget_gb - SAFETY_MARGIN_GIB) if budget_gb > 0 else float("inf")
    teacher = _frozen(teacher_builder, device, precision, channels_last)
    probe_model = model_builder()
    batchnorm = has_batchnorm(probe_model)
    del probe_model
    forced = requires_gradient_checkpointing(model_name) or plan.grad_checkpointing
    prober = _Prober(model_builder, teacher, model_name, image_size, num_classes, device, precision, channels_last,
                     plan.batch_size, limit, spec)
    try:
        best, why = prober.find(model_name, batchnorm, forced)
        if best is None:
            raise ConfigError(f"{model_name}: no micro-batch down to {MIN_MICRO_BATCH} fits in "
                              f"{budget_gb} GB (peak reserved must stay under {limit:.1f} GiB); "
                              f"lower data.image_size or train.batch_size, or raise train.vram_budget_gb")
        micro = best["micro_batch"]
        ckpt_memory = None
        if best["grad_ckpt"]:  # what checkpointing saves at this very micro-batch, for the guard's report
            without = next((t for t in prober.trials if t["micro_batch"] == micro and not t["grad_ckpt"]), None)
            without = without or prober(micro, False)
            ckpt_memory = {"micro_batch": micro, "image_size": image_size, "with_gib": round(best["peak_reserved_gib"], 3),
                           "without_gib": (round(without["peak_reserved_gib"], 3)
                                           if without["peak_reserved_gib"] != float("inf") else None),
                           "budget_gib": budget_gb}
        new = replace(plan, micro_batch=None if micro >= plan.batch_size else micro, grad_checkpointing=best["grad_ckpt"],
                      ckpt_memory=ckpt_memory, batchnorm=batchnorm,
                      notes=plan.notes + [f"choice: {why}"] + [
                          f"probe: {t['micro_batch']}{' +ckpt' if t['grad_ckpt'] else ''} -> "
                          f"{t['img_per_s']:.0f} img/s, {t['peak_reserved_gib']:.2f} GiB"
                          f"{'' if t['fits'] else ' (over budget)'}" for t in prober.trials],
                      probe_img_per_s=round(best["img_per_s"], 1), probe_peak_gib=round(best["peak_reserved_gib"], 3))
        if compile_mode == "auto":
            new = plan_compile(new, best["img_per_s"], images_to_train, lambda p: _probe_compile(
                p, best, model_builder, teacher_builder, model_name, image_size, num_classes, device, precision,
                channels_last, limit, images_to_train, spec))
        else:
            new = replace(new, compile=compile_mode == "true")
        return new
    finally:
        _release(teacher, device)
        torch.cuda.empty_cache()


def _probe_cpu(plan, model_builder, teacher_builder, model_name, image_size, num_classes, device, channels_last,
               compile_mode, images_to_train, spec: StepSpec):
    """On a CPU no memory limit applies: the configured batch is kept, and with compile=auto
    torch.compile is measured against eager as on CUDA (kept only where it pays off)."""
    plan = replace(plan, notes=plan.notes + ["CPU: configured batch used"])
    if compile_mode != "auto":
        return replace(plan, compile=compile_mode == "true")
    if images_to_train:  # no probe (5 training steps, or a compilation) for a stage too short to repay one
        bound_s = images_to_train * 3 * _forward_flops(model_builder, image_size, device) / CPU_FLOPS_BOUND
        if bound_s < COMPILE_MIN_STAGE_S:
            return replace(plan, compile=False, notes=plan.notes + [
                f"compile: not probed (training takes at least {bound_s:.1f}s of compute even at "
                f"{CPU_FLOPS_BOUND / 1e12:g} TFLOP/s, under {COMPILE_MIN_STAGE_S:.0f}s) -> off"])
    precision = Precision(device.type, None)
    model = teacher = None
    try:
        model = _fresh(model_builder, plan.grad_checkpointing, model_name, device, channels_last)
        teacher = _frozen(teacher_builder, device, precision, channels_last)
        eager = spec.measure(model, teacher, plan.batch_size, image_size, num_classes, precision, channels_last)
    finally:
        _release(model, device)
        _release(teacher, device)
    plan = replace(plan, probe_img_per_s=round(eager["img_per_s"], 1),
                   notes=plan.notes + [f"probe: eager {eager['img_per_s']:.0f} img/s"])
    return plan_compile(plan, eager["img_per_s"], images_to_train, lambda p: _probe_compile(
        p, eager, model_builder, teacher_builder, model_name, image_size, num_classes, device, precision,
        channels_last, float("inf"), images_to_train, spec))


def _forward_flops(model_builder, image_size: int, device: torch.device) -> int:
    """FLOPs of one image's forward pass: counted on the meta device (shapes only, no weights
    initialised), or on a real model where the meta device cannot run it."""
    model = shape_only(model_builder)
    if model is not None:
        try:
            return count_flops(model, image_size, torch.device("meta"))
        except Exception:  # noqa: BLE001 (an operation without a meta kernel)
            pass
    return count_flops(model_builder(), image_size, device)


def plan_compile(plan, eager_img_s: float, images_to_train: Optional[int], probe: Callable):
    """compile=auto: `probe(plan)` measures compiled against eager and decides, unless the stage's
    eager training (images_to_train / eager_img_s) is too short for any compilation to pay off."""
    eager_s = images_to_train / eager_img_s if images_to_train and eager_img_s else None
    if eager_s is not None and eager_s < COMPILE_MIN_STAGE_S:
        return replace(plan, compile=False, notes=plan.notes + [
            f"compile: not probed (eager training about {eager_s:.0f}s, under {COMPILE_MIN_STAGE_S:.0f}s: "
            f"too short to win back a compilation) -> off"])
    return probe(plan)


def compile_decision(eager_img_s: float, compiled_img_s: float, compile_s: float,
                     images_to_train: Optional[int] = None) -> tuple[bool, str]:
    """Whether to compile, and why: at least COMPILE_MIN_GAIN faster, and (when the stage's image
    count is known) the training time saved over the stage larger than the compilation's cost."""
    gain = compiled_img_s / eager_img_s if eager_img_s else 0.0
    why = f"{compiled_img_s:,.0f} img/s vs eager {eager_img_s:,.0f} ({gain:.2f}x)"
    use = gain >= COMPILE_MIN_GAIN
    if images_to_train and use:
        saved = images_to_train / eager_img_s - images_to_train / compiled_img_s
        use = saved > compile_s
        why += f"; saves {saved:.0f}s of training over {images_to_train:,} images, compiling costs {compile_s:.0f}s"
    return use, why


def _probe_compile(plan, best, model_builder, teacher_builder, model_name, image_size, num_classes, device, precision,
                   channels_last, limit, images_to_train=None, spec: Optional[StepSpec] = None):
    """Compiled student (and teacher) against eager at the chosen setting; on only when it pays off."""
    model = teacher = None
    micro = plan.micro_batch or plan.batch_size
    warmup, steps = 3, 5
    t0 = time.perf_counter()
    try:
        model = _fresh(model_builder, plan.grad_checkpointing, model_name, device, channels_last)
        teacher = _frozen(teacher_builder, device, precision, channels_last, compile_model=True)
        m = (spec or StepSpec()).measure(torch.compile(model), teacher, micro, image_size, num_classes, precision,
                                         channels_last, steps=steps, warmup=warmup, full_batch=plan.batch_size)
    except Exception as exc:  # compile failures must never stop training: eager is always there
        return replace(plan, compile=False, notes=plan.notes + [f"compile: failed ({type(exc).__name__}), eager kept"])
    finally:
        _release(model, device)
        _release(teacher, device)
        torch.cuda.empty_cache()
    # the compilation: the probe's time less its steps at the compiled speed
    compile_s = max(0.0, time.perf_counter() - t0 - (warmup + steps) * plan.batch_size / m["img_per_s"])
    use, why = compile_decision(best["img_per_s"], m["img_per_s"], compile_s, images_to_train)
    fits = m["peak_reserved_gib"] <= limit
    if not fits:
        why += f"; compiled peak {m['peak_reserved_gib']:.2f} GiB over the {limit:.2f} GiB limit"
    # the compiled speed is kept only when it fits: a reused plan re-decides compile from it
    return replace(plan, compile=use and fits, probe_compile_seconds=round(compile_s, 1),
                   probe_compiled_img_per_s=round(m["img_per_s"], 1) if fits else None,
                   notes=plan.notes + [f"compile: {why} -> {'on' if use and fits else 'off'}"])

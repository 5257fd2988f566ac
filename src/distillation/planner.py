"""Fit each stage into a VRAM budget and pick its fastest settings by measuring, not guessing.

- `apply_vram_budget` caps this process at `train.vram_budget_gb` (default 6) with
  torch.cuda.set_per_process_memory_fraction, so a 24 or 80 GB card behaves like the user's 6 GB one.
- `probe_plan` tries micro-batches (largest first; gradient accumulation keeps the configured
  batch) with and without gradient checkpointing, each for a few real training steps with the
  stage's model and its frozen teacher, and keeps the fastest that stays under the budget minus a
  safety margin. ViT-Base always keeps checkpointing (spec fix 2): only its micro-batch grows.
- With train.compile=auto, torch.compile is then measured against eager at the chosen setting
  and kept only when it is at least 5% faster.
Without CUDA nothing is probed: the configured batch is used as is.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Optional

import torch

from src.distillation.engine import Precision
from src.distillation.losses import kd_loss
from src.utils.errors import ConfigError
from src.utils.logger import get_console
from src.utils.training_guards import (cleanup_training_state, enforce_gradient_checkpointing, freeze_teacher,
                                       requires_gradient_checkpointing)

GiB = 1024 ** 3
SAFETY_MARGIN_GIB = 0.5   # room for a real card's CUDA context and fragmentation
MIN_MICRO_BATCH = 8
log = get_console()


def apply_vram_budget(device: torch.device, budget_gb: float) -> dict:
    """Cap the process at `budget_gb` of GPU memory (no-op on CPU, or when the card is smaller)."""
    if device.type != "cuda" or budget_gb <= 0:
        return {"capped": False}
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget_gb * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"capped": fraction < 1.0, "budget_gib": budget_gb, "card_gib": round(total / GiB, 1), "fraction": fraction}


def measure_steps(model, teacher, micro: int, image_size: int, num_classes: int, precision: Precision,
                  channels_last: bool, steps: int = 3, warmup: int = 2, full_batch: Optional[int] = None) -> dict:
    """Run `warmup + steps` optimizer steps on random data; return img/s and peak reserved GiB.

    One optimizer step covers `full_batch` images in micro-batches of `micro` (as training does).
    Raises torch.cuda.OutOfMemoryError when it does not fit.
    """
    device = next(model.parameters()).device
    full_batch = full_batch or micro
    n_micro = max(1, full_batch // micro)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=device.type == "cuda" or None)
    x = torch.randn(micro, 3, image_size, image_size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (micro,), device=device)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(n_micro):
            t_logits = None
            if teacher is not None:
                with torch.no_grad(), precision.autocast():
                    t_logits = teacher(x)
            with precision.autocast():
                logits = model(x)
            kd_loss(logits, y, t_logits, 0.5, 4.0)["loss"].backward()
        opt.step()

    try:
        for _ in range(warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_reserved() / GiB if device.type == "cuda" else 0.0
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


def _release(model):
    if model is not None:
        cleanup_training_state(model=model, verbose=False)


def probe_plan(plan, *, model_builder, teacher_builder, model_name: str, image_size: int, num_classes: int,
               device: torch.device, precision: Precision, channels_last: bool, budget_gb: float,
               compile_mode: str = "auto"):
    """Return a copy of `plan` with micro_batch / grad_checkpointing / compile chosen by measurement."""
    if device.type != "cuda":
        return replace(plan, notes=plan.notes + ["no CUDA: configured batch used, nothing probed"])
    limit = max(0.5, budget_gb - SAFETY_MARGIN_GIB) if budget_gb > 0 else float("inf")
    teacher = None
    if teacher_builder is not None:
        teacher = freeze_teacher(teacher_builder().to(device), verbose=False)
        if channels_last:
            teacher = teacher.to(memory_format=torch.channels_last)
    forced = requires_gradient_checkpointing(model_name) or plan.grad_checkpointing
    options = [True] if forced else [False, True]
    trials, best = [], None
    try:
        for ckpt in options:
            micro = plan.batch_size
            while micro >= min(MIN_MICRO_BATCH, plan.batch_size):
                model = None
                try:
                    model = _fresh(model_builder, ckpt, model_name, device, channels_last)
                    m = measure_steps(model, teacher, micro, image_size, num_classes, precision, channels_last,
                                      full_batch=plan.batch_size)
                    fits = m["peak_reserved_gib"] <= limit
                except torch.cuda.OutOfMemoryError:
                    m, fits = {"img_per_s": 0.0, "peak_reserved_gib": float("inf")}, False
                finally:
                    _release(model)
                    torch.cuda.empty_cache()
                trials.append({"micro_batch": micro, "grad_ckpt": ckpt, **m, "fits": fits})
                if fits:
                    if best is None or m["img_per_s"] > best["img_per_s"]:
                        best = trials[-1]
                    break  # the largest micro-batch that fits is the one worth having at this setting
                micro //= 2
        if best is None:
            raise ConfigError(f"{model_name}: no micro-batch down to {MIN_MICRO_BATCH} fits in "
                               f"{budget_gb} GB (peak reserved must stay under {limit:.1f} GiB); "
                               f"lower data.image_size or train.batch_size, or raise train.vram_budget_gb")
        micro = best["micro_batch"]
        new = replace(plan, micro_batch=None if micro >= plan.batch_size else micro, grad_checkpointing=best["grad_ckpt"],
                      notes=plan.notes + [f"probe: {t['micro_batch']}{' +ckpt' if t['grad_ckpt'] else ''} -> "
                                          f"{t['img_per_s']:.0f} img/s, {t['peak_reserved_gib']:.2f} GiB"
                                          f"{'' if t['fits'] else ' (over budget)'}" for t in trials])
        if compile_mode == "auto":
            new = _probe_compile(new, best, model_builder, teacher, model_name, image_size, num_classes, device,
                                 precision, channels_last, limit)
        else:
            new = replace(new, compile=compile_mode == "true")
        return new
    finally:
        _release(teacher)
        torch.cuda.empty_cache()


def _probe_compile(plan, best, model_builder, teacher, model_name, image_size, num_classes, device, precision,
                   channels_last, limit):
    model = None
    micro = plan.micro_batch or plan.batch_size
    try:
        model = _fresh(model_builder, plan.grad_checkpointing, model_name, device, channels_last)
        compiled = torch.compile(model)
        m = measure_steps(compiled, teacher, micro, image_size, num_classes, precision, channels_last,
                          steps=5, warmup=3, full_batch=plan.batch_size)
    except Exception as exc:  # compile failures must never stop training: eager is always there
        return replace(plan, compile=False, notes=plan.notes + [f"compile: failed ({type(exc).__name__}), eager kept"])
    finally:
        _release(model)
        torch.cuda.empty_cache()
    gain = m["img_per_s"] / best["img_per_s"] if best["img_per_s"] else 0.0
    use = gain >= 1.05 and m["peak_reserved_gib"] <= limit
    return replace(plan, compile=use, notes=plan.notes + [
        f"compile: {m['img_per_s']:.0f} img/s vs eager {best['img_per_s']:.0f} ({gain:.2f}x) -> {'on' if use else 'off'}"])

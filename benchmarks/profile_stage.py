"""Where a stage's training time goes: torch.profiler over real training steps of one stage.

    python benchmarks/profile_stage.py                              # ResNet-18 <- ResNet-34, 32 px (CNN preset's student)
    python benchmarks/profile_stage.py --chain vit --stage student  # ViT-Tiny <- ViT-Small
    python benchmarks/profile_stage.py --tiny --device cpu          # plumbing check on a CPU (tests)

The stage runs as the chain runs it: the preset's recipe (step_context: label smoothing, gradient
clipping, mixup / cutmix), the planner's batch / micro-batch / checkpointing / compile under the
budget, the bf16 frozen teacher, the TensorLoader (augmentation on the device) and
train_one_epoch; random weights and synthetic uint8 images (the speed does not depend on them).
One warm-up epoch, one timed epoch without the profiler, then one profiled epoch.

It prints one summary table (per optimizer step: wall ms, device-busy ms = the sum of kernel
times, device idle share, host synchronisations, values read back to the host, kernel launches,
host->device copies) and the top operators by device time and by host time, and writes a Chrome
trace (chrome://tracing or https://ui.perfetto.dev) and the tables under --out.
Host reads count aten::_local_scalar_dense events; on a CPU they include the scalar reads inside
CPU kernels (the fused CPU AdamW reads its step counters), which cost nothing there.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

from benchmarks.bench_stages import (PRESETS, stage_step_context, synthetic_split, build_for_plan, plan_stage,  # noqa: E402
                                     random_weight_builders)
from src.data.loaders import TensorLoader  # noqa: E402
from src.spec.config import load_config  # noqa: E402
from src.distillation.engine import Precision, compile_warmup, train_one_epoch  # noqa: E402
from src.distillation.planner import apply_vram_budget  # noqa: E402
from src.distillation.stage import use_channels_last  # noqa: E402
from src.utils.devices import resolve_device  # noqa: E402
from src.utils.reproducibility import setup_reproducibility  # noqa: E402

# profiler event names, by what they cost the pipeline
SYNC_EVENTS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
READ_EVENTS = ("aten::_local_scalar_dense",)   # .item(), float(t), bool(t)
COPY_EVENTS = ("cudaMemcpyAsync",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--chain", choices=("cnn", "vit"), default="cnn")
    p.add_argument("--resolution", type=int, choices=(32, 224), default=32)
    p.add_argument("--stage", default="student", help="stage name in the preset (teacher, assistant, student)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per epoch (warm-up, timed, profiled)")
    p.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--budget-gb", type=float, default=6.0)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny models and 16 px: a CPU plumbing check")
    p.add_argument("--top", type=int, default=15, help="rows of the operator tables")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/profile")
    args = p.parse_args(argv)
    if args.tiny and args.batch is None:
        args.batch = 16
    return args


def _count(averages, names) -> int:
    return sum(e.count for e in averages if e.key in names)


def summarise(prof, steps: int, wall_s: float, timed_img_per_s: float, batch: int) -> dict:
    """Per-step figures from a profiled epoch of `steps` optimizer steps that took `wall_s`."""
    avg = prof.key_averages()
    # device time = kernels, copies and memsets (how the profiler's own table totals it)
    device_us = sum(e.self_device_time_total for e in avg if e.device_type == DeviceType.CUDA
                    and not getattr(e, "is_user_annotation", False))
    wall_ms = wall_s * 1000 / steps
    busy_ms = device_us / 1000 / steps
    return {"steps": steps, "batch": batch, "img_per_s_unprofiled": round(timed_img_per_s, 1),
            "wall_ms_per_step": round(wall_ms, 2), "device_busy_ms_per_step": round(busy_ms, 2),
            "device_idle_share": round(max(0.0, 1 - busy_ms / wall_ms), 3) if busy_ms else None,
            "syncs_per_step": round(_count(avg, SYNC_EVENTS) / steps, 2),
            "host_reads_per_step": round(_count(avg, READ_EVENTS) / steps, 2),
            "launches_per_step": round(_count(avg, LAUNCH_EVENTS) / steps, 1),
            "copies_per_step": round(_count(avg, COPY_EVENTS) / steps, 2)}


def _table(prof, sort_by: str, top: int) -> str:
    return prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60)


def run(args) -> dict:
    device = resolve_device(args.device)
    apply_vram_budget(device, args.budget_gb)
    cfg = load_config(ROOT / PRESETS[(args.chain, args.resolution)])
    if args.tiny:
        cfg = replace(cfg, data=replace(cfg.data, image_size=16 if args.resolution == 32 else 32))
    stage = cfg.stage(args.stage)
    setup_reproducibility(cfg.seed, cfg.deterministic)  # cuDNN autotuning as the preset has it
    builder, tbuilder = random_weight_builders(cfg, stage, 10, args.tiny)
    precision = Precision.choose(device, cfg.train.amp, cfg.train.amp_dtype)
    cl = use_channels_last(cfg, stage, device)
    plan = plan_stage(cfg, stage, builder, tbuilder, device, precision, cl, args.budget_gb, args.batch,
                      args.no_compile, args.tiny)
    model, teacher = build_for_plan(builder, tbuilder, plan, stage.model, device, precision, cl)
    ctx = stage_step_context(cfg, stage, model, teacher, precision, plan, device)
    loader = TensorLoader(synthetic_split(plan.batch_size * args.steps, cfg.data.image_size), plan.batch_size, device,
                          True, replace(cfg.data, num_workers=0), channels_last=cl)
    alpha = 0.5 if teacher else 0.0
    compile_s = 0.0
    if plan.compile:
        sample = torch.randn(plan.micro_batch or plan.batch_size, 3, cfg.data.image_size, cfg.data.image_size, device=device)
        compile_s = compile_warmup(ctx, sample.contiguous(memory_format=torch.channels_last) if cl else sample)
    train_one_epoch(ctx, loader, alpha, progress=False)            # warm-up: autotuning, allocator, lazy init
    timed = train_one_epoch(ctx, loader, alpha, progress=False)    # the speed without the profiler's overhead

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        out = train_one_epoch(ctx, loader, alpha, progress=False)
    wall = time.perf_counter() - t0
    summary = summarise(prof, out["steps"], wall, timed["img_per_s"], plan.batch_size)
    summary.update(chain=args.chain, image_size=cfg.data.image_size, stage=stage.name, model=stage.model,
                   teacher="+".join(cfg.stage(n).model for n in stage.teachers), micro_batch=plan.micro_batch or plan.batch_size,
                   grad_ckpt=plan.grad_checkpointing, compile=plan.compile, compile_seconds=round(compile_s, 1),
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__)

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{args.chain}{cfg.data.image_size}_{stage.name}"
    trace = args.out / f"{name}_trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    sort_device = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = (f"# top operators by device time\n{_table(prof, sort_device, args.top)}\n"
              f"# top operators by host time\n{_table(prof, 'self_cpu_time_total', args.top)}\n")
    (args.out / f"{name}_ops.txt").write_text(tables)
    (args.out / f"{name}_summary.json").write_text(json.dumps(summary, indent=2))
    summary["tables"] = tables
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    s = run(args)
    print(s.pop("tables"))
    keys = ["chain", "image_size", "stage", "model", "teacher", "batch", "micro_batch", "grad_ckpt", "compile",
            "img_per_s_unprofiled", "wall_ms_per_step", "device_busy_ms_per_step", "device_idle_share", "syncs_per_step",
            "host_reads_per_step", "launches_per_step", "copies_per_step", "device", "torch"]
    width = max(len(k) for k in keys)
    print("\n".join(f"{k:<{width}}  {s[k]}" for k in keys))
    print(f"\ntrace and tables: {args.out}")
    return 0


if __name__ == "__main__":
    from src.utils.devices import freeze_import_heap
    freeze_import_heap()
    sys.exit(main())

"""Speed and memory of every stage of both chains under the VRAM budget, against a naive baseline.

For each chain (cnn, vit) and resolution (32 px from-scratch presets, 224 px pretrained presets,
random weights), each stage runs with its frozen teacher's forward pass:
  ours      the planner's micro-batch / checkpointing / compile, bf16 autocast, channels_last for
            CNNs, the dataset resident on the GPU with on-device crop + flip (+ resize to 224);
  baseline  fp32, no channels_last, torchvision transforms in a CPU DataLoader (2 workers),
            the largest batch that fits the same budget.
Both go through the same training engine (validate_loss, metrics and all) and are timed over
whole epochs of synthetic CIFAR-size uint8 data after a warm-up epoch.

    python benchmarks/bench_stages.py                    # on a GPU: full table, CSV and RESULTS.md
    python benchmarks/bench_stages.py --tiny             # CPU smoke test with tiny models (CI)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from src.data.loaders import StreamLoader, TensorLoader  # noqa: E402
from src.data.sources import Split  # noqa: E402
from src.distillation.config import load_config  # noqa: E402
from src.distillation.engine import Precision, StepContext, train_one_epoch  # noqa: E402
from src.distillation.planner import GiB, SAFETY_MARGIN_GIB, apply_vram_budget, measure_steps, probe_plan  # noqa: E402
from src.distillation.stage import StagePlan, build_stage_model, use_channels_last  # noqa: E402
from src.models import count_flops  # noqa: E402
from src.utils.training_guards import cleanup_training_state, freeze_teacher, requires_gradient_checkpointing  # noqa: E402

COLUMNS = ["chain", "stage", "model", "teacher", "image_size", "micro_batch", "grad_ckpt", "peak_reserved_gib",
           "img_per_s", "baseline_img_per_s", "speedup", "mfu", "gpu", "torch", "date"]
PRESETS = {("cnn", 32): "cnn_distillation/configs/cifar10.yaml", ("cnn", 224): "cnn_distillation/configs/cifar10_pretrained.yaml",
           ("vit", 32): "vit_distillation/configs/cifar10.yaml", ("vit", 224): "vit_distillation/configs/cifar10_pretrained.yaml"}
# Dense bf16 tensor-core peak, TFLOP/s, for MFU. Unknown cards: pass --peak-tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "RTX 3060": 51.2, "RTX 4090": 165.2}
TINY_MODELS = {"resnet50": ("resnet18", {}), "resnet34": ("resnet18", {}), "resnet18": ("resnet18", {}),
               "vit_base_patch16_224": ("vit_tiny_patch16_224", dict(embed_dim=32, depth=1, num_heads=2)),
               "vit_small_patch16_224": ("vit_tiny_patch16_224", dict(embed_dim=32, depth=1, num_heads=2)),
               "vit_tiny_patch16_224": ("vit_tiny_patch16_224", dict(embed_dim=16, depth=1, num_heads=2))}


def _peak_tflops(name: str, override):
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _synthetic_split(n: int, size: int = 32, classes: int = 10) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(labels=torch.randint(0, classes, (n,), generator=g),
                 images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g))


def _timed_epoch(model, teacher, loader, precision, micro, compile_model=False) -> float:
    """Warm-up epoch, then a timed epoch through the real engine; returns img/s."""
    train_model = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            fused=next(model.parameters()).is_cuda or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    ctx = StepContext(model=train_model, optimizer=opt, scheduler=sched, precision=precision, scaler=scaler,
                      teacher=teacher, micro_batch=micro, num_classes=10)
    train_one_epoch(ctx, loader, alpha=0.5 if teacher is not None else 0.0, progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = train_one_epoch(ctx, loader, alpha=0.5 if teacher is not None else 0.0, progress=False)
    opt.state.clear()
    return out["img_per_s"]


def bench_stage(cfg, stage, device, args, gpu_name):
    num_classes, size = 10, cfg.data.image_size
    def bare(s):  # random weights (speed and memory only); tiny stand-ins for the CPU smoke test
        if args.tiny:
            name, kw = TINY_MODELS.get(s.model, (s.model, {}))
            s = replace(s, model=name, model_kwargs=kw)
        return replace(s, pretrained=False, pretrained_file=None, checkpoint=None)
    builder = lambda: build_stage_model(cfg, bare(stage), num_classes)  # noqa: E731
    tbuilder = (lambda: build_stage_model(cfg, bare(cfg.stage(stage.teacher)), num_classes)) if stage.teacher else None
    precision = Precision.choose(device, True)
    cl = use_channels_last(cfg, stage, device)
    plan = StagePlan(epochs=1, batch_size=args.batch or cfg.train.batch_size,
                     grad_checkpointing=requires_gradient_checkpointing(stage.model) and not args.tiny)
    plan = probe_plan(plan, model_builder=builder, teacher_builder=tbuilder, model_name=stage.model, image_size=size,
                      num_classes=num_classes, device=device, precision=precision, channels_last=cl,
                      budget_gb=args.budget_gb, compile_mode="false" if args.no_compile else "auto")
    data_cfg = replace(cfg.data, num_workers=args.workers, random_erasing=0.0)
    n_images = plan.batch_size * args.steps
    split = _synthetic_split(n_images)

    def make(teacher_needed, fp32):
        m = builder().to(device)
        if plan.grad_checkpointing and not fp32:
            from src.utils.training_guards import enforce_gradient_checkpointing
            enforce_gradient_checkpointing(m, stage.model, verbose=False, force=True)
        if cl and not fp32:
            m = m.to(memory_format=torch.channels_last)
        t = None
        if teacher_needed and tbuilder is not None:
            t = freeze_teacher(tbuilder().to(device), verbose=False)
            if cl and not fp32:
                t = t.to(memory_format=torch.channels_last)
        return m, t

    # ours
    model, teacher = make(True, False)
    loader = TensorLoader(split, plan.batch_size, device, True, data_cfg, channels_last=cl)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours = _timed_epoch(model, teacher, loader, precision, plan.micro_batch, plan.compile)
    peak = torch.cuda.max_memory_reserved() / GiB if device.type == "cuda" else 0.0
    per_img = 3 * count_flops(model, size, device) + (count_flops(teacher, size, device) if teacher is not None else 0)
    cleanup_training_state(model=model, verbose=False)
    if teacher is not None:
        cleanup_training_state(model=teacher, verbose=False)
    del loader

    # naive baseline: fp32, CPU DataLoader with torchvision transforms, largest batch that fits
    fp32 = Precision(device.type, None)
    base_bs = _largest_fp32_batch(builder, tbuilder, size, device, args) if device.type == "cuda" else plan.batch_size
    model, teacher = make(True, True)
    bl = StreamLoader(_synthetic_split(base_bs * args.steps), base_bs, device, True, data_cfg, from_tensors=True)
    base = _timed_epoch(model, teacher, bl, fp32, None)
    cleanup_training_state(model=model, verbose=False)
    if teacher is not None:
        cleanup_training_state(model=teacher, verbose=False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak_tf = _peak_tflops(gpu_name, args.peak_tflops)
    return {"stage": stage.name, "model": stage.model, "teacher": cfg.stage(stage.teacher).model if stage.teacher else "",
            "image_size": size, "micro_batch": plan.micro_batch or plan.batch_size, "grad_ckpt": plan.grad_checkpointing,
            "peak_reserved_gib": round(peak, 3), "img_per_s": round(ours, 1), "baseline_img_per_s": round(base, 1),
            "speedup": round(ours / base, 2) if base else None,
            "mfu": round(per_img * ours / (peak_tf * 1e12), 4) if peak_tf and device.type == "cuda" else None,
            "compile": plan.compile, "baseline_batch": base_bs}


def _largest_fp32_batch(builder, tbuilder, size, device, args) -> int:
    limit = args.budget_gb - SAFETY_MARGIN_GIB
    best, bs = 0, 32
    teacher = freeze_teacher(tbuilder().to(device), verbose=False) if tbuilder else None
    while bs <= 1024:
        model = builder().to(device)
        try:
            m = measure_steps(model, teacher, bs, size, 10, Precision("cuda", None), False, steps=1, warmup=1)
            if m["peak_reserved_gib"] > limit:
                break
            best = bs
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            cleanup_training_state(model=model, verbose=False)
            torch.cuda.empty_cache()
        bs *= 2
    if teacher is not None:
        cleanup_training_state(model=teacher, verbose=False)
    return max(best, 8)


def write_results_md(df: pd.DataFrame, path: Path) -> None:
    start, end = "<!-- stages:begin -->", "<!-- stages:end -->"
    table = df[COLUMNS].to_markdown(index=False) if hasattr(df, "to_markdown") else df[COLUMNS].to_string(index=False)
    block = f"{start}\n{table}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n## Stages (bench_stages.py)\n\n{block}\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", default="cnn,vit")
    p.add_argument("--resolutions", default="32,224")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed epoch")
    p.add_argument("--budget-gb", type=float, default=6.0)
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers (the user's 2-4 cores)")
    p.add_argument("--batch", type=int, default=None, help="override the presets' batch size")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny models and 16 px: a CPU smoke test")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stages.csv")
    p.add_argument("--results-md", type=Path, default=ROOT / "benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.tiny and args.batch is None:
        args.batch = 16
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    apply_vram_budget(device, args.budget_gb)
    rows = []
    for chain in args.chains.split(","):
        for res in (int(r) for r in args.resolutions.split(",")):
            cfg = load_config(ROOT / PRESETS[(chain, res)])
            if args.tiny:
                cfg = replace(cfg, data=replace(cfg.data, image_size=16 if res == 32 else 32))
            for stage in cfg.stages:
                t0 = time.perf_counter()
                row = bench_stage(cfg, stage, device, args, gpu)
                row.update(chain=chain, gpu=gpu, torch=torch.__version__, date=_dt.date.today().isoformat())
                rows.append(row)
                print(f"{chain:>3} {res:>3}px {stage.name:<9} micro {row['micro_batch']:>4} ckpt {str(row['grad_ckpt']):<5} "
                      f"{row['img_per_s']:>8.0f} img/s  baseline {row['baseline_img_per_s']:>7.0f}  x{row['speedup']}  "
                      f"{row['peak_reserved_gib']:.2f} GiB  ({time.perf_counter() - t0:.0f}s)", flush=True)
    df = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df[COLUMNS].to_csv(args.out, index=False)
    if not args.tiny:
        write_results_md(df, args.results_md)
    print()
    print(df[COLUMNS].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

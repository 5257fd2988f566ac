"""Speed and memory of every stage of both chains under the VRAM budget, against two references.

For each chain (cnn, vit) and resolution (32 px from-scratch presets, 224 px pretrained presets,
random weights), each stage runs with its frozen teacher's forward pass, three ways, in one process:
  ours      the real engine (train_one_epoch: on-device crop + flip (+ resize, random erasing),
            metrics, NaN guard, schedule) with the stage's recipe (mixup / cutmix, label smoothing,
            gradient clipping), the planner's micro-batch / checkpointing / compile, bf16 autocast,
            channels_last for CNNs, the bf16-cast frozen teacher;
  bare      the simplest competent loop doing the same math: the same model, teacher, plan and
            recipe, batches already on the GPU, fused AdamW; no metrics, guards, schedule or host
            syncs. engine_vs_bare = ours / bare (target >= 0.95);
  baseline  naive: fp32, no channels_last, torchvision transforms in a CPU DataLoader (2 workers),
            the largest batch that fits the same budget. speedup = ours / baseline.
Timed over whole epochs of synthetic CIFAR-size uint8 data after a warm-up epoch.

    python benchmarks/bench_stages.py                    # on a GPU: full table, CSV and RESULTS.md
    python benchmarks/bench_stages.py --tiny             # CPU smoke test with tiny models (CI)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import statistics
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
from src.spec.config import load_config  # noqa: E402
from src.distillation.engine import Precision, StepContext, compile_warmup, prepare_teacher, train_one_epoch  # noqa: E402
from src.distillation.planner import SAFETY_MARGIN_GIB, StepSpec, apply_vram_budget, measure_steps, probe_plan  # noqa: E402
from src.distillation.recipe import optimizer_factory, stage_optimizer  # noqa: E402
from src.distillation.stage import (StagePlan, build_stage_model, stage_method, step_context,  # noqa: E402
                                   use_channels_last)
from src.models import count_flops  # noqa: E402
from src.utils.devices import GiB, peak_reserved_bytes, reset_peak_reserved, resolve_device, synchronize  # noqa: E402
from src.utils.training_guards import (cleanup_training_state, enforce_gradient_checkpointing,  # noqa: E402
                                       requires_gradient_checkpointing)

COLUMNS = ["chain", "stage", "model", "teacher", "image_size", "micro_batch", "grad_ckpt", "compile", "peak_reserved_gib",
           "img_per_s", "bare_img_per_s", "engine_vs_bare", "baseline_img_per_s", "speedup", "mfu", "gpu", "torch", "date"]
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


def synthetic_split(n: int, size: int = 32, classes: int = 10) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(labels=torch.randint(0, classes, (n,), generator=g),
                 images=torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g))


def stage_step_context(cfg, stage, model, teachers, precision, plan, device) -> StepContext:
    """The stage's training step as the chain builds it (its method with the frozen `teachers`,
    its recipe: optimizer, label smoothing, gradient clipping, mixup / cutmix, micro-batch), on a
    possibly compiled model."""
    train_model = torch.compile(model) if plan.compile else model
    method = stage_method(cfg, stage, teachers, model).to(device)
    opt = stage_optimizer([model, method], 1e-4, cfg.train, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
    return step_context(cfg, stage, train_model, opt, sched, precision, plan, 10, method, scaler=scaler)


def engine_img_per_s(cfg, stage, model, teacher, loader, precision, plan, sample) -> tuple[float, float]:
    """Warm-up epoch, then a timed epoch through the real engine; returns (img/s, compile seconds)."""
    ctx = stage_step_context(cfg, stage, model, teacher, precision, plan, sample.device)
    compile_s = compile_warmup(ctx, sample) if plan.compile else 0.0
    alpha = 0.5 if teacher else 0.0
    train_one_epoch(ctx, loader, alpha=alpha, progress=False)
    out = train_one_epoch(ctx, loader, alpha=alpha, progress=False)
    ctx.optimizer.state.clear()
    return out["img_per_s"], compile_s


def bare_img_per_s(cfg, stage, model, teacher, batches, precision, plan) -> float:
    """The simplest competent loop doing the same math: pre-made GPU batches, autocast, fused AdamW,
    the stage's recipe (mixup, label smoothing, gradient clipping) and its method's step (the
    one every other loop calls); no metrics, NaN guard, schedule, LR log or progress display.
    Same model, teachers, micro-batch, checkpointing, compile."""
    device = batches[0][0].device
    ctx = stage_step_context(cfg, stage, model, teacher, precision, plan, device)
    train_model, opt, micro, method = ctx.model, ctx.optimizer, plan.micro_batch, ctx.method
    alpha = 0.5 if teacher else 0.0

    def epoch():
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            method.begin_batch()
            if ctx.mixup is not None:
                x, y = ctx.mixup(x.clone(), y)
            for xs, ys in (zip(x.split(micro), y.split(micro)) if micro else [(x, y)]):
                loss = method.step(train_model, xs, ys, alpha, precision)[1]["loss"]
                if ctx.scaler is not None:
                    ctx.scaler.scale(loss).backward()
                else:
                    loss.backward()
            if ctx.scaler is not None:
                ctx.scaler.unscale_(opt)
            if ctx.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
            if ctx.scaler is not None:
                ctx.scaler.step(opt)
                ctx.scaler.update()
            else:
                opt.step()

    train_model.train()
    epoch()  # warm-up (and compilation)
    synchronize(device)
    t0 = time.perf_counter()
    epoch()
    synchronize(device)
    opt.state.clear()
    return sum(len(y) for _, y in batches) / (time.perf_counter() - t0)


def random_weight_builders(cfg, stage, num_classes: int, tiny: bool = False) -> tuple:
    """(student builder, teacher builder or None) with random weights: speed and memory do not
    depend on them. `tiny`: small stand-ins for the CPU smoke tests."""
    def bare(s):
        if tiny:
            name, kw = TINY_MODELS.get(s.model, (s.model, {}))
            s = replace(s, model=name, model_kwargs=kw)
        return replace(s, pretrained=False, pretrained_file=None, checkpoint=None)
    builder = lambda: build_stage_model(cfg, bare(stage), num_classes)  # noqa: E731
    tbuilder = (lambda: [build_stage_model(cfg, bare(cfg.stage(n)), num_classes) for n in stage.teachers]
                ) if stage.teachers else None
    return builder, tbuilder


def plan_stage(cfg, stage, builder, tbuilder, device, precision, channels_last: bool, budget_gb: float,
               batch=None, no_compile: bool = False, tiny: bool = False):
    """The planner's choice for the stage, as the chain makes it (micro-batch, checkpointing, compile)."""
    plan = StagePlan(epochs=1, batch_size=batch or cfg.train.batch_size,
                     grad_checkpointing=requires_gradient_checkpointing(stage.model) and not tiny)
    spec = StepSpec(method_builder=lambda ts, student: stage_method(cfg, stage, ts, student), optimizer_factory=optimizer_factory(cfg.train, device))
    return probe_plan(plan, model_builder=builder, teacher_builder=tbuilder, spec=spec, model_name=stage.model,
                      image_size=cfg.data.image_size, num_classes=10, device=device, precision=precision,
                      channels_last=channels_last, budget_gb=budget_gb, compile_mode="false" if no_compile else "auto")


def build_for_plan(builder, tbuilder, plan, model_name: str, device, precision, channels_last: bool, fp32: bool = False):
    """Student (checkpointed as planned, channels_last for CNNs) and its prepared frozen teachers
    (a list); `fp32`: the naive baseline's plain models."""
    m = builder().to(device)
    if plan.grad_checkpointing and not fp32:
        enforce_gradient_checkpointing(m, model_name, verbose=False, force=True)
    if channels_last and not fp32:
        m = m.to(memory_format=torch.channels_last)
    t = [prepare_teacher(x, device, Precision(device.type, None) if fp32 else precision, channels_last and not fp32)
         for x in (tbuilder() if tbuilder is not None else [])]
    return m, t


def bench_stage(cfg, stage, device, args, gpu_name):
    num_classes, size = 10, cfg.data.image_size
    builder, tbuilder = random_weight_builders(cfg, stage, num_classes, args.tiny)
    precision = Precision.choose(device, True, getattr(args, "amp_dtype", "auto"))
    cl = use_channels_last(cfg, stage, device)
    plan = plan_stage(cfg, stage, builder, tbuilder, device, precision, cl, args.budget_gb, args.batch,
                      args.no_compile, args.tiny)
    data_cfg = replace(cfg.data, num_workers=args.workers)  # the recipe as the chain runs it, random erasing included
    split = synthetic_split(plan.batch_size * args.steps)
    micro = plan.micro_batch or plan.batch_size

    def make(fp32=False):
        return build_for_plan(builder, tbuilder, plan, stage.model, device, precision, cl, fp32)

    def release(m, t):
        for x in [m, *t]:
            cleanup_training_state(model=x, verbose=False, device=device)

    loader = TensorLoader(split, plan.batch_size, device, True, data_cfg, channels_last=cl)
    sample = torch.randn(micro, 3, size, size, device=device)
    sample = sample.contiguous(memory_format=torch.channels_last) if cl else sample
    ours, bare_speed, compile_s, peak, per_img = _ours_and_bare(cfg, stage, make, release, loader, precision, plan,
                                                                sample, device, args)
    del loader
    base = None if args.no_baseline else _naive_baseline(cfg, stage, builder, tbuilder, make, release, data_cfg,
                                                         plan, sample, device, args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    peak_tf = _peak_tflops(gpu_name, args.peak_tflops)
    return {"stage": stage.name, "model": stage.model, "teacher": "+".join(cfg.stage(n).model for n in stage.teachers),
            "image_size": size, "micro_batch": micro, "grad_ckpt": plan.grad_checkpointing, "compile": plan.compile,
            "compile_seconds": round(compile_s, 1), "peak_reserved_gib": round(peak, 3), "img_per_s": round(ours, 1),
            "bare_img_per_s": round(bare_speed, 1) if bare_speed else None,
            "engine_vs_bare": round(ours / bare_speed, 3) if bare_speed else None,
            "baseline_img_per_s": round(base, 1) if base else None, "speedup": round(ours / base, 2) if base else None,
            "mfu": round(per_img * ours / (peak_tf * 1e12), 4) if peak_tf and device.type == "cuda" else None}


def _ours_and_bare(cfg, stage, make, release, loader, precision, plan, sample, device, args) -> tuple:
    """Ours (the real engine) and bare (the same stage as a plain loop over batches made beforehand
    on the device), measured alternately `repeats` times; the medians are reported (on a shared CPU
    one epoch's timing varies by 10% and more). Returns (ours, bare or None, compile seconds, peak
    reserved GiB, FLOPs per image)."""
    size = cfg.data.image_size
    ours_all, bare_all, compile_s, peak = [], [], 0.0, 0.0
    for _ in range(max(1, args.repeats)):
        model, teacher = make()
        reset_peak_reserved(device)
        speed, c_s = engine_img_per_s(cfg, stage, model, teacher, loader, precision, plan, sample)
        ours_all.append(speed)
        compile_s, peak = max(compile_s, c_s), max(peak, peak_reserved_bytes(device) / GiB)
        per_img = 3 * count_flops(model, size, device) + sum(count_flops(t, size, device) for t in teacher)
        release(model, teacher)
        if not args.no_bare:
            model, teacher = make()
            # augmented, normalised, on the device: on a GPU 4 batches recycled (memory); on a CPU, whose caches
            # would favour a few recycled batches, as many distinct batches as the engine's epoch reads
            distinct = 4 if device.type == "cuda" else len(loader)
            made = [(x.clone(), y.clone()) for _, (x, y) in zip(range(distinct), loader)]
            batches = [made[i % len(made)] for i in range(len(loader))]  # as many steps as the engine's epoch
            bare_all.append(bare_img_per_s(cfg, stage, model, teacher, batches, precision, plan))
            release(model, teacher)
            del batches, made
    bare = statistics.median(bare_all) if bare_all else None
    return statistics.median(ours_all), bare, compile_s, peak, per_img


def _naive_baseline(cfg, stage, builder, tbuilder, make, release, data_cfg, plan, sample, device, args) -> float:
    """fp32, a CPU DataLoader with torchvision transforms, the largest batch that fits."""
    size = cfg.data.image_size
    base_bs = _largest_fp32_batch(builder, tbuilder, size, device, args) if device.type == "cuda" else plan.batch_size
    model, teacher = make(fp32=True)
    bl = StreamLoader(synthetic_split(base_bs * args.steps), base_bs, device, True, data_cfg, from_tensors=True)
    base, _ = engine_img_per_s(cfg, stage, model, teacher, bl, Precision(device.type, None),
                               StagePlan(epochs=1, batch_size=base_bs), sample)
    release(model, teacher)
    return base


def _largest_fp32_batch(builder, tbuilder, size, device, args) -> int:
    limit = args.budget_gb - SAFETY_MARGIN_GIB
    best, bs = 0, 32
    teacher = [prepare_teacher(t, device, Precision("cuda", None), False) for t in (tbuilder() if tbuilder else [])]
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
            cleanup_training_state(model=model, verbose=False, device=device)
            torch.cuda.empty_cache()
        bs *= 2
    for t in teacher:
        cleanup_training_state(model=t, verbose=False, device=device)
    return max(best, 8)


def write_results_md(df: pd.DataFrame, path: Path, marker: str = "stages", columns=COLUMNS) -> None:
    """Replace the block between <!-- marker:begin --> and <!-- marker:end --> in RESULTS.md."""
    start, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    table = df[columns].to_markdown(index=False) if _has_tabulate() else df[columns].to_string(index=False)
    block = f"{start}\n{table}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += f"\n{block}\n"
    path.write_text(text)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--chains", default="cnn,vit",
                   help="comma-separated: cnn, vit (the presets' stages), takd (the TAKD paper's plain CNN 10 and "
                        "2 <- 4, CIFAR ResNet 20 and 8 <- 20, with the reproduction's recipe; runs on a CPU too)")
    p.add_argument("--resolutions", default="32,224")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per timed epoch")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure ours and bare alternately this many times and report the medians (a CPU: 3 or more)")
    p.add_argument("--budget-gb", type=float, default=6.0)
    p.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers (the user's 2-4 cores)")
    p.add_argument("--batch", type=int, default=None, help="override the presets' batch size")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-bare", action="store_true", help="skip the bare reference loop")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive fp32 DataLoader baseline")
    p.add_argument("--tiny", action="store_true", help="tiny models and 16 px: a CPU smoke test")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stages.csv")
    p.add_argument("--results-md", type=Path, default=ROOT / "benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.tiny and args.batch is None:
        args.batch = 16
    return args


# The TAKD paper's models (--chains takd, CPU or GPU), with the reproduction's recipe: a teacher
# trained alone and a student distilled from a small teacher, per family.
TAKD_STAGES = {"plain": [("plain_cnn10", None), ("plain_cnn2", "plain_cnn4")],
               "resnet": [("cifar_resnet20", None), ("cifar_resnet8", "cifar_resnet20")]}


def takd_config(family: str, compile_mode: str):
    """A config of the reproduction's recipe (benchmarks/reproduce_takd.py) holding TAKD_STAGES[family]."""
    from argparse import Namespace

    from benchmarks.reproduce_takd import base_config
    from src.spec.config import from_dict
    raw = base_config(f"bench-{family}", family, "cifar10", 10, {"source": "digits", "root": "data"},
                      Namespace(compile=compile_mode, device="auto"))
    for model, teacher in TAKD_STAGES[family]:
        if teacher:
            raw["stages"].append({"name": f"teacher_{teacher}", "model": teacher, "role": "teacher"})
        raw["stages"].append({"name": model, "model": model, "role": "student" if teacher else "teacher",
                              **({"teacher": f"teacher_{teacher}"} if teacher else {})})
    return from_dict(raw)


def _configs(chain: str, res: int, args) -> list:
    """[(label, config, stages to measure)] for one chain and resolution."""
    if chain == "takd":
        out = []
        for family in TAKD_STAGES:
            cfg = takd_config(family, "false" if args.no_compile else "auto")
            out.append((f"takd-{family}", cfg, [s for s in cfg.stages if not s.name.startswith("teacher_")]))
        return out
    cfg = load_config(ROOT / PRESETS[(chain, res)])
    if args.tiny:
        cfg = replace(cfg, data=replace(cfg.data, image_size=16 if res == 32 else 32))
    return [(chain, cfg, cfg.stages)]


def run(args) -> pd.DataFrame:
    """Every stage of the chosen chains and resolutions; one printed line per stage."""
    device = resolve_device("auto")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    apply_vram_budget(device, args.budget_gb)
    rows = []
    for chain in args.chains.split(","):
        for res in ([32] if chain == "takd" else (int(r) for r in args.resolutions.split(","))):
            for label, cfg, stages in _configs(chain, res, args):
                for stage in stages:
                    t0 = time.perf_counter()
                    row = bench_stage(cfg, stage, device, args, gpu)
                    row.update(chain=label, gpu=gpu, torch=torch.__version__, date=_dt.date.today().isoformat())
                    rows.append(row)
                    print(f"{chain:>3} {res:>3}px {stage.name:<9} micro {row['micro_batch']:>4} ckpt {str(row['grad_ckpt']):<5} "
                          f"compile {str(row['compile']):<5} {row['img_per_s']:>8.0f} img/s  bare {row['bare_img_per_s']}  "
                          f"x{row['engine_vs_bare']} of bare  baseline {row['baseline_img_per_s']}  "
                          f"{row['peak_reserved_gib']:.2f} GiB  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    df = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df[COLUMNS].to_csv(args.out, index=False)
    if not args.tiny:
        write_results_md(df, args.results_md, marker="stages-cpu" if df["gpu"].eq("cpu").all() else "stages")
    print()
    print(df[COLUMNS].to_string(index=False))
    return 0


if __name__ == "__main__":
    from src.utils.devices import freeze_import_heap
    freeze_import_heap()
    sys.exit(main())

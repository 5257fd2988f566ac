"""A chain: the stages of a config run in order, each KD stage distilled from the frozen
best-validation checkpoint of an earlier stage.

run_dir/
    config.yaml   the resolved config (what --resume re-reads)
    env.json      package versions, GPU, git commit, seed settings, command line
    plan.json     per-stage batch / micro-batch / checkpointing / compile decisions
    <stage>/      see src/distillation/stage.py
    summary.csv   one row per stage (model): params, FLOPs, val / test accuracy, F1, memory, time
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from src.data import build_loaders, load_dataset
from src.distillation import distributed as dist
from src.distillation.config import RunConfig, save_config
from src.distillation.engine import Precision, prepare_teacher
from src.distillation.planner import apply_vram_budget, compile_decision, probe_plan
from src.distillation.stage import StagePlan, build_stage_model, load_weights, run_stage, stage_seeds, use_channels_last
from src.models import count_params, is_vit
from src.utils.checkpoint import atomic_write_text
from src.utils.devices import resolve_device, set_cpu_threads
from src.utils.environment import environment_record
from src.utils.errors import CheckpointError, UserError
from src.utils.logger import get_console, is_verbose
from src.utils.reproducibility import setup_reproducibility
from src.utils.runlock import PROBE_PREFIX
from src.utils.tb import require_tensorboard
from src.utils.training_guards import cleanup_training_state, requires_gradient_checkpointing

log = get_console()
SUMMARY_COLUMNS = ["stage", "model", "role", "teacher", "params", "flops", "epochs", "best_epoch", "val_accuracy",
                   "val_f1_score", "test_accuracy", "test_precision", "test_recall", "test_f1_score", "test_loss",
                   "last_val_accuracy", "peak_gpu_memory_mb", "train_seconds", "eval_seconds", "compile_seconds",
                   "img_per_s", "lr", "precision", "label_smoothing", "batch_size", "micro_batch", "grad_checkpointing",
                   "compile", "skipped_images"]
_PLAN_CACHE: dict = {}  # plan key -> StagePlan: probed once per model and shape in this process (all seeds)


def check_writable(path: Path) -> None:
    """Fail before training, not after an hour, when the output folder cannot be written.
    Folders made only for the probe are removed again: a failed start leaves nothing behind."""
    made = []
    try:
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                folder.mkdir()
                made.append(folder)
        probe = path / f"{PROBE_PREFIX}.{os.getpid()}"  # its own name: a stale one (a killed probe) is no obstacle
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {path}: {exc.strerror or exc}. Choose another --output-dir") from None
    finally:
        for folder in reversed(made):
            folder.rmdir()


def with_baselines(cfg: RunConfig) -> RunConfig:
    """Add the two baselines beside the chain: the student trained alone, and the student
    distilled directly from the teacher (no assistant). Same data, epochs and recipe."""
    names = {s.name for s in cfg.stages}
    if len(cfg.stages) < 2 or "student_scratch" in names:
        return cfg
    first, last = cfg.stages[0], cfg.stages[-1]
    shared = dict(checkpoint=None, role=last.role or "student", seed_stream=last.seed_stream or last.name)
    scratch = replace(last, name="student_scratch", teacher=None, **shared)
    direct = replace(last, name="student_kd", teacher=first.name, **shared)
    return replace(cfg, stages=[*cfg.stages, scratch, direct])


def stage_method(stage, cfg: RunConfig) -> str:
    """scratch (no teacher), kd (distilled from the first stage) or takd (through an assistant)."""
    if not stage.teacher:
        return "scratch"
    return "kd" if stage.teacher == cfg.stages[0].name else "takd"


def _plan_key(cfg: RunConfig, stage) -> tuple:
    """Stages with the same key get one plan: the model, its shapes and the step's settings."""
    return (stage.model, stage.cifar_stem, stage.patch_size, json.dumps(stage.model_kwargs, sort_keys=True),
            stage.grad_checkpointing, stage.batch_size or cfg.train.batch_size, cfg.data.image_size, cfg.train.amp,
            cfg.train.amp_dtype, cfg.train.compile, cfg.train.vram_budget_gb, cfg.train.channels_last)


def _heaviest_teacher(cfg: RunConfig, stage, num_classes: int):
    """Of the teachers of every stage sharing this stage's plan, the largest: the plan must fit with it."""
    key = _plan_key(cfg, stage)
    names = {s.teacher for s in cfg.stages if s.teacher and _plan_key(cfg, s) == key}
    if not names:
        return None
    bare = lambda n: replace(cfg.stage(n), pretrained=False, pretrained_file=None, checkpoint=None)  # noqa: E731
    return max(sorted(names), key=lambda n: count_params(build_stage_model(cfg, bare(n), num_classes)))


def plan_stage(cfg: RunConfig, stage, device: torch.device, num_classes: int,
               train_images: Optional[int] = None) -> StagePlan:
    """Configured settings, refined on CUDA by measuring a few real steps under the VRAM budget.

    One plan per model and shape: the three student variants (scratch, KD, TAKD) share it, probed
    with the largest of their teachers, so they train with the same micro-batch (the same
    batch-norm statistics) and checkpointing; later seeds reuse it. `train_images` (per epoch and
    process) lets compile=auto weigh what compiling saves over the stage against what it costs."""
    plan = StagePlan(epochs=stage.epochs or cfg.train.epochs, batch_size=stage.batch_size or cfg.train.batch_size,
                     grad_checkpointing=stage.grad_checkpointing or requires_gradient_checkpointing(stage.model),
                     compile=cfg.train.compile == "true")
    if not cfg.train.auto_batch or (device.type != "cuda" and cfg.train.compile != "auto"):
        return plan
    images = plan.epochs * train_images if train_images else None
    key = (_plan_key(cfg, stage), str(device))
    if key in _PLAN_CACHE:
        cached = replace(_PLAN_CACHE[key], epochs=plan.epochs)
        notes = cached.notes + ["reused: probed once for this model and shape"]
        if cfg.train.compile == "auto" and cached.probe_compiled_img_per_s and cached.probe_img_per_s:
            use, why = compile_decision(cached.probe_img_per_s, cached.probe_compiled_img_per_s,
                                        cached.probe_compile_seconds or 0.0, images)
            cached, notes = replace(cached, compile=use), notes + [f"compile for {plan.epochs} epochs: {why} -> "
                                                                    f"{'on' if use else 'off'}"]
        return replace(cached, notes=notes)
    bare = lambda s: replace(s, pretrained=False, pretrained_file=None, checkpoint=None)  # noqa: E731 (shapes only)
    teacher_name = _heaviest_teacher(cfg, stage, num_classes)
    teacher_builder = None
    if teacher_name:
        teacher_builder = lambda: build_stage_model(cfg, bare(cfg.stage(teacher_name)), num_classes)  # noqa: E731
    plan = probe_plan(plan, model_builder=lambda: build_stage_model(cfg, bare(stage), num_classes),
                      teacher_builder=teacher_builder, model_name=stage.model, image_size=cfg.data.image_size,
                      num_classes=num_classes, device=device,
                      precision=Precision.choose(device, cfg.train.amp, cfg.train.amp_dtype),
                      channels_last=use_channels_last(cfg, stage, device), budget_gb=cfg.train.vram_budget_gb,
                      compile_mode=cfg.train.compile, images_to_train=images)
    _PLAN_CACHE[key] = plan
    if is_verbose():
        for note in plan.notes:
            log.info(f"  plan {stage.name}: {note}")
    return plan


def _attention_callback(cfg: RunConfig, stage, data, device, epochs: int):
    if not is_vit(stage.model) and not (stage.model.startswith("hf:")):
        return None
    from src.data.loaders import Normalizer
    from src.visualization.vit_viz import save_attention_maps
    n = cfg.viz.attention_images
    raw = data.val.images[:n] if data.val.images is not None else None
    if raw is None:  # streamed dataset: decode the few images shown
        from src.data.sources import decode_images
        raw = decode_images(data.val.files[:n], data.val.labels[:n].tolist(), data.store_size, True)[0].images
    norm = Normalizer(cfg.data.normalize, device, cfg.data.image_size, False)

    def callback(model, epoch: int, stage_dir: Path):
        if epoch % cfg.viz.attention_every and epoch != epochs:
            return
        x = norm(raw.to(device).float() / 255)
        save_attention_maps(model, x, raw, stage_dir / "attention" / f"epoch_{epoch:03d}.png",
                            heads=cfg.viz.attention_heads, rollout=cfg.viz.attention_rollout,
                            title=f"{stage.name} ({stage.model}) epoch {epoch}")
    return callback


def preflight(cfg: RunConfig, num_classes: int) -> None:
    """Refuse what would fail hours later before any time is spent (and before anything is written):
    missing checkpoint or weight files, a checkpoint of another architecture or class count, and
    pretrained weights of later stages that cannot be had (built once here, which also puts hub
    weights in the local cache)."""
    for s in cfg.stages:
        for key in ("checkpoint", "pretrained_file"):
            path = getattr(s, key)
            if path and not Path(path).expanduser().is_file():
                raise CheckpointError(f"stage {s.name!r}: {key} not found: {path}")
    if cfg.logging.tensorboard:
        require_tensorboard()
    for s in cfg.stages:
        if s.checkpoint:  # shapes checked now, not when its stage starts
            model = build_stage_model(cfg, replace(s, pretrained=False, pretrained_file=None, checkpoint=None), num_classes)
            load_weights(model, s.checkpoint, f"stage {s.name}: checkpoint {s.checkpoint}")
            del model
        elif s.pretrained or s.pretrained_file:
            model = build_stage_model(cfg, s, num_classes)
            del model


def load_teacher(cfg: RunConfig, run_dir: Path, name: str, num_classes: int, device: torch.device,
                 compile_model: bool = False):
    """The frozen best-validation checkpoint of stage `name`, prepared as the student's steps use it."""
    tstage = cfg.stage(name)
    model = build_stage_model(cfg, replace(tstage, pretrained=False, pretrained_file=None), num_classes)
    load_weights(model, run_dir / name / "best.pt", f"teacher {name}")
    return prepare_teacher(model, device, Precision.choose(device, cfg.train.amp, cfg.train.amp_dtype),
                           use_channels_last(cfg, tstage, device), compile_model=compile_model, verbose=is_verbose())


def _plan_line(plan: StagePlan) -> str:
    parts = [f"epochs {plan.epochs}", f"batch {plan.batch_size}"]
    if plan.micro_batch:
        parts.append(f"micro-batch {plan.micro_batch}")
    if plan.grad_checkpointing:
        parts.append("checkpointing")
    if plan.compile:
        parts.append("compiled")
    return ", ".join(parts)


def run_chain(cfg: RunConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
              should_stop: Callable[[], bool] = lambda: False) -> pd.DataFrame:
    """Run every stage of `cfg` into `run_dir`; finished stages are skipped on resume.

    Besides the stage folders it writes timings.json: wall-clock seconds of the whole chain split
    into data, planning, compile, training, evaluation and the rest."""
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    ds = dist.state()
    main = ds.is_main
    if main:
        check_writable(run_dir)
    device = resolve_device(cfg.train.device, ds.local_rank if ds.enabled and cfg.train.device != "cpu" else None)
    threads = set_cpu_threads(device, int(os.environ.get("LOCAL_WORLD_SIZE", ds.world_size if ds.enabled else 1)))
    repro = setup_reproducibility(cfg.seed, cfg.deterministic)
    budget = apply_vram_budget(device, cfg.train.vram_budget_gb)
    if not main:
        dist.barrier()  # rank 0 checks, decodes and caches first; the others read its caches
    t0 = time.perf_counter()
    data = load_dataset(cfg.data)
    timings = {"data": time.perf_counter() - t0, "planning": 0.0}
    preflight(cfg, data.num_classes)
    # Written only once the inputs are known to be good: a typo leaves no half-made run folder.
    if main:
        dist.barrier()
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.rglob("*.tmp") if resume else []:  # a killed process's unfinished write
            stale.unlink(missing_ok=True)
        if not resume or not (run_dir / "config.yaml").exists():
            save_config(cfg, run_dir / "config.yaml")
        env = environment_record(repro, {"device": str(device), "resumed": resume, "vram_budget": budget,
                                         "world_size": ds.world_size, "distributed_backend": dist.backend(),
                                         "cpu_threads": threads or torch.get_num_threads()},
                                 device=device)
        atomic_write_text(run_dir / ("env.json" if not (run_dir / "env.json").exists() else "env_resume.json"),
                          json.dumps(env, indent=2))
        atomic_write_text(run_dir / "classes.json", json.dumps(data.classes))
    log.info(f"Data: {data.name}, {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
             f"{data.num_classes} classes, stored at {data.store_size}px, model input {cfg.data.image_size}px, device {device}")

    plans, rows = {}, []
    plan_path = run_dir / "plan.json"
    if plan_path.exists():
        plans = json.loads(plan_path.read_text())
    for idx, stage in enumerate(cfg.stages):
        stage_dir = run_dir / stage.name
        done = stage_dir / "stage.json"
        if resume and done.exists():
            log.info(f"✓ {stage.name}: finished earlier, skipped")
            rows.append(json.loads(done.read_text()))
            continue
        resuming_stage = resume and (stage_dir / "last.pt").exists()
        t0 = time.perf_counter()
        if stage.name in plans and resuming_stage:  # the plan it started with; epochs may have grown on resume
            plan = replace(StagePlan(**plans[stage.name]), epochs=stage.epochs or cfg.train.epochs)
        else:
            per_rank = len(data.train) // dist.state().world_size
            plan = dist.broadcast(plan_stage(cfg, stage, device, data.num_classes, per_rank) if main else None)
            plans[stage.name] = asdict(plan)
            if main:
                atomic_write_text(plan_path, json.dumps(plans, indent=2))
        timings["planning"] += time.perf_counter() - t0
        teacher_note = f" <- {stage.teacher}" if stage.teacher else ""
        log.info(f"\n━━ Stage {idx + 1}/{len(cfg.stages)}: {stage.name} ({stage.model}){teacher_note}  {_plan_line(plan)}")
        teacher = None
        if stage.teacher:
            teacher = load_teacher(cfg, run_dir, stage.teacher, data.num_classes, device, compile_model=plan.compile)
        loaders = build_loaders(data, plan.batch_size, device, cfg.data, use_channels_last(cfg, stage, device),
                                seed=stage_seeds(cfg, stage)["data"], rank=ds.rank, world_size=ds.world_size)
        summary = run_stage(cfg, stage, data, loaders, stage_dir, device, plan, teacher=teacher,
                            resume=resuming_stage, progress=progress, should_stop=should_stop,
                            on_epoch_end=_attention_callback(cfg, stage, data, device, plan.epochs),
                            extra={"method": stage_method(stage, cfg)})
        dist.barrier()
        frozen = ""
        if teacher is not None:  # checked, not assumed: eval mode and no parameter asking for a gradient
            inner = getattr(teacher, "_orig_mod", teacher)  # a compiled teacher wraps the frozen module
            ok = not any(m.training for m in inner.modules()) and not any(p.requires_grad for p in inner.parameters())
            frozen = f"; teacher frozen: {'yes' if ok else 'NO'}"
            cleanup_training_state(model=teacher, verbose=False, device=device)
            del teacher
        rows.append(summary)
        log.info(f"  → {stage.name}: val acc {summary['val_accuracy']:.4f} (epoch {summary['best_epoch']}), "
                 f"test acc {summary['test_accuracy']:.4f}, macro F1 {summary['test_f1_score']:.4f}{frozen}; "
                 f"memory released {summary.get('released_mb', 0.0):.0f} MB"
                 + (f"; compile {summary['compile_seconds']:.1f}s" if summary.get("compile_seconds") else ""))
    df = pd.DataFrame(rows)
    df = df[[c for c in SUMMARY_COLUMNS + ["method"] if c in df.columns]]
    if main:
        atomic_write_text(run_dir / "summary.csv", df.to_csv(index=False))
        for key, col in (("compile", "compile_seconds"), ("training", "train_seconds"), ("evaluation", "eval_seconds")):
            timings[key] = float(df[col].sum()) if col in df else 0.0
        timings["wall"] = time.perf_counter() - t_start
        timings["other"] = timings["wall"] - sum(timings[k] for k in ("data", "planning", "compile", "training", "evaluation"))
        atomic_write_text(run_dir / "timings.json", json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=2))
    return df

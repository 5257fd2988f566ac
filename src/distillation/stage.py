"""One stage: "train model M, optionally distilled from a frozen teacher", with its artefacts.

stage_dir/
    epoch_log.csv          one row per epoch, REQUIRED_COLUMNS (src/utils/logger.py)
    epoch_terms.csv        beside it: CE and KD terms, alpha, first/last LR, time split (TERMS_COLUMNS)
    last.pt                full training state after the last completed epoch (resume)
    best.pt                weights of the best-validation epoch (model selection on val only)
    test_predictions.csv   per test image: label, prediction, top-5 and logits, from best.pt
    stage.json             this stage's summary row (written last: its presence = stage done)
    attention/             ViT attention maps (every viz.attention_every epochs)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from src.distillation import distributed as dist
from src.distillation.engine import (Precision, StepContext, compile_warmup, evaluate, lr_multiplier,
                                     teacher_logits_table, train_one_epoch)
from src.distillation.export import export_stage
from src.models import count_flops, count_params, create_model, is_cnn
from src.models.factory import check_state_dict
from src.utils.checkpoint import atomic_save, atomic_write_text, extract_state_dict, rng_state, safe_load, set_rng_state
from src.utils.devices import alloc_retries
from src.utils.errors import NonFiniteLossError
from src.utils.logger import REQUIRED_COLUMNS, TERMS_COLUMNS, EpochLogger, get_console, is_verbose, read_epoch_csv
from src.utils.reproducibility import derive_seed, setup_reproducibility
from src.utils.signals import protected
from src.utils import tb as tensorboard
from src.utils.training_guards import (cleanup_training_state, enforce_gradient_checkpointing, get_model_specific_lr,
                                       peak_memory_mb, reset_peak_memory_stats, role_from_model_name,
                                       schedule_kd_alpha)

log = get_console()


class StageFailed(RuntimeError):
    """A stage stopped on a non-finite loss; names stage, epoch and step."""


@dataclass
class StagePlan:
    """Resolved per-stage settings (config + planner measurements)."""
    epochs: int
    batch_size: int
    micro_batch: Optional[int] = None
    grad_checkpointing: bool = False
    compile: bool = False
    batchnorm: Optional[bool] = None
    ckpt_memory: Optional[dict] = None          # peak reserved with / without checkpointing at the chosen micro-batch
    probe_img_per_s: Optional[float] = None
    probe_peak_gib: Optional[float] = None
    probe_compile_seconds: Optional[float] = None   # the compile probe's compilation time (cold caches)
    probe_compiled_img_per_s: Optional[float] = None
    notes: list = field(default_factory=list)


def build_stage_model(cfg, stage, num_classes: int) -> nn.Module:
    return create_model(stage.model, num_classes, image_size=cfg.data.image_size, pretrained=stage.pretrained,
                        pretrained_file=stage.pretrained_file, cifar_stem=stage.cifar_stem,
                        patch_size=stage.patch_size, drop_path=stage.drop_path, model_kwargs=stage.model_kwargs)


def load_weights(model: nn.Module, path, source: str) -> None:
    state = extract_state_dict(safe_load(path))
    check_state_dict(model, state, source)
    model.load_state_dict(state)


def use_channels_last(cfg, stage, device: torch.device) -> bool:
    """auto: CNNs on any device (on a 2-core CPU 1.2-1.8x faster to train, see benchmarks/RESULTS.md)."""
    setting = cfg.train.channels_last
    return setting == "true" or (setting == "auto" and is_cnn(stage.model))


def stage_seeds(cfg, stage) -> dict:
    """The stage's random streams, derived from (run seed, stream name): see derive_seed."""
    stream = stage.seed_stream or stage.name
    return {"init": derive_seed(cfg.seed, f"{stream}/init"), "data": derive_seed(cfg.seed, f"{stream}/data")}


def stage_lr(cfg, stage) -> float:
    """The stage's base LR: its own `lr` or train.lr, times its role's factor unless train.role_lr is off."""
    base = stage.lr or cfg.train.lr
    return get_model_specific_lr(stage.model, base, stage.role or role_from_model_name(stage.model)) if cfg.train.role_lr else base


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device, kind: str = "adamw",
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum (`kind="sgd"`, the classic CIFAR ResNet recipe), fused
    where torch has it (CUDA, and CPU from torch 2.4): one kernel per step, and the `found_inf`
    skip the sync-free NaN guard relies on. No weight decay on biases and norms (1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "sgd":
        make = lambda **kw: torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0, **kw)  # noqa: E731
    elif kind == "adamw":
        make = lambda **kw: torch.optim.AdamW(groups, lr=lr, **kw)  # noqa: E731
    else:
        raise ValueError(f"optimizer must be adamw or sgd, got {kind!r}")
    try:
        return make(fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch without a fused kernel for this device
        return make()


def _mixup(cfg, num_classes: int, label_smoothing: float):
    d = cfg.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def step_context(cfg, stage, train_model: nn.Module, optimizer, scheduler, precision: Precision, plan: StagePlan,
                 num_classes: int, scaler=None, teacher: Optional[nn.Module] = None,
                 should_stop: Callable[[], bool] = lambda: False) -> StepContext:
    """The training step of `stage` as its config defines it: KD temperature, label smoothing,
    gradient clipping, mixup / cutmix and the planned micro-batch (also used by the benchmarks)."""
    label_smoothing = cfg.label_smoothing(stage)
    return StepContext(model=train_model, optimizer=optimizer, scheduler=scheduler, precision=precision, scaler=scaler,
                       teacher=teacher, temperature=cfg.kd.temperature, label_smoothing=label_smoothing,
                       grad_clip=cfg.train.grad_clip, micro_batch=plan.micro_batch,
                       mixup=_mixup(cfg, num_classes, label_smoothing), num_classes=num_classes, should_stop=should_stop)


def _epoch_row(epoch: int, tr: dict, val: dict, seconds: float, peak_mb: float) -> dict:
    row = {"epoch": epoch}
    for split, m in (("train", tr), ("val", val)):
        row.update({f"{split}_loss": m["loss"], f"{split}_accuracy": m["accuracy"], f"{split}_precision": m["precision"],
                    f"{split}_recall": m["recall"], f"{split}_f1_score": m["f1_score"]})
    # learning_rate: the mean LR of the epoch's optimizer steps (first and last in epoch_terms.csv)
    row.update({"learning_rate": tr["lr_mean"], "epoch_time_sec": seconds, "gpu_memory_mb": peak_mb})
    return {k: row[k] for k in REQUIRED_COLUMNS}


def warn_memory_tight(stage_name: str, epoch: int, retries: int, budget_gb: float) -> None:
    log.warning(f"  {stage_name}: memory is tight: in epoch {epoch} the CUDA allocator reached the {budget_gb:g} GB cap "
                f"and flushed its cache {retries} time(s), each a GPU synchronisation that slows training; "
                f"lower train.batch_size or raise train.vram_budget_gb")


def save_predictions(path: Path, test: dict, file_ids: Optional[list]) -> None:
    """Per test image: id, label, prediction, top-5 classes and the logits."""
    import numpy as np
    import pandas as pd
    logits = test["logits"]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    df = pd.DataFrame({"file": file_ids if file_ids is not None and len(file_ids) == len(logits) else range(len(logits)),
                       "y_true": test["y_true"], "y_pred": test["y_pred"],
                       "top5": [" ".join(map(str, r)) for r in top5]})
    df = pd.concat([df, pd.DataFrame(logits, columns=[f"logit_{i}" for i in range(logits.shape[1])])], axis=1)
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"))


def run_stage(cfg, stage, data, loaders: dict, stage_dir: Path, device: torch.device, plan: StagePlan,
              teacher: Optional[nn.Module] = None, resume: bool = False, progress: bool = True,
              should_stop: Callable[[], bool] = lambda: False,
              on_epoch_end: Optional[Callable[[nn.Module, int, Path], None]] = None, extra: Optional[dict] = None) -> dict:
    """Train (or load) one stage and return its summary row (plus `extra`). Artefacts go to `stage_dir`."""
    verbose = is_verbose()
    stage_dir.mkdir(parents=True, exist_ok=True)
    num_classes = data.num_classes
    csv_path, terms_path, last_path = stage_dir / "epoch_log.csv", stage_dir / "epoch_terms.csv", stage_dir / "last.pt"

    # ---- build: initial weights from the stage's own seed stream (shared by the three student variants)
    seeds = stage_seeds(cfg, stage)
    setup_reproducibility(seeds["init"], cfg.deterministic)
    model = build_stage_model(cfg, stage, num_classes).to(device)
    init_checksum = dist.weights_checksum(model)
    if use_channels_last(cfg, stage, device):
        model = model.to(memory_format=torch.channels_last)
    params, flops = count_params(model), count_flops(model, cfg.data.image_size, device)
    precision = Precision.choose(device, cfg.train.amp, cfg.train.amp_dtype)
    role = stage.role or role_from_model_name(stage.model)
    label_smoothing = cfg.label_smoothing(stage)
    lr, compile_seconds, epochs_done, best_epoch, train_seconds, retries = 0.0, 0.0, 0, 0, 0.0, 0
    teacher_cache_seconds = 0.0
    optimizer = scheduler = scaler = None

    if stage.checkpoint:  # ---- a trained model handed in: evaluate it, train nothing
        load_weights(model, stage.checkpoint, f"stage {stage.name}: checkpoint {stage.checkpoint}")
        if dist.is_main():
            EpochLogger(csv_path)
            atomic_save({"model": model.state_dict(), "epoch": 0, "stage": stage.name, "model_name": stage.model},
                        stage_dir / "best.pt")
    else:
        # ---- optimiser, schedule (warm-up capped to a fraction of the run), DDP, compile
        plan.grad_checkpointing = enforce_gradient_checkpointing(model, stage.model, verbose=verbose,
                                                                 force=plan.grad_checkpointing, measured=plan.ckpt_memory)
        lr = stage_lr(cfg, stage)
        optimizer = make_optimizer(model, lr, cfg.train.weight_decay, device, cfg.train.optimizer, cfg.train.momentum)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.train, len(loaders["train"]), plan.epochs))
        scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
        train_model = model
        if dist.state().enabled:  # one replica per rank; each rank runs its own frozen teacher forward
            if cfg.train.sync_bn and is_cnn(stage.model):
                train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None)
        train_model = torch.compile(train_model) if plan.compile else train_model
        ctx = step_context(cfg, stage, train_model, optimizer, scheduler, precision, plan, num_classes, scaler=scaler,
                           teacher=teacher, should_stop=should_stop)

        # ---- resume: weights, optimiser, schedule, RNG and best-so-far from last.pt
        start_epoch, best_acc, ck_rows = 1, -1.0, None
        if resume and last_path.is_file():
            ck = safe_load(last_path, map_location=device)
            check_state_dict(model, ck["model"], f"resume {last_path}")
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"])
            if scheduler.base_lrs[0] != lr:  # --resume --lr: the new LR from the next step, on the same schedule
                log.info(f"↻ {stage.name}: learning rate {scheduler.base_lrs[0]:g} -> {lr:g} from epoch {ck['epoch'] + 1}")
                factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
                scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
                for group in optimizer.param_groups:
                    group["initial_lr"], group["lr"] = lr, lr * factor
            start_epoch = ck["epoch"] + 1
            ck_rows = (ck.get("log_row"), ck.get("terms_row"))
            best_acc, best_epoch, train_seconds = ck["best_val_accuracy"], ck["best_epoch"], ck["train_seconds"]
            log.info(f"↻ {stage.name}: resuming after epoch {ck['epoch']}/{plan.epochs}")
        loggers, tb = None, None
        if dist.is_main() and cfg.logging.tensorboard:
            tb = tensorboard.open_writer(stage_dir.parent / "tb" / stage.name)
        if dist.is_main():
            terms_logger = None  # a run begun before epoch_terms.csv existed goes on without it
            if start_epoch == 1 or terms_path.exists():
                terms_logger = EpochLogger(terms_path, resume_from_epoch=start_epoch - 1, columns=TERMS_COLUMNS)
            loggers = (EpochLogger(csv_path, resume_from_epoch=start_epoch - 1), terms_logger)
            for logger, row in zip(loggers, ck_rows or (None, None)):
                if logger is not None and row is not None and len(logger.rows()) == start_epoch - 2:
                    logger.log(row)  # killed between saving last.pt and logging its row: the row is in last.pt

        # ---- a frozen teacher that sees the same inputs every epoch runs once (its logits cached)
        if teacher is not None and ctx.mixup is None and start_epoch <= plan.epochs:
            t_cache = time.perf_counter()
            ctx.teacher_logits = teacher_logits_table(teacher, loaders["train"], precision)
            if ctx.teacher_logits is not None:
                teacher_cache_seconds = time.perf_counter() - t_cache
                log.info(f"  {stage.name}: teacher logits of {len(ctx.teacher_logits):,} training images computed once "
                         f"({teacher_cache_seconds:.1f}s): no augmentation, so every epoch would repeat them")

        # ---- compile before the first epoch, timed apart from it
        if plan.compile and start_epoch <= plan.epochs:
            micro = plan.micro_batch or loaders["train"].batch_size
            sample = torch.randn(micro, 3, cfg.data.image_size, cfg.data.image_size, device=device)
            if use_channels_last(cfg, stage, device):
                sample = sample.contiguous(memory_format=torch.channels_last)
            compile_seconds = compile_warmup(ctx, sample)
            log.info(f"  {stage.name}: torch.compile took {compile_seconds:.1f}s (not counted in epoch times)")

        # ---- epochs: train, validate, checkpoint, log (a signal stops after the current step)
        with protected():
            for epoch in range(start_epoch, plan.epochs + 1):
                reset_peak_memory_stats(device)
                retries_before = alloc_retries(device)
                alpha = schedule_kd_alpha(epoch, plan.epochs, cfg.kd.alpha_start, cfg.kd.alpha_end) if teacher is not None else 0.0
                loaders["train"].set_epoch(epoch)
                try:
                    tr = train_one_epoch(ctx, loaders["train"], alpha, desc=f"{stage.name} {epoch}/{plan.epochs}",
                                         progress=progress)
                except NonFiniteLossError as exc:
                    kept = (f"{last_path} (epoch {epoch - 1}) is kept as it was" if last_path.exists() and epoch > 1
                            else "no checkpoint exists yet (first epoch)")
                    raise StageFailed(f"stage {stage.name!r}, epoch {epoch}, step {exc.step}: non-finite {exc.what} "
                                      f"({exc.value}); nothing of this epoch is saved (the model in memory, whose "
                                      f"batch-norm statistics saw the bad step, is discarded): {kept}. "
                                      f"Reduce the learning rate or check the data") from exc
                new_retries = alloc_retries(device) - retries_before
                if new_retries and not retries:  # said once per stage
                    warn_memory_tight(stage.name, epoch, new_retries, cfg.train.vram_budget_gb)
                retries += new_retries
                dist.sync_buffers(model)
                t_eval = time.perf_counter()
                val = evaluate(model, loaders["val"], precision, num_classes)
                eval_seconds = time.perf_counter() - t_eval
                train_seconds += tr["seconds"]
                row = _epoch_row(epoch, tr, val, tr["seconds"] + eval_seconds, peak_memory_mb(device))
                terms = {"epoch": epoch, "train_ce": tr["ce"], "train_kd": tr["kd"], "alpha": alpha if teacher is not None else float("nan"),
                         "lr_first": tr["lr_first"], "lr_last": tr["lr_last"], "steps": tr["steps"],
                         "train_seconds": tr["seconds"], "eval_seconds": eval_seconds,
                         "compile_seconds": compile_seconds if epoch == start_epoch else 0.0, "img_per_s": tr["img_per_s"]}
                improved = val["accuracy"] > best_acc  # identical on every rank: metrics are gathered
                if improved:
                    best_acc, best_epoch = val["accuracy"], epoch
                if dist.is_main():
                    if improved:
                        atomic_save({"model": model.state_dict(), "epoch": epoch, "stage": stage.name,
                                     "model_name": stage.model, "val_accuracy": val["accuracy"]}, stage_dir / "best.pt")
                    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                                 "rng": rng_state(), "epoch": epoch, "best_val_accuracy": best_acc, "best_epoch": best_epoch,
                                 "train_seconds": train_seconds, "stage": stage.name, "model_name": stage.model,
                                 "log_row": row, "terms_row": terms}, last_path)
                    loggers[0].log(row)  # after last.pt: a logged epoch always has its checkpoint
                    if loggers[1] is not None:
                        loggers[1].log(terms)
                    if tb is not None:
                        tensorboard.log_epoch(tb, epoch, row, terms, tr["lrs"], alpha, (epoch - 1) * tr["steps"])
                kd_note = f"alpha {alpha:.2f}  " if teacher is not None else ""
                log.info(f"  {stage.name:<15} epoch {epoch:>3}/{plan.epochs}  loss {tr['loss']:.4f}  train acc {tr['accuracy']:.4f}  "
                         f"val acc {val['accuracy']:.4f}  {kd_note}{tr['img_per_s']:>7,.0f} img/s  {row['epoch_time_sec']:.1f}s")
                if on_epoch_end is not None and dist.is_main():
                    on_epoch_end(model, epoch, stage_dir)
        epochs_done = plan.epochs
        if tb is not None:
            tb.close()

    # ---- ranks agree: DDP keeps replicas identical; prove it before trusting rank 0's checkpoint
    checksums = dist.all_checksums(model)
    if len(set(checksums)) != 1:
        raise RuntimeError(f"stage {stage.name}: ranks hold different weights at the end of training: {checksums}")
    dist.barrier()  # rank 0 has written best.pt

    # ---- test once, on the best-validation checkpoint
    load_weights(model, stage_dir / "best.pt", f"{stage_dir / 'best.pt'}")
    t_test = time.perf_counter()
    test = evaluate(model, loaders["test"], precision, num_classes, return_predictions=True)
    test_seconds = time.perf_counter() - t_test
    if dist.is_main():
        save_predictions(stage_dir / "test_predictions.csv", test, getattr(data.test, "ids", None))
        export_stage(cfg, stage, model, data.classes, stage_dir)  # model.safetensors + model.json

    # ---- summary: stage.json (written last: its presence means the stage is done)
    rows = read_epoch_csv(csv_path)
    terms_rows = read_epoch_csv(terms_path, TERMS_COLUMNS) if terms_path.exists() else []
    if rows:  # the best epoch's validation figures are in its CSV row; only a loaded checkpoint needs a pass
        val_best = {"accuracy": rows[best_epoch - 1]["val_accuracy"], "f1_score": rows[best_epoch - 1]["val_f1_score"]}
    else:
        val_best = evaluate(model, loaders["val"], precision, num_classes)
    trained_images = sum(t["img_per_s"] * t["train_seconds"] for t in terms_rows)
    summary = {
        "stage": stage.name, "model": stage.model, "role": role or "", "teacher": stage.teacher or "",
        "params": params, "flops": flops, "epochs": epochs_done, "best_epoch": best_epoch,
        "val_accuracy": val_best["accuracy"], "val_f1_score": val_best["f1_score"],
        "test_accuracy": test["accuracy"], "test_precision": test["precision"], "test_recall": test["recall"],
        "test_f1_score": test["f1_score"], "test_loss": test["loss"],
        "last_val_accuracy": rows[-1]["val_accuracy"] if rows else val_best["accuracy"],
        "peak_gpu_memory_mb": max([r["gpu_memory_mb"] for r in rows], default=0.0),
        "train_seconds": train_seconds,
        "img_per_s": trained_images / sum(t["train_seconds"] for t in terms_rows) if terms_rows else 0.0,
        "eval_seconds": sum(t["eval_seconds"] for t in terms_rows) + test_seconds,
        "compile_seconds": sum(t["compile_seconds"] for t in terms_rows),
        "teacher_cache_seconds": round(teacher_cache_seconds, 2),
        "alloc_retries": retries,  # cache flushes at the memory cap during this process's training epochs
        "optimizer": cfg.train.optimizer, "lr": lr, "precision": precision.name, "label_smoothing": label_smoothing, "batch_size": plan.batch_size,
        "micro_batch": plan.micro_batch or plan.batch_size, "grad_checkpointing": plan.grad_checkpointing,
        "compile": plan.compile, "init_seed": seeds["init"], "data_seed": seeds["data"],
        "init_weights_checksum": init_checksum, "skipped_images": len(getattr(data, "skipped_files", []) or []),
        "world_size": dist.state().world_size, "rank_weight_checksums": checksums, **(extra or {}),
    }
    if dist.is_main():
        atomic_write_text(stage_dir / "stage.json", json.dumps(summary, indent=2))

    # ---- release the stage's model and optimiser state before the next stage
    released = cleanup_training_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                      verbose=verbose and dist.is_main(), device=device)
    del model
    summary["released_mb"] = released["released_mb"]
    return summary

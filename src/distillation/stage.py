"""One stage: "train model M, optionally distilled from a frozen teacher", with its artefacts.

stage_dir/
    epoch_log.csv          one row per epoch, REQUIRED_COLUMNS (src/utils/logger.py)
    last.pt                full training state after the last completed epoch (resume)
    best.pt                weights of the best-validation epoch (model selection on val only)
    test_predictions.csv   y_true, y_pred of the test split, from best.pt
    stage.json             this stage's summary row (written last: its presence = stage done)
    attention/             ViT attention maps (every viz.attention_every epochs)
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from src.distillation import distributed as dist
from src.distillation.engine import Precision, StepContext, evaluate, train_one_epoch, warmup_cosine
from src.models import count_flops, count_params, create_model, is_cnn
from src.models.factory import check_state_dict
from src.utils.checkpoint import atomic_save, extract_state_dict, rng_state, safe_load, set_rng_state
from src.utils.errors import NonFiniteLossError
from src.utils.logger import REQUIRED_COLUMNS, EpochLogger, get_console, read_epoch_csv
from src.utils.training_guards import (cleanup_training_state, enforce_gradient_checkpointing, get_model_specific_lr,
                                       peak_memory_mb, reset_peak_memory_stats, role_from_model_name,
                                       schedule_kd_alpha)

log = get_console()


class StageFailed(RuntimeError):
    """A stage stopped on a non-finite loss; names stage, epoch and step."""


@dataclass
class StagePlan:
    """Resolved per-stage settings (config + planner)."""
    epochs: int
    batch_size: int
    micro_batch: Optional[int] = None
    grad_checkpointing: bool = False
    compile: bool = False
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
    setting = cfg.train.channels_last
    return setting == "true" or (setting == "auto" and device.type == "cuda" and is_cnn(stage.model))


def _param_groups(model: nn.Module, weight_decay: float) -> list:
    """No weight decay on biases and norm parameters (1-D tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _mixup(cfg, num_classes: int):
    d = cfg.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=cfg.train.label_smoothing,
                 num_classes=num_classes)


def run_stage(cfg, stage, data, loaders: dict, stage_dir: Path, device: torch.device, plan: StagePlan,
              teacher: Optional[nn.Module] = None, resume: bool = False, progress: bool = True,
              should_stop: Callable[[], bool] = lambda: False,
              on_epoch_end: Optional[Callable[[nn.Module, int, Path], None]] = None, extra: Optional[dict] = None) -> dict:
    """Train (or load) one stage and return its summary row (plus `extra`). Artefacts go to `stage_dir`."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    num_classes = data.num_classes
    model = build_stage_model(cfg, stage, num_classes).to(device)
    channels_last = use_channels_last(cfg, stage, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = count_params(model)
    flops = count_flops(model, cfg.data.image_size, device)
    precision = Precision.choose(device, cfg.train.amp)
    role = stage.role or role_from_model_name(stage.model)
    csv_path = stage_dir / "epoch_log.csv"

    if stage.checkpoint:  # a trained model handed in: evaluate it, train nothing
        load_weights(model, stage.checkpoint, f"stage {stage.name}: checkpoint {stage.checkpoint}")
        if dist.is_main():
            EpochLogger(csv_path)
            atomic_save({"model": model.state_dict(), "epoch": 0, "stage": stage.name, "model_name": stage.model},
                        stage_dir / "best.pt")
        epochs_done, best_epoch = 0, 0
        lr = 0.0
        train_seconds = 0.0
        img_per_s = 0.0
        optimizer = scheduler = scaler = None
    else:
        sample = None
        if device.type == "cuda":  # lets the guard measure the activation-memory drop on this GPU
            sample = torch.randn(8, 3, cfg.data.image_size, cfg.data.image_size, device=device)
        plan.grad_checkpointing = enforce_gradient_checkpointing(
            model, stage.model, verbose=True, force=plan.grad_checkpointing, sample_input=sample)
        base_lr = stage.lr or cfg.train.lr
        lr = get_model_specific_lr(stage.model, base_lr, role)
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.train.weight_decay), lr=lr,
                                      fused=device.type == "cuda" or None)
        steps_per_epoch = len(loaders["train"])
        total_steps = plan.epochs * steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
            total_steps, int(round(cfg.train.warmup_epochs * steps_per_epoch)), cfg.train.min_lr_ratio))
        scaler = torch.amp.GradScaler("cuda") if precision.needs_scaler else None
        train_model = model
        ds = dist.state()
        if ds.enabled:  # one replica per rank; each rank runs its own frozen teacher forward
            if cfg.train.sync_bn and is_cnn(stage.model):
                train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[device.index] if device.type == "cuda" else None)
        train_model = torch.compile(train_model) if plan.compile else train_model
        ctx = StepContext(model=train_model, optimizer=optimizer, scheduler=scheduler, precision=precision,
                          scaler=scaler, teacher=teacher, temperature=cfg.kd.temperature,
                          label_smoothing=cfg.train.label_smoothing, grad_clip=cfg.train.grad_clip,
                          micro_batch=plan.micro_batch, mixup=_mixup(cfg, num_classes), num_classes=num_classes,
                          should_stop=should_stop)
        start_epoch, best_acc, best_epoch, train_seconds, img_per_s = 1, -1.0, 0, 0.0, 0.0
        ck_row = None
        last_path = stage_dir / "last.pt"
        if resume and last_path.is_file():
            ck = safe_load(last_path, map_location=device)
            check_state_dict(model, ck["model"], f"resume {last_path}")
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            set_rng_state(ck["rng"])
            start_epoch = ck["epoch"] + 1
            ck_row = ck.get("log_row")
            best_acc, best_epoch, train_seconds = ck["best_val_accuracy"], ck["best_epoch"], ck["train_seconds"]
            log.info(f"↻ {stage.name}: resuming after epoch {ck['epoch']}/{plan.epochs}")
        logger = EpochLogger(csv_path, resume_from_epoch=start_epoch - 1) if dist.is_main() else None
        if logger is not None and ck_row is not None and len(logger.rows()) == start_epoch - 2:
            logger.log(ck_row)  # killed between saving last.pt and logging its row: the row is in last.pt
        for epoch in range(start_epoch, plan.epochs + 1):
            reset_peak_memory_stats()
            alpha = schedule_kd_alpha(epoch, plan.epochs, cfg.kd.alpha_start, cfg.kd.alpha_end) if teacher is not None else 0.0
            loaders["train"].set_epoch(epoch)
            t0 = time.perf_counter()
            desc = f"{stage.name} {epoch}/{plan.epochs}"
            try:
                tr = train_one_epoch(ctx, loaders["train"], alpha, desc=desc, progress=progress)
            except NonFiniteLossError as exc:
                raise StageFailed(f"stage {stage.name!r}, epoch {epoch}, step {exc.step}: non-finite loss ({exc.value}); "
                                  f"the last good checkpoint is {last_path if last_path.exists() else 'none (first epoch)'}. "
                                  f"Reduce the learning rate or check the data") from exc
            dist.sync_buffers(model)
            val = evaluate(model, loaders["val"], precision, num_classes)
            epoch_time = time.perf_counter() - t0
            train_seconds += epoch_time
            img_per_s = tr["img_per_s"]
            row = {"epoch": epoch}
            for split, m in (("train", tr), ("val", val)):
                row.update({f"{split}_loss": m["loss"], f"{split}_accuracy": m["accuracy"],
                            f"{split}_precision": m["precision"], f"{split}_recall": m["recall"],
                            f"{split}_f1_score": m["f1_score"]})
            row.update({"learning_rate": tr["lr"], "epoch_time_sec": epoch_time, "gpu_memory_mb": peak_memory_mb()})
            row = {k: row[k] for k in REQUIRED_COLUMNS}
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
                             "log_row": row}, last_path)
                logger.log(row)  # after last.pt: a logged epoch always has its checkpoint
            log.info(f"  {stage.name:<10} epoch {epoch:>3}/{plan.epochs}  loss {tr['loss']:.4f}  "
                     f"train acc {tr['accuracy']:.4f}  val acc {val['accuracy']:.4f}  alpha {alpha:.2f}  "
                     f"{tr['img_per_s']:.0f} img/s  {epoch_time:.1f}s")
            if on_epoch_end is not None and dist.is_main():
                on_epoch_end(model, epoch, stage_dir)
        epochs_done = plan.epochs

    # DDP keeps replicas identical; prove it before trusting rank 0's checkpoint for everyone.
    checksums = dist.all_checksums(model)
    if len(set(checksums)) != 1:
        raise RuntimeError(f"stage {stage.name}: ranks hold different weights at the end of training: {checksums}")
    dist.barrier()  # rank 0 has written best.pt
    # Test once, on the best-validation checkpoint.
    load_weights(model, stage_dir / "best.pt", f"{stage_dir / 'best.pt'}")
    test = evaluate(model, loaders["test"], precision, num_classes, return_predictions=True)
    if dist.is_main():
        np.savetxt(stage_dir / "test_predictions.csv", np.stack([test["y_true"], test["y_pred"]], 1),
                   fmt="%d", delimiter=",", header="y_true,y_pred", comments="")
    rows = read_epoch_csv(csv_path)
    # The best epoch's validation figures are already in its CSV row; only a loaded checkpoint needs a pass.
    if rows:
        best_row = rows[best_epoch - 1]
        val_best = {"accuracy": best_row["val_accuracy"], "f1_score": best_row["val_f1_score"]}
    else:
        val_best = evaluate(model, loaders["val"], precision, num_classes)
    peak = max([r["gpu_memory_mb"] for r in rows], default=0.0)
    summary = {
        "stage": stage.name, "model": stage.model, "role": role or "", "teacher": stage.teacher or "",
        "params": params, "flops": flops, "epochs": epochs_done, "best_epoch": best_epoch,
        "val_accuracy": val_best["accuracy"], "val_f1_score": val_best["f1_score"],
        "test_accuracy": test["accuracy"], "test_precision": test["precision"], "test_recall": test["recall"],
        "test_f1_score": test["f1_score"], "test_loss": test["loss"],
        "last_val_accuracy": rows[-1]["val_accuracy"] if rows else val_best["accuracy"],
        "peak_gpu_memory_mb": peak, "train_seconds": train_seconds, "img_per_s": img_per_s,
        "lr": lr, "precision": precision.name, "batch_size": plan.batch_size,
        "micro_batch": plan.micro_batch or plan.batch_size, "grad_checkpointing": plan.grad_checkpointing,
        "world_size": dist.state().world_size, "rank_weight_checksums": checksums, **(extra or {}),
    }
    if dist.is_main():
        (stage_dir / "stage.json").write_text(json.dumps(summary, indent=2))
    cleanup_training_state(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, verbose=dist.is_main())
    del model
    return summary

"""One stage: "train model M with the stage's method (from none, one or several frozen
teachers)", with its artefacts (names in src/runs/runfolder.py, StageFolder):

stage_dir/
    epoch_log.csv          one row per epoch, REQUIRED_COLUMNS (src/utils/logger.py)
    epoch_terms.csv        beside it: the method's terms, alpha, first/last LR, time split
    schedule.csv           the LR and alpha of every optimizer step, as applied
    last.pt                full training state after the last completed epoch (resume)
    best.pt                weights of the best-validation epoch (model selection on val only)
    test_predictions.csv   per test image: label, prediction, top-5 and logits, from best.pt
    stage.json             this stage's summary row (written last: its presence = stage done)
    attention/             ViT attention maps (every viz.attention_every epochs)

run_stage reads as its phases: build, restore (or load a given checkpoint), fit, test and
export, summarise, release.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from torch import nn

from . import distributed as dist
from . import logits_cache
from .clock import whole_epoch_seconds
from .engine import (MAX_TEACHER_CACHE_BYTES, Precision, StepContext, StopRequested, compile_warmup,
                                     evaluate, train_one_epoch)
from .methods import Method, StudentWithMethod, build_method, kd_alpha
from .recipe import make_scheduler, set_base_lr, stage_optimizer
from .export import export_stage
from ..models import count_flops, count_params, create_model, is_cnn, shape_only
from ..models.factory import check_state_dict
from ..utils.checkpoint import (atomic_save, atomic_write_text, point_to_export, read_weights, rng_state, safe_load,
                                  set_rng_state,
                                  slim_checkpoint)
from ..utils.devices import alloc_retries
from ..utils.errors import CheckpointError, NonFiniteLossError
from ..utils.logger import (REQUIRED_COLUMNS, EpochLogger, StepLogger, get_console, is_verbose, read_epoch_csv,
                              terms_columns, terms_columns_of)
from ..runs.runfolder import RunFolder, StageFolder
from ..utils.reproducibility import derive_seed, setup_reproducibility
from ..utils.signals import protected
from ..utils import tb as tensorboard
from ..utils.training_guards import (cleanup_training_state, enforce_gradient_checkpointing, get_model_specific_lr,
                                       peak_memory_mb, reset_peak_memory_stats, role_from_model_name)

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
    state = read_weights(path)
    check_state_dict(model, state, source)
    model.load_state_dict(state)


_CNN: dict = {}


def stage_is_cnn(cfg, stage) -> bool:
    """Whether the stage's model is a CNN, by its layers (built once on the meta device: no memory,
    no weights; a model that cannot be built there is judged by its name)."""
    key = (stage.model, stage.cifar_stem, stage.patch_size, json.dumps(stage.model_kwargs, sort_keys=True, default=str))
    if key not in _CNN:
        model = shape_only(lambda: build_stage_model(
            cfg, replace(stage, pretrained=False, pretrained_file=None, checkpoint=None), 10))
        _CNN[key] = is_cnn(model if model is not None else stage.model)
    return _CNN[key]


def use_channels_last(cfg, stage, device: torch.device) -> bool:
    """auto: CNNs on any device (on a 2-core CPU 1.2-1.8x faster to train, see benchmarks/RESULTS.md)."""
    setting = cfg.train.channels_last
    return setting == "true" or (setting == "auto" and stage_is_cnn(cfg, stage))


def stage_seeds(cfg, stage) -> dict:
    """The stage's random streams, derived from (run seed, stream name): see derive_seed."""
    stream = stage.seed_stream or stage.name
    return {"init": derive_seed(cfg.seed, f"{stream}/init"), "data": derive_seed(cfg.seed, f"{stream}/data"),
            "method": derive_seed(cfg.seed, f"{stream}/method")}


def stage_lr(cfg, stage) -> float:
    """The stage's base LR: its own `lr` or train.lr, times its role's factor unless train.role_lr is off."""
    base = stage.lr or cfg.train.lr
    return get_model_specific_lr(stage.model, base, stage.role or role_from_model_name(stage.model)) if cfg.train.role_lr else base


def _mixup(cfg, num_classes: int, label_smoothing: float):
    d = cfg.data
    if d.mixup <= 0 and d.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def stage_method(cfg, stage, teachers: Sequence[nn.Module] = (), student: Optional[nn.Module] = None) -> Method:
    """The stage's method (what a step computes) with its frozen teachers and the student it
    trains (a method sizes its own modules from it), seeded from its stream. Every caller (the
    stage, the estimate, the planner's probe, the benchmarks) builds it here."""
    return build_method(cfg, stage, teachers, seed=stage_seeds(cfg, stage)["method"], student=student)


def step_context(cfg, stage, train_model: nn.Module, optimizer, scheduler, precision: Precision, plan: StagePlan,
                 num_classes: int, method: Method, scaler=None,
                 should_stop: Callable[[], bool] = lambda: False) -> StepContext:
    """The training step of `stage` as its config defines it: the method (teachers, KD terms,
    label smoothing), gradient clipping, mixup / cutmix and the planned micro-batch (also used by
    the benchmarks)."""
    return StepContext(model=train_model, optimizer=optimizer, scheduler=scheduler, precision=precision, scaler=scaler,
                       method=method, grad_clip=cfg.train.grad_clip, micro_batch=plan.micro_batch,
                       mixup=_mixup(cfg, num_classes, method.label_smoothing), num_classes=num_classes,
                       should_stop=should_stop)


def recipe_key(cfg, stage, lr: float) -> str:
    """What two students must share to be compared (besides model and seed stream): the data,
    training and KD settings, the stage's own overrides and its resolved LR and label smoothing;
    not its name, teachers or method (what the comparison is about)."""
    own = {k: v for k, v in asdict(stage).items()
           if k not in ("name", "teacher", "method", "method_args", "role", "seed_stream", "checkpoint", "lr")}
    key = {"data": asdict(cfg.data), "train": {k: v for k, v in asdict(cfg.train).items() if k not in ("lr", "device")},
           "kd": {"temperature": cfg.kd.temperature, "alpha_start": cfg.kd.alpha_start, "alpha_end": cfg.kd.alpha_end},
           "stage": own, "lr": lr, "label_smoothing": cfg.label_smoothing(stage)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class StageRun:
    """One stage in progress: what its phases share."""
    cfg: Any
    stage: Any
    folder: StageFolder
    device: torch.device
    plan: StagePlan
    num_classes: int
    model: nn.Module
    method: Method
    precision: Precision
    seeds: dict
    params: int
    flops: float
    init_checksum: str
    lr: float = 0.0
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    ctx: Optional[StepContext] = None
    start_epoch: int = 1
    best_acc: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0
    retries: int = 0
    compile_seconds: float = 0.0
    teacher_cache_seconds: float = 0.0
    epochs_done: int = 0
    stopped_early: Optional[int] = None  # the epoch after which train.early_stop ended the stage
    on_validated: Optional[Callable] = None  # a search's trial: told each epoch's validation accuracy, True = prune
    pruned_at: Optional[int] = None      # the epoch after which the search pruned this trial
    ck_rows: Optional[tuple] = None
    partial: Optional[dict] = None    # an epoch saved part-way (resumed from its next step)
    epoch: int = 0                     # the epoch in progress
    skipped_steps: int = 0             # steps of this epoch taken before an interruption (resumed part-way)


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
    logits = test["logits"]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    df = pd.DataFrame({"file": file_ids if file_ids is not None and len(file_ids) == len(logits) else range(len(logits)),
                       "y_true": test["y_true"], "y_pred": test["y_pred"],
                       "top5": [" ".join(map(str, r)) for r in top5]})
    df = pd.concat([df, pd.DataFrame(logits, columns=[f"logit_{i}" for i in range(logits.shape[1])])], axis=1)
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"))


# ---------------------------------------------------------------- the phases of a stage

def run_stage(cfg, stage, data, loaders: dict, stage_dir: Path, device: torch.device, plan: StagePlan,
              teachers: Sequence[nn.Module] = (), resume: bool = False, progress: bool = True,
              should_stop: Callable[[], bool] = lambda: False,
              on_epoch_end: Optional[Callable[[nn.Module, int, Path], None]] = None, extra: Optional[dict] = None,
              clock=None, on_validated: Optional[Callable[[int, float], bool]] = None) -> dict:
    """Train (or load) one stage and return its summary row (plus `extra`). Artefacts go to
    `stage_dir`; `teachers` are the frozen models of the stages it names, in that order; `clock`
    (a ChainClock) is told every epoch's time and says the chain's time left; `on_validated(epoch,
    val_accuracy)` (a search's trial) is told every epoch's validation accuracy and ends the stage
    when it returns True (a pruned trial). Without data.read_test the test split is not read."""
    run = build(cfg, stage, data.num_classes, Path(stage_dir), device, plan, teachers)
    if stage.checkpoint:
        load_given_checkpoint(run)
    else:
        prepare_training(run, len(loaders["train"]), should_stop)
        if resume and run.folder.last.is_file():
            restore(run)
        run.on_validated = on_validated
        fit(run, loaders, progress, on_epoch_end, clock)
    checksums = check_ranks_agree(run)
    test = test_and_export(run, data, loaders) if cfg.data.read_test else export_untested(run, data)
    summary = summarise(run, data, loaders, test, checksums, extra)
    return release(run, summary)


def build(cfg, stage, num_classes: int, stage_dir: Path, device: torch.device, plan: StagePlan,
          teachers: Sequence[nn.Module]) -> StageRun:
    """Initial weights from the stage's own seed stream (shared by students compared with each
    other), its method with the frozen teachers, size and FLOPs."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    seeds = stage_seeds(cfg, stage)
    setup_reproducibility(seeds["init"], cfg.deterministic)
    model = build_stage_model(cfg, stage, num_classes).to(device)
    init_checksum = dist.weights_checksum(model)
    if use_channels_last(cfg, stage, device):
        model = model.to(memory_format=torch.channels_last)
    method = stage_method(cfg, stage, teachers, student=model).to(device)
    return StageRun(cfg=cfg, stage=stage, folder=StageFolder(stage_dir), device=device, plan=plan,
                    num_classes=num_classes, model=model, method=method,
                    precision=Precision.choose(device, cfg.train.amp, cfg.train.amp_dtype), seeds=seeds,
                    params=count_params(model), flops=count_flops(model, cfg.data.image_size, device),
                    init_checksum=init_checksum)


def load_given_checkpoint(run: StageRun) -> None:
    """A trained model handed in (`checkpoint:`): it is evaluated, nothing is trained."""
    stage = run.stage
    load_weights(run.model, stage.checkpoint, f"stage {stage.name}: checkpoint {stage.checkpoint}")
    if dist.is_main():
        EpochLogger(run.folder.epoch_log)
        atomic_save({"model": run.model.state_dict(), "epoch": 0, "stage": stage.name, "model_name": stage.model},
                    run.folder.best)


def prepare_training(run: StageRun, steps_per_epoch: int, should_stop: Callable[[], bool]) -> None:
    """Checkpointing, the recipe (optimizer over the student and the method's own modules, LR
    schedule), the GradScaler, DDP and compilation, and the step context that trains with them."""
    cfg, stage, plan, device = run.cfg, run.stage, run.plan, run.device
    plan.grad_checkpointing = enforce_gradient_checkpointing(run.model, stage.model, verbose=is_verbose(),
                                                             force=plan.grad_checkpointing, measured=plan.ckpt_memory)
    run.lr = stage_lr(cfg, stage)
    run.optimizer = stage_optimizer([run.model, run.method], run.lr, cfg.train, device)
    run.scheduler = make_scheduler(run.optimizer, cfg.train, steps_per_epoch, plan.epochs)
    run.scaler = torch.amp.GradScaler("cuda") if run.precision.needs_scaler else None
    train_model = run.model
    if any(p.requires_grad for p in run.method.parameters()):  # one module: DDP averages both gradients
        train_model = StudentWithMethod(run.model, run.method)
    if dist.state().enabled:  # one replica per rank; each rank runs its own frozen teachers' forwards
        if cfg.train.sync_bn and is_cnn(run.model):
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(train_model)
        train_model = nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    if plan.compile and run.method.features:  # feature hooks stay on eager modules
        log.info(f"  {stage.name}: torch.compile off: method {run.method.name!r} reads features through hooks")
        plan.compile = False
    train_model = torch.compile(train_model) if plan.compile else train_model
    run.ctx = step_context(cfg, stage, train_model, run.optimizer, run.scheduler, run.precision, plan,
                           run.num_classes, run.method, scaler=run.scaler, should_stop=should_stop)
    if not dist.state().enabled:  # one process: epochs are saved part-way (every few minutes, and on a stop)
        run.ctx.checkpoint_every_s = cfg.train.checkpoint_every_min * 60
        run.ctx.save_partial = lambda state: save_partial(run, state, steps_per_epoch)


def restore(run: StageRun) -> None:
    """Resume from last.pt: weights, method state, optimizer, schedule, scaler, RNG and the
    best-so-far; a new --resume --lr applies from the next step on the same schedule."""
    ck = safe_load(run.folder.last, map_location=run.device)
    if ck.get("model") is None:  # a finished stage's slimmed last.pt: its bookkeeping only
        raise CheckpointError(f"{run.folder.last} belongs to a finished stage ({ck['epoch']} epochs) and keeps no "
                              f"training state: it cannot train further. Start a new run for a longer schedule")
    check_state_dict(run.model, ck["model"], f"resume {run.folder.last}")
    run.model.load_state_dict(ck["model"])
    if ck.get("method") is not None:
        run.method.load_state_dict(ck["method"])
    if ck.get("optimizer") is None:  # a finished stage's slimmed last.pt: its weights only
        if ck["epoch"] < run.plan.epochs:
            raise CheckpointError(f"{run.folder.last} holds the weights of a finished stage ({ck['epoch']} epochs) "
                                  f"but not its optimizer state: it cannot train to {run.plan.epochs} epochs. "
                                  f"Start a new run for a longer schedule")
    else:
        run.optimizer.load_state_dict(ck["optimizer"])
        run.scheduler.load_state_dict(ck["scheduler"])
    if run.scaler is not None and ck.get("scaler"):
        run.scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck["rng"])
    if run.scheduler.base_lrs[0] != run.lr:
        log.info(f"↻ {run.stage.name}: learning rate {run.scheduler.base_lrs[0]:g} -> {run.lr:g} from epoch {ck['epoch'] + 1}")
        set_base_lr(run.optimizer, run.scheduler, run.lr)
    run.start_epoch = ck["epoch"] + 1
    run.ck_rows = (ck.get("log_row"), ck.get("terms_row"))
    run.best_acc, run.best_epoch, run.train_seconds = ck["best_val_accuracy"], ck["best_epoch"], ck["train_seconds"]
    run.partial = ck.get("partial")
    where = (f"in epoch {run.partial['epoch']} at step {run.partial['next_step']}" if run.partial
             else f"after epoch {ck['epoch']}/{run.plan.epochs}")
    log.info(f"↻ {run.stage.name}: resuming {where}")


class _Logs:
    """The stage's logs on the main rank: epoch_log.csv, epoch_terms.csv (the method's terms),
    schedule.csv (per step) and TensorBoard; a row lost between last.pt and its CSV is replayed."""

    def __init__(self, run: StageRun):
        self.epoch = self.terms = self.schedule = self.tb = None
        if not dist.is_main():
            return
        cfg, folder, done = run.cfg, run.folder, run.start_epoch - 1
        if cfg.logging.tensorboard:
            tb_dir = RunFolder(folder.path.parent).tensorboard / run.stage.name
            fresh = not tensorboard.has_events(tb_dir)
            self.tb = tensorboard.open_writer(tb_dir)
            if fresh and run.start_epoch > 1:  # --resume --tensorboard on a run begun without it
                tensorboard.backfill(self.tb, folder, upto_epoch=run.start_epoch - 1)
        if run.start_epoch == 1 or folder.terms.exists():  # a run begun before epoch_terms.csv goes on without it
            self.terms = EpochLogger(folder.terms, resume_from_epoch=done, columns=terms_columns(run.method.terms))
        self.epoch = EpochLogger(folder.epoch_log, resume_from_epoch=done)
        if run.start_epoch == 1 or folder.schedule.exists():
            self.schedule = StepLogger(folder.schedule, resume_from_epoch=done)
        for logger, row in zip((self.epoch, self.terms), run.ck_rows or (None, None)):
            if logger is not None and row is not None and len(logger.rows()) == run.start_epoch - 2:
                logger.log(row)  # killed between saving last.pt and logging its row: the row is in last.pt

    def write(self, epoch: int, row: dict, terms: dict, tr: dict, alpha: float) -> None:
        if self.epoch is None:
            return
        self.epoch.log(row)  # after last.pt: a logged epoch always has its checkpoint
        if self.terms is not None:
            self.terms.log(terms)
        if self.schedule is not None:
            self.schedule.log_epoch(epoch, tr["lrs"], alpha, tr["step_losses"])
        if self.tb is not None:
            tensorboard.log_epoch(self.tb, epoch, row, terms, tr["lrs"], alpha, (epoch - 1) * tr["steps"],
                                  tr["step_losses"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def cache_teachers(run: StageRun, train_loader) -> None:
    """Frozen teachers that see the same inputs every epoch run once: their logits are cached."""
    if not run.method.teachers or run.ctx.mixup is not None or run.start_epoch > run.plan.epochs:
        return
    t0 = time.perf_counter()
    # loaded teachers: the tables an earlier stage computed on the same images, if any (logits_cache.py)
    shared = run.method.can_cache_teacher_logits(train_loader) and dist.state().world_size == 1  # not per rank
    key = logits_cache.key_of(run, train_loader) if shared else None
    tables = logits_cache.load(key, run.device) if key else None
    if tables is not None and run.method.use_teacher_logits(tables, train_loader):
        run.teacher_cache_seconds = time.perf_counter() - t0
        log.info(f"  {run.stage.name}: teacher logits of {len(train_loader.labels):,} training images read from "
                 f"{logits_cache.DIR}/ beside the teacher ({run.teacher_cache_seconds:.1f}s): computed by an earlier "
                 f"stage with the same teacher, images, precision and threads")
        return
    if run.method.cache_teacher_logits(train_loader, run.precision, MAX_TEACHER_CACHE_BYTES):
        run.teacher_cache_seconds = time.perf_counter() - t0
        log.info(f"  {run.stage.name}: teacher logits of {len(train_loader.labels):,} training images computed once "
                 f"({run.teacher_cache_seconds:.1f}s): no augmentation, so every epoch would repeat them")
        if key:
            logits_cache.save(key, run.method.cached)


def warm_compile(run: StageRun, train_loader) -> None:
    """Compile before the first epoch, timed apart from it."""
    if not run.plan.compile or run.start_epoch > run.plan.epochs:
        return
    size = run.cfg.data.image_size
    sample = torch.randn(run.plan.micro_batch or train_loader.batch_size, 3, size, size, device=run.device)
    if use_channels_last(run.cfg, run.stage, run.device):
        sample = sample.contiguous(memory_format=torch.channels_last)
    run.compile_seconds = compile_warmup(run.ctx, sample)
    log.info(f"  {run.stage.name}: torch.compile took {run.compile_seconds:.1f}s (not counted in epoch times)")


def save_partial(run: StageRun, state: dict, steps_per_epoch: int) -> str:
    """last.pt with the epoch in progress saved part-way (weights, optimizer, schedule, random
    streams and the epoch's running state): a resumed epoch ends as an uninterrupted one.
    Returns what was saved, in words."""
    stage, epoch = run.stage, run.epoch
    atomic_save({"model": run.model.state_dict(), "method": run.method.state_dict(),
                 "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler else None, "rng": rng_state(), "epoch": epoch - 1,
                 "best_val_accuracy": run.best_acc, "best_epoch": run.best_epoch, "train_seconds": run.train_seconds,
                 "stage": stage.name, "model_name": stage.model, "log_row": (run.ck_rows or (None, None))[0],
                 "terms_row": (run.ck_rows or (None, None))[1], "partial": {"epoch": epoch, **state}}, run.folder.last)
    return f"{stage.name}: epoch {epoch} up to step {state['next_step']} of {steps_per_epoch} saved in {run.folder.last}"


def train_epoch(run: StageRun, train_loader, epoch: int, progress: bool) -> tuple:
    """One training epoch at this epoch's alpha; a non-finite loss or gradient stops the stage
    (StageFailed names stage, epoch and step, and what is kept). Returns (metrics, alpha)."""
    stage, plan = run.stage, run.plan
    run.method.begin_epoch(epoch, plan.epochs)
    alpha = kd_alpha(run.cfg, stage, epoch, plan.epochs) if run.method.teachers else 0.0
    if run.method.own_weights and run.method.teachers:  # the method's own KD weight (e.g. DKD's warm-up) is logged
        alpha = float(run.method.weights()[1])
    reset_peak_memory_stats(run.device)
    retries_before = alloc_retries(run.device)
    train_loader.set_epoch(epoch)
    run.epoch = epoch
    resume = run.partial if run.partial and run.partial["epoch"] == epoch else None
    run.partial, run.skipped_steps = None, int(resume["next_step"]) if resume else 0
    try:
        tr = train_one_epoch(run.ctx, train_loader, alpha, desc=f"{stage.name} {epoch}/{plan.epochs}",
                             progress=progress, resume=resume)
    except NonFiniteLossError as exc:
        last = run.folder.last
        kept = (f"{last} (epoch {epoch - 1}) is kept as it was" if last.exists() and epoch > 1
                else "no checkpoint exists yet (first epoch)")
        raise StageFailed(f"stage {stage.name!r}, epoch {epoch}, step {exc.step}: non-finite {exc.what} "
                          f"({exc.value}); nothing of this epoch is saved (the model in memory, whose "
                          f"batch-norm statistics saw the bad step, is discarded): {kept}. "
                          f"Reduce the learning rate or check the data") from exc
    new_retries = alloc_retries(run.device) - retries_before
    if new_retries and not run.retries:  # said once per stage
        warn_memory_tight(stage.name, epoch, new_retries, run.cfg.train.vram_budget_gb)
    run.retries += new_retries
    run.train_seconds += tr["seconds"]
    return tr, alpha


def save_epoch(run: StageRun, epoch: int, val: dict, row: dict, terms: dict) -> None:
    """best.pt when validation improved (identical on every rank: metrics are gathered), then last.pt."""
    improved = val["accuracy"] > run.best_acc
    if improved:
        run.best_acc, run.best_epoch = val["accuracy"], epoch
    if not dist.is_main():
        return
    stage = run.stage
    if improved:
        atomic_save({"model": run.model.state_dict(), "epoch": epoch, "stage": stage.name,
                     "model_name": stage.model, "val_accuracy": val["accuracy"]}, run.folder.best)
    atomic_save({"model": run.model.state_dict(), "method": run.method.state_dict(),
                 "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler else None, "rng": rng_state(), "epoch": epoch,
                 "best_val_accuracy": run.best_acc, "best_epoch": run.best_epoch, "train_seconds": run.train_seconds,
                 "stage": stage.name, "model_name": stage.model, "log_row": row, "terms_row": terms}, run.folder.last)
    run.ck_rows = (row, terms)


def early_stop_due(run: StageRun, epochs_done: int) -> bool:
    """train.early_stop: `patience` epochs have passed since the best validation accuracy. Decided
    from the best epoch alone (kept in last.pt), so a resumed stage stops where it would have."""
    patience = run.cfg.train.early_stop
    return patience > 0 and run.best_epoch > 0 and epochs_done - run.best_epoch >= patience


def _weights_note(method, alpha: float) -> str:
    """The console's word for this epoch's loss mix: the chain's alpha, or a method's own weights."""
    if not method.teachers:
        return ""
    if method.own_weights:
        ce_w, kd_w = method.weights()
        return f"ce {float(ce_w):g} + {method.name} {float(kd_w):g}  "
    return f"alpha {alpha:.2f}  "


def fit(run: StageRun, loaders: dict, progress: bool, on_epoch_end, clock=None) -> None:
    """Epochs: train, validate, checkpoint, log (a signal stops after the current step); early
    stopping ends the stage when train.early_stop asks."""
    logs = _Logs(run)
    cache_teachers(run, loaders["train"])
    warm_compile(run, loaders["train"])
    run.epochs_done = run.start_epoch - 1
    with protected():
        for epoch in range(run.start_epoch, run.plan.epochs + 1):
            t_epoch = time.perf_counter()  # the clock counts the whole epoch: training, validation, checkpoints
            if early_stop_due(run, epoch - 1):  # stopped before a kill that came ahead of stage.json
                run.stopped_early = epoch - 1
                break
            tr, alpha = train_epoch(run, loaders["train"], epoch, progress)
            dist.sync_buffers(trained_modules(run))  # batch-norm statistics: rank 0's on every rank
            t_eval = time.perf_counter()
            val = evaluate(run.model, loaders["val"], run.precision, run.num_classes)
            eval_seconds = time.perf_counter() - t_eval
            row = _epoch_row(epoch, tr, val, tr["seconds"] + eval_seconds, peak_memory_mb(run.device))
            terms = {"epoch": epoch, **{f"train_{t}": tr[t] for t in run.method.terms},
                     "alpha": alpha if run.method.teachers else float("nan"),
                     "lr_first": tr["lr_first"], "lr_last": tr["lr_last"], "steps": tr["steps"],
                     "train_seconds": tr["seconds"], "eval_seconds": eval_seconds,
                     "compile_seconds": run.compile_seconds if epoch == run.start_epoch else 0.0,
                     "img_per_s": tr["img_per_s"]}
            save_epoch(run, epoch, val, row, terms)
            logs.write(epoch, row, terms, tr, alpha)
            run.epochs_done = epoch
            kd_note = _weights_note(run.method, alpha)
            took = whole_epoch_seconds(time.perf_counter() - t_epoch, eval_seconds, tr["steps"], run.skipped_steps)
            left = f"  {clock.epoch_done(run.stage.name, took)}" if clock is not None else ""
            log.info(f"  {run.stage.name:<15} epoch {epoch:>3}/{run.plan.epochs}  loss {tr['loss']:.4f}  "
                     f"train acc {tr['accuracy']:.4f}  val acc {val['accuracy']:.4f}  {kd_note}"
                     f"{tr['img_per_s']:>7,.0f} img/s  {row['epoch_time_sec']:.1f}s{left}")
            if on_epoch_end is not None and dist.is_main():
                on_epoch_end(run.model, epoch, run.folder.path)
            if run.on_validated is not None and run.on_validated(epoch, float(val["accuracy"])) \
                    and epoch < run.plan.epochs:
                run.pruned_at = epoch
                log.info(f"  {run.stage.name}: pruned after epoch {epoch} (below the median of the search's "
                         f"earlier trials at this epoch)")
                break
            if early_stop_due(run, epoch) and epoch < run.plan.epochs:
                run.stopped_early = epoch
                log.info(f"  {run.stage.name}: early stop after epoch {epoch}: no better validation accuracy for "
                         f"{run.cfg.train.early_stop} epochs (best: epoch {run.best_epoch})")
                break
            if dist.any_rank(run.ctx.should_stop()):
                rest = ("the stage's test and export run" if epoch == run.plan.epochs else f"epoch {epoch + 1} starts")
                raise StopRequested(saved=f"{run.stage.name}: epoch {epoch} complete, saved in {run.folder.last}; "
                                          f"on resume {rest}")
    if clock is not None:
        clock.stage_ended(run.stage.name)
    logs.close()


def trained_modules(run: StageRun) -> nn.Module:
    """The student, with the method's own modules when it has any (a FitNets regressor and its
    batch norm): what the ranks must agree on."""
    has_state = any(True for _ in run.method.parameters()) or any(True for _ in run.method.buffers())
    return StudentWithMethod(run.model, run.method) if has_state else run.model


def check_ranks_agree(run: StageRun) -> list:
    """DDP keeps replicas identical; proven before rank 0's checkpoint is trusted (the method's
    own modules too, e.g. a FitNets regressor, when it has any)."""
    checksums = dist.all_checksums(trained_modules(run))
    if len(set(checksums)) != 1:
        raise RuntimeError(f"stage {run.stage.name}: ranks hold different weights at the end of training: {checksums}")
    dist.barrier()  # rank 0 has written best.pt
    return checksums


def test_and_export(run: StageRun, data, loaders: dict) -> dict:
    """Test once, on the best-validation checkpoint; predictions and the exported weights."""
    load_weights(run.model, run.folder.best, f"{run.folder.best}")
    t0 = time.perf_counter()
    test = evaluate(run.model, loaders["test"], run.precision, run.num_classes, return_predictions=True)
    test["seconds"] = time.perf_counter() - t0
    if dist.is_main():
        save_predictions(run.folder.predictions, test, getattr(data.test, "ids", None))
        export_stage(run.cfg, run.stage, run.model, data.classes, run.folder.path)  # model.safetensors + model.json
    return test


def export_untested(run: StageRun, data) -> dict:
    """A run that must not read the test split (a search's trial): the best-validation weights
    exported, no test metrics (NaN), no predictions."""
    load_weights(run.model, run.folder.best, f"{run.folder.best}")
    if dist.is_main():
        export_stage(run.cfg, run.stage, run.model, data.classes, run.folder.path)
    nan = float("nan")
    return {"accuracy": nan, "precision": nan, "recall": nan, "f1_score": nan, "loss": nan, "seconds": 0.0}


def summarise(run: StageRun, data, loaders: dict, test: dict, checksums: list, extra: Optional[dict]) -> dict:
    """stage.json, written last: its presence means the stage is done."""
    cfg, stage, plan, folder = run.cfg, run.stage, run.plan, run.folder
    rows = read_epoch_csv(folder.epoch_log)
    terms_rows = read_epoch_csv(folder.terms, terms_columns_of(folder.terms)) if folder.terms.exists() else []
    if rows:  # the best epoch's validation figures are in its CSV row; only a loaded checkpoint needs a pass
        val_best = {"accuracy": rows[run.best_epoch - 1]["val_accuracy"], "f1_score": rows[run.best_epoch - 1]["val_f1_score"]}
    else:
        val_best = evaluate(run.model, loaders["val"], run.precision, run.num_classes)
    trained_images = sum(t["img_per_s"] * t["train_seconds"] for t in terms_rows)
    summary = {
        "stage": stage.name, "model": stage.model, "role": stage.role or role_from_model_name(stage.model) or "",
        "teacher": "+".join(stage.teachers), "teachers": stage.teachers, "method": run.method.name,
        "method_label": run.method.describe(),
        "params": run.params, "flops": run.flops, "epochs": run.epochs_done, "best_epoch": run.best_epoch,
        "planned_epochs": plan.epochs, "early_stop_patience": cfg.train.early_stop, "stopped_early_at": run.stopped_early,
        "pruned_at": run.pruned_at,
        "val_accuracy": val_best["accuracy"], "val_f1_score": val_best["f1_score"],
        "test_accuracy": test["accuracy"], "test_precision": test["precision"], "test_recall": test["recall"],
        "test_f1_score": test["f1_score"], "test_loss": test["loss"],
        "last_val_accuracy": rows[-1]["val_accuracy"] if rows else val_best["accuracy"],
        "peak_gpu_memory_mb": max([r["gpu_memory_mb"] for r in rows], default=0.0),
        "train_seconds": run.train_seconds,
        "img_per_s": trained_images / sum(t["train_seconds"] for t in terms_rows) if terms_rows else 0.0,
        "eval_seconds": sum(t["eval_seconds"] for t in terms_rows) + test["seconds"],
        "compile_seconds": sum(t["compile_seconds"] for t in terms_rows),
        "teacher_cache_seconds": round(run.teacher_cache_seconds, 2),
        "alloc_retries": run.retries,  # cache flushes at the memory cap during this process's training epochs
        "optimizer": cfg.train.optimizer, "lr": run.lr, "precision": run.precision.name,
        "label_smoothing": run.method.label_smoothing, "batch_size": plan.batch_size,
        "micro_batch": plan.micro_batch or plan.batch_size, "grad_checkpointing": plan.grad_checkpointing,
        "compile": plan.compile, "seed_stream": stage.seed_stream or stage.name, "recipe": recipe_key(cfg, stage, run.lr),
        "init_seed": run.seeds["init"], "data_seed": run.seeds["data"],
        "init_weights_checksum": run.init_checksum, "skipped_images": len(getattr(data, "skipped_files", []) or []),
        "world_size": dist.state().world_size, "rank_weight_checksums": checksums, **(extra or {}),
    }
    if dist.is_main():
        atomic_write_text(folder.summary_file, json.dumps(summary, indent=2))
        # the stage is done: its weights once at full size, in the export (every rank read best.pt before
        # the test's gathered metrics); last.pt keeps only bookkeeping, best.pt names the export
        slim_checkpoint(folder.last)
        point_to_export(folder.best, StageFolder.WEIGHTS)
    return summary


def release(run: StageRun, summary: dict) -> dict:
    """The stage's model and optimizer state released before the next stage."""
    released = cleanup_training_state(model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                                      scaler=run.scaler, verbose=is_verbose() and dist.is_main(), device=run.device)
    run.model = run.ctx = None
    summary["released_mb"] = released["released_mb"]
    return summary

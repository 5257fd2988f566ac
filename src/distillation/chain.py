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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch

from ..data import build_loaders, load_dataset
from ..data.loaders import Normalizer
from ..data.sources import decode_images
from . import distributed as dist
from . import clock as chain_clock
from .clock import CPU_PRESETS, ChainClock, StageWork, duration
from ..spec.config import RunConfig, to_dict
from .engine import Precision, prepare_teacher
from .methods import check_methods, method_name, method_source, resolve
from .planner import StepSpec, apply_vram_budget, compile_decision, measure_steps, probe_plan
from .recipe import optimizer_factory
from .trial import trial_reporter
from .stage import (StagePlan, build_stage_model, load_weights, run_stage, stage_method, stage_seeds,
                                   use_channels_last)
from ..models import count_params, is_vit, shape_only
from ..utils import tb as tensorboard
from ..utils.checkpoint import atomic_write_text, point_to_export, slim_checkpoint
from ..utils.devices import resolve_device, set_cpu_threads
from ..utils.environment import environment_record
from ..utils.errors import CheckpointError, UserError
from ..utils.logger import get_console, is_verbose, read_epoch_csv
from ..utils.reproducibility import setup_reproducibility
from ..runs.runfolder import RunFolder, StageFolder
from ..runs.runlock import PROBE_PREFIX
from ..utils.tb import require_tensorboard
from ..utils.training_guards import cleanup_training_state, requires_gradient_checkpointing
from ..visualization.vit_viz import save_attention_maps

log = get_console()
SUMMARY_COLUMNS = ["stage", "model", "role", "teacher", "params", "flops", "epochs", "best_epoch", "planned_epochs",
                   "stopped_early_at", "val_accuracy",
                   "val_f1_score", "test_accuracy", "test_precision", "test_recall", "test_f1_score", "test_loss",
                   "last_val_accuracy", "peak_gpu_memory_mb", "train_seconds", "eval_seconds", "compile_seconds",
                   "img_per_s", "lr", "precision", "label_smoothing", "batch_size", "micro_batch", "grad_checkpointing",
                   "compile", "skipped_images", "method", "method_label", "seed_stream", "recipe", "init_seed",
                   "data_seed"]
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


def method_label(stage, cfg: RunConfig) -> str:
    """What taught the stage, for tables and comparisons: scratch (no teacher), kd (distilled from
    the chain's first stage), takd (through an assistant), dense (several teachers), or the name
    of the stage's own method."""
    teachers = stage.teachers
    if not teachers:
        return "scratch"
    name = resolve(method_name(stage)).name
    if name == "kd":
        return "kd" if teachers[0] == cfg.stages[0].name else "takd"
    return name


def method_words(stage, cfg: RunConfig) -> str:
    """The same in words: "scratch", "KD from teacher", "KD via assistant ta", "dense from teacher + ta"."""
    teachers = stage.teachers
    label = method_label(stage, cfg)
    if label == "scratch":
        return "scratch"
    if label == "kd":
        return f"KD from {teachers[0]}"
    if label == "takd":
        return f"KD via assistant {teachers[0]}"
    return f"{label} from {' + '.join(teachers)}"


def _plan_key(cfg: RunConfig, stage) -> tuple:
    """Stages with the same key get one plan: the model, its shapes and the step's settings."""
    return (stage.model, stage.cifar_stem, stage.patch_size, json.dumps(stage.model_kwargs, sort_keys=True),
            stage.grad_checkpointing, stage.batch_size or cfg.train.batch_size, cfg.data.image_size, cfg.train.amp,
            cfg.train.amp_dtype, cfg.train.compile, cfg.train.vram_budget_gb, cfg.train.channels_last)


def _bare(stage):
    return replace(stage, pretrained=False, pretrained_file=None, checkpoint=None)  # shapes only


def _heaviest_teachers(cfg: RunConfig, stage, num_classes: int):
    """Of the stages sharing this stage's plan, the one whose frozen models weigh most together
    (the plan must fit with all of them in memory), or None when none of them has a teacher."""
    sharing = [s for s in cfg.stages if s.teachers and _plan_key(cfg, s) == _plan_key(cfg, stage)]
    if not sharing:
        return None
    sizes = {}

    def weight(s):
        for n in s.teachers:
            if n not in sizes:
                build = lambda n=n: build_stage_model(cfg, _bare(cfg.stage(n)), num_classes)  # noqa: E731
                shapes = shape_only(build)
                sizes[n] = count_params(shapes if shapes is not None else build())
        return sum(sizes[n] for n in s.teachers)
    return max(sharing, key=lambda s: (weight(s), len(s.teachers)))


def plan_stage(cfg: RunConfig, stage, device: torch.device, num_classes: int,
               train_images: Optional[int] = None) -> StagePlan:
    """Configured settings, refined on CUDA by measuring a few real steps under the VRAM budget.

    One plan per model and shape: students compared with each other (scratch, KD, TAKD, dense)
    share it, probed with the heaviest set of frozen models among them, so they train with the same micro-batch (the same
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
    heaviest = _heaviest_teachers(cfg, stage, num_classes)  # its frozen models and method are the probe's
    teacher_builder = None
    if heaviest is not None:
        teacher_builder = lambda: [build_stage_model(cfg, _bare(cfg.stage(n)), num_classes)  # noqa: E731
                                   for n in heaviest.teachers]
    spec = StepSpec(method_builder=lambda ts, student: stage_method(cfg, heaviest or stage, ts, student),
                    optimizer_factory=optimizer_factory(cfg.train, device))
    plan = probe_plan(plan, model_builder=lambda: build_stage_model(cfg, _bare(stage), num_classes),
                      teacher_builder=teacher_builder, spec=spec, model_name=stage.model, image_size=cfg.data.image_size,
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
    if not is_vit(stage.model):  # a transformer family (Hugging Face ViTs included): attention maps
        return None
    n = cfg.viz.attention_images
    raw = data.val.images[:n] if data.val.images is not None else None
    if raw is None:  # streamed dataset: decode the few images shown
        raw = decode_images(data.val.files[:n], data.val.labels[:n].tolist(), data.store_size, True)[0].images
    norm = Normalizer(cfg.data.normalize, device, cfg.data.image_size, False)

    def callback(model, epoch: int, stage_dir: Path):
        if epoch % cfg.viz.attention_every and epoch != epochs:
            return
        x = norm(raw.to(device).float() / 255)
        save_attention_maps(model, x, raw, StageFolder(stage_dir).attention_map(epoch),
                            heads=cfg.viz.attention_heads, rollout=cfg.viz.attention_rollout,
                            title=f"{stage.name} ({stage.model}) epoch {epoch}")
    return callback


def check_stages(cfg: RunConfig) -> dict:
    """Before any data is read: every stage's model built from its name and settings (on the meta
    device: shapes only, seconds for the whole chain) and every method checked (check_methods).
    Returns where each stage's method code is."""
    for s in cfg.stages:
        try:
            with torch.device("meta"):
                build_stage_model(cfg, _bare(s), 10)
        except UserError as exc:
            raise type(exc)(f"stage {s.name!r}: {exc}") from None
        except Exception:  # noqa: BLE001 (a family the meta device cannot build: built for real later)
            pass
    return check_methods(cfg, build_model=lambda s: build_stage_model(cfg, _bare(s), 10))


def check_method_sources(folder: RunFolder, methods: dict) -> None:
    """A resumed run refuses a method whose source file changed since the run started (the file
    may be outside the repository, in no commit): its weights would mix two methods."""
    env = folder.file(RunFolder.ENV)
    started = json.loads(env.read_text()).get("methods", {}) if env.exists() else {}
    for stage, now in methods.items():
        then = started.get(stage)
        if then and then.get("sha256") and then.get("sha256") != now.get("sha256"):
            raise UserError(f"stage {stage!r}: the method's source {now.get('file') or then.get('file')} changed since "
                            f"this run started (SHA-256 {then['sha256'][:12]}... -> {str(now.get('sha256'))[:12]}...); "
                            f"put the file back as it was to resume, or start a new run with the new method")


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


def load_teacher(cfg: RunConfig, folder: RunFolder, name: str, num_classes: int, device: torch.device,
                 compile_model: bool = False):
    """The frozen best-validation checkpoint of stage `name`, prepared as the student's steps use it."""
    tstage = cfg.stage(name)
    model = build_stage_model(cfg, replace(tstage, pretrained=False, pretrained_file=None), num_classes)
    load_weights(model, folder.stage(name).best, f"teacher {name}")
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


@dataclass
class ChainRun:
    """A chain in progress: what its phases share."""
    cfg: RunConfig
    folder: RunFolder
    device: torch.device
    data: object
    resume: bool
    timings: dict
    plans: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)
    methods: dict = field(default_factory=dict)   # stage -> where its method's code is (method_source)
    write_bytes_per_s: float = float("inf")       # measured before the estimate (write_speed)


def run_chain(cfg: RunConfig, run: RunFolder | Path, *, resume: bool = False, progress: bool = True,
              should_stop: Callable[[], bool] = lambda: False, later_seeds: int = 0,
              cpu_advice: bool = True, threads: Optional[int] = None) -> pd.DataFrame:
    """Run every stage of `cfg` into the run folder `run` (or its path) in this process, one after
    another; finished stages are skipped on resume.

    Every stage still to run is planned first, and the time the chain will take (this run and
    `later_seeds` more of it) is said before the first step, with the advice that a long chain on a
    CPU is meant for a GPU unless `cpu_advice` is off (a caller that chose a long CPU run). Besides the stage folders it writes
    timings.json: wall-clock seconds of the whole chain split into data, planning, compile,
    training, evaluation and the rest. `threads`: CPU threads for every stage (a study's plan)."""
    t_start = time.perf_counter()
    chain, todo = prepare_run(cfg, RunFolder.of(run), resume, threads)
    try:
        clock = announce_estimate(chain, todo, later_seeds, cpu_advice)
        for idx, stage, plan in todo:
            chain.rows.append(train_stage(chain, idx, stage, plan, progress, should_stop, clock))
        return finish_chain(chain, t_start)
    finally:  # a stopped or failed session's wall time counts too (finish_chain wrote it when done)
        if not chain.timings.get("written"):
            write_timings(chain, t_start)


def prepare_run(cfg: RunConfig, folder: RunFolder, resume: bool, threads: Optional[int] = None) -> tuple:
    """(the chain, [(index, stage, plan)] still to train): the run's own files written, finished
    stages read back (their rows in chain.rows), every stage still to run planned (plan.json).
    What a study's executor calls once per seed before its jobs start."""
    chain = start_chain(cfg, folder, resume, threads)
    todo = []
    new = [s.name for s in cfg.stages if s.name not in chain.plans and not (resume and chain.folder.stage(s.name).finished)]
    if new and dist.is_main():  # what the silence before the estimate is: large models on a CPU take minutes here
        log.info(f"Planning {len(new)} stage{'s' if len(new) > 1 else ''} ({', '.join(new[:6])}{', ...' if len(new) > 6 else ''}): "
                 f"batch size and memory, compile or not, then a few timed steps each for the estimate")
    for idx, stage in enumerate(cfg.stages):
        stage_folder = chain.folder.stage(stage.name)
        if resume and stage_folder.finished:
            log.info(f"✓ {stage.name}: finished earlier, skipped")
            tidy_finished(chain, stage_folder)
            chain.rows.append(stage_folder.summary())
        else:
            todo.append((idx, stage, stage_plan(chain, stage, resuming=resume and stage_folder.started)))
    return chain, todo


def tidy_finished(chain: ChainRun, folder: StageFolder) -> None:
    """A finished stage met again: a kill between its stage.json and its slimming is completed now."""
    if dist.is_main():
        slim_checkpoint(folder.last)
        if folder.weights.exists():
            point_to_export(folder.best, StageFolder.WEIGHTS)
    backfill_tensorboard(chain, folder)


def finish_run(chain: ChainRun, t_start: float) -> pd.DataFrame:
    """After a study's jobs of this seed: summary.csv from every stage's stage.json, and timings.json."""
    chain.rows = [chain.folder.stage(s.name).summary() for s in chain.cfg.stages]
    return finish_chain(chain, t_start)


def run_job(job, progress: bool = False, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Train one stage job of a study (src/plan/jobs.py) in this process and return its
    summary. Its seed's run folder was prepared (config, plan.json) before the job started; its
    teachers are the finished stages it needs. A stage begun earlier (a stop, a worker that died)
    continues from its last checkpoint; a finished one is read back, never trained again."""
    folder = job.folder
    if folder.finished:
        return folder.summary()
    chain = open_chain(job.cfg, job.run, job.threads)
    if job.stage not in chain.plans:
        raise UserError(f"stage job {job.id}: {job.run.file(RunFolder.PLAN)} has no plan for it; "
                        f"run the study's command with --resume")
    stage = job.cfg.stage(job.stage)
    plan = replace(StagePlan(**chain.plans[job.stage]), epochs=stage.epochs or job.cfg.train.epochs)
    idx = [s.name for s in job.cfg.stages].index(job.stage)
    return train_stage(chain, idx, stage, plan, progress, should_stop)


def estimate_jobs(plan) -> dict:
    """Seconds per unfinished job of a study, for --dry-run: one seed's stages planned and timed
    over a few steps as a chain's estimate is (every seed trains the same stages), nothing written."""
    _, run, cfg = plan.runs()[0]
    check_stages(cfg)
    device = resolve_device(cfg.train.device)
    set_cpu_threads(device, threads=plan.threads)
    data = load_dataset(cfg.data)
    chain = ChainRun(cfg, run, device, data, False, {"data": 0.0, "planning": 0.0})
    per_stage = {}
    for stage in cfg.stages:
        stage_plan_ = plan_stage(cfg, stage, device, data.num_classes, len(data.train))
        epoch, after = stage_seconds(chain, stage, stage_plan_)
        per_stage[stage.name] = after + (0 if stage.checkpoint else epoch * stage_plan_.epochs)
    return {j.id: per_stage[j.stage] for j in plan.jobs if not j.folder.finished}


def open_chain(cfg: RunConfig, folder: RunFolder, threads: Optional[int]) -> ChainRun:
    """A prepared run as one job's process sees it: device, threads, data and plans, nothing written.
    The study's process checked, planned and timed every stage before any job started (prepare_run):
    here each method is only located (its file and hash for stage.json), and the job builds its own
    stage's method once, to train it."""
    device = resolve_device(cfg.train.device)
    set_cpu_threads(device, threads=threads)
    setup_reproducibility(cfg.seed, cfg.deterministic)
    apply_vram_budget(device, cfg.train.vram_budget_gb)
    data = load_dataset(cfg.data)
    chain = ChainRun(cfg, folder, device, data, True, {"data": 0.0, "planning": 0.0},
                     methods={s.name: method_source(s) for s in cfg.stages})
    if folder.file(RunFolder.PLAN).exists():
        chain.plans = json.loads(folder.file(RunFolder.PLAN).read_text())
    return chain


def backfill_tensorboard(chain: ChainRun, folder) -> None:
    """--resume --tensorboard on a run begun without it: a finished stage's epochs from its CSVs."""
    tb_dir = chain.folder.tensorboard / folder.name
    if chain.cfg.logging.tensorboard and dist.is_main() and not tensorboard.has_events(tb_dir):
        writer = tensorboard.open_writer(tb_dir)
        n = tensorboard.backfill(writer, folder)
        writer.close()
        log.info(f"  {folder.name}: {n} logged epoch(s) written to TensorBoard from its CSVs")


def write_speed(folder: Path, size: int = 32 * 2**20) -> float:
    """Bytes per second this disk takes a checkpoint at (written and fsynced as one is), measured
    on a scratch file in the run folder."""
    scratch = folder / ".write_probe.tmp"
    t0 = time.perf_counter()
    try:
        with open(scratch, "wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        return float("inf")  # the real writes will say what is wrong
    finally:
        scratch.unlink(missing_ok=True)
    return size / max(time.perf_counter() - t0, 1e-6)


def checkpoint_bytes(cfg: RunConfig, stage, num_classes: int) -> tuple[int, int]:
    """(bytes one epoch writes: last.pt with the weights and the optimizer's state, two more copies
    under AdamW, one under SGD with momentum, and best.pt; bytes of the export: the weights once), at fp32."""
    with torch.device("meta"):
        weights = 4 * sum(p.numel() for p in build_stage_model(cfg, _bare(stage), num_classes).parameters())
    states = 2 if cfg.train.optimizer == "adamw" else (1 if cfg.train.momentum else 0)
    return weights * (2 + states), weights


def stage_seconds(chain: ChainRun, stage, plan: StagePlan) -> tuple[float, float]:
    """(one epoch of the stage: training, validation and its checkpoints; what follows its last
    epoch: the test scoring and the export), from the planner's measured speed or two
    timed steps at the stage's real batch size after a warm-up one (random weights and data; the
    stage's own method; every frozen teacher's forward at each step unless the run will cache its
    logits, as it does when the inputs are the same every epoch and the method reads no teacher
    features)."""
    cfg, data, device = chain.cfg, chain.data, chain.device
    img_s = plan.probe_compiled_img_per_s if plan.compile and plan.probe_compiled_img_per_s else plan.probe_img_per_s
    if not img_s:
        precision = Precision.choose(device, cfg.train.amp, cfg.train.amp_dtype)
        cl = use_channels_last(cfg, stage, device)
        model = build_stage_model(cfg, _bare(stage), data.num_classes).to(device)
        model = model.to(memory_format=torch.channels_last) if cl else model
        teachers = [prepare_teacher(build_stage_model(cfg, _bare(cfg.stage(n)), data.num_classes), device, precision, cl)
                    for n in stage.teachers]
        try:
            micro = plan.micro_batch or plan.batch_size  # the real batch: small batches understate a CPU's speed
            method = stage_method(cfg, stage, teachers, model).to(device)
            d = cfg.data  # inputs the same every epoch: the run computes the teachers' logits once, not per step,
            fixed = d.augment == "none" and d.random_erasing == 0 and d.mixup <= 0 and d.cutmix <= 0
            if fixed and method.teachers and not method.uses_teacher_features():  # unless the method reads features
                method.cached = [torch.randn(micro, data.num_classes, device=device) for _ in teachers]
            img_s = measure_steps(model, teachers, micro, cfg.data.image_size, data.num_classes, precision, cl,
                                  steps=2, warmup=1, method=method,
                                  optimizer_factory=optimizer_factory(cfg.train, device))["img_per_s"]
        finally:
            for m in [model, *teachers]:
                cleanup_training_state(model=m, verbose=False, device=device)
    per_rank = len(data.train) / dist.state().world_size
    forward = 3 * img_s  # evaluation: a forward pass, about a third of a training step
    try:
        per_epoch, export = checkpoint_bytes(cfg, stage, data.num_classes) if dist.is_main() else (0, 0)
    except Exception:  # noqa: BLE001 (a family the meta device cannot build: its checkpoints go uncounted)
        per_epoch, export = 0, 0
    disk = chain.write_bytes_per_s
    return per_rank / img_s + len(data.val) / forward + per_epoch / disk, len(data.test) / forward + export / disk


def announce_estimate(chain: ChainRun, todo: list, later_seeds: int = 0, cpu_advice: bool = True) -> ChainClock:
    """Say before the first step how long the chain will take; on a CPU, when that is long (and
    `cpu_advice`), say that the preset is meant for a GPU and name the presets that fit a CPU."""
    work = []
    chain.write_bytes_per_s = write_speed(chain.folder.path) if todo and dist.is_main() else float("inf")
    for _, stage, plan in todo:
        folder = chain.folder.stage(stage.name)
        done = len(read_epoch_csv(folder.epoch_log)) if chain.resume and folder.epoch_log.exists() else 0
        epochs_left = 0 if stage.checkpoint else max(0, plan.epochs - done)
        seconds, test = stage_seconds(chain, stage, plan) if epochs_left else (0.0, 0.0)
        work.append(StageWork(stage.name, epochs_left, seconds, test, ended=not epochs_left))
    full = sum(w.epoch_seconds * (chain.cfg.stage(w.name).epochs or chain.cfg.train.epochs) + w.test_seconds
               for w in work)
    clock = ChainClock(work, full, later_seeds)
    total = clock.left()
    if dist.is_main() and total > 0:
        parts = ", ".join(f"{w.name} {duration(w.seconds_left())}" for w in work if w.epochs_left)
        seeds = f", and {later_seeds} more seed{'s' if later_seeds > 1 else ''}" if later_seeds else ""
        log.info(f"Estimated training time: about {duration(total)} ({parts}{seeds}; training, validation and "
                 f"test scoring, measured over a few steps at the real batch size), updated after every epoch")
        if cpu_advice and chain.device.type == "cpu" and total > chain_clock.SLOW_ON_CPU_S:  # read here: a test may lower it
            log.warning(f"⚠️  This preset is meant for a GPU: on this CPU it would take about {duration(total)}. "
                        f"Presets that fit a CPU: {CPU_PRESETS}. Ctrl-C stops it; --resume continues it")
    return clock


def start_chain(cfg: RunConfig, folder: RunFolder, resume: bool, threads: Optional[int] = None) -> ChainRun:
    """Device, threads, seeds and memory cap; the data; the preflight checks; then (only once the
    inputs are known to be good: a typo leaves no half-made run folder) the run's own files."""
    ds = dist.state()
    methods = check_stages(cfg)  # a bad model name, stem or method is found before any data is decoded
    if resume:
        check_method_sources(folder, methods)
    if ds.is_main:
        check_writable(folder.path)
    device = resolve_device(cfg.train.device, ds.local_rank if ds.enabled and cfg.train.device != "cpu" else None)
    threads = set_cpu_threads(device, int(os.environ.get("LOCAL_WORLD_SIZE", ds.world_size if ds.enabled else 1)),
                              threads=None if ds.enabled else threads)
    repro = setup_reproducibility(cfg.seed, cfg.deterministic)
    budget = apply_vram_budget(device, cfg.train.vram_budget_gb)
    if not ds.is_main:
        dist.barrier()  # rank 0 checks, decodes and caches first; the others read its caches
    t0 = time.perf_counter()
    data = load_dataset(cfg.data)
    chain = ChainRun(cfg, folder, device, data, resume, {"data": time.perf_counter() - t0, "planning": 0.0},
                     methods=methods)
    preflight(cfg, data.num_classes)
    if ds.is_main:
        dist.barrier()
        write_run_files(chain, repro, {"device": str(device), "resumed": resume, "vram_budget": budget,
                                       "world_size": ds.world_size, "distributed_backend": dist.backend(),
                                       "cpu_threads": threads or torch.get_num_threads(), "methods": methods})
    log.info(f"Data: {data.name}, {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
             f"{data.num_classes} classes, stored at {data.store_size}px, model input {cfg.data.image_size}px, device {device}")
    if chain.folder.file(RunFolder.PLAN).exists():
        chain.plans = json.loads(chain.folder.file(RunFolder.PLAN).read_text())
    return chain


def write_run_files(chain: ChainRun, repro: dict, env_extra: dict) -> None:
    """config.yaml (not rewritten on resume), env.json (env_resume.json on resume), classes.json."""
    folder, cfg = chain.folder, chain.cfg
    folder.path.mkdir(parents=True, exist_ok=True)
    for stale in folder.path.rglob("*.tmp") if chain.resume else []:  # a killed process's unfinished write
        stale.unlink(missing_ok=True)
    if not chain.resume or not folder.config_path.exists():
        folder.save_config(to_dict(cfg))
    env = environment_record(repro, env_extra, device=chain.device)
    env_name = RunFolder.ENV if not folder.file(RunFolder.ENV).exists() else RunFolder.ENV_RESUME
    atomic_write_text(folder.file(env_name), json.dumps(env, indent=2))
    atomic_write_text(folder.file(RunFolder.CLASSES), json.dumps(chain.data.classes))


def _planned_twin(chain: ChainRun, stage) -> Optional[str]:
    """A stage of this run already planned with the same model, shapes and step settings (the
    students compared with each other): its plan is kept for this one, so paired students train
    with one micro-batch and checkpointing even when a restart would probe differently."""
    cfg = chain.cfg
    key, epochs = _plan_key(cfg, stage), stage.epochs or cfg.train.epochs
    twins = {s.name for s in cfg.stages if s.name != stage.name and _plan_key(cfg, s) == key
             and (s.epochs or cfg.train.epochs) == epochs}  # same length: the same compile decision too
    return next((n for n in chain.plans if n in twins), None)


PLAN_NOTE_S = 10.0  # a stage whose planning took longer says so (progress through a long, quiet start)


def stage_plan(chain: ChainRun, stage, resuming: bool) -> StagePlan:
    """The plan a resumed stage started with (its epochs may have grown), else the plan of a twin
    planned earlier in this run (same model and shapes), else a new one, measured on rank 0 and
    shared with every rank; kept in plan.json."""
    cfg, t0 = chain.cfg, time.perf_counter()
    if stage.name in chain.plans and resuming:
        plan = replace(StagePlan(**chain.plans[stage.name]), epochs=stage.epochs or cfg.train.epochs)
    elif (twin := _planned_twin(chain, stage)) is not None:
        plan = replace(StagePlan(**chain.plans[twin]), epochs=stage.epochs or cfg.train.epochs)
        chain.plans[stage.name] = asdict(plan)
        if dist.is_main():
            atomic_write_text(chain.folder.file(RunFolder.PLAN), json.dumps(chain.plans, indent=2))
    else:
        main = dist.is_main()
        per_rank = len(chain.data.train) // dist.state().world_size
        plan = dist.broadcast(plan_stage(cfg, stage, chain.device, chain.data.num_classes, per_rank) if main else None)
        chain.plans[stage.name] = asdict(plan)
        if main:
            atomic_write_text(chain.folder.file(RunFolder.PLAN), json.dumps(chain.plans, indent=2))
            took = time.perf_counter() - t0
            if took > PLAN_NOTE_S:
                log.info(f"  planned {stage.name} ({stage.model}) in {duration(took)}")
    chain.timings["planning"] += time.perf_counter() - t0
    return plan


def _chain_words(stage, cfg: RunConfig) -> dict:
    """The chain's words for what taught a scratch / KD / TAKD stage ("KD via assistant ta"); any
    other method keeps its own label (its describe(): options, layers) in stage.json."""
    return {"method_label": method_words(stage, cfg)} if method_label(stage, cfg) in ("scratch", "kd", "takd") else {}


def train_stage(chain: ChainRun, idx: int, stage, plan: StagePlan, progress: bool, should_stop, clock=None) -> dict:
    """Load the stage's frozen teachers, build its loaders, run it, check the teachers stayed frozen."""
    cfg, data, device, ds = chain.cfg, chain.data, chain.device, dist.state()
    teacher_note = f" <- {' + '.join(stage.teachers)}" if stage.teachers else ""
    log.info(f"\n━━ Stage {idx + 1}/{len(cfg.stages)}: {stage.name} ({stage.model}){teacher_note}  {_plan_line(plan)}")
    teachers = [load_teacher(cfg, chain.folder, n, data.num_classes, device, compile_model=plan.compile)
                for n in stage.teachers]
    loaders = build_loaders(data, plan.batch_size, device, cfg.data, use_channels_last(cfg, stage, device),
                            seed=stage_seeds(cfg, stage)["data"], rank=ds.rank, world_size=ds.world_size)
    folder = chain.folder.stage(stage.name)
    summary = run_stage(cfg, stage, data, loaders, folder.path, device, plan, teachers=teachers,
                        resume=chain.resume and folder.started, progress=progress, should_stop=should_stop,
                        on_epoch_end=_attention_callback(cfg, stage, data, device, plan.epochs), clock=clock,
                        on_validated=None if stage.checkpoint else trial_reporter(chain.folder.path),
                        extra={"method": method_label(stage, cfg), **_chain_words(stage, cfg),
                               "method_file": chain.methods.get(stage.name, {}).get("file"),
                               "method_sha256": chain.methods.get(stage.name, {}).get("sha256")})
    dist.barrier()
    frozen = ""
    if teachers:  # checked, not assumed: eval mode and no parameter asking for a gradient
        inner = [getattr(t, "_orig_mod", t) for t in teachers]  # a compiled teacher wraps the frozen module
        ok = all(not any(m.training for m in t.modules()) and not any(p.requires_grad for p in t.parameters())
                 for t in inner)
        frozen = f"; teacher{'s' if len(teachers) > 1 else ''} frozen: {'yes' if ok else 'NO'}"
        for t in teachers:
            cleanup_training_state(model=t, verbose=False, device=device)
        del teachers
    best = f"epoch {summary['best_epoch']}" if summary.get("best_epoch") else "loaded from its checkpoint, not trained here"
    tested = (f"test acc {summary['test_accuracy']:.4f}, macro F1 {summary['test_f1_score']:.4f}" if cfg.data.read_test
              else "test split not read")
    log.info(f"  → {stage.name}: val acc {summary['val_accuracy']:.4f} ({best}), {tested}{frozen}; "
             f"memory released {summary.get('released_mb', 0.0):.0f} MB"
             + (f"; compile {summary['compile_seconds']:.1f}s" if summary.get("compile_seconds") else ""))
    return summary


def finish_chain(chain: ChainRun, t_start: float) -> pd.DataFrame:
    """summary.csv (one row per stage) and timings.json."""
    df = pd.DataFrame(chain.rows)
    df = df[[c for c in SUMMARY_COLUMNS if c in df.columns]]
    if dist.is_main():
        atomic_write_text(chain.folder.summary_csv, df.to_csv(index=False))
    write_timings(chain, t_start)
    return df


def write_timings(chain: ChainRun, t_start: float) -> None:
    """timings.json: wall-clock seconds summed over every session of the run (a resume adds its
    own to what the earlier ones recorded), split into data, planning, compile, training,
    evaluation and the rest. Training, compile and evaluation come from the finished stages'
    summaries, which count every session; "other" is what is left, never below 0 (a session
    killed by SIGKILL cannot record its wall time, while its stages' training time survives)."""
    if not dist.is_main():
        return
    path = chain.folder.file(RunFolder.TIMINGS)
    before = json.loads(path.read_text()) if chain.resume and path.exists() else {}
    timings = {"sessions": int(before.get("sessions", 0)) + 1,
               "wall": before.get("wall", 0.0) + time.perf_counter() - t_start,
               "data": before.get("data", 0.0) + chain.timings["data"],
               "planning": before.get("planning", 0.0) + chain.timings["planning"]}
    for key, col in (("compile", "compile_seconds"), ("training", "train_seconds"), ("evaluation", "eval_seconds")):
        timings[key] = float(sum(r.get(col, 0.0) or 0.0 for r in chain.rows))
    timings["other"] = max(0.0, timings["wall"] - sum(timings[k] for k in ("data", "planning", "compile", "training",
                                                                         "evaluation")))
    atomic_write_text(path, json.dumps({k: round(v, 2) for k, v in timings.items()}, indent=2))
    chain.timings["written"] = True

"""Typed run configuration: YAML presets -> dataclasses, with unknown keys and bad values refused.

A chain is data: a list of stages, each "train model M, optionally distilled from the frozen
model of an earlier stage". CNN and ViT chains differ only in their YAML.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from .sweep import apply_guidance, expand_methods, expand_sweep
from ..utils.errors import ConfigError


@dataclass
class DataConfig:
    source: str = "cifar10"            # cifar10 | cifar100 | imagefolder | digits
    root: str = "data"                 # dataset folder (imagefolder tree, or torchvision download dir)
    image_size: int = 32               # size the model sees (on-device resize when it differs)
    val_fraction: float = 0.1          # validation split carved from train, for model selection
    split_seed: int = 0                # the split is fixed by this seed, independent of the run seed
    max_train_samples: Optional[int] = None  # subsample (stratified) for quick runs
    max_test_samples: Optional[int] = None
    augment: str = "crop_flip"         # crop_flip | flip | none
    crop_padding: int = 4
    mixup: float = 0.0                 # timm Mixup alpha (0 = off)
    cutmix: float = 0.0                # timm CutMix alpha (0 = off)
    random_erasing: float = 0.0        # probability, on-device
    normalize: str = "imagenet"        # imagenet | cifar | cifar100 (the TAKD authors' statistics, used for both CIFARs)
    loader: str = "auto"               # auto | tensor (whole set in memory, device-side aug) | dataloader
    num_workers: int = 2
    cache_dir: Optional[str] = None    # decoded uint8 tensors cached here (default: <root>/.cache)
    skip_bad_images: bool = False      # skip unreadable images (count reported) instead of stopping
    read_test: bool = True             # false: the test split is never opened (a search's trials select on validation)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adamw"           # adamw | sgd (Nesterov momentum); both fused where torch has it
    lr: float = 1e-3
    role_lr: bool = True               # LR times 1.0 / 0.75 / 0.5 for teacher / assistant / student (false: every stage lr)
    momentum: float = 0.9              # sgd only
    nesterov: bool = True              # sgd only: Nesterov momentum (false: plain heavy-ball momentum)
    weight_decay: float = 0.05
    decay_all: bool = False            # weight decay on biases and norms too (false: on weights of rank >= 2 only)
    schedule: str = "cosine"           # cosine (to min_lr_ratio) | step (x lr_gamma at each of lr_milestones) | constant
    lr_milestones: list = field(default_factory=list)  # step: epochs after which the LR is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: float = 1.0         # linear warm-up before any schedule (capped at 20% of the stage's steps)
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0             # max global grad norm (0 = off)
    label_smoothing: float = 0.0       # for stages that teach no other stage; a teacher's default is 0 (see StageConfig)
    amp: bool = True                   # bf16 where supported, fp16 + GradScaler otherwise; fp32 on CPU
    amp_dtype: str = "auto"            # auto | bf16 | fp16 (fp16 forces the GradScaler path of Turing cards)
    channels_last: str = "auto"        # auto (CNNs) | true | false
    compile: str = "auto"              # auto (probe: on where it measurably pays off, CUDA and CPU) | true | false
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    vram_budget_gb: float = 6.0        # the process is capped to this much GPU memory (0 = no cap)
    auto_batch: bool = True            # on CUDA: probe micro-batch / checkpointing to fit the budget
    sync_bn: bool = False              # multi-GPU CNNs: SyncBatchNorm across ranks
    checkpoint_every_min: float = 5.0  # inside an epoch, save a resumable checkpoint this often (0: only on a stop)
    early_stop: int = 0                # stop a stage after this many epochs without a better validation accuracy (0: off)


@dataclass
class KDConfig:
    temperature: float = 4.0
    alpha_start: float = 0.9
    alpha_end: float = 0.5
    weights: Optional[list] = None     # several teachers: the weight of each one's KD term (default 1 each)
    drop_teachers: int = 0             # several teachers: leave out this many, drawn at random for every batch


@dataclass
class StageConfig:
    name: str = ""
    model: str = ""
    role: Optional[str] = None         # teacher | assistant | student (LR factor); default from the model name
    teacher: Any = None                # an earlier stage to distil from, or a list of them; None = plain training
    method: Optional[str] = None       # what a step computes (src/distillation/methods/): scratch | kd | dense | dkd | dist | fitnet | at | deit |
                                       # path/file.py:Class; default kd (one teacher), dense (several), scratch
    method_args: dict = field(default_factory=dict)  # options of the method (e.g. weights, drop_teachers)
    pretrained: bool = False           # ImageNet weights from the timm / Hugging Face hub
    pretrained_file: Optional[str] = None  # ... or from a local file
    checkpoint: Optional[str] = None   # skip training: load this checkpoint (e.g. a trained teacher)
    cifar_stem: Any = False            # ResNet: 3x3 stride-1 first conv, no max-pool (32 px from scratch); true |
                                       # false | auto (applied where the model has a ResNet stem: model swaps need no edit)
    patch_size: Optional[int] = None   # ViT: override patch size (e.g. 4 for 32 px)
    drop_path: float = 0.0
    grad_checkpointing: bool = False   # force on for this model (always on for ViT-Base)
    label_smoothing: Optional[float] = None  # default: 0 when a later stage distils from this one
                                       # (smoothed teachers distil worse, Mueller et al. 2019), else train.label_smoothing
    seed_stream: Optional[str] = None  # initial weights and data order drawn from (seed, this name); default: the
                                       # stage name. The --baselines students share the TAKD student's stream
    epochs: Optional[int] = None       # override train.epochs
    lr: Optional[float] = None         # override train.lr (before the role factor)
    batch_size: Optional[int] = None   # override train.batch_size
    model_kwargs: dict = field(default_factory=dict)

    @property
    def teachers(self) -> list:
        """The stages this one distils from, in the order named (none, one or several)."""
        if not self.teacher:
            return []
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)


@dataclass
class VizConfig:
    attention_every: int = 10          # attention maps every N epochs (and at the last epoch)
    attention_images: int = 8
    attention_heads: int = 2
    attention_rollout: bool = False


@dataclass
class LoggingConfig:
    tensorboard: bool = False          # also write RUN/tb/ (needs the tensorboard package)


@dataclass
class SweepConfig:
    assistants: list = field(default_factory=list)  # one path per entry: a model, {model:, ...}, or a list (several steps)
    baselines: bool = True             # also the student from scratch and distilled directly from the teacher
    methods: list = field(default_factory=list)  # e.g. [dkd, dist, fitnet, at]: one student per method, direct and via each assistant


@dataclass
class TuneConfig:
    """A search (src/experiment/search.py, on Optuna): knobs of a stage tuned on validation, trial by trial."""
    knobs: Any = None                  # "kd.temperature=1:20:log,kd.alpha=0.05:0.95" or {knob: "low:high[:log]"} (src/spec/tune.py)
    trials: int = 0                    # trials per tuned stage (0: no search)
    each: bool = False                 # tune every KD-taught student (direct and via each assistant) and each method's
                                       # direct student, each with `trials` trials on its own knobs
    stage: Optional[str] = None        # the stage to tune (default: the chain's student)
    storage: Optional[str] = None      # Optuna storage URL (several machines); default: RUN/tune/study.journal
    sampler_seed: int = 0              # TPE's seed (each tuned stage adds its index)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 42
    deterministic: bool = True
    output_dir: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    viz: VizConfig = field(default_factory=VizConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)  # expanded into stages when the config is read
    tune: TuneConfig = field(default_factory=TuneConfig)  # a search before the final training (trials > 0)
    tuned: dict = field(default_factory=dict)  # written by a finished search: per stage its study and frozen values
    guidance: str = "single"           # single | dense: every taught stage learns from all stages above it (DGKD)
    stages: list = field(default_factory=list)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def label_smoothing(self, stage: StageConfig) -> float:
        """The stage's own value; else 0 for a stage another one distils from; else train.label_smoothing."""
        if stage.label_smoothing is not None:
            return stage.label_smoothing
        teaches = any(stage.name in s.teachers for s in self.stages)
        return 0.0 if teaches else self.train.label_smoothing


_CHOICES = {
    ("data", "augment"): ("crop_flip", "flip", "none"),
    ("data", "normalize"): ("imagenet", "cifar", "cifar100"),
    ("data", "loader"): ("auto", "tensor", "dataloader"),
    ("train", "channels_last"): ("auto", "true", "false"),
    ("train", "compile"): ("auto", "true", "false"),
    ("train", "amp_dtype"): ("auto", "bf16", "fp16"),
    ("train", "optimizer"): ("adamw", "sgd"),
    ("train", "schedule"): ("cosine", "step", "constant"),
    ("stage", "role"): ("teacher", "assistant", "student", None),
    ("stage", "cifar_stem"): (True, False, "auto"),
    ("run", "guidance"): ("single", "dense"),
}


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_type(path, value, next(a for a in args if a is not type(None)))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 and 1e9 (no dot) as strings; people write numbers that way
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, bool) and path.endswith(("channels_last", "compile")):
            return str(value).lower()
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if annotation is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls, raw: Any, path: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in raw if k not in valid]
    if unknown:
        where = f" in '{path}'" if path else ""
        raise ConfigError(f"unknown config key{'s' if len(unknown) > 1 else ''} {unknown}{where}; valid keys: {', '.join(valid)}")
    kwargs = {}
    for name, value in raw.items():
        sub = f"{path}.{name}" if path else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, sub)
        elif name == "stages" and cls is RunConfig:
            if not isinstance(value, list) or not value:
                raise ConfigError("stages: expected a non-empty list of stages")
            kwargs[name] = [_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(value)]
        else:
            kwargs[name] = _check_type(sub, value, hint)
    return cls(**kwargs)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: RunConfig) -> RunConfig:
    """Range and cross-field checks; raises ConfigError naming the key and the allowed values."""
    _check_choices(cfg)
    _need(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    _check_data(cfg.data)
    _check_train(cfg.train)
    _check_kd(cfg.kd)
    _check_viz(cfg.viz)
    _check_stages(cfg.stages)
    _check_tune(cfg)
    return cfg


def _check_tune(cfg: RunConfig) -> None:
    t = cfg.tune
    _need(t.trials >= 0, f"tune.trials must be >= 0 (0: no search), got {t.trials}")
    if t.trials == 0:
        _need(t.knobs is None and not t.each, "tune: knobs given but no trials: add --trials N (or --tune-each N)")
        return
    _need(t.knobs is not None or t.each, "tune.trials without knobs: name them with --tune (or use --tune-each)")
    if t.knobs is not None:
        from .tune import parse_knobs  # the knob grammar lives beside the search's other spec code
        parse_knobs(t.knobs)
    if t.stage is not None:
        _need(t.stage in {s.name for s in cfg.stages}, f"tune.stage: no stage named {t.stage!r}")


def _check_choices(cfg: RunConfig) -> None:
    """Every key with a fixed set of values (data sources: the registry's)."""
    from ..data.sources import source_names  # the registry (torch): here, so that importing this module needs none
    for (section, key), choices in [*_CHOICES.items(), (("data", "source"), source_names())]:
        objs = cfg.stages if section == "stage" else [cfg] if section == "run" else [getattr(cfg, section)]
        for obj in objs:
            value = getattr(obj, key)
            _need(value in choices, f"{section}.{key}: {value!r} is not one of {[c for c in choices if c]}")


def _check_data(d: DataConfig) -> None:
    _need(d.image_size >= 8, f"data.image_size must be >= 8, got {d.image_size}")
    _need(0.0 < d.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
    for key in ("max_train_samples", "max_test_samples"):
        v = getattr(d, key)
        _need(v is None or v > 0, f"data.{key} must be positive, got {v}")
    _need(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    for key in ("mixup", "cutmix"):
        _need(getattr(d, key) >= 0, f"data.{key} must be >= 0, got {getattr(d, key)}")
    _need(0.0 <= d.random_erasing <= 1.0, f"data.random_erasing must be in [0, 1], got {d.random_erasing}")


def _check_train(t: TrainConfig) -> None:
    _need(t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}")
    _need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _need(0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}")
    _need(all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in t.lr_milestones)
         and list(t.lr_milestones) == sorted(set(t.lr_milestones)),
         f"train.lr_milestones must be increasing whole epochs >= 1, got {t.lr_milestones}")
    _need(t.schedule != "step" or bool(t.lr_milestones), "train.schedule: step needs train.lr_milestones, e.g. [80, 120]")
    _need(0 < t.lr_gamma <= 1, f"train.lr_gamma must be in (0, 1], got {t.lr_gamma}")
    _need(t.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {t.warmup_epochs}")
    _need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _need(t.grad_clip >= 0, f"train.grad_clip must be >= 0, got {t.grad_clip}")
    _need(0 <= t.label_smoothing < 1, f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    _need(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
         f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    _need(t.vram_budget_gb >= 0, f"train.vram_budget_gb must be >= 0, got {t.vram_budget_gb}")
    _need(t.early_stop >= 0, f"train.early_stop must be >= 0 epochs (0: off), got {t.early_stop}")
    _need(t.checkpoint_every_min >= 0, f"train.checkpoint_every_min must be >= 0, got {t.checkpoint_every_min}")


def _check_kd(k: KDConfig) -> None:
    _need(k.temperature > 0, f"kd.temperature must be > 0, got {k.temperature}")
    _need(k.drop_teachers >= 0, f"kd.drop_teachers must be >= 0, got {k.drop_teachers}")
    _need(k.weights is None or all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in k.weights),
         f"kd.weights must be a list of numbers >= 0, got {k.weights}")
    for key in ("alpha_start", "alpha_end"):
        v = getattr(k, key)
        _need(0.0 <= v <= 1.0, f"kd.{key} must be in [0, 1], got {v}")


def _check_viz(viz: VizConfig) -> None:
    _need(viz.attention_every >= 1, f"viz.attention_every must be >= 1, got {viz.attention_every}")
    _need(1 <= viz.attention_heads <= 2, "viz.attention_heads must be 1 or 2 (attention maps are O(N^2) in memory)")
    _need(1 <= viz.attention_images <= 8, "viz.attention_images must be 1..8 (one small batch only)")


def _check_stages(stages: list) -> None:
    _need(bool(stages), "stages: at least one stage is needed")
    seen = set()
    for s in stages:
        _need(bool(s.name) and bool(s.model), f"every stage needs a name and a model, got name={s.name!r} model={s.model!r}")
        _need(s.name not in seen, f"stage names must be unique: {s.name!r} appears twice")
        _need(s.teacher is None or isinstance(s.teacher, str) or (
            isinstance(s.teacher, list) and s.teacher and all(isinstance(t, str) for t in s.teacher)),
             f"stage {s.name!r}: teacher must be a stage name or a list of them, got {s.teacher!r}")
        for t in s.teachers:
            _need(t in seen, f"stage {s.name!r}: teacher {t!r} must name an earlier stage (have {sorted(seen)})")
        _need(len(set(s.teachers)) == len(s.teachers), f"stage {s.name!r}: a teacher is named twice: {s.teacher}")
        _need(s.epochs is None or s.epochs >= 1, f"stage {s.name!r}: epochs must be >= 1, got {s.epochs}")
        _need(s.lr is None or s.lr > 0, f"stage {s.name!r}: lr must be > 0, got {s.lr}")
        _need(s.batch_size is None or s.batch_size >= 1, f"stage {s.name!r}: batch_size must be >= 1")
        _need(0 <= s.drop_path < 1, f"stage {s.name!r}: drop_path must be in [0, 1), got {s.drop_path}")
        _need(not (s.pretrained and s.checkpoint), f"stage {s.name!r}: use pretrained or checkpoint, not both")
        _need(s.label_smoothing is None or 0 <= s.label_smoothing < 1,
             f"stage {s.name!r}: label_smoothing must be in [0, 1), got {s.label_smoothing}")
        seen.add(s.name)


def from_dict(raw: dict) -> RunConfig:
    """The typed, checked config, with its sweep expanded into stages and dense guidance applied
    (src/spec/sweep.py): the resolved chain is what a run saves and resumes."""
    cfg = validate(_build(RunConfig, raw, ""))
    return validate(expand_methods(apply_guidance(expand_sweep(cfg))))


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML preset (safe_load only), apply `key.sub=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.constructor.ConstructorError as exc:
        where = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        tag = str(exc.problem).split("tag '")[-1].split("'")[0] if "tag" in str(exc.problem) else str(exc.problem)
        tag = tag.replace("tag:yaml.org,2002:", "!!")
        raise ConfigError(f"{path}{where}: the tag {tag} is refused: configs are plain data (read with "
                          f"yaml.safe_load); write the value itself") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: not valid YAML ({problem}); check the indentation and quoting there") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (name:, data:, train:, stages: ...), "
                          f"got a {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw)


def apply_override(raw: dict, item: str) -> None:
    """`train.epochs=5` or `stages.student.epochs=3` (a stage addressed by its name)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        if part == "stages" and isinstance(node.get("stages"), list):
            name = parts[i + 1]
            match = [s for s in node["stages"] if s.get("name") == name]
            if not match:
                raise ConfigError(f"override {item!r}: no stage named {name!r}")
            node = match[0]
            rest = parts[i + 2:]
            for p in rest[:-1]:
                node = node.setdefault(p, {})
            node[rest[-1]] = _parse_value(value, item)
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = _parse_value(value, item)


def _parse_value(text: str, item: str):
    """A --set value as YAML (true, null, 3, [1, 2]); numbers as people write them (1e-3) are numbers."""
    if _NUMBER.fullmatch(text.strip()) and not text.strip().lstrip("+-").isdigit():
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it, e.g. --set 'key=\"text\"'") from None


def to_dict(cfg: RunConfig) -> dict:
    return asdict(cfg)


def config_record(raw: dict) -> tuple[str, str]:
    """(config.yaml's text, its digest's text) for a run's resolved config: the digest holds the
    text's SHA-256 and the values it was written with, so that a later --resume can tell a hand
    edit from the changes it accepted itself (RunFolder.save_config writes both)."""
    text = yaml.safe_dump(raw, sort_keys=False)
    return text, json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest(), "config": raw}, indent=1)


def edited_keys(text: str, digest_text: str) -> list:
    """The keys whose values differ between a config.yaml's `text` and the values its digest was
    written with ([] when unchanged or only comments and layout changed)."""
    saved = json.loads(digest_text)
    if hashlib.sha256(text.encode()).hexdigest() == saved["sha256"]:
        return []
    try:
        now = yaml.safe_load(text)
    except yaml.YAMLError:
        now = None
    return changed_keys(saved["config"], now) if isinstance(now, dict) else ["(the file no longer parses)"]


def config_leaves(d: Any, prefix: str = ""):
    """(dotted key, value) of every leaf of a raw config; stages are addressed by their name."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from config_leaves(v, f"{prefix}{k}.")
    elif isinstance(d, list) and all(isinstance(item, dict) for item in d) and d:
        for item in d:
            yield from config_leaves(item, f"{prefix}{item.get('name', '?')}.")
    else:
        yield prefix[:-1], d


def changed_keys(before: dict, after: dict) -> list:
    a, b = dict(config_leaves(before)), dict(config_leaves(after))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))

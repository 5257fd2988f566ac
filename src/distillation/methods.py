"""What a training step computes: one method object per stage.

A method is built from the stage's config. It holds the stage's frozen teachers (none, one or
several) and any trainable modules beyond the student, and turns a batch into the step's terms,
`{"loss": ..., "ce": ..., "kd": ..., ...}`, the way timm's distillation task returns its loss
terms. The epoch loop, the compile warm-up, the planner's probe, the stage benchmark and the
profiler all call `Method.step`; nothing else computes a distillation loss. The optimizer sees
`method.parameters()` beside the student's, checkpoints keep `method.state_dict()` (trainable
modules and `get_extra_state`, e.g. a random stream), and epoch_terms.csv gets a `train_<term>`
column for every name in `terms`.

Adding a method is one file:

    from src.distillation.methods import Method, register

    @register("mean_kd")                       # or refer to it as `method: path/to/file.py:MeanKD`
    class MeanKD(Method):
        terms = ("ce", "kd")
        def distill(self, student_logits, teacher_logits):   # teacher_logits: one [B, C] per teacher
            ...                                               # return the KD term (a scalar)

and a stage that names it: `method: mean_kd`, `teacher: [a, b]`.

Built in:
    scratch   no teacher: the task cross-entropy alone
    kd        Hinton et al. 2015, one teacher: (1 - a) CE + a T^2 KL(p_t || p_s)
    dense     DGKD (Son et al. 2021), several teachers: (1 - a) CE + a sum_i w_i T^2 KL(p_ti || p_s),
              weights default 1 each; `drop_teachers: k` leaves out k of them, drawn at random for
              every batch (the paper's stochastic variant). With one teacher and no drop it is `kd`.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from src.distillation.losses import kd_term, task_ce
from src.utils.errors import ConfigError

METHODS: dict = {}


def register(name: str):
    """Class decorator: make a Method subclass available to configs as `method: <name>`."""
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


class Method(nn.Module):
    """Base class: the task cross-entropy, plus `distill` (the KD term) when teachers are present.

    `teachers` are frozen modules (eval mode, no gradients) kept outside the module tree: they
    are not in `parameters()` or `state_dict()`; the stage loads them from earlier stages."""
    name = "base"                    # set by @register, else the class name
    terms: tuple = ("ce", "kd")      # reported beside "loss"; epoch_terms.csv: train_<term>
    min_teachers, max_teachers = 0, None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __init__(self, teachers: Sequence[nn.Module] = (), teacher_names: Sequence[str] = (), *,
                 temperature: float = 4.0, label_smoothing: float = 0.0, seed: int = 0, **options):
        super().__init__()
        if options:
            raise ConfigError(f"method {self.name!r}: unknown option(s) {sorted(options)}")
        n = len(teachers)
        if n < self.min_teachers or (self.max_teachers is not None and n > self.max_teachers):
            want = (f"exactly {self.min_teachers}" if self.min_teachers == self.max_teachers
                    else f"at least {self.min_teachers}" if self.max_teachers is None
                    else f"{self.min_teachers} to {self.max_teachers}")
            raise ConfigError(f"method {self.name!r} takes {want} teacher(s), got {n}")
        self.__dict__["teachers"] = list(teachers)   # plain attribute: frozen, not part of the module tree
        self.teacher_names = list(teacher_names) or [f"teacher{i}" for i in range(n)]
        self.temperature, self.label_smoothing, self.seed = temperature, label_smoothing, seed
        self.cached: Optional[list] = None  # per teacher [N, C] logits of every training image (see cache_teacher_logits)

    # ---- what a contributor overrides
    def distill(self, student_logits: torch.Tensor, teacher_logits: list) -> torch.Tensor:
        """The KD term from the student's logits and one [B, C] logits tensor per active teacher."""
        raise NotImplementedError(f"method {self.name!r} has teachers but no distill()")

    def begin_batch(self) -> None:
        """Called once per optimizer batch, before its (micro-)steps: draw per-batch randomness here."""

    def active_teachers(self) -> list:
        """Indices of the teachers this batch learns from (all of them unless a method drops some)."""
        return list(range(len(self.teachers)))

    # ---- the step
    def uses_teachers(self, alpha: float) -> bool:
        return bool(self.teachers) and alpha > 0

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor, precision, index: Optional[torch.Tensor] = None) -> list:
        """The active teachers' logits for `x` (frozen forwards, no gradients); looked up in the
        cache by dataset `index` when the inputs are the same every epoch."""
        active = self.active_teachers()
        if self.cached is not None and index is not None:
            return [self.cached[i][index] for i in active]
        with precision.autocast():
            return [self.teachers[i](x) for i in active]

    def loss(self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[list],
             alpha: float) -> dict:
        """{"loss", *terms}: `loss` = (1 - alpha) * ce + alpha * kd, the one to back-propagate. A
        term not computed in a step (kd without a teacher) is left out: the epoch reports it as NaN."""
        ce = task_ce(student_logits, targets, self.label_smoothing)
        if not teacher_logits or alpha == 0.0:
            return {"loss": ce, "ce": ce}
        kd = self.distill(student_logits.float(), [t.float() for t in teacher_logits])
        return {"loss": (1.0 - alpha) * ce + alpha * kd, "ce": ce, "kd": kd}

    def step(self, student: nn.Module, x: torch.Tensor, targets: torch.Tensor, alpha: float, precision,
             index: Optional[torch.Tensor] = None) -> tuple:
        """One forward of a (micro-)batch: the frozen teachers, then the student, then the terms.
        Returns (student logits, terms); the caller back-propagates terms["loss"]."""
        t = self.teacher_logits(x, precision, index) if self.uses_teachers(alpha) else None
        with precision.autocast():
            logits = student(x)
        return logits, self.loss(logits, targets, t, alpha)

    # ---- bookkeeping the stage uses
    def eval_teachers(self) -> None:
        for t in self.teachers:
            t.eval()

    @torch.no_grad()
    def cache_teacher_logits(self, loader, precision, max_bytes: int) -> bool:
        """When the loader presents every image identically each epoch (no augmentation, no
        erasing; the caller rules out mixup), run each teacher once over the training split and
        keep its logits [N, C], in dataset order: the same inputs, precision and eval mode as the
        online forward. False (nothing cached) when that does not hold or the tables would pass
        `max_bytes`."""
        if not self.teachers or not getattr(loader, "same_inputs_every_epoch", False):
            return False
        n = len(loader.labels)
        tables = [None] * len(self.teachers)
        self.eval_teachers()
        for x, idx in loader.in_order():
            with precision.autocast():
                for i, teacher in enumerate(self.teachers):
                    logits = teacher(x)
                    if tables[i] is None:
                        if len(self.teachers) * n * logits.shape[1] * logits.element_size() > max_bytes:
                            return False
                        tables[i] = torch.empty(n, logits.shape[1], dtype=logits.dtype, device=logits.device)
                    tables[i][idx] = logits
        self.cached = tables
        return True

    def describe(self) -> str:
        """What the stage does, in words, for the console and stage.json."""
        if not self.teachers:
            return "scratch"
        return f"{self.name} from {' + '.join(self.teacher_names)}"


@register("scratch")
class Scratch(Method):
    """No teacher: the task cross-entropy alone (a baseline is the same code with the teacher off)."""
    max_teachers = 0


@register("kd")
class KD(Method):
    """Hinton et al. 2015 from one frozen teacher: T^2 KL(p_t^T || p_s^T), batch-mean."""
    min_teachers = max_teachers = 1

    def distill(self, student_logits, teacher_logits):
        return kd_term(student_logits, teacher_logits[0], self.temperature)


@register("dense")
class Dense(Method):
    """Dense guidance (DGKD, Son et al. 2021): sum_i w_i T^2 KL(p_ti || p_s) over the teachers
    (weights default 1 each); `drop_teachers: k` drops k of them at random for every batch, from
    the stage's own random stream (kept in checkpoints, so a resumed run drops the same ones)."""
    min_teachers = 1

    def __init__(self, teachers=(), teacher_names=(), *, weights: Optional[Sequence[float]] = None,
                 drop_teachers: int = 0, **kw):
        super().__init__(teachers, teacher_names, **kw)
        n = len(self.teachers)
        self.weights = [1.0] * n if weights is None else [float(w) for w in weights]
        if len(self.weights) != n:
            raise ConfigError(f"method dense: {len(self.weights)} weights for {n} teachers")
        if not 0 <= drop_teachers < n:
            raise ConfigError(f"method dense: drop_teachers must be in 0..{n - 1} (it keeps at least one of the "
                              f"{n} teachers), got {drop_teachers}")
        self.drop = int(drop_teachers)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._active = list(range(n))

    def begin_batch(self) -> None:
        if self.drop:
            keep = torch.randperm(len(self.teachers), generator=self.generator)[: len(self.teachers) - self.drop]
            self._active = sorted(keep.tolist())

    def active_teachers(self) -> list:
        return self._active

    def distill(self, student_logits, teacher_logits):
        terms = [self.weights[i] * kd_term(student_logits, t, self.temperature)
                 for i, t in zip(self._active, teacher_logits)]
        return torch.stack(terms).sum()

    def get_extra_state(self):
        return {"generator": self.generator.get_state(), "active": list(self._active)}

    def set_extra_state(self, state):
        if state:
            self.generator.set_state(state["generator"])
            self._active = list(state["active"])

    def describe(self) -> str:
        drop = f", {self.drop} dropped per batch" if self.drop else ""
        return f"dense from {' + '.join(self.teacher_names)}{drop}"


def resolve(spec: str):
    """A method class from `name` (registered), `package.module:Class` or `path/file.py:Class`."""
    if spec in METHODS:
        return METHODS[spec]
    if ":" not in spec:
        raise ConfigError(f"method {spec!r} is not known (have {', '.join(sorted(METHODS))}); a method of your own: "
                          f"`method: path/to/file.py:ClassName` or `package.module:ClassName`")
    where, cls_name = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"method {spec!r}: file not found: {path}")
            mod_name = f"_takd_method_{abs(hash(str(path)))}"
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as exc:
        raise ConfigError(f"method {spec!r}: cannot import {where} ({exc})") from None
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {spec!r}: {cls_name} is not a Method subclass in {where}")
    return cls


def method_name(stage) -> str:
    """The stage's method: its own `method`, else kd (one teacher), dense (several) or scratch."""
    if stage.method:
        return stage.method
    n = len(stage.teachers)
    return "scratch" if n == 0 else "kd" if n == 1 else "dense"


def build_method(cfg, stage, teachers: Sequence[nn.Module] = (), seed: int = 0) -> Method:
    """The stage's method with its frozen `teachers` (in the order the stage names them)."""
    cls = resolve(method_name(stage))
    options = dict(stage.method_args)
    if cfg.kd.weights is not None and "weights" not in options and len(stage.teachers) > 1:
        options["weights"] = cfg.kd.weights
    if cfg.kd.drop_teachers and "drop_teachers" not in options and len(stage.teachers) > 1:
        options["drop_teachers"] = cfg.kd.drop_teachers
    return cls(list(teachers), stage.teachers, temperature=cfg.kd.temperature,
               label_smoothing=cfg.label_smoothing(stage), seed=seed, **options)


def method_source(stage) -> dict:
    """Where the stage's method comes from: its spec, source file and that file's SHA-256 (a method
    file outside the repository is in no git commit: the hash is what ties a run to its code)."""
    import hashlib
    import inspect
    spec = method_name(stage)
    cls = resolve(spec)
    try:
        path = Path(inspect.getsourcefile(cls) or "")
    except TypeError:
        path = Path("")
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"spec": spec, "class": cls.__name__, "file": str(path) if digest else None, "sha256": digest}


def check_methods(cfg, num_classes: int = 10) -> dict:
    """Every stage's method imported, built with as many teachers as the stage names (options
    checked) and run once on random logits, backward included, before anything trains: a typo or
    a missing import in a method file is found now, not when its stage starts hours later.
    Returns {stage: method_source(stage)}."""
    import traceback
    sources = {}
    for stage in cfg.stages:
        spec = method_name(stage)
        try:
            sources[stage.name] = method_source(stage)
            method = build_method(cfg, stage, [nn.Identity() for _ in stage.teachers])
            gen = torch.Generator().manual_seed(0)
            logits = torch.randn(4, num_classes, generator=gen, requires_grad=True)
            targets = torch.randint(0, num_classes, (4,), generator=gen)
            teachers = [torch.randn(4, num_classes, generator=gen) for _ in stage.teachers] or None
            method.begin_batch()
            if teachers:
                teachers = [teachers[i] for i in method.active_teachers()]
            terms = method.loss(logits, targets, teachers, 0.5)
            loss = terms["loss"]
            if loss.ndim != 0 or not torch.isfinite(loss):
                raise ValueError(f"its loss is {'not a scalar' if loss.ndim else 'not finite'} ({loss})")
            loss.backward()
        except ConfigError as exc:
            raise ConfigError(f"stage {stage.name!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 (a contributor's code: any error is reported the same way)
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            raise ConfigError(f"stage {stage.name!r}: method {spec!r} fails on a test batch of random logits, "
                              f"before anything trains: {type(exc).__name__}: {exc} "
                              f"({Path(frame.filename).name}, line {frame.lineno})") from None
    return sources

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

    from . import Method, register

    @register("mean_kd")                       # or refer to it as `method: path/to/file.py:MeanKD`
    class MeanKD(Method):
        terms = ("ce", "kd")
        def distill(self, student_logits, teacher_logits):   # teacher_logits: one [B, C] per teacher
            ...                                               # return the KD term (a scalar)

and a stage that names it: `method: mean_kd`, `teacher: [a, b]`.

A method sees more than logits when it asks (the seam, not the method, does the plumbing):
    features = {"student": ["layer2"], "teacher": ["layer3"]}   # module names; "auto": the stage outputs
        -> distill(..., features={"student": [tensor], "teacher": [[tensor] per active teacher]})
    distill(self, student_logits, teacher_logits, targets)       # the batch's labels, when declared
    begin_epoch(epoch, epochs)                                    # self.epoch / self.epochs
    progress()                                                    # epochs done after this batch (float)
    own_weights = True + weights() -> (ce weight, kd weight)      # instead of the chain's alpha schedule
Its trainable modules may be built from the student's shapes: `student` and `image_size` reach the
constructor, and `feature_shapes(student, names)` gives the shapes a forward produces. The seam
hooks the bare modules (under DistributedDataParallel and torch.compile), wraps student and
method in one module before DistributedDataParallel so their gradients are averaged together,
and turns the teacher-logit cache off when teacher features are needed.

Built in (more in this package, one file each, found by name: dkd, dist, fitnet, at, deit):
    scratch   no teacher: the task cross-entropy alone
    kd        Hinton et al. 2015, one teacher: (1 - a) CE + a T^2 KL(p_t || p_s)
    dense     DGKD (Son et al. 2021), several teachers: (1 - a) CE + a sum_i w_i T^2 KL(p_ti || p_s),
              weights default 1 each; `drop_teachers: k` leaves out k of them, drawn at random for
              every batch (the paper's stochastic variant). With one teacher and no drop it is `kd`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..losses import kd_term, task_ce
from ...utils.errors import ConfigError
from ...utils.training_guards import freeze_teacher, schedule_kd_alpha

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
    features: dict = {}              # {"student": [names] | "auto", "teacher": [names] | "auto"}: hooked outputs
    own_weights = False              # True: loss = ce_w * ce + kd_w * kd from weights(), not the chain's alpha
    default_temperature: Optional[float] = None  # a method's own published T; None: the chain's kd.temperature

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__

    def __init__(self, teachers: Sequence[nn.Module] = (), teacher_names: Sequence[str] = (), *,
                 temperature: float = 4.0, label_smoothing: float = 0.0, seed: int = 0,
                 student: Optional[nn.Module] = None, image_size: int = 32, **options):
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
        self.image_size, self.epoch, self.epochs = image_size, 1, 1
        self.batch, self.batches = None, None  # the optimizer batch within the epoch (begin_step), None between epochs
        self._hooks: dict = {}             # id(bare module) -> (handles, {name: output})
        self._batch_features: Optional[dict] = None
        sig = inspect.signature(self.distill).parameters
        self._distill_kw = {k for k in ("targets", "features") if k in sig or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())}

    # ---- what a contributor overrides
    def distill(self, student_logits: torch.Tensor, teacher_logits: list) -> torch.Tensor:
        """The KD term from the student's logits and one [B, C] logits tensor per active teacher
        (or {"kd": the term, "<name>": a part of it to log, declared in `terms`})."""
        raise NotImplementedError(f"method {self.name!r} has teachers but no distill()")

    def begin_batch(self) -> None:
        """Called once per optimizer batch, before its (micro-)steps: draw per-batch randomness here."""

    def begin_epoch(self, epoch: int, epochs: int) -> None:
        """Called before every epoch (1-based) of `epochs`: schedules that follow the epoch read them."""
        self.epoch, self.epochs = epoch, epochs
        self.batch, self.batches = None, None

    def begin_step(self, batch: int, batches: int) -> None:
        """Called by the trainer before optimizer batch `batch` (0-based) of the epoch's `batches`
        (before begin_batch; a resumed epoch continues at its batch): per-step schedules read it."""
        self.batch, self.batches = batch, batches

    def progress(self) -> float:
        """Epochs of training done once the current batch is taken, as a float (epoch 3, batch 49
        of 100: 2.5); between epochs (before the first batch), the end of the epoch begun: `epoch`."""
        if self.batch is None or not self.batches:
            return float(self.epoch)
        return self.epoch - 1 + (self.batch + 1) / self.batches

    def weights(self) -> tuple:
        """(CE weight, KD weight) of this epoch, for a method with `own_weights = True`."""
        return 1.0, 1.0

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
        """{"loss", *terms}: `loss` = (1 - alpha) * ce + alpha * kd, the one to back-propagate (a
        method with own_weights: ce_w * ce + kd_w * kd from weights()). A term not computed in a
        step (kd without a teacher) is left out: the epoch reports it as NaN."""
        ce = task_ce(student_logits, targets, self.label_smoothing)
        if not teacher_logits or (alpha == 0.0 and not self.own_weights):
            return {"loss": ce, "ce": ce}
        kw = {}
        if "targets" in self._distill_kw:
            kw["targets"] = targets if targets.ndim == 1 else targets.argmax(1)  # mixup: the larger share
        if "features" in self._distill_kw:
            kw["features"] = self._batch_features
        kd = self.distill(student_logits.float(), [t.float() for t in teacher_logits], **kw)
        logged = {}
        if isinstance(kd, dict):  # {"kd": the term, other named parts: logged, not optimised}
            logged = {k: v.detach() for k, v in kd.items() if k != "kd"}
            kd = kd["kd"]
        ce_w, kd_w = self.weights() if self.own_weights else (1.0 - alpha, alpha)
        return {"loss": ce_w * ce + kd_w * kd, "ce": ce, "kd": kd, **logged}

    def uses_teacher_features(self) -> bool:
        return bool(self.features.get("teacher"))

    def step(self, student: nn.Module, x: torch.Tensor, targets: torch.Tensor, alpha: float, precision,
             index: Optional[torch.Tensor] = None) -> tuple:
        """One forward of a (micro-)batch: the frozen teachers, then the student, then the terms.
        Returns (student logits, terms); the caller back-propagates terms["loss"]. The features a
        method asks for are collected by hooks on the bare modules during these forwards."""
        wanted = self.uses_teachers(alpha) or (self.own_weights and bool(self.teachers))
        t_out = self._hooked(self.teachers, "teacher") if wanted and self.uses_teacher_features() else None
        t = self.teacher_logits(x, precision, None if t_out else index) if wanted else None
        s_out = self._hooked([student], "student") if self.features.get("student") else None
        with precision.autocast():
            logits = student(x)
        if s_out is not None or t_out is not None:
            active = self.active_teachers()
            self._batch_features = {"student": self._collect(s_out[0], "student") if s_out else [],
                                    "teacher": [self._collect(t_out[i], "teacher") for i in active] if t_out else []}
        try:
            return logits, self.loss(logits, targets, t, alpha)
        finally:
            self._batch_features = None

    # ---- features: hooks on the bare modules
    def _hooked(self, modules: list, role: str) -> list:
        """The output stores of `modules` (bare: unwrapped from DDP, torch.compile and the
        student-with-method wrapper), hooks registered once per module."""
        stores = []
        for m in modules:
            m = bare_module(m)
            key = id(m)
            if key not in self._hooks:
                names = self.feature_names(m, role)
                store: dict = {}
                mods = dict(m.named_modules())
                missing = [n for n in names if n not in mods]
                if missing:
                    raise ConfigError(f"method {self.name!r}: {role} has no module {missing[0]!r} "
                                      f"(stage outputs: {', '.join(stage_outputs(m, self.image_size)) or 'none'})")
                handles = [mods[n].register_forward_hook(_store_output(store, n)) for n in names]
                self._hooks[key] = (handles, store, names)
            stores.append(self._hooks[key])
        return stores

    @staticmethod
    def _collect(entry, role: str) -> list:
        _, store, names = entry
        return [store.pop(n) for n in names]

    def feature_names(self, module: nn.Module, role: str) -> list:
        """The module names whose outputs `features[role]` asks for ("auto": the stage outputs)."""
        names = self.features.get(role) or []
        return stage_outputs(module, self.image_size) if names == "auto" else list(names)

    def __getstate__(self):  # hooks and their stores are not part of a copy
        state = self.__dict__.copy()
        state["_hooks"] = {}
        return state

    # ---- bookkeeping the stage uses
    def eval_teachers(self) -> None:
        for t in self.teachers:
            t.eval()

    def can_cache_teacher_logits(self, loader) -> bool:
        """Teachers whose logits are the same every epoch: frozen, on inputs presented identically,
        for a method that reads only their logits (one that reads their features needs the forwards)."""
        return bool(self.teachers) and getattr(loader, "same_inputs_every_epoch", False) \
            and not self.uses_teacher_features()

    def use_teacher_logits(self, tables: list, loader) -> bool:
        """Tables computed earlier (src/distillation/logits_cache.py) in place of computing them: each
        teacher's [N, C] logits in dataset order; False when they do not fit this loader."""
        if len(tables) != len(self.teachers) or any(t.shape[0] != len(loader.labels) for t in tables):
            return False
        self.eval_teachers()
        self.cached = tables
        return True

    @torch.no_grad()
    def cache_teacher_logits(self, loader, precision, max_bytes: int) -> bool:
        """When the loader presents every image identically each epoch (no augmentation, no
        erasing; the caller rules out mixup), run each teacher once over the training split and
        keep its logits [N, C], in dataset order: the same inputs, precision and eval mode as the
        online forward. False (nothing cached) when that does not hold or the tables would pass
        `max_bytes`."""
        if not self.can_cache_teacher_logits(loader):
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


def bare_module(m: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel (.module), torch.compile (._orig_mod) and
    StudentWithMethod (.student): where hooks go and whose names a method refers to."""
    while True:
        if isinstance(m, StudentWithMethod):
            m = m.student
        elif hasattr(m, "_orig_mod"):
            m = m._orig_mod
        elif isinstance(m, nn.parallel.DistributedDataParallel):
            m = m.module
        else:
            return m


class StudentWithMethod(nn.Module):
    """The student and the method's trainable modules as one module, so that DistributedDataParallel
    averages the gradients of both (and broadcasts both from rank 0 at the start). Its forward is
    the student's; the method's modules act on features after it."""

    def __init__(self, student: nn.Module, method: "Method"):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, x):
        return self.student(x)


def _store_output(store: dict, name: str):
    def hook(module, inputs, output):
        store[name] = output
    return hook


def _probe_forward(model: nn.Module, hooks: dict, image_size: int) -> None:
    """One eval-mode, no-grad forward of a zero image with `hooks` ({module: hook}) attached, then
    the model as it was (training mode, no hooks)."""
    handles = [m.register_forward_hook(h) for m, h in hooks.items()]
    was = model.training
    try:
        model.eval()
        p = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()


def stage_outputs(model: nn.Module, image_size: int) -> list:
    """The names of the modules that end each spatial stage of a CNN (for every feature-map size
    in forward order, the last module to produce a 4-D output of that size), found by one forward
    of a zero image; [] for a model without 4-D feature maps (a ViT)."""
    model, order = bare_module(model), []

    def record(name):
        return lambda mod, i, o: order.append((name, tuple(o.shape[-2:]))) if torch.is_tensor(o) and o.ndim == 4 else None
    _probe_forward(model, {m: record(name) for name, m in model.named_modules() if name}, image_size)
    last: dict = {}
    for name, size in order:
        last[size] = name  # the last module of each size; sizes keep their first-seen order
    return list(last.values())


def feature_shapes(model: nn.Module, names: Sequence[str], image_size: int) -> list:
    """[C, H, W] of each named module's output for one image (a method sizes its modules with it)."""
    model, shapes = bare_module(model), {}
    mods = dict(model.named_modules())
    _probe_forward(model, {mods[n]: (lambda m, i, o, n=n: shapes.__setitem__(n, list(o.shape[1:]))) for n in names},
                   image_size)
    return [shapes[n] for n in names]


def resolve(spec: str):
    """A method class from `name` (registered), `package.module:Class` or `path/file.py:Class`."""
    if spec in METHODS:
        return METHODS[spec]
    if ":" not in spec and spec.isidentifier() and (Path(__file__).parent / f"{spec}.py").is_file():
        importlib.import_module(f"{__name__}.{spec}")  # one file per method in this package
        if spec in METHODS:
            return METHODS[spec]
    if ":" not in spec:
        raise ConfigError(f"method {spec!r} is not known (have {', '.join(available())}); a method of your own: "
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


def available() -> list:
    """Every method name: registered ones and the files of this package."""
    return sorted(set(METHODS) | {p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_")})


def build_method(cfg, stage, teachers: Sequence[nn.Module] = (), seed: int = 0,
                 student: Optional[nn.Module] = None) -> Method:
    """The stage's method with its frozen `teachers` (in the order the stage names them) and, for
    a method that sizes modules from it, the `student`."""
    cls = resolve(method_name(stage))
    options = dict(stage.method_args)
    options.pop("kd_alpha", None)  # the KD weight of the stage (kd_alpha), read by the stage's epochs, not the method
    if cfg.kd.weights is not None and "weights" not in options and len(stage.teachers) > 1:
        options["weights"] = cfg.kd.weights
    if cfg.kd.drop_teachers and "drop_teachers" not in options and len(stage.teachers) > 1:
        options["drop_teachers"] = cfg.kd.drop_teachers
    return cls(list(teachers), stage.teachers, temperature=method_temperature(cls, cfg, options),
               label_smoothing=cfg.label_smoothing(stage), seed=seed, student=student,
               image_size=cfg.data.image_size, **options)


def kd_alpha(cfg, stage, epoch: int, epochs: int) -> float:
    """The weight of the KD term at `epoch` for this stage: its own `method_args.kd_alpha` (constant,
    e.g. a value a search froze for it) else the chain's kd.alpha_start -> kd.alpha_end schedule."""
    own = stage.method_args.get("kd_alpha")
    if own is not None:
        if not 0.0 <= float(own) <= 1.0:
            raise ConfigError(f"stage {stage.name!r}: method_args.kd_alpha must be in [0, 1], got {own}")
        return float(own)
    return schedule_kd_alpha(epoch, epochs, cfg.kd.alpha_start, cfg.kd.alpha_end)


def method_temperature(cls, cfg, options: dict) -> float:
    """The stage's `method_args.temperature` (removed from the options), else the method's own
    published default (DKD's and DIST's 4), else the chain's kd.temperature (KD's own setting)."""
    given = options.pop("temperature", None)
    if given is not None:
        if float(given) <= 0:
            raise ConfigError(f"method {cls.name!r}: temperature must be > 0, got {given}")
        return float(given)
    return float(cls.default_temperature if cls.default_temperature is not None else cfg.kd.temperature)


def method_source(stage) -> dict:
    """Where the stage's method comes from: its spec, source file and that file's SHA-256 (a method
    file outside the repository is in no git commit: the hash is what ties a run to its code)."""
    spec = method_name(stage)
    cls = resolve(spec)
    try:
        path = Path(inspect.getsourcefile(cls) or "")
    except TypeError:
        path = Path("")
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {"spec": spec, "class": cls.__name__, "file": str(path) if digest else None, "sha256": digest}


def check_methods(cfg, num_classes: int = 10, build_model=None) -> dict:
    """Every stage's method imported, built with as many teachers as the stage names (options
    checked) and run once, backward included, before anything trains: on random logits, or, for a
    method that reads features, on two random images through the stage's real student and teachers
    (`build_model(stage)`, untrained). A typo or a missing import in a method file is found now,
    not when its stage starts hours later. Returns {stage: method_source(stage)}."""
    sources = {}
    for stage in cfg.stages:
        spec = method_name(stage)
        try:
            sources[stage.name] = method_source(stage)
            if resolve(spec).features and build_model is not None:
                _try_on_images(cfg, stage, num_classes, build_model)
            else:
                _try_on_logits(cfg, stage, num_classes)
        except ConfigError as exc:
            raise ConfigError(f"stage {stage.name!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 (a contributor's code: any error is reported the same way)
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            raise ConfigError(f"stage {stage.name!r}: method {spec!r} fails on a test batch, "
                              f"before anything trains: {type(exc).__name__}: {exc} "
                              f"({Path(frame.filename).name}, line {frame.lineno})") from None
    return sources


def _check_loss(terms: dict) -> None:
    loss = terms["loss"]
    if loss.ndim != 0 or not torch.isfinite(loss):
        raise ValueError(f"its loss is {'not a scalar' if loss.ndim else 'not finite'} ({loss})")
    loss.backward()


def _try_on_logits(cfg, stage, num_classes: int) -> None:
    method = build_method(cfg, stage, [nn.Identity() for _ in stage.teachers])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, num_classes, generator=gen, requires_grad=True)
    targets = torch.randint(0, num_classes, (4,), generator=gen)
    teachers = [torch.randn(4, num_classes, generator=gen) for _ in stage.teachers] or None
    method.begin_epoch(1, 1)
    method.begin_batch()
    if teachers:
        teachers = [teachers[i] for i in method.active_teachers()]
    _check_loss(method.loss(logits, targets, teachers, 0.5))


def _try_on_images(cfg, stage, num_classes: int, build_model) -> None:
    student = build_model(stage)
    teachers = [freeze_teacher(build_model(cfg.stage(n)), verbose=False) for n in stage.teachers]
    method = build_method(cfg, stage, teachers, student=student)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size, generator=gen)
    y = torch.randint(0, num_classes, (2,), generator=gen)

    class _Eager:  # the step's precision on a CPU: no autocast
        @staticmethod
        def autocast():
            return contextlib.nullcontext()
    method.begin_epoch(1, 1)
    method.begin_batch()
    student.train()
    _check_loss(method.step(student, x, y, 0.5, _Eager)[1])

"""Ask the TAKD question in one command: an assistant sweep, longer paths, dense guidance.

A sweep (`sweep.assistants` in YAML, or `--assistants resnet34,resnet26`) keeps the chain's
first stage as the teacher and its last as the student, and trains
  - the teacher once;
  - one assistant per step of every path, each distilled from the step before it (a step shared
    by several paths is trained once: `resnet34` and `resnet34>resnet26` share `ta_resnet34`);
  - one student per path, distilled from the path's last assistant;
  - with `sweep.baselines` (default on): the student from scratch and distilled directly from
    the teacher.
Every student shares one seed stream (the chain student's): within a seed they all start from
the same weights and see the same batches; only what taught them differs. Assistants take the
chain's middle stage as their template (else the student's), with the candidate's model.

A path entry is a model name, a mapping of stage keys ({model: vit_small_patch16_224,
model_kwargs: {embed_dim: 288}, name: vit_s288, pretrained: false}) or a list of those (a
multi-step path: teacher -> A1 -> A2 -> student).

`sweep.methods` (or `--methods dkd,dist,fitnet,at`): beside every student taught by KD, the same
student taught by each method, from the same teacher, on the same seed stream: `student_<m>`
from the teacher directly and `student_<m>_via_<assistant>` through each assistant (the direct-KD
and scratch students are added when the chain has none).

`guidance: dense` (DGKD, Son et al. 2021): every stage that has a teacher learns from all the
stages above it on its path (its teacher, that one's teacher, ...), earlier ones first.
"""
from __future__ import annotations

import re
from dataclasses import fields, replace

from ..utils.errors import ConfigError
from .names import DIRECT_KD, SCRATCH, assistant_stage, baseline_stages, method_student, path_student


def parse_assistants(text: str) -> list:
    """`resnet34,resnet26` (two one-step paths) or `resnet34>resnet26,resnet26` (a two-step path and
    a one-step one) -> the sweep.assistants list."""
    paths = []
    for item in text.split(","):
        steps = [s.strip() for s in item.split(">") if s.strip()]
        if not steps:
            raise ConfigError(f"--assistants: empty entry in {text!r}; e.g. resnet34,resnet26 or 'resnet34>resnet26'")
        paths.append(steps if len(steps) > 1 else steps[0])
    return paths


def _step(entry, where: str, stage_keys: set) -> dict:
    keys = stage_keys - {"teacher", "role", "checkpoint", "seed_stream", "method", "method_args"}
    if isinstance(entry, str):
        entry = {"model": entry}
    if not isinstance(entry, dict) or not entry.get("model"):
        raise ConfigError(f"{where}: each assistant is a model name or a mapping with a model, got {entry!r}")
    unknown = sorted(set(entry) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(keys))}")
    return dict(entry)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def expand_sweep(cfg):
    """The chain with its sweep expanded into stages (and the sweep block emptied), or cfg as is."""
    sweep = cfg.sweep
    if not sweep.assistants:
        return cfg
    if len(cfg.stages) < 2:
        raise ConfigError("sweep: the chain needs a teacher (its first stage) and a student (its last stage)")
    teacher, student = cfg.stages[0], cfg.stages[-1]
    template = cfg.stages[1] if len(cfg.stages) > 2 else student
    plain = dict(checkpoint=None, method=None, method_args={}, seed_stream=None)
    stream = student.seed_stream or student.name
    stages, made, students = [teacher], set(), []
    for i, path in enumerate(sweep.assistants):
        keys = {f.name for f in fields(teacher)}  # a stage's keys (StageConfig), from the stage itself
        steps = [_step(e, f"sweep.assistants[{i}]", keys) for e in (path if isinstance(path, list) else [path])]
        if not steps:
            raise ConfigError(f"sweep.assistants[{i}]: an empty path")
        parent, key = teacher.name, []
        for step in steps:
            key.append(_slug(step.pop("name", None) or step["model"]))
            name = assistant_stage("_".join(key))
            if name not in made:
                made.add(name)
                stages.append(replace(template, **plain, name=name, role="assistant", teacher=parent,
                                      model_kwargs=step.pop("model_kwargs", {}), **step))
            parent = name
        students.append(replace(student, **{**plain, "seed_stream": stream}, name=path_student("_".join(key)),
                                role=student.role or "student", teacher=parent))
    if len({s.name for s in students}) != len(students):
        raise ConfigError("sweep.assistants: the same path is listed twice")
    base = list(baseline_stages(student, teacher.name).values()) if sweep.baselines else []
    return replace(cfg, stages=[*stages, *students, *base], sweep=replace(sweep, assistants=[]))


def apply_guidance(cfg):
    """guidance: dense -> every taught stage's teachers are all its ancestors, earlier first
    (idempotent: a resolved config stays as it is)."""
    if cfg.guidance != "dense":
        return cfg
    order = {s.name: i for i, s in enumerate(cfg.stages)}
    ancestors: dict = {}
    for s in cfg.stages:
        found = set()
        for t in s.teachers:
            found |= {t} | ancestors[t]
        ancestors[s.name] = found
    stages = [replace(s, teacher=sorted(ancestors[s.name], key=order.get)) if len(ancestors[s.name]) > 1 else s
              for s in cfg.stages]
    return replace(cfg, stages=stages)


def expand_methods(cfg):
    """sweep.methods -> one student per method beside every KD-taught student (direct and via each
    assistant), same teacher and seed stream; the direct-KD and scratch students are added when
    missing (idempotent: the resolved chain keeps no methods list)."""
    methods = [m for m in cfg.sweep.methods if m not in ("kd", "scratch")]  # names are checked with the stages' methods
    if not cfg.sweep.methods:
        return cfg
    if len(cfg.stages) < 2:
        raise ConfigError("sweep.methods: the chain needs a teacher (its first stage) and a student (its last stage)")
    teacher, student = cfg.stages[0], cfg.stages[-1]
    stages = list(cfg.stages)
    names = {s.name for s in stages}
    base = baseline_stages(student, teacher.name)
    if not any(s.teachers == [teacher.name] and s.role == "student" for s in stages) and DIRECT_KD not in names:
        stages.append(base[DIRECT_KD])
    if SCRATCH not in names:
        stages.append(base[SCRATCH])
    taught = [s for s in stages if s.role == "student" and len(s.teachers) == 1 and (s.method or "kd") == "kd"]
    variants = []
    for s in taught:
        via = s.teachers[0]
        for m in methods:
            if via == teacher.name:
                name = method_student(m)
            else:
                name = method_student(m, s.name.removeprefix(path_student("")) if s.name.startswith(path_student(""))
                                      else via)
            if name not in names:
                variants.append(replace(s, name=name, method=m, method_args={}, checkpoint=None,
                                        seed_stream=s.seed_stream or s.name))
                names.add(name)
    return replace(cfg, stages=[*stages, *variants], sweep=replace(cfg.sweep, methods=[]))


def with_baselines(cfg):
    """--baselines: the two baselines beside the chain (the student trained alone, and distilled
    directly from the teacher; no assistant). Same data, epochs and recipe."""
    names = {s.name for s in cfg.stages}
    if len(cfg.stages) < 2 or SCRATCH in names:
        return cfg
    base = baseline_stages(cfg.stages[-1], cfg.stages[0].name)
    return replace(cfg, stages=[*cfg.stages, base[SCRATCH], base[DIRECT_KD]])

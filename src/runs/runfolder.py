"""The layout of a run folder, known in one place: every reader and writer goes through here.

RUN/                          a single-seed run (or one seed of a --seeds run)
    config.yaml               the resolved config (what --resume re-reads); config.digest.json beside it
    env.json                  versions, device, git commit, command line (env_resume.json on resume)
    plan.json, classes.json, timings.json
    summary.csv               one row per stage (written when the chain finished)
    <stage>/                  see StageFolder
RUN/ of a --seeds run:
    seeds.json                {"seeds": [...], "config": preset}
    seed_<n>/                 a single-seed run each
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..spec.config import config_record, edited_keys, load_config
from ..utils.errors import ConfigError


def _file(name: str) -> property:
    """A property: the path of the artefact `name` inside the folder."""
    return property(lambda self: self.path / name, doc=f"{name} in the folder")


@dataclass(frozen=True)
class StageFolder:
    """RUN/<stage>/: what one stage writes."""
    path: Path

    EPOCH_LOG = "epoch_log.csv"          # one row per epoch, REQUIRED_COLUMNS
    TERMS = "epoch_terms.csv"            # the objective's terms, alpha, first/last LR, time split
    SCHEDULE = "schedule.csv"            # the LR, alpha and loss of every optimizer step, as applied
    LAST = "last.pt"                     # full training state after the last completed epoch (resume)
    BEST = "best.pt"                     # weights of the best-validation epoch (finished: names the export instead)
    PREDICTIONS = "test_predictions.csv"  # per test image: file id, label, prediction, top-5, logits
    SUMMARY = "stage.json"               # the stage's summary row, written last: present = stage done
    WEIGHTS = "model.safetensors"        # exported weights (+ model.json)
    MODEL_JSON = "model.json"            # how to load the export (timm name, kwargs, classes, normalisation)
    ATTENTION = "attention"              # ViT attention maps
    TEACHER_LOGITS = "teacher_logits"    # a loaded teacher's logits on a training split, for the next stage that loads it

    epoch_log, terms, schedule = _file(EPOCH_LOG), _file(TERMS), _file(SCHEDULE)
    last, best, predictions, summary_file = _file(LAST), _file(BEST), _file(PREDICTIONS), _file(SUMMARY)
    weights, attention = _file(WEIGHTS), _file(ATTENTION)

    def attention_map(self, epoch: int) -> Path:
        return self.attention / f"epoch_{epoch:03d}.png"

    def state_dict(self) -> dict:
        """The stage's best-validation weights: from best.pt, or (a finished stage) from the export it names."""
        from ..utils.checkpoint import read_weights  # brings torch, which reading a run folder's files does not need
        return read_weights(self.best)

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def finished(self) -> bool:
        return self.summary_file.exists()

    @property
    def started(self) -> bool:
        return self.last.exists()

    def summary(self) -> dict:
        return json.loads(self.summary_file.read_text())


@dataclass(frozen=True)
class RunFolder:
    """One run folder: a single-seed run, or a --seeds run holding one per seed."""
    path: Path

    CONFIG = "config.yaml"               # the run's resolved config
    DIGEST = "config.digest.json"        # beside it: its SHA-256 and the values it was written with
    ENV_RESUME = "env_resume.json"       # env.json of a resumed session
    RESUME_OVERRIDES = "resume_overrides.json"  # changes accepted on --resume
    REPORT, REPORT_TABLE, REPORT_DIFFS = "report.md", "report_table.csv", "report_differences.csv"
    SEEDS = "seeds.json"
    SUMMARY = "summary.csv"
    PLAN = "plan.json"
    JOBS = "jobs.json"                   # the study's stage jobs: dependencies, threads, GPU share (jobs.py)
    JOB_LOGS = "logs"                    # SEED_RUN/logs/<stage>.log: each job's output under --jobs / --executor ray
    CLASSES = "classes.json"
    ENV = "env.json"
    TIMINGS = "timings.json"
    TENSORBOARD = "tb"                   # RUN/tb/<stage>/ with --tensorboard
    FIGURES = "figures"                  # the report's figures
    EVALUATIONS = "evaluations"          # RUN/evaluations/<stage>-<split>-<data>/ from src.evaluate
    EVAL_PREDICTIONS, EVAL_METRICS = "predictions.csv", "metrics.json"
    # the report's figure names; {run}: the run's name made file-safe
    FIG_CURVES, FIG_SCHEDULES = "{run}_curves.png", "{run}_schedules.png"
    FIG_CONFUSION, FIG_GALLERY = "{run}_confusion_{stage}.png", "{run}_attention_gallery.png"
    FIG_SWEEP = "{run}_accuracy_vs_assistant.png"
    FIG_PARAMS, FIG_FLOPS = "accuracy_vs_params.png", "accuracy_vs_flops.png"
    FIG_METHODS, FIG_METHODS_VIA = "methods.png", "methods_direct_and_via.png"

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @classmethod
    def of(cls, where) -> "RunFolder":
        """The folder itself, or the folder at a path."""
        return where if isinstance(where, RunFolder) else cls(where)

    config_path, seeds_file, summary_csv = _file(CONFIG), _file(SEEDS), _file(SUMMARY)
    figures, tensorboard = _file(FIGURES), _file(TENSORBOARD)

    def job_log(self, stage: str) -> Path:
        return self.path / self.JOB_LOGS / f"{stage}.log"

    def evaluation(self, stage: str, split: str, data: str) -> Path:
        """Where src.evaluate writes one stage's scoring on one split of one dataset."""
        return self.path / self.EVALUATIONS / f"{stage}-{split}-{data}"

    # ---- what kind of folder
    @property
    def is_multi_seed(self) -> bool:
        return self.seeds_file.exists() and not self.config_path.exists()

    @property
    def is_run(self) -> bool:
        return self.config_path.exists() or self.seeds_file.exists()

    @property
    def finished(self) -> bool:
        return self.summary_csv.exists()

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- the config
    def save_config(self, raw: dict) -> None:
        """config.yaml and, beside it, the digest and values it was written with."""
        from ..utils.checkpoint import atomic_write_text  # brings torch, which reading a run folder does not need
        text, digest = config_record(raw)
        atomic_write_text(self.config_path, text)
        atomic_write_text(self.file(self.DIGEST), digest)

    def check_config_digest(self) -> None:
        """Refuse a run whose config.yaml was changed by hand since the toolkit wrote it (naming the
        keys): its weights and logs belong to the settings it was written with. Edits that change no
        value (comments, layout) pass; runs begun before digests existed are not checked."""
        digest = self.file(self.DIGEST)
        if not digest.exists():
            return
        keys = edited_keys(self.config_path.read_text(), digest.read_text())
        if keys:
            raise ConfigError(f"{self.config_path} was edited after the run wrote it ({', '.join(keys[:8])}): its "
                              f"checkpoints belong to the settings it was trained with. Undo the edit (the written "
                              f"values are in {self.DIGEST}), change learning rates or epochs with --resume's own "
                              f"options, or start a new run for other changes")

    # ---- seeds
    def seed_list(self) -> list:
        """The seeds a --seeds run was started with (empty for a single-seed run)."""
        return json.loads(self.seeds_file.read_text())["seeds"] if self.seeds_file.exists() else []

    def seed_folder(self, seed: int) -> "RunFolder":
        return RunFolder(self.path / f"seed_{seed}")

    def seed_runs(self, finished_only: bool = False) -> list:
        """[(seed or None, RunFolder)]: every seed's folder of a --seeds run (that has begun:
        its config.yaml written), or the run itself."""
        if self.is_multi_seed:
            runs = [(s, self.seed_folder(s)) for s in self.seed_list()]
            runs = [(s, r) for s, r in runs if r.config_path.exists()]
        else:
            runs = [(None, self)] if self.config_path.exists() else []
        return [(s, r) for s, r in runs if r.finished] if finished_only else runs

    def first_seed(self) -> "RunFolder":
        """The folder whose config describes the run (the first seed's, for a --seeds run)."""
        return self.seed_folder(self.seed_list()[0]) if self.is_multi_seed else self

    # ---- contents
    def config(self):
        return load_config(self.first_seed().config_path)

    def stage(self, name: str) -> StageFolder:
        return StageFolder(self.path / name)

    def stages(self) -> list:
        """The stage folders in the config's order."""
        return [self.stage(s.name) for s in self.config().stages]

    def classes(self) -> Optional[list]:
        path = self.path / self.CLASSES
        return json.loads(path.read_text()) if path.exists() else None

    def env(self) -> dict:
        path = self.path / self.ENV
        return json.loads(path.read_text()) if path.exists() else {}

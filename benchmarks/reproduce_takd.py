"""Reproduce the TAKD paper's CIFAR tables (Mirzadeh et al. 2020) with an honest protocol.

    python benchmarks/reproduce_takd.py --slice cpu          # plain CNN 10 -> 4 -> 2, CIFAR-10, 3 seeds, short
    python benchmarks/reproduce_takd.py --slice cpu-full     # the same row at the paper's 150 epochs (hours)
    python benchmarks/reproduce_takd.py --data-root cifar10=DIR --data-root cifar100=DIR   # everything, 150 epochs
    python benchmarks/reproduce_takd.py --tables table1 --families resnet --datasets cifar10 --seeds 0,1,2,3,4
    python benchmarks/reproduce_takd.py ... --resume         # after any stop: the same command plus --resume
    python benchmarks/reproduce_takd.py --slice cpu-full --tables assistants --teachers-from runs/full --out runs/sizes
                                                             # more assistants beside a finished run's teacher
    python benchmarks/reproduce_takd.py --slice cpu --methods dkd,dist,fitnet,at --jobs 2 --out runs/methods
                                                             # the field's methods beside KD, direct and via the assistant

For each family and dataset the teacher and every assistant are trained once (one run), then
every student (no KD, direct KD from the teacher, TAKD through each assistant) once per seed,
the students of a seed starting from the same weights and seeing the same batches. Each run goes
through the toolkit's own command line in this process, its stage jobs run by its executors (one
after another, --jobs N at once on this machine, or --executor ray); it is an ordinary run folder of
this toolkit (config.yaml, logs, checkpoints, predictions, report) under --out. The tables (CSV and
markdown) land in OUT/results/ unless --results or --publish says otherwise. This file keeps only
the paper: its published numbers, its configs and its tables.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from benchmarks.takd_tables import (PUBLISHED_SOURCE, Comparison, not_comparable, published,  # noqa: E402
                                    summarise)
from src.experiment import cli  # noqa: E402
from src.spec.names import DIRECT_KD, SCRATCH, assistant_stage, method_student, path_student, tuned_stage  # noqa: E402
from src.spec.tune import DECLARED  # noqa: E402
from src.distillation.chain import check_stages, estimate_jobs  # noqa: E402
from src.distillation.clock import duration  # noqa: E402
from src.experiment.search import search_seconds, seconds_by_stage  # noqa: E402
from src.plan.jobs import build_plan, machine_threads  # noqa: E402
from src.spec.config import apply_override, changed_keys, from_dict  # noqa: E402
from src.distillation.methods import available  # noqa: E402
from src.analysis.report import ONE_CLASS_SHARE, chance_bar, still_rising, top_class_share, write_report  # noqa: E402
from src.utils.errors import UserError  # noqa: E402
from src.runs.runfolder import RunFolder  # noqa: E402
from src.analysis.compare import Paired, paired_differences, rows_of  # noqa: E402
from src.utils.stats import t_interval  # noqa: E402

# Declared before any run and used for every row: never chosen by looking at test accuracy.
# Both are points of the paper's own search grid (T in {1, 2, 5, 10, 15, 20}, lambda in [0.05, 1]).
TEMPERATURE, KD_WEIGHT = 5.0, 0.5
DKD_WARMUP = (20, 240)      # DKD's CIFAR warm-up: 20 of its 240 epochs (mdistiller's configs)
PAPER_EPOCHS = 150          # the paper's text; the authors' config.yml runs 160
AUTHORS_CONFIG_EPOCHS = 160
PUBLISHED_TRACKED = ROOT / "benchmarks" / "results" / "takd_reproduction.csv"
# The authors' train.py: SGD, momentum 0.9 (not Nesterov), weight decay 1e-4 applied by SGD to
# every parameter (biases and batch norm too), batch 128; data_loader.py: no augmentation
# (get_cifar is called with crop=False), CIFAR-100's mean and std for both datasets.
AUTHORS_RECIPE = {"optimizer": "sgd", "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "decay_all": True,
                  "batch_size": 128}
FAMILIES = {
    # plain CNNs: LR 0.01 throughout (train.py, adjust_learning_rate, is_plane). Constant-LR runs
    # plateau and then overfit: they stop after `early_stop` epochs without a better validation
    # accuracy (declared here, before any run; listed as a deviation).
    "plain": {"teacher": "plain_cnn10", "student": "plain_cnn2", "table1_assistant": "plain_cnn4",
              "assistants": ["plain_cnn4", "plain_cnn6", "plain_cnn8"],
              "train": {"lr": 0.01, "schedule": "constant"}, "early_stop": 20},
    # CIFAR ResNets: train.py's first test `epoch < int(epoch/2.0)` is never true, so its ResNets
    # train at 0.01 for the first 3/4 of the epochs and at 0.001 after (never at 0.1)
    "resnet": {"teacher": "cifar_resnet110", "student": "cifar_resnet8", "table1_assistant": "cifar_resnet20",
               "assistants": ["cifar_resnet14", "cifar_resnet20", "cifar_resnet32", "cifar_resnet56"],
               "train": {"lr": 0.01, "schedule": "step", "milestone_fractions": [0.75]}, "early_stop": 0},
}
DATASETS = ("cifar10", "cifar100")
TABLES = ("table1", "assistants")
# beside the assistant-size rows, an extra row not in the paper: DGKD (Son et al. 2021), the student
# distilled from the teacher and every assistant at once, (1 - lambda) CE + lambda T^2 sum_i KL_i with
# the same T and lambda, one of the guides dropped at random for every batch (their train_dgkd.py's
# default --drop-num 1)
DGKD_STAGE, DGKD_DROP, DGKD_ROW = "student_dgkd", 1, "DGKD, teacher and every assistant (not in the paper)"
DGKD_SOURCE = "not in the paper: DGKD, Son et al. 2021 (its numbers are not compared here)"
_JPEG_TREE = str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
SLICES = {
    # the paper's plain CNN row on a 2-core CPU in about 40 minutes: too short to compare with the paper
    "cpu": {"families": ["plain"], "datasets": ["cifar10"], "tables": ["table1"], "seeds": [0, 1, 2],
            "epochs": 15, "teacher_epochs": 8, "early_stop": 0, "compile": "false",  # compiled is slower on 2 cores
            "data_root": {"cifar10": _JPEG_TREE}},
    # the same row at the paper's length, early stopping as declared for plain CNNs, two students at once
    "cpu-full": {"families": ["plain"], "datasets": ["cifar10"], "tables": ["table1"], "seeds": [0, 1, 2],
                 "epochs": PAPER_EPOCHS, "teacher_epochs": PAPER_EPOCHS, "compile": "false", "jobs": 2,
                 "data_root": {"cifar10": _JPEG_TREE}},
}

PROTOCOL = f"""Protocol (the same for every row, fixed before any run; sources in brackets):
  - Models: the authors' plain CNNs (plain_cnn_cifar.py: its CIFAR-10 widths, and its wider
    CIFAR-100 table for CIFAR-100) and CIFAR ResNets with 1x1-conv shortcuts (resnet_cifar.py).
  - Optimizer: SGD, momentum 0.9, plain momentum (train.py; the paper's text says Nesterov),
    weight decay 1e-4 on every parameter, batch 128 (train.py's defaults).
  - LR: plain CNNs 0.01 throughout; ResNets 0.01 for the first 3/4 of the epochs, then 0.001
    (train.py's adjust_learning_rate as it runs: its 0.1 branch is never taken).
  - {PAPER_EPOCHS} epochs (the paper; the authors' config.yml says {AUTHORS_CONFIG_EPOCHS}). No augmentation, CIFAR-100's
    mean and std for both datasets (data_loader.py). No warm-up, clipping or label smoothing.
  - Loss (1 - lambda) CE + lambda T^2 KL with one T = {TEMPERATURE:g} and lambda = {KD_WEIGHT:g} for every
    distilled model, declared before any run (points of the authors' search_space.json grid).
  - Early stopping (plain CNNs only, constant LR): a stage ends after the declared number of
    epochs without a better validation accuracy; the epoch it stopped at is recorded per run.
  - Model selection on a validation split (10% of train, fixed split seed) carved from train; the
    test split is read once per model, on its best-validation checkpoint.
  - Teacher and assistants are trained once: their own variance is in no interval below; each
    student once per seed, the students of a seed from the same initial weights and batches.
  - Per seed, exact McNemar tests on the test images, Holm-corrected across every test of the
    report. Over seeds, the mean difference with a Student-t interval at Bonferroni's level
    1 - 0.05 / m (m: the comparisons of the report), so that all of them hold together at 95%;
    the verdicts read these corrected intervals (Holm corrects tests, not intervals, and a verdict
    also asks whether the interval holds the paper's gap); the same difference on every seed
    gives no interval and reads undecided. A run of another length than the
    paper's gets no verdict against the paper: "not comparable" and its own significance."""


DECLARED_SEEDS = [0, 1, 2]  # the protocol's seeds; other seeds are another experiment


def protocol_overrides(args) -> list:
    """Every way this run departs from the declared protocol besides its length: a --set override
    (a data cap, a recipe value, ...), a changed early-stopping patience, other seeds. Any of them
    makes the run not comparable with the paper."""
    out = [f"--set {item}" for item in args.overrides]
    for family in args.families:  # declared: by the preset (--slice cpu: off, as it says), else by the family
        declared = SLICES.get(args.slice, {}).get("early_stop", FAMILIES[family]["early_stop"])
        if args.early_stop.get(family) != declared:
            out.append(f"early stopping for {family} after {args.early_stop[family] or 'no'} epochs without a better "
                       f"validation accuracy (declared: {declared or 'none'})")
    if list(args.seeds) != DECLARED_SEEDS:
        out.append(f"seeds {','.join(map(str, args.seeds))} (declared: {','.join(map(str, DECLARED_SEEDS))})")
    return out


def comparability(args) -> Optional[str]:
    """Why this run's numbers cannot be set against the paper's (None when they can): its length,
    or any override of the declared protocol."""
    reason = not_comparable(args.epochs, args.teacher_epochs, PAPER_EPOCHS)
    overrides = protocol_overrides(args)
    if overrides:
        extra = "overrides the declared protocol: " + "; ".join(overrides)
        reason = f"{reason}; {extra}" if reason else f"not comparable: {extra}"
    return reason


def deviations(args, families) -> list:
    """Every way this protocol differs from the authors' code and the paper's numbers."""
    out = [
        "model selection: the authors keep the epoch of best *test* accuracy (train.py validates on the test "
        "loader); here the checkpoint is chosen on a validation split, so 10% fewer training images are used",
        f"search: the published numbers are the best of the authors' NNI search over T, lambda and the seed "
        f"(search_space.json: seeds 20, 31, 55), a maximum over trials and seeds; here T = {TEMPERATURE:g}, "
        f"lambda = {KD_WEIGHT:g} for every row and the mean over seeds {','.join(map(str, args.seeds))}",
        "KD term: the authors' nn.KLDivLoss() averages over classes as well as samples ('mean'), which scales "
        "their KD term by 1/classes; here the KL is per sample (Hinton's T^2 scale)",
        "paper vs code (a choice, not a finding: nothing shows which of the two produced the published numbers; "
        "the code is the one that can be run): the paper's text says Nesterov momentum, LR 0.1 for the plain CNNs too, "
        "LR 0.1 for ResNets dropped at epochs 80 and 120, weight decay only for ResNets and inputs normalised to mean "
        "0 and std 0.5; the authors' code runs plain momentum, LR 0.01 (ResNets 0.001 after 3/4 of the epochs), weight "
        "decay 1e-4 on every model and CIFAR-100's mean and std; this follows the code, with the paper's "
        f"{PAPER_EPOCHS} epochs rather than config.yml's {AUTHORS_CONFIG_EPOCHS}",
    ]
    stops = {f: patience for f, patience in args.early_stop.items() if f in families and patience}
    if stops:
        out.append("early stopping (declared before the run): " + ", ".join(
            f"{f} stages stop after {p} epochs without a better validation accuracy" for f, p in stops.items())
            + "; the authors train every epoch")
    for item in protocol_overrides(args):
        out.append(f"override of the declared protocol: {item}; no verdict against the paper")
    reason = not_comparable(args.epochs, args.teacher_epochs, PAPER_EPOCHS)
    if reason:
        out.append(f"epochs: {args.teacher_epochs} for the teacher, {args.epochs} for assistants and students (the "
                   f"paper: {PAPER_EPOCHS}); ResNet LR milestones at the same fractions of the run; no verdict "
                   f"against the paper ({reason})")
    if any(str(r).endswith(".tar.gz") for r in args.data_root.values()):
        out.append("data: CIFAR as a JPEG tree (quality 75) rather than the original PNG-exact arrays: expect "
                   "slightly lower accuracies than on torchvision's CIFAR")
    return out


# ------------------------------------------------------------------------------------------ configs
def milestones(family: str, epochs: int) -> list:
    """The step schedule's milestones at the family's fractions of the run (train.py: 3/4)."""
    fractions = FAMILIES[family]["train"].get("milestone_fractions", [])
    return sorted({max(1, int(f * epochs)) for f in fractions if int(f * epochs) < epochs}) or (
        [max(1, epochs // 2)] if fractions else [])


def model_for(model: str, dataset: str) -> str:
    """The authors' model of that name for the dataset: their CIFAR-100 plain CNNs are wider."""
    return f"{model}_cifar100" if dataset == "cifar100" and model.startswith("plain_cnn") else model


def base_config(name: str, family: str, dataset: str, epochs: int, data: dict, args) -> dict:
    fam = FAMILIES[family]["train"]
    train = {"epochs": epochs, **AUTHORS_RECIPE, "lr": fam["lr"], "role_lr": False, "schedule": fam["schedule"],
             "warmup_epochs": 0.0, "grad_clip": 0.0, "label_smoothing": 0.0, "compile": args.compile,
             "device": args.device, "early_stop": args.early_stop[family]}
    if fam["schedule"] == "step":
        train.update(lr_milestones=milestones(family, epochs), lr_gamma=0.1)
    return {"name": name, "seed": 0, "deterministic": True,
            "data": {"source": data["source"], "root": data["root"], "image_size": 32, "val_fraction": 0.1,
                     "split_seed": 0, "augment": "none", "normalize": "cifar100"},
            "train": train, "kd": {"temperature": TEMPERATURE, "alpha_start": KD_WEIGHT, "alpha_end": KD_WEIGHT},
            "stages": []}


def group_models(family: str, tables: list) -> tuple[str, list, str]:
    """Teacher, the assistants the selected tables need (in the paper's order), student: the
    CIFAR-10 names, which also name the stages."""
    fam = FAMILIES[family]
    assistants = fam["assistants"] if "assistants" in tables else [fam["table1_assistant"]]
    return fam["teacher"], assistants, fam["student"]


def ta_stage(model: str) -> str:
    return assistant_stage(model)


def student_stage(family: str, assistant: str) -> str:
    """The Table-1 assistant's student is `student` (the report's TAKD student); others name theirs."""
    return "student" if assistant == FAMILIES[family]["table1_assistant"] else path_student(assistant)


def teachers_config(family, dataset, tables, teacher_epochs, epochs, data, args) -> dict:
    teacher, assistants, _ = group_models(family, tables)
    cfg = base_config(f"takd-{family}-{dataset}-teachers", family, dataset, epochs, data, args)
    cfg["stages"] = [{"name": "teacher", "model": model_for(teacher, dataset), "role": "teacher",
                      "epochs": teacher_epochs}]
    if FAMILIES[family]["train"]["schedule"] == "step" and teacher_epochs != epochs:
        raise UserError("ResNet milestones follow the run's epochs: use the same --epochs and --teacher-epochs "
                        "for the resnet family")
    cfg["stages"] += [{"name": ta_stage(a), "model": model_for(a, dataset), "role": "assistant",
                       "teacher": "teacher"} for a in assistants]
    return cfg


def students_config(family, dataset, tables, epochs, teachers_dir: Path, data, args) -> dict:
    teacher, assistants, student = group_models(family, tables)
    cfg = base_config(f"takd-{family}-{dataset}-students", family, dataset, epochs, data, args)
    stream = {"model": model_for(student, dataset), "role": "student", "seed_stream": "student"}
    trained = RunFolder(teachers_dir)
    cfg["stages"] = (
        [{"name": "teacher", "model": model_for(teacher, dataset), "role": "teacher",
          "checkpoint": str(trained.stage("teacher").best)}]
        + [{"name": ta_stage(a), "model": model_for(a, dataset), "role": "assistant",
            "checkpoint": str(trained.stage(ta_stage(a)).best)} for a in assistants]
        + [{"name": SCRATCH, **stream}, {"name": DIRECT_KD, "teacher": "teacher", **stream}]
        + [{"name": student_stage(family, a), "teacher": ta_stage(a), **stream} for a in assistants])
    if "assistants" in tables:  # dense guidance from the teacher and every assistant (not in the paper)
        cfg["stages"].append({"name": DGKD_STAGE, "teacher": ["teacher", *[ta_stage(a) for a in reversed(assistants)]],
                              "method": "dense", "method_args": {"drop_teachers": DGKD_DROP}, **stream})
    if args.tune:  # each KD student (and each method's direct one) searched with the same trials on validation
        cfg["tune"] = {"knobs": DECLARED["kd"], "trials": args.tune, "each": True}
    for m in args.methods:  # beside KD: the method from the teacher and via each assistant (not in the paper)
        extra = method_args(m, epochs)
        cfg["stages"] += [{"name": method_stage(m), "teacher": "teacher", "method": m, "method_args": extra, **stream}]
        cfg["stages"] += [{"name": method_stage(m, a), "teacher": ta_stage(a), "method": m, "method_args": extra,
                           **stream} for a in assistants]
    return cfg


def method_stage(method: str, assistant=None) -> str:
    """The names --methods gives (as the toolkit's own --methods): student_<m>, student_<m>_via_<assistant stage>."""
    return method_student(method, None if assistant is None else ta_stage(assistant))


def method_args(method: str, epochs: int) -> dict:
    """Declared before any run: each method's published defaults, except DKD's warm-up, which keeps
    its paper's share of training (20 of 240 epochs: 1.25 of 15, a staircase of quarter-epoch steps) so that
    its KD weight reaches 1 in a short run. (Rounded to whole epochs, 1 of 15 was no warm-up at
    all: the full weight from the first batch, where the paper starts at 1/20.)"""
    return {"warmup": DKD_WARMUP[0] * epochs / DKD_WARMUP[1]} if method == "dkd" else {}


def reuse_trained(raw: dict, source: Path, group: str) -> dict:
    """--teachers-from SOURCE: each stage of this teachers run that SOURCE (an earlier reproduction)
    finished with the same settings is loaded from its weights, not trained again, so new
    assistants beside a teacher of hours cost the assistants only. Settings that differ in
    anything but the stages (data, recipe, epochs, early stopping, seed) are refused."""
    config, folder = source / "configs" / f"{group}-teachers.yaml", RunFolder(source / group / "teachers")
    if not config.exists() or not folder.is_run:
        raise UserError(f"--teachers-from: {source} holds no reproduction with a {group} teachers run")
    old = yaml.safe_load(config.read_text())
    differs = changed_keys({k: v for k, v in old.items() if k != "stages"}, {k: v for k, v in raw.items() if k != "stages"})
    if differs:
        raise UserError(f"--teachers-from: {source}'s {group} teachers were trained with other settings "
                        f"({', '.join(differs)}); give the options it was run with")
    before = {st["name"]: st for st in old["stages"]}
    reused = [i for i, st in enumerate(raw["stages"]) if before.get(st["name"]) == st and folder.stage(st["name"]).finished]
    if not reused:
        raise UserError(f"--teachers-from: {source} has no finished {group} stage of these settings to reuse")
    for i in reused:  # loaded as the students load them: evaluated here, never trained
        st = raw["stages"][i]
        raw["stages"][i] = {"name": st["name"], "model": st["model"], "role": st["role"],
                            "checkpoint": str(folder.stage(st["name"]).best)}
    from_dict(raw)
    return raw


def finalise(raw: dict, overrides: list) -> dict:
    """Apply --set overrides and check the config as the trainer will."""
    for item in overrides:
        apply_override(raw, item)
    from_dict(raw)
    return raw


# ------------------------------------------------------------------------------------------ running
def run_done(run_dir: Path, stages: list, seeds=None) -> bool:
    dirs = [RunFolder(run_dir).seed_folder(s) for s in seeds] if seeds else [RunFolder(run_dir)]
    return all(d.stage(s["name"]).finished for d in dirs for s in stages)


def train_run(config_path: Path, run_dir: Path, args, seeds=None, threads=None) -> int:
    """One of the reproduction's runs through the toolkit's own command line, in this process: a
    new run or the interrupted one resumed, its stage jobs run by the executor that --jobs or
    --executor names (the students of every seed share one plan). Returns its exit code; a stop
    prints one --resume line, this command's."""
    started = RunFolder(run_dir).is_run
    argv = ["--no-progress", "--no-cpu-advice"]  # its length is chosen
    argv += ["--resume", str(run_dir)] if started else ["--config", str(config_path), "--output-dir", str(run_dir)]
    if seeds and not started:
        argv += ["--seeds", ",".join(map(str, seeds))]
    if threads:
        argv += ["--threads", str(threads)]
    if args.executor:
        argv += ["--executor", args.executor] + (["--ray-address", args.ray_address] if args.ray_address else [])
    if args.jobs > 1 and args.executor != "ray":
        argv += ["--jobs", str(args.jobs)]
    if args.verbose:
        argv.append("--verbose")
    return cli.run(argv, "cnn", ROOT / "cnn_distillation" / "configs" / "cifar10.yaml", resume_command=resume_line(args))


def resume_line(args) -> str:
    """This command again, with --resume: what continues the whole reproduction after any stop."""
    words = [w for w in args.argv if w != "--resume"]
    return " ".join(["python", "benchmarks/reproduce_takd.py", *words, "--resume"])


class RunClock:
    """Each run's wall time in OUT/timings.json, summed over sessions and written every `every`
    seconds while the run trains (and when it ends): a session ended by SIGKILL loses at most
    that much of it. (Written only at the end, a killed session's hours were lost: the full-length
    run's teacher trained 3 h in a session that ended that way, and the table said 3 min.)
    Used as a context manager: a thread writes it while the run trains in this process."""

    def __init__(self, path: Path, label: str, every: float = 30.0):
        self.path, self.label, self.every = path, label, every
        self.timings = json.loads(path.read_text()) if path.exists() else {}
        self.before = float(self.timings.get(label, 0.0))
        self.t0 = self.written = time.perf_counter()
        self._stop = threading.Event()
        self._thread = None

    def tick(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.written >= self.every:
            self.timings[self.label] = round(self.before + now - self.t0, 1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(self.timings, indent=2))
            os.replace(tmp, self.path)  # never a half-written file
            self.written = now

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True, name="run clock")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.tick(force=True)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.tick(force=True)


def student_threads(folder: RunFolder, seeds: list, jobs: int) -> int:
    """Threads per student job, fixed when the run's first students start (jobs.json keeps it; an
    earlier version kept it in seeds.json) and kept on every resume, whatever --jobs or the seeds
    left then: a CPU's thread count changes the order of float sums (plain_cnn2 on CIFAR-10, 1
    against 2 threads: the first epoch's loss differs in the fourth digit, test accuracy after 15
    epochs by 0.1-0.2 points), so paired students, and every seed, train at one count."""
    for path in (folder.file(RunFolder.JOBS), folder.seeds_file):
        recorded = json.loads(path.read_text()).get("threads") if path.exists() else None
        if recorded:
            return int(recorded)
    return max(1, machine_threads() // max(1, min(jobs, len(seeds))))


def whole_estimate(runs, args) -> dict:
    """{label: seconds} of every run not finished yet, as the toolkit's --dry-run times a study (one
    seed's stages planned and timed over a few steps, on the real data), then spread over --jobs:
    the longer of the critical path and the work over the workers; a --tune search as if no trial
    were pruned (every trial of each tuned student run to the end, --jobs at a time, and the seeds'
    tuned students)."""
    out = {}
    for label, raw, run_dir, seeds in runs:
        if run_done(run_dir, raw["stages"], seeds):
            continue
        cfg = from_dict(raw)
        threads = student_threads(RunFolder(run_dir), seeds, args.jobs) if seeds else None
        plan = build_plan(cfg, RunFolder(run_dir), seeds, threads)
        seconds = estimate_jobs(plan)
        work, (path, _) = sum(seconds.values()), plan.critical_path(seconds)
        out[label] = max(path, work / max(1, args.jobs)) if seeds else work
        if cfg.tune.trials > 0 and not cfg.tuned:
            out[label] += search_seconds(cfg, seconds_by_stage(plan, seconds), len(seeds or [0]), args.jobs)
    return out


def say_estimate(estimates: dict, done: dict, tuning: bool = False) -> None:
    """The time left, from the estimates of the runs not done yet (printed at the start and after each run)."""
    left = {k: v for k, v in estimates.items() if k not in done}
    if not left:
        return
    parts = ", ".join(f"{k} {duration(v)}" for k, v in left.items())
    head = "Whole reproduction" if not done else "Left"
    print(f"{head}: about {duration(sum(left.values()))} ({parts}; timed over a few steps of each stage on this "
          f"machine now{'; the --tune search as if no trial were pruned' if tuning else ''}); each run updates its own "
          f"estimate every epoch", flush=True)


def plan_runs(args) -> list:
    """[(label, config dict, run folder, seeds or None)] in training order."""
    runs = []
    for dataset in args.datasets:
        data = data_for(dataset, args)
        for family in args.families:
            group = args.out / f"{family}-{dataset}"
            teachers = finalise(teachers_config(family, dataset, args.tables, args.teacher_epochs, args.epochs, data,
                                                args), args.overrides)
            if args.teachers_from:
                teachers = reuse_trained(teachers, args.teachers_from, group.name)
            students = finalise(students_config(family, dataset, args.tables, args.epochs, group / "teachers", data,
                                                args), args.overrides)
            runs.append((f"{family}-{dataset} teacher and assistants", teachers, group / "teachers", None))
            runs.append((f"{family}-{dataset} students, seeds {','.join(map(str, args.seeds))}", students,
                         group / "students", args.seeds))
    return runs


def data_for(dataset: str, args) -> dict:
    root = args.data_root.get(dataset)
    if args.data_source:
        return {"source": args.data_source, "root": root or "data"}
    if root:
        return {"source": "imagefolder", "root": root}
    return {"source": dataset, "root": str(ROOT / "data" / dataset)}  # torchvision's download (needs a network)


def write_configs(runs, args) -> None:
    """Each run's config under OUT/configs; on --resume it must equal the one the run started with."""
    folder = args.out / "configs"
    texts = {folder / f"{run_dir.parent.name}-{run_dir.name}.yaml": yaml.safe_dump(raw, sort_keys=False)
             for _, raw, run_dir, _ in runs}
    for path, text in texts.items():  # every one checked before any is written
        if path.exists() and path.read_text() != text:
            raise UserError(f"{path.name}: this command asks for other settings than the reproduction in {args.out} "
                            f"started with (epochs, seeds, data, --early-stop, --set, --teachers-from); --resume continues it as it "
                            f"was: give the same options, or choose a new --out")
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        if not path.exists():
            path.write_text(text)


# ------------------------------------------------------------------------------------------ results
def seed_dirs(students_dir: Path, seeds) -> list:
    folder = RunFolder(students_dir)
    return [(s, folder.seed_folder(s).path) for s in seeds if folder.seed_folder(s).finished]


def _stops(summary: pd.DataFrame, stage: str) -> str:
    """'stopped at 41 (best 21)' or 'all 150' for one stage of one run's summary.csv."""
    if stage not in summary.index:
        return ""
    r = summary.loc[stage]
    stopped = r.get("stopped_early_at")
    if stopped is not None and pd.notna(stopped):
        return f"stopped at {int(stopped)} (best {int(r['best_epoch'])})"
    return f"all {int(r['epochs'])} (best {int(r['best_epoch'])})"


def stage_seconds(summary_csvs: list) -> float:
    """Training, evaluation and compile seconds of every stage in these summary.csv files: recorded
    with every epoch, so they count the sessions whose run clock was lost (a SIGKILL)."""
    cols = ("train_seconds", "eval_seconds", "compile_seconds")
    frames = [pd.read_csv(p) for p in summary_csvs if Path(p).exists()]
    return float(sum(f[c].fillna(0).sum() for f in frames for c in cols if c in f.columns))


def _trained_epochs(teachers_dir: Path, summary: pd.DataFrame):
    """stage -> its epochs in words; a stage loaded from another reproduction (--teachers-from)
    says the epochs it trained there, and where."""
    path = RunFolder(teachers_dir).config_path
    stages = yaml.safe_load(path.read_text())["stages"] if path.exists() else []
    sources = {st["name"]: Path(st["checkpoint"]).parents[1] for st in stages if st.get("checkpoint")}

    def words(stage: str) -> str:
        if stage not in sources:
            return _stops(summary, stage)
        there = RunFolder(sources[stage]).summary_csv
        trained = _stops(pd.read_csv(there).set_index("stage"), stage) if there.exists() else "unknown"
        return f"{trained}, trained in {sources[stage]} and loaded here"
    return words


def measured(wanted: list) -> list:
    """[(family, dataset, Comparison)] from [(family, dataset, Paired, paper gap)]: each comparison's
    per-seed differences (points) and exact McNemar p-values from the analysis layer's pipeline
    (the report's own), for `summarise` to correct together and read against the paper."""
    df = paired_differences([w[2] for w in wanted])
    out = []
    for family, dataset, pair, gap in wanted:
        seeds, _ = rows_of(df, pair)
        out.append((family, dataset, Comparison(pair.name, list(100 * seeds["mean"]) if len(seeds) else [],
                                                list(seeds["p_value"]) if len(seeds) else [], gap)))
    return out


def broken(seeds: list, stage: str) -> list:
    """Why a student's results say nothing, per seed of [(seed, run folder)], by the report's own
    checks (the same students read by both get one reading): it predicts one class for most test
    images (a collapse), scores near chance, or its validation accuracy was still rising at its last
    epoch; [] when it is sound."""
    out = []
    for seed, d in seeds:
        folder = RunFolder(d).stage(stage)
        if not folder.predictions.exists():
            continue
        preds = pd.read_csv(folder.predictions, usecols=["y_true", "y_pred"])
        share, acc = top_class_share(folder.predictions), float((preds["y_true"] == preds["y_pred"]).mean())
        if share >= ONE_CLASS_SHARE:
            out.append(f"seed {seed}: {stage} predicts one class for {100 * share:.0f}% of the test images")
        elif acc < chance_bar(preds["y_true"].nunique()):
            out.append(f"seed {seed}: {stage} at {100 * acc:.1f}% test accuracy, near chance")
        rising = still_rising(folder)
        if rising:
            out.append(f"seed {seed}: {stage}: validation accuracy still rising at its last epoch ({rising})")
    return out


def unreadable(tests: pd.DataFrame, troubles: list) -> pd.DataFrame:
    """A comparison with a broken student in it reads "not interpretable", whatever its test says."""
    for i, trouble in enumerate(troubles):
        if trouble:
            tests.loc[i, "verdict"] = f"not interpretable: {'; '.join(trouble)} (the tests alone: {tests.loc[i, 'verdict']})"
            tests.loc[i, "words"] = NOT_INTERPRETABLE
    return tests


def tuned_words(seeds: list) -> str:
    """How the _tuned students were chosen, from the run's own record (its config's `tuned:`)."""
    records = RunFolder(seeds[0][1]).config().tuned if seeds else {}
    trials = sorted({r["trials"] for r in records.values()})
    return (f"tuned on validation with {'/'.join(map(str, trials))} trials each; the paper: best of 120 on test"
            if trials else "tuned on validation")


def group_context(group: Path, family: str, dataset: str, tables: list, seeds: list) -> list:
    """The lines said above a family's rows: the teacher's and assistants' accuracy and epochs
    (trained once), and the stages' own time over every session."""
    teacher, assistants, _ = group_models(family, tables)
    summary, lines = RunFolder(group / "teachers").summary_csv, []
    if summary.exists():
        single = pd.read_csv(summary).set_index("stage")
        acc = lambda st: 100 * single["test_accuracy"].get(st, float("nan"))  # noqa: E731
        epochs = _trained_epochs(group / "teachers", single)
        lines.append(f"{family}, {dataset}: teacher {teacher} {acc('teacher'):.2f}% (epochs: {epochs('teacher')})"
                     + "".join(f", assistant {a} {acc(ta_stage(a)):.2f}% (epochs: {epochs(ta_stage(a))})"
                               for a in assistants) + "; trained once")
    staged = stage_seconds([summary] + [RunFolder(d).summary_csv for _, d in seeds])
    if staged:
        lines.append(f"{family}, {dataset}: the stages' own training and evaluation time {staged / 60:.1f} min (summed "
                     f"from their summaries, so it counts every session, also one whose run clock was lost)")
    return lines


NOT_INTERPRETABLE = ("not interpretable: a student in the comparison collapsed to one class or scored near chance in "
                     "some seed, so the difference says nothing about the methods")


def collect(args) -> tuple[pd.DataFrame, pd.DataFrame, list]:
    """Rows of the tables (ours next to the paper's) and the paired comparisons, from the run folders."""
    rows, comparisons, context, troubles = [], [], [], []
    incomparable = comparability(args)
    for dataset in args.datasets:
        for family in args.families:
            group = args.out / f"{family}-{dataset}"
            teacher, assistants, student = group_models(family, args.tables)
            t1 = FAMILIES[family]["table1_assistant"]
            seeds = seed_dirs(group / "students", args.seeds)
            folders = [(seed, RunFolder(d)) for seed, d in seeds]
            context += group_context(group, family, dataset, args.tables, seeds)
            if not seeds:
                continue
            summaries = {s: pd.read_csv(RunFolder(d).summary_csv).set_index("stage") for s, d in seeds}
            acc = {s: summ["test_accuracy"] * 100 for s, summ in summaries.items()}
            entries = [("NOKD", SCRATCH, None), ("BLKD", DIRECT_KD, None)]
            entries += [("TAKD" if a == t1 else f"TAKD, assistant {a}", student_stage(family, a), a) for a in assistants]
            entries += [(f"{row}, tuned ({tuned_words(seeds)})", tuned_stage(st), a) for row, st, a in list(entries)
                        if row != "NOKD" and all(tuned_stage(st) in summ.index for summ in summaries.values())]
            dense = "assistants" in args.tables and any(DGKD_STAGE in summ.index for summ in summaries.values())
            entries += [(DGKD_ROW, DGKD_STAGE, None)] if dense else []
            for table in args.tables:
                for row, stage, assistant in entries:
                    if table == "table1" and (assistant not in (None, t1) or stage == DGKD_STAGE):
                        continue
                    values = [acc[s][stage] for s, _ in seeds if stage in acc[s]]
                    mean, lo, hi = t_interval(values) if values else (float("nan"),) * 3
                    rows.append({"table": table, "family": family, "dataset": dataset, "row": row, "stage": stage,
                                 "teacher": teacher, "assistant": assistant or "", "student": student,
                                 "published": published(family, dataset, "TAKD" if assistant else row, assistant,
                                                        table),
                                 "source": DGKD_SOURCE if stage == DGKD_STAGE else PUBLISHED_SOURCE[table],
                                 "comparable": incomparable or "yes",
                                 "ours_mean": mean, "ours_lo": lo, "ours_hi": hi,
                                 "seeds": len(values), "per_seed": ";".join(f"{v:.2f}" for v in values),
                                 "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                                 "early_stop": args.early_stop[family],
                                 "epochs_per_seed": "; ".join(_stops(summaries[s], stage) for s, _ in seeds),
                                 "broken": "; ".join(broken(seeds, stage))})
            pairs = [("TAKD - BLKD" if a == t1 else f"TAKD(assistant {a}) - BLKD", student_stage(family, a), DIRECT_KD,
                      a) for a in assistants if "assistants" in args.tables or a == t1]
            pairs.append(("BLKD - NOKD", DIRECT_KD, SCRATCH, None))
            pairs += [(f"{name} (both tuned)", tuned_stage(x), tuned_stage(y), a) for name, x, y, a in list(pairs)
                      if y == DIRECT_KD and all(tuned_stage(st) in summ.index for summ in summaries.values() for st in (x, y))]
            pairs += [("DGKD - TAKD", DGKD_STAGE, "student", None)] if dense else []
            for name, a_stage, b_stage, assistant in pairs:
                pa = (published(family, dataset, "TAKD" if assistant else "BLKD", assistant,
                                "table1" if assistant == t1 else "assistants") if a_stage != DGKD_STAGE else None)
                pb = published(family, dataset, "BLKD" if assistant else "NOKD")
                gap = None if pa is None or pb is None else round(pa - pb, 2)
                comparisons.append((family, dataset, Paired(group.name, name, a_stage, b_stage, folders), gap))
                troubles.append(broken(seeds, a_stage) + broken(seeds, b_stage))
    comparisons = measured(comparisons)
    summaries = summarise([c for _, _, c in comparisons], incomparable)
    tests = pd.DataFrame([{"family": f, "dataset": d, **s} for (f, d, _), s in zip(comparisons, summaries)])
    return pd.DataFrame(rows), unreadable(tests, troubles), context


def collect_methods(args) -> tuple[pd.DataFrame, pd.DataFrame]:
    """--methods: each method's students (from the teacher and via each assistant) over seeds, and
    two questions per method with their own Bonferroni correction (not the paper's): does the
    assistant help it (via - direct), and does it beat KD (its direct student - KD's)."""
    rows, comparisons, troubles = [], [], []
    for dataset in args.datasets:
        for family in args.families:
            seeds = seed_dirs(args.out / f"{family}-{dataset}" / "students", args.seeds)
            if not args.methods or not seeds:
                continue
            _, assistants, _ = group_models(family, args.tables)
            summaries = {s: pd.read_csv(RunFolder(d).summary_csv).set_index("stage") for s, d in seeds}
            for m in ["kd", *args.methods]:
                direct = DIRECT_KD if m == "kd" else method_stage(m)
                paths = [(direct, "teacher")] + [(student_stage(family, a) if m == "kd" else method_stage(m, a), a)
                                                 for a in assistants]
                for stage, via in paths:
                    values = [100 * summaries[s]["test_accuracy"][stage] for s, _ in seeds if stage in summaries[s].index]
                    mean, lo, hi = t_interval(values) if values else (float("nan"),) * 3
                    rows.append({"family": family, "dataset": dataset, "method": m, "via": via, "stage": stage,
                                 "ours_mean": mean, "ours_lo": lo, "ours_hi": hi, "seeds": len(values),
                                 "per_seed": ";".join(f"{v:.2f}" for v in values), "epochs": args.epochs,
                                 "broken": "; ".join(broken(seeds, stage))})
                pairs = [(f"{m.upper()} via {a} - {m.upper()} direct", stage, direct) for stage, a in paths[1:]]
                if m != "kd":
                    pairs.append((f"{m.upper()} direct - KD direct", direct, DIRECT_KD))
                folders = [(seed, RunFolder(d)) for seed, d in seeds]
                for name, a_stage, b_stage in pairs:
                    comparisons.append((family, dataset, Paired(f"{family}-{dataset}", name, a_stage, b_stage, folders),
                                        None))
                    troubles.append(broken(seeds, a_stage) + broken(seeds, b_stage))
    comparisons = measured(comparisons)
    summaries = summarise([c for _, _, c in comparisons])
    tests = pd.DataFrame([{"family": f, "dataset": d, **s} for (f, d, _), s in zip(comparisons, summaries)])
    return pd.DataFrame(rows), unreadable(tests, troubles)


def methods_reports(args) -> list:
    """The toolkit's own report over the seeds of every students run with --methods (its figures:
    accuracy per method, direct and via the assistant); returns the report paths."""
    out = []
    for dataset in args.datasets:
        for family in args.families:
            students = args.out / f"{family}-{dataset}" / "students"
            if args.methods and seed_dirs(students, args.seeds):
                out.append(write_report([students]))
    return out


def recorded_method_args(args, method: str) -> dict:
    """A method's arguments as the students' configs of this reproduction recorded them (what the
    runs trained with, whatever the code says now); the current declaration when none is recorded."""
    for path in sorted((args.out / "configs").glob("*-students.yaml")):
        for stage in yaml.safe_load(path.read_text()).get("stages", []):
            if stage.get("method") == method:
                return dict(stage.get("method_args") or {})
    return method_args(method, args.epochs)


def _dkd_warmup_words(args) -> str:
    ran, share = recorded_method_args(args, "dkd").get("warmup"), method_args("dkd", args.epochs)["warmup"]
    if ran is None or float(ran) == share:
        return f"DKD's warm-up kept at its paper's share of training: {share:.3g} of {args.epochs} epochs"
    return (f"DKD's warm-up as these runs recorded it: {float(ran):.3g} of {args.epochs} epochs, where the paper's share "
            f"is {share:.3g}")


def methods_markdown(table: pd.DataFrame, tests: pd.DataFrame, args, reports=()) -> list:
    if table.empty:
        return []
    lines = ["## Methods beside KD (not in the paper)", "",
             f"Each method with its reference's defaults ({_dkd_warmup_words(args)}; DKD and DIST at their own "
             f"T = 4, KD at the declared T = {TEMPERATURE:g}; docs/methods.md names each default's source), the same "
             f"teacher, assistants, seeds and initial weights as the rows above. "
             f"Test accuracy (%), mean and 95% t interval over seeds:", "",
             "| family | dataset | method | from | ours (%) | per seed |", "|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.family} | {r.dataset} | {r.method} | {r.via} | {_interval(r.ours_mean, r.ours_lo, r.ours_hi)}"
                     f" | {r.per_seed}{_broken_note(r)} |")
    if not tests.empty:
        level = f"{100 * tests['level'].iloc[0]:.1f}%"
        lines += ["", f"| family | dataset | comparison | mean [{level} t, Bonferroni over {len(tests)}] (pp) | "
                      f"per seed: diff, McNemar p (Holm) | reading |", "|---|---|---|---|---|---|"]
        for r in tests.itertuples():
            per = "; ".join(f"{d:+.2f}, p={p:.3g} ({ph:.3g})" for d, p, ph in zip(r.diffs, r.p, r.p_holm))
            lines.append(f"| {r.family} | {r.dataset} | {r.comparison} | {_interval(r.mean, r.lo, r.hi)} | {per} | "
                         f"{_reading(r)} |")
        lines += ["", TWO_TESTS]
    for report in reports:
        lines += ["", f"The toolkit's report over these seeds, with every pairwise comparison and the figures "
                      f"(`figures/methods_direct_and_via.png`: accuracy per method, direct and via the assistant): "
                      f"`{report}`"]
    return lines + [""]


TWO_TESTS = ("Two tests, two questions. The verdict reads the t interval over seeds (Bonferroni-corrected): is the "
             "mean difference between the two ways of training away from 0, seed-to-seed noise included? That is "
             "the question about the methods. 'k/n seeds significant after Holm' reads the exact McNemar test of "
             "each seed on its test images: do these two trained networks differ? A difference can be significant "
             "on every seed and not over seeds when it varies from seed to seed more than three seeds can pin down.")


def _reading(r) -> str:
    """The verdict over seeds, named as such, beside the per-seed tests' count."""
    v = r.verdict
    for word in ("not significant", "significant"):
        if v.startswith(word):
            v = f"{word} over seeds{v[len(word):]}"
            break
    return f"**{v}** ({r.significant_seeds}/{r.seeds} seeds significant after Holm, per seed)"


def _broken_note(row) -> str:
    return f" (**not interpretable**: {row.broken})" if isinstance(getattr(row, "broken", ""), str) and row.broken else ""


def _interval(mean, lo, hi) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else " (no interval)")


def markdown(table: pd.DataFrame, tests: pd.DataFrame, context: list, args, wall_s: float) -> str:
    incomparable = comparability(args)
    lines = ["# TAKD reproduction (Mirzadeh et al. 2020)", "", "```", PROTOCOL, "```", "",
             "Differences from the authors' code and the published numbers:",
             *[f"- {d}" for d in deviations(args, args.families)], "",
             f"Seeds {','.join(map(str, args.seeds))}; teacher {args.teacher_epochs} epochs, assistants and students "
             f"{args.epochs}; wall time of the runs {wall_s / 60:.1f} min (the reproduction's clock).", ""]
    lines += [f"- {c}" for c in context] + [""]
    if not table.empty:
        lines += ["| table | family | dataset | row | paper (%) | ours: mean [95% t interval] (%) | per seed | "
                  "epochs per seed |", "|---|---|---|---|---|---|---|---|"]
        for r in table.itertuples():
            paper = incomparable or (f"{r.published:.2f}" if pd.notna(r.published) else "no published number")
            lines.append(f"| {r.table} | {r.family} | {r.dataset} | {r.row} | {paper} | "
                         f"{_interval(r.ours_mean, r.ours_lo, r.ours_hi)} | {r.per_seed}{_broken_note(r)} | {r.epochs_per_seed} |")
        lines.append("")
    if not tests.empty:
        level = f"{100 * tests['level'].iloc[0]:.1f}%"
        lines += [f"| family | dataset | comparison | paper (pp) | ours: mean [{level} t, Bonferroni over "
                  f"{len(tests)}] (pp) | per seed: diff, McNemar p (Holm) | verdict |", "|---|---|---|---|---|---|---|"]
        for r in tests.itertuples():
            per = "; ".join(f"{d:+.2f}, p={p:.3g} ({ph:.3g})" for d, p, ph in zip(r.diffs, r.p, r.p_holm))
            gap = incomparable or (f"{r.paper_gap:+.2f}" if r.paper_gap is not None and pd.notna(r.paper_gap)
                                   else "no published gap")
            lines.append(f"| {r.family} | {r.dataset} | {r.comparison} | {gap} | {_interval(r.mean, r.lo, r.hi)} | "
                         f"{per} | {_reading(r)} |")
        lines += ["", "Verdicts: " + "; ".join(sorted(set(tests["words"]))) + ".", "", TWO_TESTS]
        lines += [f"The correction's family: the {len(tests)} comparisons of this table (Bonferroni for the intervals, "
                  f"Holm over their {sum(len(d) for d in tests['diffs'])} per-seed tests); another report that reads "
                  f"the same students with another family gets other intervals."]
        if len(args.seeds) == 2:
            lines += ["", "With two seeds a t interval has one degree of freedom (t = 12.7 at 95%): it is nearly "
                          "uninformative, whatever the verdict; three or more seeds narrow it quickly."]
    return "\n".join(lines) + "\n"


def _write_tests(tests: pd.DataFrame, path: Path) -> None:
    """The comparisons as CSV, per-seed lists joined with ';' (nothing when there are none)."""
    if tests.empty:
        return
    flat = tests.assign(**{c: tests[c].map(lambda v: ";".join(f"{float(x):.4g}" for x in v)) for c in ("diffs", "p", "p_holm")})
    flat.to_csv(path, index=False, float_format="%.4g")


def write_results(args, wall_s: float) -> list:
    """The tables (CSV, the tests' CSV, markdown) at every path asked for; returns the markdown paths."""
    table, tests, context = collect(args)
    m_table, m_tests = collect_methods(args)
    reports = methods_reports(args) if not m_table.empty else []
    written = []
    for results in args.results:
        results.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(results, index=False, float_format="%.4f")
        _write_tests(tests, results.with_name(results.stem + "_tests.csv"))
        if not m_table.empty:
            m_table.to_csv(results.with_name(results.stem + "_methods.csv"), index=False, float_format="%.4f")
        _write_tests(m_tests, results.with_name(results.stem + "_methods_tests.csv"))
        md = results.with_suffix(".md")
        md.write_text(markdown(table, tests, context, args, wall_s) + "\n".join(["", *methods_markdown(m_table, m_tests, args, reports)]))
        written.append(md)
    return written


# ------------------------------------------------------------------------------------------ command line
def _presets_text() -> str:
    return "; ".join(f"{name}: {', '.join(p['families'])} on {', '.join(p['datasets'])}, {', '.join(p['tables'])}, "
                     f"seeds {','.join(map(str, p['seeds']))}, teacher {p['teacher_epochs']} / others {p['epochs']} "
                     f"epochs" + (f", {p['jobs']} students at once" if p.get("jobs") else "")
                     for name, p in SLICES.items())


def parse_args(argv):
    default_out = ROOT / "runs" / "takd_reproduction"
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0], epilog=PROTOCOL,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", choices=sorted(SLICES), help=f"a preset part ({_presets_text()}; data: the CIFAR-10 "
                   f"JPEG tree in ../shared/data)")
    p.add_argument("--tables", default=None, help=f"comma-separated, of {', '.join(TABLES)} (default: both)")
    p.add_argument("--families", default=None, help="comma-separated, of plain, resnet (default: both)")
    p.add_argument("--datasets", default=None, help="comma-separated, of cifar10, cifar100 (default: both)")
    p.add_argument("--epochs", type=int, default=None, help=f"epochs of assistants and students (default {PAPER_EPOCHS})")
    p.add_argument("--teacher-epochs", type=int, default=None, help="epochs of the teacher (default: --epochs)")
    p.add_argument("--early-stop", type=int, default=None, metavar="EPOCHS",
                   help="stop a stage after this many epochs without a better validation accuracy, 0 = off "
                        "(default: " + ", ".join(f"{f} {v['early_stop']}" for f, v in FAMILIES.items()) + ")")
    p.add_argument("--seeds", default=None, help="comma-separated student seeds (default 0,1,2)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods trained beside KD, each from the teacher and via each assistant, "
                        "e.g. dkd,dist,fitnet,at (not in the paper: a table of their own, no verdicts)")
    p.add_argument("--tune", type=int, default=None, metavar="N",
                   help="tune each row's KD students (BLKD and TAKD via each assistant; and each --methods method) on "
                        "validation with N trials each (T and the KD weight: " + DECLARED["kd"] + "), then train the "
                        "declared seeds at the best values beside the declared ones (docs/tuning.md); the paper's "
                        "numbers are the best of 120 trials on test")
    p.add_argument("--jobs", type=int, default=None, help="stage jobs trained at once on this machine (students of "
                   "any seed, assistants after the teacher), each a process with a share of the cores (default 1)")
    p.add_argument("--executor", choices=("serial", "local", "ray"), default=None,
                   help="who runs the stage jobs (the toolkit's --executor): ray for a Ray instance or cluster")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT", help="with --executor ray: join this cluster")
    p.add_argument("--data-root", action="append", default=[], metavar="[DATASET=]PATH",
                   help="an ImageFolder tree or its .tar.gz for a dataset (cifar10=PATH); without it torchvision "
                        "downloads CIFAR into data/ (needs a network)")
    p.add_argument("--data-source", default=None, help="override the data source for every dataset (tests: digits)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--compile", default=None, choices=("auto", "true", "false"),
                   help="torch.compile (default auto: kept where it measures faster and pays off)")
    p.add_argument("--out", type=Path, default=default_out,
                   help=f"where the run folders go (default {default_out.relative_to(ROOT)})")
    p.add_argument("--results", type=Path, default=None,
                   help="the table (CSV; the markdown and the tests' CSV beside it); default OUT/results/"
                        "takd_reproduction.csv")
    p.add_argument("--publish", action="store_true",
                   help=f"also write the tables to the tracked {PUBLISHED_TRACKED.relative_to(ROOT)} (and .md)")
    p.add_argument("--teachers-from", type=Path, default=None, metavar="OUT",
                   help="load the teacher and assistants that the reproduction in OUT finished with the same settings "
                        "instead of training them again (e.g. --tables assistants beside a finished Table 1 run)")
    p.add_argument("--resume", action="store_true", help="continue the reproduction in --out after any stop")
    p.add_argument("--report-only", action="store_true", help="rebuild the tables from the runs in --out, train nothing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (recorded in its config), e.g. --set data.max_train_samples=500")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return check_args(args)


def check_args(args):
    """Every choice, number and data root checked before anything is written."""
    preset = SLICES.get(args.slice, {})
    split = lambda v, default: [x.strip() for x in v.split(",") if x.strip()] if v else list(default)  # noqa: E731
    args.tables = split(args.tables, preset.get("tables", TABLES))
    args.families = split(args.families, preset.get("families", FAMILIES))
    args.datasets = split(args.datasets, preset.get("datasets", DATASETS))
    for given, valid, what in ((args.tables, TABLES, "table"), (args.families, FAMILIES, "family"),
                               (args.datasets, DATASETS, "dataset")):
        bad = [x for x in given if x not in valid]
        if bad or not given:
            raise UserError(f"unknown {what} {', '.join(bad or given) or '(none)'}; choose from {', '.join(valid)}")
    try:
        args.seeds = [int(s) for s in split(args.seeds, map(str, preset.get("seeds", [0, 1, 2])))]
    except ValueError:
        raise UserError(f"--seeds takes comma-separated whole numbers, e.g. 0,1,2; got {args.seeds!r}") from None
    if not args.seeds or min(args.seeds) < 0 or len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds needs distinct seeds >= 0, got {args.seeds}")
    args.methods = check_method_names(split(args.methods, []))
    given = lambda value, default: default if value is None else value  # noqa: E731
    args.epochs = given(args.epochs, preset.get("epochs", PAPER_EPOCHS))
    args.teacher_epochs = given(args.teacher_epochs, preset.get("teacher_epochs", args.epochs))
    args.jobs = given(args.jobs, preset.get("jobs", 1))
    for name, value in (("--epochs", args.epochs), ("--teacher-epochs", args.teacher_epochs), ("--jobs", args.jobs),
                        ("--tune", 1 if args.tune is None else args.tune)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    stop = args.early_stop if args.early_stop is not None else preset.get("early_stop")
    if stop is not None and stop < 0:
        raise UserError(f"--early-stop takes a number of epochs >= 0 (0: off), got {stop}")
    args.early_stop = {f: stop if stop is not None else v["early_stop"] for f, v in FAMILIES.items()}
    args.compile = args.compile or preset.get("compile", "auto")
    roots = dict(preset.get("data_root", {}))
    for item in args.data_root:
        name, _, path = item.rpartition("=")
        if name and name not in DATASETS:
            raise UserError(f"--data-root {item}: {name} is not one of {', '.join(DATASETS)}")
        if not name and len(args.datasets) > 1:
            raise UserError(f"--data-root {item}: name the dataset (cifar10=PATH) when several are selected")
        roots[name or args.datasets[0]] = str(Path(path).expanduser().resolve())
    args.data_root = {d: r for d, r in roots.items() if d in args.datasets}
    if not args.data_source:
        for dataset, root in args.data_root.items():
            if not Path(root).exists():
                raise UserError(f"--data-root for {dataset}: {root} does not exist (an ImageFolder tree or its .tar.gz)")
    args.out = args.out.expanduser().resolve()
    if args.teachers_from:
        args.teachers_from = args.teachers_from.expanduser().resolve()
        if args.teachers_from == args.out:
            raise UserError("--teachers-from names --out itself: --resume continues a reproduction in place")
    results = (args.results or args.out / "results" / "takd_reproduction.csv").expanduser().resolve()
    args.results = [results] + ([PUBLISHED_TRACKED] if args.publish and results != PUBLISHED_TRACKED else [])
    return args


def check_method_names(names: list) -> list:
    known = [m for m in available() if m not in ("kd", "scratch", "dense")]
    bad = [m for m in names if m not in known]
    if bad:
        raise UserError(f"--methods: unknown {', '.join(bad)}; choose from {', '.join(known)} (kd and the scratch "
                        f"student are always trained)")
    if len(set(names)) != len(names):
        raise UserError(f"--methods names a method twice: {','.join(names)}")
    return names


def check_methods_before_training(runs) -> None:
    """Every method of every run built and run once on its real (untrained) models before the
    teacher trains: a method that cannot work on these models is refused now, not hours later."""
    for label, raw, _, _ in runs:
        if any(st.get("method") for st in raw["stages"]):
            try:
                check_stages(from_dict(raw))
            except UserError as exc:
                raise UserError(f"{label}: {exc}") from None


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        runs = plan_runs(args)
        if not args.report_only:
            check_methods_before_training(runs)
            if args.out.exists() and any(args.out.iterdir()) and not args.resume:
                raise UserError(f"{args.out} holds a reproduction already: add --resume to continue it, or choose "
                                f"another --out")
            write_configs(runs, args)
        elif not args.out.is_dir():
            raise UserError(f"--report-only: {args.out} holds no reproduction")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(PROTOCOL, flush=True)
    fresh = not args.resume and not args.report_only  # this command made args.out: a refusal leaves nothing behind
    timings_path = args.out / "timings.json"
    estimates, done = {}, {}
    if not args.report_only:
        try:
            estimates = whole_estimate(runs, args)
        except Exception as exc:  # noqa: BLE001 (the estimate is advice: the runs themselves say what is wrong)
            print(f"(no whole-reproduction estimate: {type(exc).__name__}: {exc})", flush=True)
        say_estimate(estimates, done, bool(args.tune))
    for i, (label, raw, run_dir, seeds) in enumerate([] if args.report_only else runs):
        if run_done(run_dir, raw["stages"], seeds):
            print(f"[{i + 1}/{len(runs)}] {label}: finished earlier", flush=True)
            continue
        print(f"\n[{i + 1}/{len(runs)}] {label} -> {run_dir}", flush=True)
        config_path = args.out / "configs" / f"{run_dir.parent.name}-{run_dir.name}.yaml"
        threads = student_threads(RunFolder(run_dir), seeds, args.jobs) if seeds else None
        with RunClock(timings_path, label):
            code = train_run(config_path, run_dir, args, seeds, threads)
        done[label] = True
        if code == 0:
            say_estimate(estimates, done, bool(args.tune))
        if code != 0:  # the run said why, and printed the one command that continues the reproduction
            if fresh and i == 0 and not any(args.out.rglob("stage.json")) and not any(args.out.rglob("last.pt")):
                shutil.rmtree(args.out, ignore_errors=True)  # refused before anything trained: no skeleton left behind
            return code
    wall = sum(json.loads(timings_path.read_text()).values()) if timings_path.exists() else 0.0
    written = write_results(args, wall)
    print(f"\n{written[0].read_text()}\nTables: " + ", ".join(f"{m.with_suffix('.csv')} and {m}" for m in written),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

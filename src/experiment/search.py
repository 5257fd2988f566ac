"""The search: knobs of a stage tuned on validation with Optuna, trial by trial, as stage jobs.

    bash cnn_distillation/train_cnn.sh --tune 'kd.temperature=1:20:log,kd.alpha=0.05:0.95' --trials 16
    bash cnn_distillation/train_cnn.sh --baselines --methods dkd --tune-each 16 --jobs 2

Read top to bottom, a search is:
1. the targets: the stages tuned and each one's knobs (src/spec/tune.py), checked by building every
   target at both ends of its ranges before anything trains;
2. the upstream: the teachers and assistants the targets learn from, trained once (the first
   seed's), in RUN/tune/upstream, without the test split;
3. the trials: Optuna's ask-and-tell (TPE with a fixed seed, the median pruner reading each epoch's
   validation accuracy). A trial is a run folder RUN/tune/<stage>/trial_<n> holding the upstream as
   loaded checkpoints and the target with the trial's values; its jobs run under the study's
   executor (serial, --jobs, Ray) like any other. No trial reads the test split (data.read_test
   false: the test folder is not even listed). The journal file RUN/tune/study.journal (or
   --storage) holds every trial: a stopped search resumes, and a finished trial is not repeated;
4. the freeze: each target's best values become a stage of their own, `<stage>_tuned`, beside the
   declared one (same seed stream: default against tuned is a paired comparison), recorded in the
   config's `tuned:` with the study, its trial counts and the seed of the best trial. Only then
   do the declared seeds train, and test accuracy is read once, at the end.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..distillation.chain import check_stages
from ..distillation.trial import JOURNAL, SEARCH_DIR, TRIAL_FILE, open_storage, pruner
from ..plan.jobs import Plan, build_plan
from ..runs.runfolder import RunFolder
from ..spec.config import TuneConfig, from_dict, to_dict
from ..inference import final_student
from ..spec.names import tuned_stage
from ..spec.tune import Knob, check_knobs_fit, declared_knobs, parse_knobs, with_values
from ..utils.checkpoint import atomic_write_text
from ..utils.errors import ConfigError
from ..utils.logger import get_console

STATE_FILE = "search.json"
log = get_console()


@dataclass(frozen=True)
class Target:
    stage: str
    knobs: tuple
    study: str


# ------------------------------------------------------------------------------------------ 1. targets
def targets(cfg) -> list:
    """The stages a search tunes, each with its knobs: tune.stage (default: the chain's student),
    or with tune.each every KD-taught student (from the teacher and via each assistant) and each
    method's student from the teacher."""
    t = cfg.tune
    given = parse_knobs(t.knobs) if t.knobs is not None else None
    if t.each:
        teacher = cfg.stages[0].name
        stages = [s for s in cfg.stages if len(s.teachers) == 1 and s.role != "assistant" and s.name != teacher
                  and ((s.method or "kd") == "kd" or s.teachers == [teacher])]
    else:
        name = t.stage or final_student(cfg)  # the stage load_model and src.evaluate read by default
        stages = [cfg.stage(name)]
    out = []
    for s in stages:
        knobs = given if given is not None and _fits(s, given) else declared_knobs(s) if t.each else given
        check_knobs_fit(s, knobs)
        out.append(Target(s.name, tuple(knobs), s.name))
    if not out:
        raise ConfigError("--tune-each: the chain has no student taught by one teacher to tune")
    return out


def _fits(stage, knobs) -> bool:
    try:
        check_knobs_fit(stage, knobs)
        return True
    except ConfigError:
        return False


def check_targets(cfg, found: list) -> None:
    """Every target built with its knobs at both ends of their ranges (a method that does not take
    an argument, or a value it refuses, is one line before anything trains)."""
    for end in ("low", "high"):
        stages = [with_values(s, {k.name: _value(k, getattr(k, end)) for k in t.knobs})
                  for t in found for s in [cfg.stage(t.stage)]]
        named = {s.name: s for s in stages}
        probe = replace(cfg, stages=[named.get(s.name, s) for s in cfg.stages])
        try:
            check_stages(probe)
        except ConfigError as exc:
            raise ConfigError(f"--tune at the {end} end of its ranges: {exc}") from None


def _value(k: Knob, v: float):
    return int(round(v)) if k.integer else float(v)


# ------------------------------------------------------------------------------------------ 2. upstream
def ancestors(cfg, names) -> list:
    """The stages the named ones learn from, directly or through others, in the config's order."""
    found, frontier = set(), set(names)
    while frontier:
        frontier = {t for n in frontier for t in cfg.stage(n).teachers} - found
        found |= frontier
    return [s.name for s in cfg.stages if s.name in found]


def upstream_config(cfg0, needed: list):
    stages = [s for s in cfg0.stages if s.name in needed]
    return replace(cfg0, name=f"{cfg0.name}-upstream", stages=stages, tune=TuneConfig(), tuned={},
                   data=replace(cfg0.data, read_test=False))


def loaded(stage, run: RunFolder):
    """An upstream stage as a trial sees it: its trained weights, nothing to train."""
    return replace(stage, checkpoint=str(run.stage(stage.name).best), teacher=None, method=None, method_args={})


# ------------------------------------------------------------------------------------------ 3. trials
def trial_config(cfg0, up: RunFolder, target: Target, number: int, values: dict):
    needed = ancestors(cfg0, [target.stage])
    stages = [loaded(s, up) for s in cfg0.stages if s.name in needed]
    stages.append(with_values(cfg0.stage(target.stage), values))
    return replace(cfg0, name=f"{cfg0.name}-{target.stage}-trial{number}", stages=stages, tune=TuneConfig(),
                   tuned={}, data=replace(cfg0.data, read_test=False))


def distributions(target: Target) -> dict:
    import optuna  # the search's engine
    return {k.name: (optuna.distributions.IntDistribution(int(k.low), int(k.high), log=k.log) if k.integer
                     else optuna.distributions.FloatDistribution(k.low, k.high, log=k.log)) for k in target.knobs}


def open_studies(found: list, storage_spec: str, seed: int) -> dict:
    import optuna  # the search's engine
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_spec)
    return {t.stage: optuna.create_study(study_name=t.study, storage=storage, direction="maximize", load_if_exists=True,
                                         sampler=optuna.samplers.TPESampler(seed=seed + i), pruner=pruner())
            for i, t in enumerate(found)}


def counts(study) -> dict:
    import optuna  # the search's engine
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    return {name: sum(t.state == state for t in trials) for name, state in
            (("complete", S.COMPLETE), ("pruned", S.PRUNED), ("failed", S.FAIL), ("running", S.RUNNING))}


def next_batch(found: list, studies: dict, trials: int, width: int) -> list:
    """[(target, trial_id, number, params)]: trials a stop left running first (they resume from their
    folders), then new ones asked round-robin over the targets until `width` or the budget is reached."""
    import optuna  # the search's engine
    batch = []
    for t in found:
        for ft in studies[t.stage].get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            batch.append((t, ft._trial_id, ft.number, dict(ft.params)))
    left = {t.stage: trials - sum(v for k, v in counts(studies[t.stage]).items()) for t in found}
    while len(batch) < width and any(v > 0 for v in left.values()):
        for t in found:
            if len(batch) < width and left[t.stage] > 0:
                trial = studies[t.stage].ask(distributions(t))
                batch.append((t, trial._trial_id, trial.number, dict(trial.params)))
                left[t.stage] -= 1
    return batch


def trial_folder(root: Path, target: Target, number: int) -> RunFolder:
    return RunFolder(root / target.stage / f"trial_{number}")


def prepare_trial(root: Path, cfg0, up: RunFolder, storage_spec: str, item) -> tuple:
    target, trial_id, number, params = item
    folder = trial_folder(root, target, number)
    folder.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.path / TRIAL_FILE, json.dumps({"storage": storage_spec, "study": target.study,
                                                           "trial_id": trial_id, "number": number, "params": params}))
    return folder, trial_config(cfg0, up, target, number, params)


def tell(studies: dict, item, folder: RunFolder) -> str:
    """The trial's outcome into its study: its best validation accuracy, pruned, or failed."""
    import optuna  # the search's engine
    target, trial_id, number, params = item
    study, stage = studies[target.stage], folder.stage(target.stage)
    summary = stage.summary() if stage.finished else None
    if summary is None:
        study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        return "failed"
    if summary.get("pruned_at"):
        study.tell(number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        return f"pruned after epoch {summary['pruned_at']}"
    study.tell(number, float(summary["val_accuracy"]), skip_if_finished=True)
    return f"val acc {summary['val_accuracy']:.4f}"


# ------------------------------------------------------------------------------------------ 4. freeze
def freeze(cfg, found: list, studies: dict, storage_spec: str, trials: int, seed: int):
    """The config with `<stage>_tuned` beside each target (its best values) and `tuned:` recorded."""
    tuned, extra = {}, {}
    for t in found:
        study = studies[t.stage]
        done = counts(study)
        if not done["complete"]:
            raise ConfigError(f"search of {t.stage}: no trial finished ({done['pruned']} pruned, {done['failed']} "
                              f"failed); see the trials' logs in RUN/{SEARCH_DIR}/{t.stage}/")
        best = study.best_trial
        name = tuned_stage(t.stage)
        declared = cfg.stage(t.stage)  # the same seed stream: the same initial weights and batches as the declared stage
        extra[t.stage] = replace(with_values(declared, best.params), name=name,
                                 seed_stream=declared.seed_stream or declared.name)
        tuned[name] = {"from": t.stage, "study": t.study, "storage": storage_spec, "trials": trials,
                       "complete": done["complete"], "pruned": done["pruned"], "failed": done["failed"],
                       "best_trial": best.number, "seed": seed, "best_val_accuracy": best.value,
                       "values": dict(best.params), "knobs": [k.text() for k in t.knobs],
                       "sampler": f"TPE (seed {cfg.tune.sampler_seed + found.index(t)})",
                       "pruner": "median over earlier trials at the same epoch (4 trials first, from epoch 2)"}
    stages = []
    for s in cfg.stages:
        stages.append(s)
        if s.name in extra:
            stages.append(extra[s.name])
    return replace(cfg, stages=stages, tuned=tuned)


# ------------------------------------------------------------------------------------------ its time
def seconds_by_stage(plan, seconds: dict) -> dict:
    """{stage: seconds} from a plan's {job id: seconds} (every seed trains the same stages)."""
    return {j.stage: seconds[j.id] for j in plan.jobs if j.id in seconds}


def search_seconds(cfg, stage_seconds: dict, seeds: int, width: int) -> float:
    """What a search adds to a study if no trial is pruned, from each target's timed stage
    (`stage_seconds`, as a --dry-run times them): every trial run to the end (a pruned one ends
    sooner), `width` at a time, then each seed's `<stage>_tuned`. The upstream trains once more
    only where the study's own teachers are not loaded (not counted: one seed's teachers again)."""
    per_target = [stage_seconds.get(t.stage, 0.0) for t in targets(cfg)]
    return sum(per_target) * (cfg.tune.trials + max(1, seeds)) / max(1, width)


# ------------------------------------------------------------------------------------------ the search
def preflight(cfg) -> None:
    """Everything a search can refuse, before anything is written: its targets and knobs (built at
    both ends of their ranges) and a --storage URL that does not open."""
    check_targets(cfg, targets(cfg))
    if cfg.tune.storage:
        open_storage(cfg.tune.storage)


def search(cfg, root: RunFolder, seeds, threads: int, width: int, run_plan: Callable) -> object:
    """Tune, then return the config the declared seeds train (see the module's docstring); the
    caller ran `preflight(cfg)` first.
    `run_plan(plan)` runs a plan under the study's executor (resuming what was started)."""
    # 1. the targets (preflight, run by the caller before anything was written, built them at both ends)
    found = targets(cfg)
    tune_root = root.path / SEARCH_DIR
    storage_spec = cfg.tune.storage or str(tune_root / JOURNAL)
    studies = open_studies(found, storage_spec, cfg.tune.sampler_seed)  # an unreachable --storage fails here
    cfg0 = replace(cfg, seed=seeds[0]) if seeds else cfg
    atomic_write_text(_state_path(root), json.dumps({"config": to_dict(cfg), "seeds": seeds}, indent=2))
    log.info(f"\n════ search: {', '.join(t.stage for t in found)}, {cfg.tune.trials} trials each, on validation "
             f"(seed {cfg0.seed}), storage {storage_spec} ════")

    # 2. the upstream, trained once
    needed = ancestors(cfg0, [t.stage for t in found])
    up = RunFolder(tune_root / "upstream")
    if needed:
        run_plan(build_plan(upstream_config(cfg0, needed), up, None, threads))

    # 3. the trials, a batch at a time under the executor
    while batch := next_batch(found, studies, cfg.tune.trials, width):
        made = [prepare_trial(tune_root, cfg0, up, storage_spec, item) for item in batch]
        jobs = []
        for (folder, tcfg), (target, _, number, _) in zip(made, batch):
            prefix = f"{target.stage}/trial_{number}/"
            jobs += [replace(j, id=prefix + j.id, needs=tuple(prefix + n for n in j.needs))
                     for j in build_plan(tcfg, folder, None, threads).jobs]
        try:
            run_plan(Plan(root=RunFolder(tune_root), jobs=tuple(jobs), seeds=None, threads=threads))
        except Exception as exc:  # noqa: BLE001 (a failed trial is a failed trial: told as such, the search goes on)
            if type(exc).__name__ == "StopRequested":
                raise
            log.warning(f"⚠️  a trial failed: {type(exc).__name__}: {exc}")
        for (folder, _), item in zip(made, batch):
            outcome = tell(studies, item, folder)
            log.info(f"  trial {item[0].stage} #{item[2]} {_params(item[3])}: {outcome}")

    # 4. the freeze
    frozen = freeze(cfg, found, studies, storage_spec, cfg.tune.trials, cfg0.seed)
    for name, rec in frozen.tuned.items():
        log.info(f"  → {name}: {_params(rec['values'])} (trial #{rec['best_trial']}, val acc "
                 f"{rec['best_val_accuracy']:.4f}; {rec['complete']} complete, {rec['pruned']} pruned, "
                 f"{rec['failed']} failed)")
    return from_dict(to_dict(frozen))


def _params(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in values.items())


def _state_path(root: RunFolder) -> Path:
    return root.path / SEARCH_DIR / STATE_FILE


def pending_search(root: RunFolder):
    """(config, seeds) of a search stopped before its seeds started, else None (for --resume)."""
    path = _state_path(root)
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    return from_dict(state["config"]), state["seeds"]


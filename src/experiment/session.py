"""One invocation of a chain's command line, from its parsed arguments to its exit code.

cli.py parses the arguments and imports this module only then (so that --help and a typo answer
at once, without torch); everything here imports the toolkit at the top. Library code raises;
`exit_code` is the one place that turns exceptions into one-line errors and exit codes: 0 done,
1 unexpected error, 2 bad input, 3 non-finite loss, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
import yaml

from ..distillation import distributed as dist
from ..distillation.chain import check_writable, estimate_jobs, finish_run, prepare_run, run_chain
from ..distillation.clock import duration
from .executor import JobsFailed, RayExecutor, SerialExecutor, make_executor
from .search import pending_search, search, search_seconds, seconds_by_stage, targets
from .search import preflight as search_preflight
from ..plan.jobs import build_plan, gpu_share, recorded_threads
from ..spec.config import apply_override, changed_keys, config_leaves, from_dict, load_config
from ..distillation.engine import StopRequested
from ..distillation.stage import StageFailed
from ..spec.sweep import parse_assistants, with_baselines
from ..analysis import report
from ..runs import runlock
from ..utils import signals
from ..utils.checkpoint import atomic_write_text
from ..utils.devices import freeze_import_heap
from ..utils.errors import ConfigError, UserError
from ..utils.logger import get_console, set_verbose
from ..runs.runfolder import RunFolder, StageFolder
from ..utils.tb import log_figures

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_OK, EXIT_ERROR, EXIT_USER, EXIT_NAN, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 3, 130, 143


# Command-line shortcut -> the config key it sets.
_SHORTCUTS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "data_root": "data.root",
              "data_source": "data.source", "device": "train.device", "seed": "seed", "assistants": "sweep.assistants",
              "guidance": "guidance", "methods": "sweep.methods", "tune": "tune.knobs", "trials": "tune.trials",
              "storage": "tune.storage"}


def _abs(path):
    return None if path is None else Path(path).expanduser().resolve()


def _overrides(args) -> list:
    """--set items plus the shortcut options, as key=value. A key set both ways is refused: the
    order on the command line would otherwise decide silently."""
    given = {item.split("=", 1)[0].strip() for item in args.overrides}
    overrides = list(args.overrides)
    for opt, key in _SHORTCUTS.items():
        value = getattr(args, opt)
        if value is None:
            continue
        if key in given:
            raise ConfigError(f"--{opt.replace('_', '-')} and --set {key}=... both set {key}: give only one")
        if opt == "assistants":
            value = yaml.safe_dump(parse_assistants(value), default_flow_style=True).strip()
        if opt == "methods":
            value = "[" + ",".join(m.strip() for m in value.split(",") if m.strip()) + "]"
        if opt in ("tune", "storage"):
            value = json.dumps(value)  # a YAML string, whatever its colons and commas
        overrides.append(f"{key}={value}")
    if getattr(args, "tune_each", None) is not None:
        if "tune.trials" in {item.split("=", 1)[0].strip() for item in overrides}:
            raise ConfigError("--tune-each N and --trials N both set the trials per tuned stage: give only one")
        overrides += ["tune.each=true", f"tune.trials={args.tune_each}"]
    if args.tensorboard:
        overrides.append("logging.tensorboard=true")
    return overrides


# What --resume may change, and how: anything else would make the run's parts disagree.
RESUMABLE = ("lr", "epochs", "device", "tensorboard")


def _apply_resume_overrides(run_dirs: list, overrides: list, log) -> None:
    """Apply the overrides that are safe on resume to every config.yaml of the run, or refuse them.

    Safe: learning rates (the stages not finished yet train with the new one; the interrupted stage
    from its next epoch), epochs upwards (the cosine schedule is recomputed for the new length),
    the device and TensorBoard logging. Each change is recorded in resume_overrides.json."""
    checked = []  # every config is checked before any is written: a refusal changes nothing
    for run_dir in run_dirs:
        path = RunFolder(run_dir).config_path
        raw = yaml.safe_load(path.read_text())
        new = yaml.safe_load(yaml.safe_dump(raw))
        for item in overrides:
            apply_override(new, item)
        old_cfg, new_cfg = from_dict(raw), from_dict(new)
        before_leaves, after_leaves = dict(config_leaves(raw)), dict(config_leaves(new))
        changed = changed_keys(raw, new)
        refused = [k for k in changed if k.split(".")[-1] not in RESUMABLE]
        if refused:
            raise ConfigError(f"--resume keeps the run's settings: {', '.join(refused)} cannot change on resume "
                              f"(allowed: learning rates, epochs upwards, device, tensorboard); start a new run "
                              f"with --output-dir for other changes")
        for a, b in zip(old_cfg.stages, new_cfg.stages):
            before, after = a.epochs or old_cfg.train.epochs, b.epochs or new_cfg.train.epochs
            if after < before:
                raise ConfigError(f"--resume: stage {a.name!r} epochs can only grow ({before} -> {after})")
        if changed:
            checked.append((run_dir, path, new, {k: [before_leaves.get(k), after_leaves.get(k)] for k in changed}))
    for run_dir, path, new, changed in checked:
        history_path = RunFolder(run_dir).file(RunFolder.RESUME_OVERRIDES)
        history = json.loads(history_path.read_text()) if history_path.exists() else []
        history.append({"time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "overrides": overrides,
                        "changed": changed})
        RunFolder(run_dir).save_config(new)
        atomic_write_text(history_path, json.dumps(history, indent=2))
        log.info(f"↻ resume with {', '.join(changed)} changed (recorded in {history_path.name})")


def _parse_seeds(text):
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds needs distinct non-negative integers, got {text!r}")
    return seeds


@dataclass
class Session:
    """One invocation: its arguments, the run it works on, and what must be undone at the end."""
    args: argparse.Namespace
    chain: str
    user_cwd: str
    log: object = None
    ds: object = None
    cfg: object = None
    seeds: Optional[list] = None
    out: Optional[Path] = None
    out_existed: bool = False
    lock: object = None
    previous_handlers: object = None
    own_process: bool = False  # the entry point's process (not a caller's): its import heap may be frozen
    resume_command: Optional[str] = None  # a caller's own command for continuing (the reproduction's)


def run_session(args: argparse.Namespace, chain: str, own_process: bool = False, resume_command=None) -> int:
    """The command line's phases: resolve the target (a new run or the one to resume), check its
    output folder, train; every exception becomes one line and an exit code (exit_code)."""
    session = open_session(args, chain)
    session.own_process, session.resume_command = own_process, resume_command
    try:
        resolve_target(session)
        check_output_folder(session)
        train(session)
        return EXIT_OK
    except BaseException as exc:  # noqa: B902 (KeyboardInterrupt included: it gets its own line and code)
        return exit_code(session, exc)
    finally:
        close_session(session)


def open_session(args, chain: str) -> Session:
    """Command-line paths are the user's (current folder); config paths are the repository's.
    Signal handlers, the distributed state and the console are set up here."""
    args.config, args.output_dir, args.resume = _abs(args.config), _abs(args.output_dir), _abs(args.resume)
    if args.data_root is not None:
        args.data_root = str(_abs(args.data_root))
    session = Session(args=args, chain=chain, user_cwd=os.getcwd())
    os.chdir(REPO_ROOT)
    session.previous_handlers = signals.install_handlers(StopRequested)
    session.log = get_console()
    set_verbose(args.verbose)
    session.out = args.resume or args.output_dir
    session.out_existed = session.out is not None and session.out.exists()
    session.ds = dist.init_from_env(args.device or "auto")
    if not session.ds.is_main:
        session.log.setLevel(logging.WARNING)  # one voice: rank 0 reports
        args.no_progress = True
    return session


def close_session(session: Session) -> None:
    if session.lock is not None:
        session.lock.release()
    dist.shutdown()
    signals.restore_handlers(session.previous_handlers)


def resolve_target(session: Session) -> None:
    """session.cfg, .seeds and .out: from the run folder for --resume, else from the preset."""
    if session.args.resume:
        _resolve_resume(session)
    else:
        _resolve_new(session)


def _resolve_resume(session: Session) -> None:
    """Claim the run folder, refuse a hand-edited config, apply the overrides --resume allows."""
    args, ds = session.args, session.ds
    folder = RunFolder(args.resume)
    if ds.is_main and args.resume.is_dir() and not args.dry_run:  # claimed before anything is read or changed
        session.lock = runlock.acquire(args.resume, "resuming it")
    started = folder.first_seed().config_path.exists() if folder.is_multi_seed else folder.config_path.exists()
    pending = None if started else pending_search(folder)
    if pending is not None:  # a search stopped before its seeds started: it continues from its storage
        session.cfg, session.seeds = pending
        return
    if not folder.is_run:
        unfinished = args.resume.is_dir() and any(p.suffix == ".tmp" or p.name.startswith(runlock.PROBE_PREFIX)
                                                  for p in args.resume.rglob("*"))
        raise UserError(f"--resume {args.resume}: not a run folder (no {RunFolder.CONFIG} or {RunFolder.SEEDS})" + (
            "; it was stopped before anything was saved: start it again with the same command" if unfinished else ""))
    dirs = [r.path for _, r in folder.seed_runs()]
    if ds.is_main:
        for d in dirs:  # a config.yaml edited by hand would make the run claim what its weights are not
            RunFolder(d).check_config_digest()
        if args.tensorboard and folder.tensorboard.exists() and not folder.tensorboard.is_dir():
            raise UserError(f"--tensorboard writes into {folder.tensorboard}, which is a file; move it away")
    overrides = _overrides(args)
    if overrides and ds.is_main and not args.dry_run:
        _apply_resume_overrides(dirs, overrides, session.log)
    dist.barrier()
    if folder.is_multi_seed:
        first = folder.first_seed().config_path  # resolved, baselines included
        session.seeds = folder.seed_list()
        session.cfg = load_config(first if first.exists() else Path(json.loads(folder.seeds_file.read_text())["config"]))
    else:
        session.cfg = load_config(folder.config_path)


def _resolve_new(session: Session) -> None:
    """The preset with the overrides (and the baselines), the seeds, the output folder claimed."""
    args, ds = session.args, session.ds
    overrides = _overrides(args)
    cfg = load_config(args.config, overrides)
    if any(item.split("=", 1)[0].strip().endswith(".model") for item in overrides):
        cfg = named_after_its_chain(cfg, load_config(args.config))
    session.cfg = with_baselines(cfg) if args.baselines else cfg
    session.seeds = _parse_seeds(args.seeds) if args.seeds else None
    if session.out is None:
        stamp = dist.broadcast(_dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
        session.out = REPO_ROOT / "runs" / session.chain / f"{session.cfg.name}-{stamp}"
        session.out_existed = session.out.exists()
    if ds.is_main and not args.dry_run:  # claimed first: a second start a second later is refused here, naming this one
        session.lock = runlock.acquire(session.out, "starting a run")


def named_after_its_chain(cfg, preset):
    """A chain whose models were swapped on the command line is not the preset any more: its run
    (folder, report, figure titles) is named after its models, e.g. cnn_cifar10-plain_cnn10-plain_cnn4-plain_cnn2."""
    models = [s.model for s in cfg.stages]
    if models == [s.model for s in preset.stages]:
        return cfg
    short = "-".join(dict.fromkeys(m.removeprefix("hf:").split("/")[-1] for m in models))  # a sweep repeats its student
    return replace(cfg, name=f"{preset.name}-{short}")


def check_output_folder(session: Session) -> None:
    """A new run's folder must hold no files; any run's folder must be writable. Every rank stops
    when rank 0 finds a problem."""
    out, problem = session.out, None
    if session.args.dry_run:
        return
    if session.ds.is_main:
        try:
            # jobs.json is the plan, written again at every start: alone it is no run (a kill before config.yaml)
            if not session.args.resume and any(p.is_file() and p.suffix != ".tmp" and not runlock.is_bookkeeping(p)
                                               and p != out / RunFolder.JOBS for p in out.rglob("*")):
                problem = (f"output folder {out} already holds files; choose a new --output-dir, "
                           f"or continue that run with --resume {out}")
            else:
                check_writable(out)
        except UserError as exc:
            problem = str(exc)
    problem = dist.broadcast(problem)
    if problem:
        raise UserError(problem)


def train(session: Session) -> None:
    """The study's plan of stage jobs, run by the executor the command line names (serial: the
    chain once, or once per seed, in this process); a search first when the config asks for one
    (its best values frozen into the plan); then the report."""
    args, out, cfg = session.args, session.out, session.cfg
    folder = RunFolder(out)
    plan = build_plan(cfg, folder, session.seeds, args.threads or recorded_threads(folder), gpu_per_job(cfg))
    searching = cfg.tune.trials > 0 and not cfg.tuned
    if args.dry_run:
        text, seconds = dry_run_text(plan, session)
        print(text + (f"\n{search_text(cfg, plan, seconds, len(session.seeds or [0]), args.jobs or 1)}"
                      if searching else ""))
        return
    if session.own_process:
        freeze_import_heap()
    if searching:
        search_preflight(cfg)  # a bad knob or storage: one line, nothing written
    executor = make_executor(args.executor or "serial", args.jobs, args.ray_address)
    try:
        if session.seeds and session.ds.is_main and args.resume is None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder.seeds_file, json.dumps({"seeds": session.seeds, "config": str(args.config)}))
        if searching:
            cfg = session.cfg = search(cfg, folder, session.seeds, plan.threads, args.jobs or 1,
                                       lambda p: run_plan(session, p, executor, started_only=True))
            plan = build_plan(cfg, folder, session.seeds, plan.threads, gpu_per_job(cfg))
        if session.ds.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder.file(RunFolder.JOBS), json.dumps(plan.record(), indent=2))
        run_plan(session, plan, executor)
    finally:
        executor.close()
    if session.ds.is_main:
        _report(folder, session.log, tensorboard=cfg.logging.tensorboard)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0
    session.log.info(f"\n✅ Done. Results in {out} ({size / 2 ** 20:,.0f} MB: per stage its weights once, "
                     f"in model.safetensors, plus logs and the report)")


def search_text(cfg, plan, seconds: dict, seeds: int, width: int) -> str:
    """--dry-run with a search: what it would tune, with which knobs, how many trials, and what it
    adds to the plan's time if no trial is pruned."""
    found = targets(cfg)
    text = "search before the plan above: " + "; ".join(
        f"{t.stage} ({', '.join(k.text() for k in t.knobs)})" for t in found) + (
        f"; {cfg.tune.trials} trials each on validation, then <stage>_tuned beside each with the best values")
    by_stage = seconds_by_stage(plan, seconds)
    if seconds and all(t.stage in by_stage for t in found):
        text += (f"\nthe search adds about {duration(search_seconds(cfg, by_stage, seeds, width))} if no trial is "
                 f"pruned ({width} trial(s) at a time; a pruned trial ends sooner)")
    return text


def run_plan(session: Session, plan, executor, started_only: bool = False) -> None:
    """A plan under the executor: serial in this process, else the executor's workers. A run folder
    continues where it stopped: on --resume, or (a search's trials) whenever its config was written."""
    if isinstance(executor, SerialExecutor):
        train_serial(session, plan, started_only)
    else:
        train_parallel(session, plan, executor, started_only)


def gpu_per_job(cfg) -> float:
    """On CUDA, the share of one GPU a stage job reserves: the planner fits each stage under
    train.vram_budget_gb, so a job needs that much of the card (none on a CPU; a whole GPU with no budget)."""
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return 0.0
    total = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    return gpu_share(cfg.train.vram_budget_gb or total, total)


def _resumes(session: Session, run: RunFolder, started_only: bool) -> bool:
    return run.config_path.exists() if started_only else session.args.resume is not None and run.path.exists()


def train_serial(session: Session, plan, started_only: bool = False) -> None:
    """Every job in this process, seed by seed: a chain per seed, as it always ran."""
    args = session.args
    quiet = dict(progress=not args.no_progress, cpu_advice=not args.no_cpu_advice, threads=plan.threads,
                 should_stop=lambda: signals.stop_requested() is not None)
    runs = plan.runs()
    for i, (seed, run, cfg) in enumerate(runs):
        if seed is not None:
            session.log.info(f"\n════ seed {seed} ════")
        run_chain(cfg, run, resume=_resumes(session, run, started_only), later_seeds=len(runs) - 1 - i, **quiet)


def train_parallel(session: Session, plan, executor, started_only: bool = False) -> None:
    """Each seed's run folder prepared here (its files, plan.json), the jobs handed to the
    executor, then each seed's summary; a failed job's dependants do not run, the rest finish."""
    t0 = time.perf_counter()
    if isinstance(executor, RayExecutor):
        executor.check_shared(plan.root.path)
    chains = []
    for seed, run, cfg in plan.runs():
        chain, _ = prepare_run(cfg, run, _resumes(session, run, started_only), plan.threads)
        chain.data = None  # the jobs read the data themselves; the summary needs only the folder
        chains.append(chain)
    session.log.info(plan.describe() + f"\nexecutor: {executor.name}; each job's output in SEED_RUN/logs/<stage>.log")
    outcome = executor.run(plan)
    for chain in chains:
        if all(chain.folder.stage(s.name).finished for s in chain.cfg.stages):
            finish_run(chain, t0)
    if outcome.retried:
        session.log.info(f"retried after their worker died: {', '.join(f'{k} ({v}x)' for k, v in outcome.retried.items())}")
    outcome.raise_if_failed()


def dry_run_text(plan, session: Session) -> str:
    """The plan with each job's estimated time (measured over a few steps, as a chain's estimate)
    and the critical path; nothing is written."""
    try:
        seconds = estimate_jobs(plan)
    except Exception as exc:  # noqa: BLE001 (the graph is still worth printing)
        session.log.warning(f"⚠️  no time estimate ({type(exc).__name__}: {exc})")
        seconds = {}
    return plan.describe(seconds, duration=duration) + "\n(dry run: nothing written)", seconds


def exit_code(session: Session, exc: BaseException) -> int:
    """One table from exception to message and exit code; the first matching row wins."""
    args = session.args
    resume = f"continue with:\n  {session.resume_command or _resume_command(session.chain, session.out, session.user_cwd)}"
    saved = getattr(exc, "saved", "") or "finished stages, and each running stage up to its last step, are saved"
    table = [
        (StopRequested, lambda: EXIT_SIGTERM if signals.stop_requested() == signal.SIGTERM else EXIT_SIGINT,
         f"Stopped. {saved}; {resume}", False),
        (KeyboardInterrupt, lambda: EXIT_SIGINT, f"Aborted. The last checkpoint of each stage is kept; {resume}", False),
        (StageFailed, lambda: EXIT_NAN, f"error: {exc}", True),
        (JobsFailed, lambda: exc.code, f"error: {exc}; the other jobs finished; {resume}", False),
        (UserError, lambda: EXIT_USER, f"error: {exc}", True),
        (Exception, lambda: EXIT_ERROR, f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                                        f"(run again with --debug for the traceback)", True),
    ]
    for kind, code, message, traceback_on_debug in table:
        if isinstance(exc, kind):
            if traceback_on_debug and args.debug:
                traceback.print_exception(exc)
            print(message, file=sys.stderr)
            if kind in (UserError, Exception) and not args.resume:  # a refused or failed start leaves nothing behind
                # only a folder this process made and claimed, removed while its lock is still held: a start
                # refused because another process holds the folder never touches that process's files
                if session.lock is not None and session.out is not None and not session.out_existed and session.ds.is_main:
                    _remove_if_unused(session.out)
                if session.lock is not None:
                    session.lock.release()
                    session.lock = None
            return code()
    raise exc  # SystemExit and the like pass through


def _resume_command(chain: str, out, cwd: str) -> str:
    """The command that continues this run, as typed from the folder the user started in."""
    script = os.path.relpath(REPO_ROOT / f"{chain}_distillation" / f"train_{chain}.sh", cwd)
    return f"bash {script} --resume {out}"


def _remove_if_unused(out: Path) -> None:
    """A new run that stopped before any stage saved anything (a refused model, method or data,
    a failure while planning) leaves no folder behind: only the run's own bookkeeping was there
    (config.yaml, env.json, plan.json, seeds.json, the lock), so --output-dir can be used again."""
    if not out.is_dir():
        return
    trained = {StageFolder.EPOCH_LOG, StageFolder.LAST, StageFolder.BEST, StageFolder.SUMMARY, StageFolder.PREDICTIONS}
    if not any(p.name in trained for p in out.rglob("*")):
        shutil.rmtree(out, ignore_errors=True)


def _report(folder: RunFolder, log, tensorboard: bool = False) -> None:
    try:
        path = report.write_report([folder])
        if tensorboard:
            log_figures(folder.tensorboard, sorted(folder.figures.glob("*.png")))
    except Exception as exc:  # the results are on disk already; a figure problem must not fail the run
        if isinstance(exc, StopRequested):
            raise
        log.warning(f"⚠️  report not written ({type(exc).__name__}: {exc}); rebuild it with: python -m src.report {folder.path}")
        return
    log.info(f"Report: {path}")

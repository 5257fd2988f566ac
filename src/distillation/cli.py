"""Command line shared by cnn_distillation/train_cnn.py and vit_distillation/train_vit.py.

Library code raises; this is the one place that turns exceptions into one-line errors and
exit codes: 0 done, 1 unexpected error, 2 bad input, 3 non-finite loss, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import sys
import traceback
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_OK, EXIT_ERROR, EXIT_USER, EXIT_NAN, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 3, 130, 143


def build_parser(chain: str, default_config: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"train_{chain}.sh",
        description=f"Teacher -> assistant -> student distillation ({chain.upper()} chain). "
                    f"Every stage's results land in one run folder.",
        epilog="Relative paths on the command line are taken from the current folder; relative paths inside "
               "a config file from the repository root.")
    p.add_argument("--config", type=Path, default=default_config, help=f"YAML preset (default: {default_config.relative_to(REPO_ROOT)})")
    p.add_argument("--output-dir", type=Path, default=None, help="run folder (default: runs/<chain>/<name>-<time>); must be new or empty")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue an interrupted run: finished stages are skipped, the unfinished one continues from its last epoch")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every stage (overrides the preset)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size for every stage")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (before the 1.0 / 0.75 / 0.5 role factor)")
    p.add_argument("--data-root", type=str, default=None,
                   help="dataset folder (imagefolder: root/train/<class>/*, root/test/<class>/*), a .tar.gz of such a "
                        "tree used as is, or the torchvision download folder for cifar10/cifar100")
    p.add_argument("--data-source", choices=("cifar10", "cifar100", "imagefolder", "digits"), default=None,
                   help="where the images come from: cifar10 / cifar100 (torchvision, downloaded when online), "
                        "imagefolder (--data-root), digits (scikit-learn's bundled set, offline demos)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=None,
                   help="run seed: initial weights, data order and augmentation of every stage derive from it "
                        "(the validation split is fixed by data.split_seed)")
    p.add_argument("--seeds", type=str, default=None, help="comma-separated seeds, e.g. 0,1,2: the chain once per seed, results as mean ± std")
    p.add_argument("--baselines", action="store_true", help="also train the student from scratch and distilled directly from the teacher")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set kd.temperature=2 --set stages.student.epochs=5 (repeatable)")
    p.add_argument("--gpus", type=int, default=None,
                   help=f"train every stage with DistributedDataParallel on N GPUs of this machine (relaunches itself "
                        "under torchrun; N=1 runs one NCCL rank). Or start it directly: torchrun --nproc_per_node N "
                        f"-m {chain}_distillation.train_{chain} [options]. train.batch_size stays the global batch")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to RUN/tb/ for TensorBoard (needs: python -m pip install tensorboard)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (on a terminal a bar, elsewhere a line every 30 s)")
    p.add_argument("--verbose", action="store_true",
                   help="print the guards' full messages (frozen teacher, checkpointing, cleanup, NaN diagnosis) "
                        "and the planner's probes")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def _abs(path):
    return None if path is None else Path(path).expanduser().resolve()


# Command-line shortcut -> the config key it sets.
_SHORTCUTS = {"epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "data_root": "data.root",
              "data_source": "data.source", "device": "train.device", "seed": "seed"}


def _overrides(args) -> list:
    """--set items plus the shortcut options, as key=value. A key set both ways is refused: the
    order on the command line would otherwise decide silently."""
    from src.utils.errors import ConfigError
    given = {item.split("=", 1)[0].strip() for item in args.overrides}
    overrides = list(args.overrides)
    for opt, key in _SHORTCUTS.items():
        value = getattr(args, opt)
        if value is None:
            continue
        if key in given:
            raise ConfigError(f"--{opt.replace('_', '-')} and --set {key}=... both set {key}: give only one")
        overrides.append(f"{key}={value}")
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
    import yaml

    from src.distillation.config import apply_override, changed_keys, config_leaves, from_dict, save_config_dict
    from src.utils.checkpoint import atomic_write_text
    from src.utils.errors import ConfigError

    checked = []  # every config is checked before any is written: a refusal changes nothing
    for run_dir in run_dirs:
        path = run_dir / "config.yaml"
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
        history_path = run_dir / "resume_overrides.json"
        history = json.loads(history_path.read_text()) if history_path.exists() else []
        history.append({"time": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "overrides": overrides,
                        "changed": changed})
        save_config_dict(new, path)
        atomic_write_text(history_path, json.dumps(history, indent=2))
        log.info(f"↻ resume with {', '.join(changed)} changed (recorded in {history_path.name})")


def _parse_seeds(text):
    from src.utils.errors import ConfigError
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds needs distinct non-negative integers, got {text!r}")
    return seeds


def _relaunch_under_torchrun(argv, chain: str, n: int) -> int:
    """`--gpus N` from a plain process: start N ranks with torchrun on this machine."""
    rest, skip = [], False
    for a in argv:  # drop "--gpus N" / "--gpus=N": the ranks must not relaunch again
        if not skip and a != "--gpus" and not a.startswith("--gpus="):
            rest.append(a)
        skip = a == "--gpus"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", f"{chain}_distillation.train_{chain}", *rest]
    import subprocess
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.call(cmd, env=env)


def run(argv, chain: str, default_config: Path) -> int:
    args = build_parser(chain, default_config).parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return EXIT_USER
    if args.gpus is not None and "LOCAL_RANK" not in os.environ:  # not yet under torchrun
        return _relaunch_under_torchrun(argv, chain, args.gpus)
    # Command-line paths are the user's (current folder); config paths are the repository's.
    args.config, args.output_dir, args.resume = _abs(args.config), _abs(args.output_dir), _abs(args.resume)
    if args.data_root is not None:
        args.data_root = str(_abs(args.data_root))
    user_cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    from src.distillation.engine import StopRequested
    from src.utils import signals
    previous_handlers = signals.install_handlers(StopRequested)
    stop = lambda: signals.stop_requested() is not None  # noqa: E731
    import logging
    from src.distillation import distributed as dist
    from src.utils.logger import get_console, set_verbose
    log = get_console()
    set_verbose(args.verbose)
    out = args.resume or args.output_dir
    out_existed = out is not None and out.exists()
    ds = dist.init_from_env(args.device or "auto")
    if not ds.is_main:
        log.setLevel(logging.WARNING)  # one voice: rank 0 reports
        args.no_progress = True
    lock = None
    try:
        from src.distillation.chain import check_writable, run_chain, with_baselines
        from src.distillation.config import check_config_digest, load_config
        from src.distillation.stage import StageFailed
        from src.utils import runlock
        from src.utils.checkpoint import atomic_write_text
        from src.utils.errors import UserError
        overrides = _overrides(args)
        if args.resume:
            seeds_file = args.resume / "seeds.json"
            if ds.is_main and args.resume.is_dir():  # claimed before anything is read or changed
                lock = runlock.acquire(args.resume, "resuming it")
            if not (args.resume / "config.yaml").exists() and not seeds_file.exists():
                unfinished = args.resume.is_dir() and any(p.suffix == ".tmp" or p.name.startswith(runlock.PROBE_PREFIX)
                                                          for p in args.resume.rglob("*"))
                raise UserError(f"--resume {args.resume}: not a run folder (no config.yaml or seeds.json)" + (
                    "; it was stopped before anything was saved: start it again with the same command" if unfinished else ""))
            dirs = ([args.resume / f"seed_{s}" for s in json.loads(seeds_file.read_text())["seeds"]]
                    if seeds_file.exists() else [args.resume])
            dirs = [d for d in dirs if (d / "config.yaml").exists()]
            if ds.is_main:
                for d in dirs:  # a config.yaml edited by hand would make the run claim what its weights are not
                    check_config_digest(d)
                if args.tensorboard and (args.resume / "tb").exists() and not (args.resume / "tb").is_dir():
                    raise UserError(f"--tensorboard writes into {args.resume / 'tb'}, which is a file; move it away")
            if overrides and ds.is_main:
                _apply_resume_overrides(dirs, overrides, log)
            dist.barrier()
            if seeds_file.exists():
                meta = json.loads(seeds_file.read_text())
                seeds = meta["seeds"]
                first = args.resume / f"seed_{seeds[0]}" / "config.yaml"  # resolved, baselines included
                cfg = load_config(first if first.exists() else Path(meta["config"]))
            else:
                seeds, cfg = None, load_config(args.resume / "config.yaml")
        else:
            cfg = load_config(args.config, overrides)
            if args.baselines:
                cfg = with_baselines(cfg)
            seeds = _parse_seeds(args.seeds) if args.seeds else None
            if out is None:
                stamp = dist.broadcast(_dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
                out = REPO_ROOT / "runs" / chain / f"{cfg.name}-{stamp}"
                out_existed = out.exists()
            problem = None
            if ds.is_main:  # claimed first: a second start a second later is refused here, naming this one
                lock = runlock.acquire(out, "starting a run")
            if ds.is_main and any(p.is_file() and p.suffix != ".tmp" and not runlock.is_bookkeeping(p)
                                  for p in out.rglob("*")):
                problem = (f"output folder {out} already holds files; choose a new --output-dir, "
                           f"or continue that run with --resume {out}")
            problem = dist.broadcast(problem)
            if problem:
                raise UserError(problem)
        problem = None
        if ds.is_main:
            try:
                check_writable(out)
            except UserError as exc:
                problem = str(exc)
        problem = dist.broadcast(problem)  # every rank stops, not only rank 0
        if problem:
            raise UserError(problem)
        resume = args.resume is not None
        progress = not args.no_progress
        if seeds and ds.is_main and not resume:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "seeds.json", json.dumps({"seeds": seeds, "config": str(args.config)}))
        if seeds:
            for s in seeds:
                log.info(f"\n════ seed {s} ════")
                rd = out / f"seed_{s}"
                run_chain(replace(cfg, seed=s), rd, resume=resume and rd.exists(), progress=progress, should_stop=stop)
        else:
            run_chain(cfg, out, resume=resume, progress=progress, should_stop=stop)
        if ds.is_main:
            _report(out, log, tensorboard=cfg.logging.tensorboard)
        log.info(f"\n✅ Done. Results in {out}")
        return EXIT_OK
    except StopRequested:
        code = EXIT_SIGTERM if signals.stop_requested() == signal.SIGTERM else EXIT_SIGINT
        print(f"Stopped. Completed epochs are saved; continue with:\n  {_resume_command(chain, out, user_cwd)}",
              file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"Aborted. Completed epochs are saved; continue with:\n  {_resume_command(chain, out, user_cwd)}",
              file=sys.stderr)
        return EXIT_SIGINT
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return EXIT_NAN
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        if lock is not None:
            lock.release()
        if out is not None and not out_existed and ds.is_main:
            _remove_if_unused(out)
        return EXIT_USER
    except Exception as exc:  # an unexpected failure: one line unless --debug
        if args.debug:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: {type(exc).__name__}: {first} (run again with --debug for the traceback)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if lock is not None:
            lock.release()
        dist.shutdown()
        signals.restore_handlers(previous_handlers)


def _resume_command(chain: str, out, cwd: str) -> str:
    """The command that continues this run, as typed from the folder the user started in."""
    script = os.path.relpath(REPO_ROOT / f"{chain}_distillation" / f"train_{chain}.sh", cwd)
    return f"bash {script} --resume {out}"


def _remove_if_unused(out: Path) -> None:
    """A start refused before any training leaves no folder behind (only seeds.json may be in it)."""
    if not out.is_dir():
        return
    from src.utils.runlock import is_bookkeeping
    files = [p for p in out.rglob("*") if p.is_file()]
    if all(p.name == "seeds.json" or is_bookkeeping(p) for p in files):
        import shutil
        shutil.rmtree(out, ignore_errors=True)


def _report(out: Path, log, tensorboard: bool = False) -> None:
    try:
        from src.report import write_report
        path = write_report([out])
        if tensorboard:
            from src.utils.tb import log_figures
            log_figures(out / "tb", sorted((out / "figures").glob("*.png")))
    except Exception as exc:  # the results are on disk already; a figure problem must not fail the run
        from src.distillation.engine import StopRequested
        if isinstance(exc, StopRequested):
            raise
        log.warning(f"⚠️  report not written ({type(exc).__name__}: {exc}); rebuild it with: python -m src.report {out}")
        return
    log.info(f"Report: {path}")


def main(chain: str, default_config: Path) -> None:
    sys.exit(run(sys.argv[1:], chain, default_config))

"""Command line shared by cnn_distillation/train_cnn.py and vit_distillation/train_vit.py.

Only the arguments are read here, with nothing of the toolkit imported, so that --help and a
mistyped option answer at once; the run itself (src/experiment/session.py) turns every
exception into one line and an exit code: 0 done, 1 unexpected error, 2 bad input, 3 non-finite
loss, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from ..utils.signals import die_with_parent  # the standard library only: --help stays instant

REPO_ROOT = Path(__file__).resolve().parents[2]
EXIT_USER = 2


def build_parser(chain: str, default_config: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False,
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
    p.add_argument("--data-source", default=None, metavar="SOURCE",
                   help="where the images come from, a source registered in src/data/sources.py (checked with the "
                        "config): cifar10 / cifar100 / svhn (torchvision, downloaded when online), imagefolder "
                        "(--data-root), digits (scikit-learn's bundled set, offline demos)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=None,
                   help="run seed: initial weights, data order and augmentation of every stage derive from it "
                        "(the validation split is fixed by data.split_seed)")
    p.add_argument("--seeds", type=str, default=None, help="comma-separated seeds, e.g. 0,1,2: the chain once per seed, results as mean ± std")
    p.add_argument("--baselines", action="store_true", help="also train the student from scratch and distilled directly from the teacher")
    p.add_argument("--assistants", default=None, metavar="MODELS",
                   help="assistant sweep: one teacher, one assistant per candidate (distilled from the teacher), one "
                        "student per assistant, plus the scratch and direct-KD students; comma-separated models, "
                        "'a>b' for a two-step path, e.g. --assistants 'resnet34,resnet26,resnet34>resnet26'")
    p.add_argument("--methods", default=None, metavar="METHODS",
                   help="compare methods: beside the KD student(s), one student per method from the same teacher "
                        "(and via each assistant), same seed stream, plus the scratch and direct-KD students; "
                        "comma-separated, e.g. --methods dkd,dist,fitnet,at")
    p.add_argument("--guidance", choices=("single", "dense"), default=None,
                   help="dense: every taught stage learns from all the stages above it (DGKD); default single")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any config value, e.g. --set kd.temperature=2 --set stages.student.epochs=5 (repeatable)")
    p.add_argument("--gpus", type=int, default=None,
                   help=f"train every stage with DistributedDataParallel on N GPUs of this machine (relaunches itself "
                        "under torchrun; N=1 runs one NCCL rank). Or start it directly: torchrun --nproc_per_node N "
                        f"-m {chain}_distillation.train_{chain} [options]. train.batch_size stays the global batch")
    _add_study_options(p)
    p.add_argument("--tensorboard", action="store_true",
                   help="also log to RUN/tb/ for TensorBoard (needs: python -m pip install tensorboard)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress display (on a terminal a bar, elsewhere a line every 30 s)")
    p.add_argument("--no-cpu-advice", action="store_true",
                   help="no advice that a long chain on a CPU is meant for a GPU (for a long CPU run chosen on purpose)")
    p.add_argument("--verbose", action="store_true",
                   help="print the guards' full messages (frozen teacher, checkpointing, cleanup, NaN diagnosis) "
                        "and the planner's probes")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def _add_study_options(p: argparse.ArgumentParser) -> None:
    """Who runs the study's stage jobs, with how many threads each, or only the plan (--dry-run)."""
    p.add_argument("--executor", choices=("serial", "local", "ray"), default=None,
                   help="who runs the study's stage jobs: serial (default: this process, one after another), local "
                        "(--jobs N at once on this machine), ray (a local Ray instance, or a cluster with --ray-address)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="N stage jobs at once on this machine (--executor local; each in its own process)")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="with --executor ray: join this Ray cluster (default: start a local instance)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per stage job (default: this machine's cores); fixed in the plan and kept on "
                        "resume, so that a stage's weights do not depend on the executor. With --jobs N on a CPU, "
                        "cores / N avoids oversubscription")
    p.add_argument("--tune", default=None, metavar="KNOB=LOW:HIGH[:log],...",
                   help="tune knobs of the student on validation before training it (Optuna, TPE, median pruning), e.g. "
                        "'kd.temperature=1:20:log,kd.alpha=0.05:0.95'; then the declared seeds train with the best "
                        "values and test is read once (docs/tuning.md)")
    p.add_argument("--trials", type=int, default=None, metavar="N", help="trials per tuned stage (with --tune)")
    p.add_argument("--tune-each", type=int, default=None, metavar="N",
                   help="the same N trials for every compared student: KD from the teacher and via each assistant, "
                        "and each --methods method, each on its own declared knobs (or --tune's)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="the search's Optuna storage for several machines (postgresql://..., mysql://...); default: "
                        "a journal file in the run folder")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (stage jobs, what each needs, threads and GPU share, estimated time and the "
                        "critical path) and write nothing")


def _relaunch_under_torchrun(argv, chain: str, n: int) -> int:
    """`--gpus N` from a plain process: start N ranks with torchrun on this machine."""
    rest, skip = [], False
    for a in argv:  # drop "--gpus N" / "--gpus=N": the ranks must not relaunch again
        if not skip and a != "--gpus" and not a.startswith("--gpus="):
            rest.append(a)
        skip = a == "--gpus"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", f"{chain}_distillation.train_{chain}", *rest]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)

    def forward(signum, frame):  # the launcher's ranks save their epoch and stop; none is left behind
        proc.send_signal(signum)
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cuda_available() -> bool:
    import torch  # only for --gpus: the rest of the command line stays free of torch's import time
    return torch.cuda.is_available()


def run(argv, chain: str, default_config: Path, own_process: bool = False, resume_command=None) -> int:
    """Parse the arguments (relaunching under torchrun for --gpus N), then run the session.
    `resume_command`: what a stop tells the user to type (a caller's own command, e.g. the
    reproduction's), instead of this chain's --resume line."""
    args = build_parser(chain, default_config).parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        print("error: --gpus must be >= 1", file=sys.stderr)
        return EXIT_USER
    if args.gpus is not None and (args.jobs or args.executor not in (None, "serial")):
        print("error: --gpus trains each stage on several GPUs in one chain; --jobs / --executor spread a study's "
              "stages over workers: choose one", file=sys.stderr)
        return EXIT_USER
    if args.seeds is not None and args.seed is not None:
        print("error: --seeds trains one run per seed and --seed sets one run's seed: give only one "
              f"(e.g. --seeds {args.seeds},{args.seed})", file=sys.stderr)
        return EXIT_USER
    if args.gpus is not None and args.device != "cpu" and not _cuda_available():
        print(f"error: --gpus {args.gpus} needs CUDA GPUs and this machine has none visible (torch.cuda.is_available() "
              f"is False); drop --gpus to train on the CPU (--device cpu --gpus N: N CPU processes, a check of the "
              f"multi-GPU path)", file=sys.stderr)
        return EXIT_USER
    for name in ("jobs", "threads", "trials", "tune_each"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return EXIT_USER
    if args.gpus is not None and "LOCAL_RANK" not in os.environ:  # not yet under torchrun
        return _relaunch_under_torchrun(argv, chain, args.gpus)
    from .session import run_session  # torch and the toolkit: only once the arguments parse
    return run_session(args, chain, own_process, resume_command)


def main(chain: str, default_config: Path) -> None:
    sys.exit(run(sys.argv[1:], chain, default_config, own_process=True))

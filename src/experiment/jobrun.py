"""One stage job in a process of its own: what every executor but `serial` runs per job.

    python -m src.experiment.jobrun --run RUN/seed_0 --stage student_kd --threads 1 --log RUN/logs/seed_0__student_kd.log

The seed's run folder was prepared by the study (config.yaml, plan.json); the job reads its spec
from there, claims its stage folder (a lock of its own: two workers never train one stage),
trains it or continues it from its last checkpoint, and exits with the session's codes: 0 done,
1 unexpected error, 2 bad input, 3 non-finite loss, 130 SIGINT, 143 SIGTERM. Its output goes to
its log file. SIGINT and SIGTERM save the epoch so far, as in a chain.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from ..distillation.chain import run_job
from ..spec.config import load_config
from ..distillation.engine import StopRequested
from ..plan.jobs import StageJob
from ..distillation.stage import StageFailed
from ..runs import runlock
from ..utils import signals
from ..utils.errors import UserError
from ..utils.logger import get_console
from ..runs.runfolder import RunFolder

EXIT_OK, EXIT_ERROR, EXIT_USER, EXIT_NAN, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 3, 130, 143


def job_from_folder(run: Path, stage: str, threads: int, seed=None, job_id: str = "") -> StageJob:
    folder = RunFolder(run)
    return StageJob(id=job_id or stage, seed=seed, stage=stage, cfg=load_config(folder.config_path), run=folder,
                    needs=(), threads=threads)


def run_job_process(run: Path, stage: str, threads: int, log_path: Path, seed=None, job_id: str = "") -> int:
    """Run one job with its output in `log_path` (appended: a retried job keeps its first try's lines)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        sys.stdout = sys.stderr = out
        get_console()  # its handler writes to sys.stdout as it is at each message
        previous = signals.install_handlers(StopRequested)
        lock = None
        try:
            job = job_from_folder(run, stage, threads, seed, job_id)
            lock = runlock.acquire(job.folder.path, f"training stage job {job.id}")
            run_job(job, progress=False, should_stop=lambda: signals.stop_requested() is not None)
            return EXIT_OK
        except StopRequested:
            return EXIT_SIGTERM if signals.stop_requested() == signal.SIGTERM else EXIT_SIGINT
        except StageFailed as exc:
            print(f"error: {exc}", flush=True)
            return EXIT_NAN
        except UserError as exc:
            print(f"error: {exc}", flush=True)
            return EXIT_USER
        except Exception:  # noqa: BLE001 (the job's log keeps the traceback; the study names the log)
            traceback.print_exc()
            return EXIT_ERROR
        finally:
            if lock is not None:
                lock.release()
            signals.restore_handlers(previous)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.experiment.jobrun", allow_abbrev=False,
                                description="train one stage job of a prepared study")
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--id", default="")
    a = p.parse_args(argv)
    return run_job_process(a.run, a.stage, a.threads, a.log, a.seed, a.id)


if __name__ == "__main__":
    sys.exit(main())

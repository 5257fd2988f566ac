"""Who runs a study's stage jobs (src/plan/jobs.py): one interface, three executors.

    serial   (default) this process, the jobs one after another, seed by seed: a chain as always
    local    --jobs N: N jobs at once on this machine, each in a fresh process of its own (the
             standard library's multiprocessing, spawn: a stage's memory goes with its process)
    ray      --executor ray [--ray-address auto|HOST:PORT]: each job a Ray task with its threads
             as num_cpus and its GPU share as num_gpus; no address starts a local instance (no
             server to start by hand), an address joins a running cluster

Every job trains the same way under every executor (src/experiment/jobrun.py, at the thread
count the plan fixed), so a stage's weights do not depend on the executor. A failed job stops
only the jobs that need it; a job whose worker died is tried again (it continues from its last
checkpoint); SIGINT or SIGTERM to the command reaches every running job, each saves its epoch so
far, and the study raises StopRequested once for the session to print one --resume line.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..distillation.engine import StopRequested
from .jobrun import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, run_job_process
from ..plan.jobs import Plan, StageJob
from ..utils import signals
from ..utils.signals import die_with_parent
from ..utils.errors import UserError
from ..utils.logger import get_console

REPO_ROOT = Path(__file__).resolve().parents[2]
RETRIES = 2  # tries after the first for a job whose worker died (killed, out of memory): it resumes
log = get_console()


class JobsFailed(Exception):
    """Some jobs failed: their own exit codes and logs; the jobs that needed them did not run."""

    def __init__(self, failed: dict, skipped: list, code: int):
        self.failed, self.skipped, self.code = failed, skipped, code
        parts = [f"{jid} (exit {c}; log {path})" for jid, (c, path) in failed.items()]
        more = f"; not run, since they need it: {', '.join(skipped)}" if skipped else ""
        super().__init__(f"{len(failed)} stage job(s) failed: {'; '.join(parts)}{more}")


@dataclass
class Outcome:
    """What became of a study's jobs."""
    done: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)   # id -> (exit code, log path)
    skipped: list = field(default_factory=list)
    retried: dict = field(default_factory=dict)  # id -> tries after the first

    def raise_if_failed(self) -> None:
        if self.failed:
            codes = {c for c, _ in self.failed.values()}
            raise JobsFailed(self.failed, self.skipped, codes.pop() if len(codes) == 1 else 1)


def died(code: int) -> bool:
    """An exit by a signal (a stopped job exits 130 or 143 itself): the worker was killed, not the job refused."""
    return code < 0


def _job_args(job: StageJob) -> tuple:
    return (str(job.run.path), job.stage, job.threads, str(job.log), job.seed, job.id)


class Executor:
    """Runs the jobs of `plan` that are not finished, in an order that respects their needs."""
    name = "base"

    def run(self, plan: Plan) -> Outcome:
        raise NotImplementedError

    def close(self) -> None:
        """Give back what the executor holds (a Ray instance it started)."""


class SerialExecutor(Executor):
    """The default: a chain per seed in this process (the session runs it, as always)."""
    name = "serial"


class LocalExecutor(Executor):
    """N jobs at once on this machine: the standard library's multiprocessing, one spawned process
    per job (a stage's memory goes with its process), waited on through their sentinels."""
    name = "local"

    def __init__(self, jobs: int):
        if jobs < 1:
            raise UserError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs

    def run(self, plan: Plan) -> Outcome:
        out, tries, running = Outcome(done=[j.id for j in plan.jobs if j.folder.finished]), {}, {}
        waiting = [j for j in plan.jobs if j.id not in out.done]
        try:
            while waiting or running:
                blocked = set(out.failed) | set(out.skipped)
                for j in [j for j in waiting if set(j.needs) & blocked]:
                    waiting.remove(j)
                    out.skipped.append(j.id)
                for j in [j for j in waiting if set(j.needs) <= set(out.done)][:max(0, self.jobs - len(running))]:
                    waiting.remove(j)
                    running[j.id] = (_start_process(j, self._gpu_for(running)), j)
                if not running:  # nothing runs and nothing can start: what waits can never run
                    out.skipped += [j.id for j in waiting]
                    break
                ended = multiprocessing.connection.wait([proc.sentinel for proc, _ in running.values()])
                for jid in [jid for jid, (proc, _) in running.items() if proc.sentinel in ended]:
                    proc, j = running.pop(jid)
                    proc.join()
                    self._ended(out, tries, waiting, j, proc.exitcode)
        except StopRequested:
            _stop_processes([proc for proc, _ in running.values()])
            raise
        out.retried = tries
        return out

    @staticmethod
    def _gpu_for(running: dict) -> Optional[int]:
        """The GPU of this machine with the fewest running jobs (None without CUDA): jobs spread over the cards."""
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 2:
            return None
        busy = [g for proc, _ in running.values() for g in [getattr(proc, "gpu", None)] if g is not None]
        return min(range(count), key=busy.count)

    @staticmethod
    def _ended(out: Outcome, tries: dict, waiting: list, j: StageJob, code: int) -> None:
        if code == EXIT_OK:
            out.done.append(j.id)
        elif code in (EXIT_SIGINT, EXIT_SIGTERM) or signals.stop_requested():
            raise StopRequested(f"stage job {j.id} stopped")
        elif died(code) and tries.get(j.id, 0) < RETRIES:
            tries[j.id] = tries.get(j.id, 0) + 1
            log.warning(f"⚠️  stage job {j.id}: its process died (signal {-code}); trying again from its last "
                        f"checkpoint ({tries[j.id]} of {RETRIES})")
            waiting.insert(0, j)
        else:
            out.failed[j.id] = (code, j.log)


def _start_process(job: StageJob, gpu: Optional[int] = None):
    proc = multiprocessing.get_context("spawn").Process(target=_process_main, args=(_job_args(job), gpu),
                                                        name=f"job {job.id}")
    proc.start()
    proc.gpu = gpu
    return proc


def _process_main(args: tuple, gpu: Optional[int] = None) -> None:
    """A job's process: its own process group (a terminal's Ctrl-C reaches the study, which passes
    it on once), SIGTERM when the study's process dies (no orphan keeps training), and on a machine
    with several GPUs the one it was given (set before CUDA starts: torch starts it lazily)."""
    os.setpgrp()
    die_with_parent()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    run, stage, threads, log_path, seed, job_id = args
    sys.exit(run_job_process(Path(run), stage, threads, Path(log_path), seed, job_id))


def _stop_processes(procs: list) -> None:
    """Pass the study's stop on to every running job once, as SIGTERM (a job not yet past its
    start ends at once, with nothing to save), and wait while each saves its epoch so far."""
    for proc in procs:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, TypeError):
            pass
    for proc in procs:
        proc.join()


# ---------------------------------------------------------------------------------------------- Ray
class RayExecutor(Executor):
    """Each job a Ray task (num_cpus = its threads, num_gpus = its GPU share) running the job's
    process; a task whose worker died is retried by Ray (max_retries) and resumes."""
    name = "ray"

    def __init__(self, address: Optional[str] = None, _init=None):
        try:
            import ray  # noqa: PLC0415 (optional at import: only this executor needs it, and it is slow to import)
        except ImportError:
            raise UserError("--executor ray needs Ray: python -m pip install 'ray>=2.9'") from None
        self.ray, self.started = ray, False
        if address and address != "auto":
            _check_reachable(address)
        if not ray.is_initialized():
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                               if p)}}
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env,
                         configure_logging=False, **(_init or {}))
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise UserError(f"--executor ray: cannot reach {where}: {str(exc).splitlines()[0]}") from None
            self.started = True

    def check_shared(self, root: Path) -> None:
        """Every alive node writes a probe into the run folder and reads the study's token: a run
        folder that is not on a filesystem all nodes share is refused before anything trains."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415 (Ray only)
        token = uuid.uuid4().hex
        probe = Path(root) / f".shared-probe-{token}"
        probe.write_text(token)
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = {n["NodeManagerAddress"] + ":" + n["NodeID"][:8]: _probe_task.options(
                num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(probe), token) for n in nodes}
            bad = [name for name, ref in refs.items() if not ray.get(ref)]
        finally:
            probe.unlink(missing_ok=True)
        if bad:
            raise UserError(f"--executor ray: the run folder {root} is not shared with node(s) {', '.join(bad)}; "
                            f"put it on a filesystem every node mounts at the same path")

    def run(self, plan: Plan) -> Outcome:
        ray, out = self.ray, Outcome(done=[j.id for j in plan.jobs if j.folder.finished])
        refs = {}
        for j in plan.jobs:
            if j.id in out.done:
                continue
            upstream = [refs[n] for n in j.needs if n in refs]
            task = _ray_job.options(num_cpus=j.threads, num_gpus=j.gpu, max_retries=RETRIES,
                                    retry_exceptions=[WorkerDied])
            refs[j.id] = task.remote(_job_args(j), *upstream)
        try:
            for jid, ref in refs.items():
                self._collect(plan, out, jid, ref)
        except (StopRequested, KeyboardInterrupt):
            for ref in refs.values():
                ray.cancel(ref)  # KeyboardInterrupt in the task: it passes the stop to its job's process
            ray.wait(list(refs.values()), num_returns=len(refs), timeout=120)
            raise
        return out

    def _collect(self, plan: Plan, out: Outcome, jid: str, ref) -> None:
        ray = self.ray
        j = plan.job(jid)
        if set(j.needs) & (set(out.failed) | set(out.skipped)):  # Ray did not run it: an input failed
            out.skipped.append(jid)
            return
        try:
            code = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            code = exc.cause.code if isinstance(exc.cause, (JobExit, WorkerDied)) else 1
        except ray.exceptions.TaskCancelledError:
            raise StopRequested(f"stage job {jid} stopped") from None
        if code == EXIT_OK:
            out.done.append(jid)
        elif code in (EXIT_SIGINT, EXIT_SIGTERM):
            raise StopRequested(f"stage job {jid} stopped")
        else:
            out.failed[jid] = (code, j.log)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """HOST:PORT answers a TCP connection (Ray itself would keep retrying an unreachable head for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({exc}); give the head node's "
                        f"HOST:PORT (ray start --head prints it) or leave --ray-address out for a local instance") from None


class JobExit(Exception):
    def __init__(self, code: int):
        super().__init__(f"exit {code}")
        self.code = code


class WorkerDied(JobExit):
    """The job's process was killed (not stopped): Ray tries the task again, which resumes the stage."""


def _ray_job_fn(args: tuple, *upstream) -> int:
    """One job as a Ray task, started once the jobs it needs returned (`upstream`, their exit codes):
    its process runs jobrun (the same code every executor runs); a cancel passes SIGINT on to it
    and waits while it saves its epoch."""
    run, stage, threads, log_path, seed, job_id = args
    cmd = [sys.executable, "-m", f"{__package__}.jobrun", "--run", run, "--stage", stage, "--threads", str(threads),
           "--log", log_path, "--id", job_id] + (["--seed", str(seed)] if seed is not None else [])
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, start_new_session=True, preexec_fn=die_with_parent)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    if died(code):
        raise WorkerDied(code)
    if code != EXIT_OK and code not in (EXIT_SIGINT, EXIT_SIGTERM):
        raise JobExit(code)
    return code


def _probe_fn(path: str, token: str) -> bool:
    try:
        return Path(path).read_text() == token
    except OSError:
        return False


def _remote(fn):
    """fn as a Ray remote function, made when Ray is first used (importing this module needs no Ray)."""
    state = {}

    class Lazy:
        def options(self, **kw):
            if "fn" not in state:
                import ray  # noqa: PLC0415 (optional: only the Ray executor gets here)
                state["fn"] = ray.remote(fn)
            return state["fn"].options(**kw)
    return Lazy()


_ray_job = _remote(_ray_job_fn)
_probe_task = _remote(_probe_fn)


def make_executor(name: str, jobs: Optional[int], address: Optional[str]) -> Executor:
    """The executor the command line asks for (--executor, --jobs, --ray-address)."""
    if name == "ray":
        return RayExecutor(address)
    if address:
        raise UserError("--ray-address needs --executor ray")
    if name == "local" or (jobs or 1) > 1:
        return LocalExecutor(jobs or 2)
    return SerialExecutor()

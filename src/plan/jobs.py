"""The plan of a study: one stage job per stage of each seed, with the jobs it waits for.

A study (a chain, `--seeds`, `--baselines`, `--assistants`, `--methods`, `--guidance`) is many
small trainings. Its resolved config already names every stage and what teaches it; the plan turns
that into a graph of jobs an executor can run in any order that respects it:

    job        one stage of one seed: `seed_1/student_kd` (or `student_kd` without seeds)
    needs      the jobs whose checkpoints it loads as teachers (same seed)
    folder     its StageFolder, inside its seed's RunFolder
    threads    CPU threads it trains with: fixed in the plan and recorded in jobs.json, so that a
               stage's weights do not depend on the executor (a CPU's float sums follow the
               thread count)
    gpu        the share of one GPU it reserves on CUDA: the planner fits every stage under
               train.vram_budget_gb, so a job needs that much of the card (6 GB of an 80 GB H100:
               0.075, thirteen students at once)

`--dry-run` prints it (jobs, dependencies, resources, estimated time per job and the critical
path) and writes nothing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Optional

from ..spec.config import RunConfig
from ..utils.errors import ConfigError
from ..runs.runfolder import RunFolder, StageFolder


def machine_threads() -> int:
    """The cores this process may use (its CPU affinity, which a container or taskset limits), or
    OMP_NUM_THREADS when it is set."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class StageJob:
    """One stage of one seed, with everything a worker needs to train it."""
    id: str
    seed: Optional[int]
    stage: str
    cfg: RunConfig          # the seed's resolved config: the stage's spec is cfg.stage(stage)
    run: RunFolder          # the seed's run folder
    needs: tuple            # ids of the jobs it loads as teachers
    threads: int
    gpu: float = 0.0

    @property
    def folder(self) -> StageFolder:
        return self.run.stage(self.stage)

    @property
    def log(self):
        """Its output under a parallel executor: SEED_RUN/logs/<stage>.log."""
        return self.run.job_log(self.stage)


@dataclass(frozen=True)
class Plan:
    root: RunFolder
    jobs: tuple             # topological order (a stage's teachers come before it in the config)
    seeds: Optional[tuple]
    threads: int

    def job(self, job_id: str) -> StageJob:
        return next(j for j in self.jobs if j.id == job_id)

    def runs(self) -> list:
        """(seed, RunFolder, RunConfig) of every seed, in order."""
        seen = {}
        for j in self.jobs:
            seen.setdefault(j.run.path, (j.seed, j.run, j.cfg))
        return list(seen.values())

    def dependants(self, job_id: str) -> set:
        """Every job that waits for `job_id`, directly or through another."""
        out, frontier = set(), {job_id}
        while frontier:
            frontier = {j.id for j in self.jobs if set(j.needs) & frontier} - out
            out |= frontier
        return out

    def critical_path(self, seconds: dict) -> tuple[float, list]:
        """(seconds, job ids) of the longest chain of dependent jobs: the least wall time any number of workers needs."""
        best: dict = {}
        for j in self.jobs:
            before = max((best[n] for n in j.needs), key=lambda b: b[0], default=(0.0, []))
            best[j.id] = (before[0] + seconds.get(j.id, 0.0), before[1] + [j.id])
        return max(best.values(), key=lambda b: b[0], default=(0.0, []))

    def record(self) -> dict:
        """What jobs.json keeps: every job's dependencies and resources (resume reads the threads back)."""
        return {"threads": self.threads, "seeds": list(self.seeds) if self.seeds else None,
                "jobs": [{"id": j.id, "stage": j.stage, "seed": j.seed, "needs": list(j.needs), "threads": j.threads,
                          "gpu": j.gpu, "folder": str(j.folder.path.relative_to(self.root.path))} for j in self.jobs]}

    def describe(self, seconds: Optional[dict] = None, duration=lambda s: f"{s:.0f} s") -> str:
        """The graph as a table, with the estimate per job and the critical path when `seconds` is given."""
        seconds = seconds or {}
        width = max(len(j.id) for j in self.jobs)
        lines = [f"{len(self.jobs)} stage jobs in {self.root.path}" + (f" ({len(self.seeds)} seeds)" if self.seeds else ""),
                 f"  {'job':<{width}}  {'threads':>7}  {'gpu':>5}  {'estimate':>10}  needs"]
        for j in self.jobs:
            est = duration(seconds[j.id]) if j.id in seconds else "-"
            lines.append(f"  {j.id:<{width}}  {j.threads:>7}  {j.gpu:>5.3g}  {est:>10}  {', '.join(j.needs) or '-'}")
        if seconds:
            total, path = self.critical_path(seconds)
            lines.append(f"critical path: {duration(total)} ({' -> '.join(path)}); one after another: "
                         f"{duration(sum(seconds.values()))}")
        return "\n".join(lines)


def build_plan(cfg: RunConfig, root: RunFolder, seeds=None, threads: Optional[int] = None,
               gpu_share: float = 0.0) -> Plan:
    """The jobs of a resolved config, once per seed (seed_<n>/ folders) or once."""
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    threads = threads or machine_threads()
    jobs = []
    for seed in (seeds or [None]):
        run_cfg = cfg if seed is None else replace(cfg, seed=seed)
        run = root if seed is None else root.seed_folder(seed)
        prefix = "" if seed is None else f"seed_{seed}/"
        for s in run_cfg.stages:
            jobs.append(StageJob(id=prefix + s.name, seed=seed, stage=s.name, cfg=run_cfg, run=run,
                                 needs=tuple(prefix + t for t in s.teachers), threads=threads, gpu=gpu_share))
    return Plan(root=root, jobs=tuple(jobs), seeds=tuple(seeds) if seeds else None, threads=threads)


def recorded_threads(root: RunFolder) -> Optional[int]:
    """The thread count a run's plan fixed when it started (jobs.json), kept on resume."""
    path = root.file(RunFolder.JOBS)
    try:
        return int(json.loads(path.read_text())["threads"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def gpu_share(budget_gb: float, total_gb: float) -> float:
    """The share of one GPU a job reserves: its planned budget over the card's memory (at most 1)."""
    if total_gb <= 0:
        return 1.0
    return round(min(1.0, max(budget_gb, 0.0) / total_gb), 3) or 1.0

"""One study under each executor: wall time against the critical path, and the same weights.

    python benchmarks/bench_executors.py                       # CPU: a digits study, serial / --jobs 2 / two-node Ray
    python benchmarks/bench_executors.py --gpu --data-root T   # one GPU: eight small students one after another / at once

Every mode trains the same plan under each executor at a fixed thread count per job, checks that
every stage's rank_weight_checksums equal the serial run's, and prints a table: wall time, the
work (the stages' own training and evaluation seconds), the critical path (teacher -> assistant
-> slowest student), the speed-up over serial and the scheduling overhead per job
((wall - max(critical path, work / workers)) / jobs). Ray's mode simulates two nodes of one CPU each
on this machine (ray.cluster_utils.Cluster). On a machine without Ray (the lent GPU's), the GPU
mode compares serial with --jobs 8 (processes sharing the card) instead of Ray's fractional GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

from src.spec.sweep import with_baselines  # noqa: E402
from src.spec.config import load_config  # noqa: E402
from src.plan.jobs import build_plan  # noqa: E402
from src.runs.runfolder import RunFolder  # noqa: E402

DIGITS = """name: bench_executors
seed: 0
deterministic: true
data: {source: digits, image_size: 32, max_train_samples: 1200, max_test_samples: 200, augment: crop_flip, crop_padding: 2}
train: {epochs: 20, batch_size: 32, lr: 0.003, device: cpu}
stages:
  - {name: teacher, model: plain_cnn4, role: teacher}
  - {name: assistant, model: plain_cnn2, role: assistant, teacher: teacher}
  - {name: student, model: plain_cnn2, role: student, teacher: assistant}
"""
GPU = """name: bench_share
seed: 0
deterministic: true
data: {source: imagefolder, root: ROOT, image_size: 32, max_train_samples: 10000, augment: none}
train: {epochs: 3, batch_size: 128, lr: 0.01, device: cuda, vram_budget_gb: 4, compile: "false"}
stages:
  - {name: teacher, model: plain_cnn4, role: teacher}
""" + "".join(f"  - {{name: student_{i}, model: plain_cnn2, role: student, teacher: teacher, seed_stream: s{i}}}\n"
              for i in range(8))


def run(config: Path, out: Path, extra: list) -> float:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("OMP_NUM_THREADS", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--no-cpu-advice",
                           "--config", str(config), "--output-dir", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(extra)}: exit {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def stage_info(out: Path) -> dict:
    """{job id: (checksums, seconds of its own training and evaluation)} from each stage.json."""
    info = {}
    for path in sorted(out.rglob("stage.json")):
        s = json.loads(path.read_text())
        rel = path.parent.relative_to(out)
        info["/".join(rel.parts)] = (s["rank_weight_checksums"], (s.get("train_seconds") or 0) + (s.get("eval_seconds") or 0))
    return info


def measure(config: Path, base: list, modes: list, seeds, work_dir: Path) -> pd.DataFrame:
    rows, reference = [], None
    cfg = with_baselines(load_config(config)) if "--baselines" in base else load_config(config)
    for label, extra, workers, setup in modes:
        out = work_dir / label.replace(" ", "_")
        context = setup() if setup else None
        try:
            wall = run(config, out, base + extra + (["--ray-address", context.address] if context else []))
        finally:
            if context:
                context.shutdown()
        info = stage_info(out)
        reference = reference or info
        same = all(info[k][0] == reference[k][0] for k in reference) and len(info) == len(reference)
        plan = build_plan(cfg, RunFolder(out), seeds, 1)
        seconds = {j.id: reference[j.id][1] for j in plan.jobs}
        crit, _ = plan.critical_path(seconds)
        work = sum(seconds.values())
        ideal = max(crit, work / workers)
        rows.append({"executor": label, "jobs": len(plan.jobs), "workers": workers, "wall_s": round(wall, 1),
                     "work_s": round(work, 1), "critical_path_s": round(crit, 1),
                     "overhead_per_job_s": round((wall - ideal) / len(plan.jobs), 2), "same_weights": same})
    df = pd.DataFrame(rows)
    df["speedup"] = (df["wall_s"].iloc[0] / df["wall_s"]).round(2)
    return df


def markdown(df: pd.DataFrame) -> str:
    rows = [list(map(str, df.columns))] + [[str(v) for v in r] for r in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in [rows[0], ["---"] * len(df.columns), *rows[1:]])


def two_node_cluster():
    from ray.cluster_utils import Cluster  # noqa: PLC0415 (only this mode needs Ray)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()

    class Handle:
        address = cluster.address

        @staticmethod
        def shutdown():
            import ray  # noqa: PLC0415 (only this mode needs Ray)
            ray.shutdown()
            cluster.shutdown()
    return Handle()


def ray_start_seconds(repeats: int = 3) -> list:
    code = ("import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False, configure_logging=False); "
            "ray.get(ray.remote(lambda: 1).remote()); print(time.perf_counter() - t); ray.shutdown()")
    return [round(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()[-1]), 1)
            for _ in range(repeats)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--gpu", action="store_true", help="eight small students on one GPU, serial against --jobs 8")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    p.add_argument("--work", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--csv", type=Path, default=None, help="also write the table here")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_executors-"))
    config = work / "study.yaml"
    work.mkdir(parents=True, exist_ok=True)
    if a.gpu:
        config.write_text(GPU.replace("ROOT", a.data_root))
        base, seeds = ["--threads", "2"], None
        modes = [("serial", [], 1, None), ("local 8", ["--jobs", "8"], 8, None)]
    else:
        config.write_text(DIGITS)
        base, seeds = ["--seeds", "0,1", "--baselines", "--threads", "1"], [0, 1]
        modes = [("serial", [], 1, None), ("local 2", ["--jobs", "2"], 2, None),
                 ("ray 2 nodes x 1 cpu", ["--executor", "ray"], 2, two_node_cluster)]
    table = measure(config, base, modes, seeds, work)
    print(markdown(table))
    if not a.gpu:
        print(f"\nRay local instance, start to first task: {ray_start_seconds()} s")
    if a.csv:
        table.to_csv(a.csv, index=False)
    return 0 if table["same_weights"].all() else 1


if __name__ == "__main__":
    sys.exit(main())

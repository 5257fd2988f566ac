"""Chaos: kill a small deterministic chain with SIGKILL at random moments, resume it each time,
and require that nothing is lost or doubled; then fill the disk under it.

    python benchmarks/chaos.py --kills 200            # about 200 kills (several rounds of the chain)
    python benchmarks/chaos.py --kills 12 --no-disk   # what tests/test_chaos.py runs

Kills land at random times (start-up and planning, mid-epoch, between stages, during the report)
and, on purpose, while a checkpoint or CSV is being written (a *.tmp file exists). After each round
the run must have every epoch exactly once in every CSV, best.pt / last.pt / stage.json that load
and agree, and final weights and CSVs (all but the timing columns) equal to an uninterrupted run's,
bit for bit. The disk part runs the chain in a small tmpfs (where mounting one is allowed): it must
stop with exit 2 and one line, leave no .tmp file, and finish equal to the reference once there is room.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.runs.runfolder import RunFolder, StageFolder  # noqa: E402

TIMING = {"epoch_time_sec", "gpu_memory_mb", "train_seconds", "eval_seconds", "compile_seconds", "img_per_s"}
CONFIG = """name: chaos
seed: 0
deterministic: true
data: {source: digits, image_size: 16, max_train_samples: 120, max_test_samples: 40, augment: crop_flip, crop_padding: 2}
train: {epochs: 3, batch_size: 24, lr: 0.003, device: cpu, warmup_epochs: 0.5}
stages:
  - {name: teacher, model: vit_tiny_patch16_224, patch_size: 8, model_kwargs: {embed_dim: 16, depth: 1, num_heads: 2}}
  - {name: student, model: vit_tiny_patch16_224, patch_size: 8, teacher: teacher, role: student,
     model_kwargs: {embed_dim: 8, depth: 1, num_heads: 2}}
"""


def _start(cfg: Path, run: Path, resume: bool):
    cmd = ["bash", str(ROOT / "cnn_distillation/train_cnn.sh"), "--no-progress"]
    cmd += ["--resume", str(run)] if resume else ["--config", str(cfg), "--output-dir", str(run)]
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def reference(cfg: Path, run: Path) -> float:
    """The uninterrupted run; returns its wall time, from which the kill moments are drawn. The
    interpreter's libraries are read once before (a first start on a cold file cache can take
    several times as long as the restarts after it: moments drawn from that would fall after most
    restarts had finished, and their kills would be missed)."""
    subprocess.run([sys.executable, "-c", "import src.distillation.chain, src.analysis.report"], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    t0 = time.perf_counter()
    proc = _start(cfg, run, False)
    _, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed: {err[-500:]}")
    return time.perf_counter() - t0


def _trigger(run: Path, kind: str) -> bool:
    try:
        if kind == "write":  # a checkpoint or CSV being written
            return any(run.rglob("*.tmp"))
        if kind == "between":  # a stage just finished
            return any(run.rglob(StageFolder.SUMMARY)) and not RunFolder(run).finished
        if kind == "report":
            return RunFolder(run).finished
    except OSError:  # the folder appears (or a probe file goes) while it is being listed
        return False
    return False


def chaos_round(cfg: Path, run: Path, kills_wanted: int, wall: float, rng: random.Random) -> dict:
    """Run the chain into `run`, killing it until it finishes; returns {kills, restarts, kinds}."""
    kills, kinds, resume = 0, {}, False
    while True:
        proc = _start(cfg, run, resume)
        kind = rng.choice(["time", "time", "write", "between", "report"]) if kills < kills_wanted else "none"
        deadline = time.perf_counter() + rng.uniform(0.2, wall * 0.8)
        killed = False
        while proc.poll() is None:
            if kind != "none" and (time.perf_counter() >= deadline or _trigger(run, kind)):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed = True
                break
            time.sleep(0.002)
        resume = RunFolder(run).config_path.exists()  # killed before the config was saved: start again, as a user would
        if killed:
            kills += 1
            kinds[kind] = kinds.get(kind, 0) + 1
            continue
        err = proc.stderr.read() if proc.stderr else ""
        if proc.returncode != 0:
            raise AssertionError(f"run failed after {kills} kills (exit {proc.returncode}): {err.strip()[-800:]}")
        if not (run / "report.md").exists():  # the report's failure is a warning, not an exit code: show it
            raise AssertionError(f"no report.md after {kills} kills: {err.strip()[-800:]}")
        return {"kills": kills, "kinds": kinds}


def _csv_rows(path: Path):
    from src.utils.logger import REQUIRED_COLUMNS, read_epoch_csv, terms_columns_of
    cols = terms_columns_of(path) if path.name == StageFolder.TERMS else REQUIRED_COLUMNS
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_epoch_csv(path, cols)]


def verify(run: Path, ref: Path, epochs: int = 3) -> None:
    """Every CSV has each epoch once; checkpoints load and agree; weights and CSVs equal the reference's."""
    import json

    import torch

    from src.utils.checkpoint import safe_load
    assert not list(run.rglob("*.tmp")), f"left-over temporary files: {list(run.rglob('*.tmp'))}"
    for stage in ("teacher", "student"):
        d, r = RunFolder(run).stage(stage).path, RunFolder(ref).stage(stage).path
        steps = (d / StageFolder.SCHEDULE).read_text()  # every optimizer step once, with the LR it used
        assert steps == (r / StageFolder.SCHEDULE).read_text(), f"{stage}/{StageFolder.SCHEDULE} differs from the uninterrupted run"
        for name in (StageFolder.EPOCH_LOG, StageFolder.TERMS):
            rows = _csv_rows(d / name)  # read_epoch_csv refuses a missing or repeated epoch
            assert [int(x["epoch"]) for x in rows] == list(range(1, epochs + 1)), (stage, name)
            ref_rows = _csv_rows(r / name)
            same = all(a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]) for k in a)
                       for a, b in zip(rows, ref_rows))
            assert same, f"{stage}/{name} differs from the uninterrupted run"
        best, last = safe_load(d / StageFolder.BEST), safe_load(d / StageFolder.LAST)
        info = json.loads((d / StageFolder.SUMMARY).read_text())
        assert last["epoch"] == epochs and best["epoch"] == info["best_epoch"] == last["best_epoch"], stage
        for key, ck in (("best", best), ("last", last)):
            ref_ck = safe_load(r / (StageFolder.BEST if key == "best" else StageFolder.LAST))
            assert (ck["model"] is None) == (ref_ck["model"] is None), f"{stage}/{key}.pt: slimmed in one run only"
            for k, v in (ck["model"] or {}).items():
                assert torch.equal(v, ref_ck["model"][k]), f"{stage}/{key}.pt: {k} differs from the uninterrupted run"
        ours, ref_w = StageFolder(d).state_dict(), StageFolder(r).state_dict()  # the best weights, wherever kept
        assert all(torch.equal(ours[k], ref_w[k]) for k in ref_w), f"{stage}: best weights differ from the uninterrupted run"
    assert RunFolder(run).finished and (run / "report.md").exists()


def disk_full(cfg: Path, ref: Path, work: Path) -> str:
    """The chain in a tmpfs too small for it: exit 2 with one line, nothing half-written; then room, resume."""
    mnt = work / "small_disk"
    mnt.mkdir(parents=True, exist_ok=True)
    need = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file() and "figures" not in p.parts)
    size_kb = max(64, int(need * 0.5 / 1024))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        return "skipped: no tmpfs here (the simulated ENOSPC tests in tests/test_faults.py cover a full disk)"
    try:
        run = mnt / "run"
        proc = _start(cfg, run, False)
        _, err = proc.communicate(timeout=600)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert proc.returncode == 2, f"full disk: exit {proc.returncode}, expected 2: {err[-500:]}"
        assert len(lines) == 1 and "could not write" in lines[0] and "Traceback" not in err, err
        assert not list(run.rglob("*.tmp")), "a .tmp file holds the space after the failure"
        subprocess.run(["mount", "-o", f"remount,size={need * 4 // 1024 + 4096}k", str(mnt)], check=True)
        proc = _start(cfg, run, True)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"resume after freeing space failed: {err[-500:]}"
        verify(run, ref)
        return f"ok: stopped at {size_kb} KiB with '{lines[0][:90]}...', resumed to the reference"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--kills", type=int, default=200, help="total SIGKILLs, over as many rounds as needed")
    p.add_argument("--per-round", type=int, default=10, help="kills before a round is let finish")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-disk", action="store_true", help="skip the full-disk part")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "chaos.yaml"
    cfg.write_text(CONFIG)
    ref = work / "reference"
    shutil.rmtree(ref, ignore_errors=True)
    wall = reference(cfg, ref)
    print(f"reference run: {wall:.1f}s")
    rng = random.Random(args.seed)
    total, rounds, kinds = 0, 0, {}
    while total < args.kills:
        run = work / f"round_{rounds}"
        shutil.rmtree(run, ignore_errors=True)
        res = chaos_round(cfg, run, min(args.per_round, args.kills - total), wall, rng)
        verify(run, ref)
        total += res["kills"]
        rounds += 1
        for k, v in res["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
        print(f"round {rounds}: {res['kills']} kills survived ({res['kinds']}); total {total}", flush=True)
        shutil.rmtree(run, ignore_errors=True)
    print(f"survived {total} SIGKILLs in {rounds} rounds: every CSV complete, checkpoints consistent, "
          f"weights and logs equal to the uninterrupted run. Kill moments: {kinds}")
    if not args.no_disk:
        print(f"full disk: {disk_full(cfg, ref, work)}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A student taught by a loaded teacher: its teacher's logits computed (cold) or read from
teacher_logits/ beside the checkpoint (warm), with the same weights either way.

    python benchmarks/bench_teacher_logits.py --checkpoint RUN/teacher/best.pt --model plain_cnn10 \\
        --data-root ../shared/data/cifar10-jpeg.tar.gz --threads 1

A search's trials and a reproduction's seeds are such students: each used to compute the tables
itself. Four runs of one student stage (`--epochs`, default 1): cold, cold, warm, warm (the
cache folder is removed before each cold run; the first run may also decode the images into the
data cache). The table: the seconds the teacher's logits took (stage.json's
teacher_cache_seconds), the stage's own training seconds, the process's wall time, and whether the
student's rank_weight_checksums equal the first cold run's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.runs.runfolder import StageFolder  # noqa: E402

CONFIG = """name: bench_teacher_logits
seed: 0
deterministic: true
data: {{source: imagefolder, root: {root}, image_size: 32, augment: none}}
train: {{epochs: {epochs}, batch_size: 128, lr: 0.01, device: {device}, compile: "false"}}
stages:
  - {{name: teacher, model: {model}, role: teacher, checkpoint: {checkpoint}}}
  - {{name: student, model: {student}, role: student, teacher: teacher}}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--checkpoint", type=Path, required=True, help="a finished teacher stage's best.pt")
    ap.add_argument("--model", required=True, help="the teacher's model name (e.g. plain_cnn10)")
    ap.add_argument("--student", default="plain_cnn2")
    ap.add_argument("--data-root", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None, help="where the four runs go (default: a temporary folder)")
    args = ap.parse_args(argv)
    if not (args.checkpoint.parent / StageFolder.SUMMARY).is_file():
        print(f"error: {args.checkpoint} is not in a finished stage folder (no {StageFolder.SUMMARY} beside it)",
              file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_logits_"))
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(CONFIG.format(root=args.data_root.resolve(), epochs=args.epochs, device=args.device,
                                    model=args.model, checkpoint=args.checkpoint.resolve(), student=args.student))
    cache = args.checkpoint.parent / StageFolder.TEACHER_LOGITS
    rows, first = [], None
    for i, kind in enumerate(("cold", "cold", "warm", "warm")):
        if kind == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        out = work / f"run{i}"
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--no-cpu-advice",
                               "--threads", str(args.threads), "--config", str(config), "--output-dir", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print((proc.stdout + proc.stderr)[-3000:], file=sys.stderr)
            return 1
        info = json.loads((out / "student" / StageFolder.SUMMARY).read_text())
        first = first or info["rank_weight_checksums"]
        read = "read from teacher_logits/" in proc.stdout + proc.stderr
        rows.append((i + 1, kind, "read" if read else "computed", info["teacher_cache_seconds"], info["train_seconds"],
                     wall, info["rank_weight_checksums"] == first))
    print(f"\n{args.model} -> {args.student}, {args.epochs} epoch(s), {args.threads} thread(s), {args.device}\n")
    print("| run | cache | teacher logits | logits (s) | training (s) | wall (s) | same weights |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {'yes' if r[6] else 'NO'} |")
    return 0 if all(r[6] for r in rows) and [r[2] for r in rows] == ["computed", "computed", "read", "read"] else 1


if __name__ == "__main__":
    sys.exit(main())

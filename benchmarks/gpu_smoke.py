"""The GPU smoke test: every CUDA path of the product in one run of about five minutes.

    bash benchmarks/gpu_session.sh smoke          # the first thing to run whenever a GPU is at hand
    python benchmarks/gpu_smoke.py --data-root .gpu_carry/cifar10-jpeg.tar.gz --out DIR [--record RESULTS.md]

Steps, each one or more rows of the closing table (stage, micro-batch, checkpointing, compile,
peak reserved GiB, img/s, result); any failure makes the exit code 1:
  tests     every CUDA-only test (pytest -m gpu): none may fail or be skipped; among them the
            compile probe and a compiled chain, and the sync count of a training epoch
  cnn       ResNet-50 -> 34 -> 18, one epoch on the full CIFAR-10 JPEG tree (planner; compile=auto,
            which leaves a one-epoch stage eager: too short to win back a compilation)
  vit       ViT-B -> S -> Ti, one epoch on the same data (checkpointing, attention maps on CUDA)
  224px     each stage of both 224-px pretrained presets, random weights: planned under the
            6 GiB cap, then a few engine steps
  ddp       --gpus 1: the chain under torchrun, one NCCL rank
  fp16      train.amp_dtype=fp16: the fp16 + GradScaler path of Turing cards, forced here
  clean     clean.sh on CUDA
`--cpu` runs the same plumbing on a CPU with tiny data and models (for the test suite).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.runs.runfolder import RunFolder  # noqa: E402

import pandas as pd  # noqa: E402

TABLE = ["step", "stage", "micro_batch", "checkpointing", "compile", "peak_reserved_gib", "img_per_s", "seconds", "result"]


def _sh(cmd: list, timeout: float, log: Path) -> tuple[int, str]:
    """Run a command, log its output, return (exit code, last error-looking line)."""
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        log.write_text(f"$ {' '.join(map(str, cmd))}\nTIMEOUT after {timeout:.0f}s\n{exc.stdout or ''}{exc.stderr or ''}")
        return 124, f"timed out after {timeout:.0f}s"
    log.write_text(f"$ {' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}")
    lines = [ln for ln in (res.stderr or res.stdout).splitlines() if ln.strip()]
    return res.returncode, (lines[-1][:160] if lines else "")


def _stage_rows(step: str, run: Path, code: int, note: str, seconds: float) -> list:
    rows = []
    order = json.loads((run / "plan.json").read_text()) if (run / "plan.json").exists() else {}
    for name in order:
        sj = RunFolder(run).stage(name).summary_file
        if not sj.exists():
            continue
        s = json.loads(sj.read_text())
        rows.append({"step": step, "stage": f"{s['stage']} ({s['model']})", "micro_batch": s["micro_batch"],
                     "checkpointing": s["grad_checkpointing"], "compile": s.get("compile", False),
                     "peak_reserved_gib": round(s["peak_gpu_memory_mb"] / 1024, 2), "img_per_s": round(s["img_per_s"]),
                     "seconds": round(seconds), "result": "ok" if code == 0 else f"FAIL: {note}"})
    if code != 0 or not rows:
        rows.append({"step": step, "stage": "(run)", "seconds": round(seconds),
                     "result": "ok" if code == 0 and rows else f"FAIL (exit {code}): {note or 'no stage finished'}"})
    return rows


def chain_step(step: str, chain: str, out: Path, args, extra: list, timeout: float) -> list:
    run = out / step
    cmd = ["bash", f"{chain}_distillation/train_{chain}.sh", "--no-progress", "--output-dir", str(run), *extra]
    t0 = time.perf_counter()
    code, note = _sh(cmd, timeout, out / f"{step}.log")
    rows = _stage_rows(step, run, code, note, time.perf_counter() - t0)
    if code == 0 and step == "ddp":  # it really ran as a rank of a process group
        backend = json.loads((run / "env.json").read_text()).get("distributed_backend")
        want = "gloo" if args.cpu else "nccl"
        if backend != want:
            rows.append({"step": step, "stage": "process group", "result": f"FAIL: backend {backend}, expected {want}"})
    if code == 0 and chain == "vit":  # attention maps drawn from a CUDA model
        pngs = list(run.rglob("attention/*.png"))
        if len(pngs) < 3:
            rows.append({"step": step, "stage": "attention maps", "result": f"FAIL: {len(pngs)} PNGs"})
    return rows


def data_args(args) -> list:
    if args.cpu:
        return ["--data-source", "digits", "--device", "cpu", "--set", "data.max_train_samples=120",
                "--set", "data.max_test_samples=40"]
    return ["--data-source", "imagefolder", "--data-root", str(args.data_root), "--device", "cuda"]


def small_chain_config(out: Path, args) -> Path:
    """Two ResNet-18 stages on a slice of the data: for the DDP and fp16 steps."""
    import yaml
    cfg = {"name": "smoke_small", "seed": 0, "deterministic": False,
           "data": {"max_train_samples": 120 if args.cpu else 4000, "max_test_samples": 40 if args.cpu else 1000},
           "train": {"epochs": 1, "batch_size": 32 if args.cpu else 256, "lr": 0.002, "compile": "false"},
           "stages": [{"name": "teacher", "model": "resnet18", "cifar_stem": True},
                      {"name": "student", "model": "resnet18", "cifar_stem": True, "teacher": "teacher", "role": "student"}]}
    path = out / "smoke_small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def presets_224(out: Path, args) -> list:
    """Every stage of both pretrained presets at 224 px, random weights, planned under the cap."""
    from benchmarks import bench_stages
    bargs = bench_stages.parse_args(["--resolutions", "224", "--steps", "2" if args.cpu else "5", "--no-bare",
                                     "--no-baseline", "--no-compile"] + (["--tiny"] if args.cpu else []))
    rows = []
    t0 = time.perf_counter()
    try:
        df = bench_stages.run(bargs)
    except Exception as exc:  # one failing stage fails the step; the table says which exception
        return [{"step": "224px", "stage": "(run)", "seconds": round(time.perf_counter() - t0),
                 "result": f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}]
    for _, r in df.iterrows():
        ok = r["peak_reserved_gib"] <= bargs.budget_gb - 0.5 + 1e-9
        rows.append({"step": "224px", "stage": f"{r['chain']} {r['stage']} ({r['model']})", "micro_batch": r["micro_batch"],
                     "checkpointing": r["grad_ckpt"], "compile": r["compile"], "peak_reserved_gib": r["peak_reserved_gib"],
                     "img_per_s": round(r["img_per_s"]), "seconds": round(time.perf_counter() - t0),
                     "result": "ok" if ok else "FAIL: over 5.5 GiB"})
    return rows


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--data-root", type=Path, default=ROOT / ".gpu_carry" / "cifar10-jpeg.tar.gz")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_smoke")
    p.add_argument("--steps", default="tests,cnn,vit,224px,ddp,fp16,clean")
    p.add_argument("--budget-s", type=float, default=330.0, help="steps not started by then are reported as not run")
    p.add_argument("--record", type=Path, default=None, help="write the table into this RESULTS.md")
    p.add_argument("--cpu", action="store_true", help="the plumbing on a CPU with tiny data (for the test suite)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # after the arguments: --help needs no torch
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device visible; gpu_smoke.py checks the GPU path (use --cpu for the plumbing)", file=sys.stderr)
        return 2
    if not args.cpu and not args.data_root.exists():
        print(f"error: {args.data_root} not found: copy ../shared/data/cifar10-jpeg.tar.gz there", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows = run_steps(smoke_steps(args.out, args), args, t_start)
    if not args.cpu:
        rows.extend(fp16_check(args.out))
    return write_table(rows, args, time.perf_counter() - t_start)


def smoke_steps(out: Path, args) -> dict:
    """{step name: a callable returning its table rows}."""
    small = small_chain_config(out, args)
    # On a CPU (the suite's plumbing check) a slow or busy machine must not fail it: ten times the GPU's limits,
    # and no overall budget. On the GPU the limits keep the smoke inside its few minutes.
    slack = 10 if args.cpu else 1
    if args.cpu:
        args.budget_s = float("inf")
    tiny_cnn = ["--config", "cnn_distillation/configs/demo.yaml", "--set", "data.image_size=16"] if args.cpu else []
    tiny_vit = ["--config", "vit_distillation/configs/demo.yaml"] if args.cpu else []
    return {
        "tests": lambda: test_step(out, args),
        "cnn": lambda: chain_step("cnn", "cnn", out, args, tiny_cnn + data_args(args) + ["--epochs", "1"], 200 * slack),
        "vit": lambda: chain_step("vit", "vit", out, args, tiny_vit + data_args(args) +
                                  ["--epochs", "1", "--set", "train.compile=false", "--set", "viz.attention_every=1"], 200 * slack),
        "224px": lambda: presets_224(out, args),
        "ddp": lambda: chain_step("ddp", "cnn", out, args, ["--config", str(small), "--gpus", "1"] + data_args(args), 150 * slack),
        "fp16": lambda: chain_step("fp16", "cnn", out, args, ["--config", str(small), "--set", "train.amp_dtype=fp16"]
                                   + data_args(args), 120 * slack),
        "clean": lambda: clean_step(out),
    }


def run_steps(steps: dict, args, t_start: float) -> list:
    """The asked-for steps in order; those not started within the time budget are rows saying so."""
    rows = []
    for name in args.steps.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"step": name, "result": f"NOT RUN: time budget {args.budget_s:.0f}s spent"})
            continue
        print(f"[{time.perf_counter() - t_start:5.0f}s] {name} ...", flush=True)
        rows.extend(steps[name]())
    return rows


def write_table(rows: list, args, total: float) -> int:
    """Print the table, write it to OUT/smoke.md (and --record); 1 when any row failed."""
    import torch
    df = pd.DataFrame(rows).reindex(columns=TABLE)
    for col in ("micro_batch", "img_per_s", "seconds"):
        df[col] = pd.to_numeric(df[col]).round().astype("Int64")
    failed = ~df["result"].astype(str).str.startswith("ok")
    header = (f"GPU smoke {_dt.date.today().isoformat()}: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}, "
              f"torch {torch.__version__}, total {total:.0f}s, {'FAILED: ' + str(int(failed.sum())) + ' row(s)' if failed.any() else 'all ok'}")
    shown = df.astype(object).where(df.notna(), "")
    table = shown.to_string(index=False)
    print(f"\n{header}\n{table}")
    (args.out / "smoke.md").write_text(f"{header}\n\n```\n{table}\n```\n")
    if args.record:
        from benchmarks.bench_stages import write_results_md
        write_results_md(shown, args.record, marker="smoke", columns=TABLE)
        text = args.record.read_text().replace("<!-- smoke:begin -->", f"<!-- smoke:begin -->\n{header}\n", 1)
        args.record.write_text(text)
    return 1 if failed.any() else 0


def test_step(out: Path, args) -> list:
    t0 = time.perf_counter()
    code, note = _sh([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/"], 240, out / "tests.log")
    text = (out / "tests.log").read_text()
    skipped = "skipped" in text.splitlines()[-1] if text.strip() else True
    ok = code == 0 and (args.cpu or not skipped)
    return [{"step": "tests", "stage": "pytest -m gpu", "seconds": round(time.perf_counter() - t0),
             "result": "ok" if ok or (args.cpu and code == 5) else f"FAIL (exit {code}): {note}"}]


def clean_step(out: Path) -> list:
    t0 = time.perf_counter()
    code, note = _sh(["bash", "cnn_distillation/clean.sh"], 60, out / "clean.log")
    text = (out / "clean.log").read_text()
    ok = code == 0 and ("GPU 0" in text or "No CUDA device visible" in text)
    return [{"step": "clean", "stage": "clean.sh", "seconds": round(time.perf_counter() - t0),
             "result": "ok" if ok else f"FAIL (exit {code}): {note}"}]


def fp16_check(out: Path) -> list:
    """The fp16 step really took the GradScaler path."""
    stage = RunFolder(out / "fp16").stage("teacher").summary_file
    if not stage.exists():
        return []
    precision = json.loads(stage.read_text()).get("precision")
    return [] if precision == "fp16" else [{"step": "fp16", "stage": "precision", "result": f"FAIL: ran {precision}"}]


if __name__ == "__main__":
    sys.exit(main())

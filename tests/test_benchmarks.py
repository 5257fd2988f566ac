"""The benchmark scripts run end to end at tiny sizes on CPU (their numbers only mean something on a GPU)."""
import subprocess
import sys

import pandas as pd

from tests.conftest import ROOT


def test_bench_stages_tiny_writes_the_csv(tmp_path):
    out = tmp_path / "stages.csv"
    # the ViT chain takes the same path; compiled training: tests/test_compile.py
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_stages.py"), "--tiny", "--steps", "1",
                          "--chains", "cnn", "--resolutions", "32", "--no-compile", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(out)
    assert list(df.columns) == ["chain", "stage", "model", "teacher", "image_size", "micro_batch", "grad_ckpt", "compile",
                                "peak_reserved_gib", "img_per_s", "bare_img_per_s", "engine_vs_bare",
                                "baseline_img_per_s", "speedup", "mfu", "gpu", "torch", "date"]
    assert len(df) == 3 and (df["img_per_s"] > 0).all() and (df["baseline_img_per_s"] > 0).all()
    assert (df["bare_img_per_s"] > 0).all()
    # the CSV rounds img/s to 0.1 and the ratio to 0.001: at a few img/s the rounding alone moves the
    # ratio of the rounded columns, so the check allows exactly what the rounding can do, not a speed
    ratio = df["img_per_s"] / df["bare_img_per_s"]
    rounding = 0.0005 + ratio * (0.05 / df["img_per_s"] + 0.05 / df["bare_img_per_s"]) * 1.01
    assert ((df["engine_vs_bare"] - ratio).abs() <= rounding).all(), df[["img_per_s", "bare_img_per_s", "engine_vs_bare"]]
    assert list(df["teacher"].fillna("")) == ["", "resnet50", "resnet34"]


def test_bench_accuracy_appends_rows(tmp_path):
    out = tmp_path / "acc.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_accuracy.py"), "--chains", "cnn", "--data-source", "digits",
           "--epochs", "1", "--max-train-samples", "40", "--image-size", "8", "--runs", str(tmp_path / "runs"),
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(out)
    from benchmarks.bench_accuracy import COLUMNS
    assert list(df.columns) == COLUMNS
    assert list(df["role"]) == ["teacher", "assistant", "student"]
    split = df[["data_s", "planning_s", "compile_s", "training_s", "evaluation_s", "report_s", "other_s"]].iloc[0]
    assert (split >= -0.5).all() and df["training_s"].iloc[0] > 0 and df["report_s"].iloc[0] > 0
    assert abs(split.sum() / 60 - df["chain_minutes"].iloc[0]) < 0.02  # the split adds up to the wall clock


def test_gpu_smoke_plumbing_runs_on_cpu(tmp_path):
    """The GPU smoke script's steps, on a CPU with tiny data: the same commands, table and exit code
    (ddp and fp16 mean nothing on a CPU; tests/test_distributed.py runs two gloo ranks)."""
    out = tmp_path / "smoke"
    record = tmp_path / "RESULTS.md"
    record.write_text("# Benchmark results\n\n<!-- smoke:begin -->\nold\n<!-- smoke:end -->\n")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_smoke.py"), "--cpu", "--out", str(out),
                          "--steps", "cnn,clean", "--record", str(record)],
                         capture_output=True, text=True, timeout=3600)  # ten times its time on a busy 2-core machine
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = (out / "smoke.md").read_text()
    for step in ("cnn", "clean"):
        assert any(line.split()[:1] == [step] and line.rstrip().endswith("ok") for line in table.splitlines()), step
    text = record.read_text()
    assert "old" not in text and "GPU smoke" in text and "clean.sh" in text


def test_profile_stage_writes_trace_tables_and_summary(tmp_path):
    """The profiler pass on one stage (R18 <- R34 stand-ins on a CPU): summary per step, operator
    tables, a gzipped Chrome trace; the unprofiled speed is measured apart from the profiled epoch."""
    import gzip
    import json
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/profile_stage.py"), "--tiny", "--device", "cpu",
                          "--steps", "3", "--no-compile", "--out", str(tmp_path)],  # compiling: test_compile.py
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "cnn16_student_summary.json").read_text())
    assert summary["steps"] == 3 and summary["model"] == "resnet18" and summary["teacher"] == "resnet34"
    assert summary["img_per_s_unprofiled"] > 0 and summary["wall_ms_per_step"] > 0
    assert summary["syncs_per_step"] == 0 and summary["launches_per_step"] == 0  # no CUDA here
    trace = json.loads(gzip.open(tmp_path / "cnn16_student_trace.json.gz").read())
    assert any(e.get("name") == "aten::convolution" for e in trace["traceEvents"])
    ops = (tmp_path / "cnn16_student_ops.txt").read_text()
    assert "top operators by host time" in ops and "aten::" in ops
    assert "wall_ms_per_step" in res.stdout and "host_reads_per_step" in res.stdout


def test_bench_teacher_logits_computes_then_reads_with_the_same_weights(tmp_path):
    """Cold, cold, warm, warm: the teacher's logits computed twice, then read twice, the student's
    weights the same every time (the script's exit code says so, and its table)."""
    from tests.test_tuning import make_tree
    tree = make_tree(tmp_path / "tree", corrupt_test=False)
    config = tmp_path / "teacher.yaml"
    config.write_text(f"""name: t
seed: 0
data: {{source: imagefolder, root: {tree}, image_size: 32, augment: none}}
train: {{epochs: 1, batch_size: 32, lr: 0.003, device: cpu}}
stages:
  - {{name: teacher, model: plain_cnn4, role: teacher}}
""")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cnn_distillation.train_cnn", "--no-progress", "--threads", "1",
                           "--config", str(config), "--output-dir", str(run)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_teacher_logits.py"), "--checkpoint",
                           str(run / "teacher" / "best.pt"), "--model", "plain_cnn4", "--data-root", str(tree),
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [r.split("|")[2].strip() + "/" + r.split("|")[3].strip() for r in rows] == [
        "cold/computed", "cold/computed", "warm/read", "warm/read"]
    assert all(r.rstrip(" |").endswith("yes") for r in rows)

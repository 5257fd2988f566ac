"""The benchmark scripts run end to end at tiny sizes on CPU (their numbers only mean something on a GPU)."""
import subprocess
import sys

import pandas as pd

from tests.conftest import ROOT


def test_bench_stages_tiny_writes_the_csv(tmp_path):
    out = tmp_path / "stages.csv"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_stages.py"), "--tiny", "--steps", "1",
                          "--resolutions", "32", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(out)
    assert list(df.columns) == ["chain", "stage", "model", "teacher", "image_size", "micro_batch", "grad_ckpt",
                                "peak_reserved_gib", "img_per_s", "baseline_img_per_s", "speedup", "mfu", "gpu",
                                "torch", "date"]
    assert len(df) == 6 and (df["img_per_s"] > 0).all() and (df["baseline_img_per_s"] > 0).all()
    assert list(df["teacher"].fillna("")) == ["", "resnet50", "resnet34", "", "vit_base_patch16_224", "vit_small_patch16_224"]


def test_bench_accuracy_appends_rows(tmp_path):
    out = tmp_path / "acc.csv"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_accuracy.py"), "--chains", "cnn", "--data-source", "digits",
           "--epochs", "1", "--max-train-samples", "40", "--image-size", "8", "--runs", str(tmp_path / "runs"),
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    df = pd.read_csv(out)
    assert list(df.columns) == ["chain", "model", "role", "epochs", "val_acc", "test_acc", "train_minutes", "gpu", "date"]
    assert list(df["role"]) == ["teacher", "assistant", "student"]

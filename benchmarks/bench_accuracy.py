"""Accuracy of both default chains trained from scratch on CIFAR-10 (the JPEG tree), appended to
benchmarks/results/accuracy.csv with the GPU, the time taken and the date.

    python benchmarks/bench_accuracy.py --data-root ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/bench_accuracy.py --chains cnn --epochs 40
Targets (H100 under the 6 GiB cap): ResNet-18 student >= 92.5% test accuracy and ViT-Tiny student
>= 82%, each whole chain in under 8 minutes.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from src.distillation.chain import run_chain  # noqa: E402
from src.distillation.config import load_config  # noqa: E402

COLUMNS = ["chain", "model", "role", "epochs", "val_acc", "test_acc", "train_minutes", "gpu", "date"]
PRESETS = {"cnn": "cnn_distillation/configs/cifar10.yaml", "vit": "vit_distillation/configs/cifar10.yaml"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", default="cnn,vit")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"),
                   help="ImageFolder tree or its .tar.gz (default: ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--data-source", default="imagefolder")
    p.add_argument("--epochs", type=int, default=None, help="override every stage's epochs")
    p.add_argument("--max-train-samples", type=int, default=None, help="subsample (smoke tests)")
    p.add_argument("--image-size", type=int, default=None, help="override (smoke tests)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_accuracy")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/accuracy.csv")
    args = p.parse_args(argv)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    for chain in args.chains.split(","):
        cfg = load_config(ROOT / PRESETS[chain])
        data = replace(cfg.data, source=args.data_source, root=args.data_root,
                       max_train_samples=args.max_train_samples, image_size=args.image_size or cfg.data.image_size)
        train = replace(cfg.train, epochs=args.epochs or cfg.train.epochs)
        stages = [replace(s, epochs=args.epochs) if args.epochs else s for s in cfg.stages]
        cfg = replace(cfg, data=data, train=train, stages=stages)
        t0 = time.perf_counter()
        df = run_chain(cfg, args.runs / f"{chain}-{stamp}", progress=True)
        total = (time.perf_counter() - t0) / 60
        for _, r in df.iterrows():
            rows.append({"chain": chain, "model": r["model"], "role": r["role"], "epochs": int(r["epochs"]),
                         "val_acc": round(float(r["val_accuracy"]), 4), "test_acc": round(float(r["test_accuracy"]), 4),
                         "train_minutes": round(float(r["train_seconds"]) / 60, 2), "gpu": gpu,
                         "date": _dt.date.today().isoformat()})
        print(f"{chain}: whole chain {total:.1f} min (data, planning and evaluation included)")
    new = pd.DataFrame(rows, columns=COLUMNS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    new.to_csv(args.out, mode="a", header=not args.out.exists(), index=False)
    print(new.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

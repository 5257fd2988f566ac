"""Accuracy and whole-chain time of both default chains trained from scratch on CIFAR-10 (the JPEG
tree), appended to benchmarks/results/accuracy.csv with the GPU, the recipe and the date.

    python benchmarks/bench_accuracy.py --data-root ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/bench_accuracy.py --chains cnn --epochs 40 --set train.batch_size=512
Each row is one stage of one try; chain_minutes is the wall clock of the whole try (data,
planning, compilation, training, evaluation and the report), split into the *_s columns.
Targets (H100 under the 6 GiB cap): ResNet-18 student >= 92.5% test in under 6 minutes; ViT-Tiny
student >= 82% in under 8 minutes; teacher >= assistant >= student; TAKD student above scratch.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from src.distillation.chain import run_chain  # noqa: E402
from src.spec.sweep import with_baselines  # noqa: E402
from src.spec.config import load_config  # noqa: E402
from src.analysis.report import write_report  # noqa: E402

COLUMNS = ["chain", "stage", "model", "role", "method", "epochs", "val_acc", "test_acc", "train_minutes", "chain_minutes",
           "data_s", "planning_s", "compile_s", "training_s", "evaluation_s", "report_s", "other_s", "recipe", "gpu",
           "date"]
PRESETS = {"cnn": "cnn_distillation/configs/cifar10.yaml", "vit": "vit_distillation/configs/cifar10.yaml"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--chains", default="cnn,vit")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"),
                   help="ImageFolder tree or its .tar.gz (default: ../shared/data/cifar10-jpeg.tar.gz)")
    p.add_argument("--data-source", default="imagefolder")
    p.add_argument("--epochs", type=int, default=None, help="override every stage's epochs")
    p.add_argument("--max-train-samples", type=int, default=None, help="subsample (smoke tests)")
    p.add_argument("--image-size", type=int, default=None, help="override (smoke tests)")
    p.add_argument("--baselines", action="store_true", help="also the scratch and direct-KD students")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe change for this try (recorded in the CSV), e.g. --set train.lr=0.003")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench_accuracy")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/accuracy.csv")
    args = p.parse_args(argv)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    for chain in args.chains.split(","):
        overrides = [f"data.source={args.data_source}", f"data.root={args.data_root}", *args.overrides]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        if args.max_train_samples:
            overrides.append(f"data.max_train_samples={args.max_train_samples}")
        if args.image_size:
            overrides.append(f"data.image_size={args.image_size}")
        cfg = load_config(ROOT / PRESETS[chain], overrides)
        if args.epochs:  # a stage's own epochs would win over train.epochs
            cfg = replace(cfg, stages=[replace(s, epochs=args.epochs) for s in cfg.stages])
        cfg = with_baselines(cfg) if args.baselines else cfg
        run_dir = args.runs / f"{chain}-{stamp}"
        t0 = time.perf_counter()
        df = run_chain(cfg, run_dir, progress=False)
        t_report = time.perf_counter()
        write_report([run_dir])
        end = time.perf_counter()
        timings = json.loads((run_dir / "timings.json").read_text())
        split = {f"{k}_s": round(timings.get(k, 0.0), 1) for k in ("data", "planning", "compile", "training", "evaluation")}
        split["report_s"] = round(end - t_report, 1)
        split["other_s"] = round((end - t0) - sum(split.values()), 1)
        for _, r in df.iterrows():
            rows.append({"chain": chain, "stage": r["stage"], "model": r["model"], "role": r["role"],
                         "method": r.get("method", ""), "epochs": int(r["epochs"]),
                         "val_acc": round(float(r["val_accuracy"]), 4), "test_acc": round(float(r["test_accuracy"]), 4),
                         "train_minutes": round(float(r["train_seconds"]) / 60, 2),
                         "chain_minutes": round((end - t0) / 60, 2), **split, "recipe": " ".join(args.overrides[:]),
                         "gpu": gpu, "date": _dt.date.today().isoformat()})
        print(f"{chain}: whole chain {(end - t0) / 60:.1f} min: " + ", ".join(f"{k} {v:.0f}" for k, v in split.items()))
    new = pd.DataFrame(rows, columns=COLUMNS)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # older files may have fewer columns: keep every try, align on the header
        new = pd.concat([pd.read_csv(args.out), new], ignore_index=True)[COLUMNS]
    new.to_csv(args.out, index=False)
    print(new.tail(len(rows)).to_string(index=False))
    return 0


if __name__ == "__main__":
    from src.utils.devices import freeze_import_heap
    freeze_import_heap()
    sys.exit(main())

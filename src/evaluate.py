"""Evaluate a trained stage of a run folder on any split or image tree.

    python -m src.evaluate RUN_DIR [--stage STAGE] [--split test|val|train]
                           [--data-source imagefolder --data-root TREE_OR_TARBALL] [--out DIR] [--device cpu]

Writes DIR/metrics.json (accuracy, macro precision / recall / F1, CE loss, images) and
DIR/predictions.csv (per image: file id, label, prediction, top-5 classes, logits). Class names
of another tree are matched to the run's classes by name. Exit codes: 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .data import build_loaders, load_dataset
from .data.sources import classes_of, source_names
from .distillation.engine import Precision, evaluate
from .distillation.stage import save_predictions
from .inference import load_model
from .utils.devices import resolve_device
from .utils.errors import DataError, UserError
from .runs.runfolder import RunFolder
from .runs.runlock import claim

REPO_ROOT = Path(__file__).resolve().parents[1]


def _check_classes(given: list, known: list, dcfg) -> None:
    unknown = [c for c in given if c not in known]
    if unknown:
        raise DataError(f"classes {unknown[:5]} of {dcfg.root if dcfg.source == 'imagefolder' else dcfg.source} are not "
                        f"among the model's {len(known)} classes ({', '.join(known[:10])}...)")


def evaluate_run(run_dir: Path, stage: str | None = None, split: str = "test", data_source: str | None = None,
                 data_root: str | None = None, out: Path | None = None, device: str = "auto") -> dict:

    dev = resolve_device(device)
    loaded = load_model(run_dir, stage, device=dev)
    stage = loaded.stage
    cfg = RunFolder(run_dir).config()  # a --seeds run folder: its first seed's
    dcfg = cfg.data
    if data_source or data_root:
        dcfg = replace(dcfg, source=data_source or dcfg.source, root=data_root or dcfg.root,
                       max_train_samples=None, max_test_samples=None)
    peek = classes_of(dcfg)  # checked before decoding: a tree of other classes is refused at once
    if peek is not None:
        _check_classes(peek, loaded.classes, dcfg)
    data = load_dataset(dcfg)
    chosen = {"train": data.train, "val": data.val, "test": data.test}[split]
    if data.classes != loaded.classes:  # another tree: map its labels onto the run's classes by name
        _check_classes(data.classes, loaded.classes, dcfg)
        remap = torch.tensor([loaded.classes.index(c) for c in data.classes])
        chosen = replace(chosen, labels=remap[chosen.labels])
    data = replace(data, train=chosen, val=chosen, test=chosen, classes=loaded.classes)
    loader = build_loaders(data, 256, dev, dcfg, False, seed=0)["test"]
    precision = Precision.choose(dev, cfg.train.amp, cfg.train.amp_dtype)
    result = evaluate(loaded.model, loader, precision, len(loaded.classes), return_predictions=True)
    data_name = dcfg.source + (f"-{Path(dcfg.root).name}" if dcfg.source == "imagefolder" else "")
    out = Path(out) if out else RunFolder(run_dir).evaluation(stage, split, data_name)
    out.mkdir(parents=True, exist_ok=True)
    save_predictions(out / RunFolder.EVAL_PREDICTIONS, result, chosen.ids)
    metrics = {k: result[k] for k in ("accuracy", "precision", "recall", "f1_score", "loss")}
    metrics.update(images=len(result["y_true"]), stage=stage, model=loaded.model_name, split=split,
                   data_source=dcfg.source, data_root=str(dcfg.root), averaging="macro",
                   stage_finished=loaded.finished)
    if not loaded.finished:
        metrics["note"] = ("the stage's training was interrupted: these are the weights of its best epoch so far, "
                           "not of the finished stage")
    (out / RunFolder.EVAL_METRICS).write_text(json.dumps(metrics, indent=2))
    return {**metrics, "out": str(out)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m src.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (or a --seeds run folder: its first seed)")
    p.add_argument("--stage", default=None, help="which stage's best checkpoint (default: the chain's final student: "
                   "student, or in a sweep the last path's student_via_...)")
    p.add_argument("--split", choices=("test", "val", "train"), default="test",
                   help="split of the run's dataset, or of --data-root's tree (test/ or val/ for 'test')")
    p.add_argument("--data-source", choices=source_names(), default=None,
                   help="evaluate on other data than the run's")
    p.add_argument("--data-root", default=None, help="image tree (root/test/<class>/*) or its .tar.gz")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/evaluations/<stage>-<split>-<data>)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=None,
                   help="a --seeds run: evaluate this seed's model (default: every seed, one output folder each)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run_dir, out = args.run_dir.expanduser().resolve(), args.out.expanduser().resolve() if args.out else None
    data_root = str(Path(args.data_root).expanduser().resolve()) if args.data_root else None
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # relative paths inside a run's config are the repository's, as in training
    try:
        if out is not None and out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file; give a folder (metrics.json and predictions.csv go into it)")
        targets = seed_targets(run_dir, args.seed, out)
        with claim(run_dir, "evaluating it") if run_dir.is_dir() else contextlib.nullcontext():
            for label, folder, target_out in targets:
                res = evaluate_run(folder, args.stage, args.split, args.data_source, data_root, target_out, args.device)
                print(f"{label}{res['stage']} ({res['model']}) on {res['split']} of {res['data_root']}: accuracy "
                      f"{res['accuracy']:.4f}, macro F1 {res['f1_score']:.4f}, {res['images']} images -> {res['out']}"
                      + ("" if res["stage_finished"] else "  (UNFINISHED stage: its best epoch so far; "
                                                         "resume the run to finish it)"))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        os.chdir(cwd)
    return 0


def seed_targets(run_dir: Path, seed, out):
    """[(label, run folder, output folder)]: the run itself, or for a --seeds run the chosen seed or
    every seed (each with its own output folder, said once)."""
    folder = RunFolder(run_dir)
    if not folder.is_multi_seed:
        if seed is not None:
            raise UserError(f"--seed {seed}: {run_dir} is a single-seed run; drop --seed")
        return [("", run_dir, out)]
    seeds = folder.seed_list()
    if seed is not None and seed not in seeds:
        raise UserError(f"--seed {seed}: {run_dir} holds seeds {', '.join(map(str, seeds))}")
    chosen = [seed] if seed is not None else seeds
    if seed is None:
        print(f"{run_dir} is a --seeds run: evaluating every seed ({', '.join(map(str, seeds))}); --seed N for one")
    return [(f"seed {s}: ", folder.seed_folder(s).path, (out / f"seed_{s}") if out and len(chosen) > 1 else out)
            for s in chosen]


if __name__ == "__main__":
    sys.exit(main())

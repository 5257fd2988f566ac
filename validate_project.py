#!/usr/bin/env python
"""Check the project and its run folders; one line per check, exit 1 naming any failure.

    python validate_project.py              # layout, imports, guard self-test, presets, CSVs under runs/
    python validate_project.py --runs DIR   # check the run folders under DIR instead
    python validate_project.py --smoke      # also train a tiny two-stage chain end to end
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

LAYOUT = ["README.md", "requirements.txt", "validate_project.py", "src/utils/training_guards.py",
          "src/utils/logger.py", "src/utils/reproducibility.py", "src/visualization/vit_viz.py",
          "cnn_distillation/train_cnn.sh", "cnn_distillation/train_cnn.py", "cnn_distillation/clean.sh",
          "cnn_distillation/configs/cifar10.yaml", "cnn_distillation/configs/cifar10_pretrained.yaml",
          "cnn_distillation/configs/demo.yaml", "vit_distillation/train_vit.sh", "vit_distillation/train_vit.py",
          "vit_distillation/clean.sh", "vit_distillation/configs/cifar10.yaml",
          "vit_distillation/configs/cifar10_pretrained.yaml", "vit_distillation/configs/demo.yaml",
          "vit_distillation/configs/cnn_teacher.yaml"]
GUARDS = ["freeze_teacher", "enforce_gradient_checkpointing", "cleanup_training_state", "validate_loss",
          "reset_peak_memory_stats", "schedule_kd_alpha", "get_model_specific_lr"]


class Checker:
    def __init__(self):
        self.failed: list[str] = []

    def check(self, name: str, fn) -> None:
        try:
            detail = fn()
        except Exception as exc:  # every failure is reported, none stops the others
            self.failed.append(name)
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"✗ {name}: {msg}")
            if "--debug" in sys.argv:
                traceback.print_exc()
        else:
            print(f"✓ {name}" + (f" ({detail})" if detail else ""))


def check_layout():
    missing = [p for p in LAYOUT if not (ROOT / p).exists()]
    if missing:
        raise AssertionError(f"missing {missing}")
    return f"{len(LAYOUT)} paths"


def check_imports():
    mods = ["cnn_distillation.train_cnn", "vit_distillation.train_vit"]
    for path in sorted((ROOT / "src").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        mods.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    for m in mods:
        importlib.import_module(m)
    guards = importlib.import_module("src.utils.training_guards")
    absent = [g for g in GUARDS if not callable(getattr(guards, g, None))]
    if absent:
        raise AssertionError(f"training_guards lacks {absent}")
    return f"{len(mods)} modules, 7 guards"


def check_self_test():
    out = subprocess.run([sys.executable, str(ROOT / "src/utils/training_guards.py")], capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0 or "All safety guards working" not in out.stdout:
        raise AssertionError(f"exit {out.returncode}: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    return "4/4"


def check_presets():
    from src.spec.config import load_config
    presets = sorted(ROOT.glob("*_distillation/configs/*.yaml"))
    for p in presets:
        try:
            load_config(p)
        except Exception as exc:
            raise AssertionError(f"{p.relative_to(ROOT)}: {exc}") from None
    return f"{len(presets)} presets"


def check_runs_folder(runs: Path):
    if not runs.is_dir():
        raise AssertionError(f"{runs} {'is not a folder' if runs.exists() else 'does not exist'}")
    return str(runs)


def check_csvs(runs: Path):
    from src.utils.logger import read_epoch_csv, terms_columns_of
    from src.runs.runfolder import StageFolder
    csvs = sorted(runs.rglob(StageFolder.EPOCH_LOG)) if runs.is_dir() else []
    for c in csvs:
        rows = read_epoch_csv(c)
        terms = c.with_name(StageFolder.TERMS)
        if terms.exists() and len(read_epoch_csv(terms, terms_columns_of(terms))) != len(rows):
            raise AssertionError(f"{terms}: not one row per epoch of {c.name}")
    return f"{len(csvs)} epoch_log.csv under {runs}" if csvs else f"no runs under {runs}"


def check_run_folder(run: Path):
    """Every stage: CSV schema-exact with one row per epoch, checkpoints loadable, summary consistent."""
    import pandas as pd
    from src.utils.checkpoint import safe_load
    from src.utils.logger import read_epoch_csv
    from src.runs.runfolder import RunFolder
    folder = RunFolder(run)
    cfg = folder.config()
    summary = pd.read_csv(folder.summary_csv) if folder.finished else None
    if summary is None:
        holder = _live_owner(run)
        if holder:
            return f"in progress: still being written by {holder}, not checked"
        raise AssertionError("unfinished and not running (no summary.csv, no live process holds it): "
                             "continue it with --resume")
    for stage in cfg.stages:
        d = folder.stage(stage.name)
        info = d.summary()
        rows = read_epoch_csv(d.epoch_log)
        if len(rows) != info["epochs"]:
            raise AssertionError(f"{stage.name}: {len(rows)} CSV rows for {info['epochs']} epochs")
        try:
            d.state_dict()  # best.pt's own weights, or the export it names
        except Exception as exc:  # noqa: BLE001
            raise AssertionError(f"{stage.name}/{d.BEST}: no model weights ({exc})") from None
        if info["epochs"]:
            last = safe_load(d.last)
            if last.get("epoch") != info["epochs"]:
                raise AssertionError(f"{stage.name}/{d.LAST} is at epoch {last.get('epoch')}, expected {info['epochs']}")
        match = summary[summary["stage"] == stage.name]
        if len(match) != 1:
            raise AssertionError(f"summary.csv has {len(match)} rows for stage {stage.name}")
        for key in ("test_accuracy", "val_accuracy", "params"):
            if abs(float(match.iloc[0][key]) - float(info[key])) > 1e-9:
                raise AssertionError(f"summary.csv {key} of {stage.name} differs from {stage.name}/stage.json")
    return f"{len(cfg.stages)} stages"


def _live_owner(run: Path):
    """The live process writing this run (its folder or its --seeds parent), if any."""
    from src.runs import runlock
    for folder in (run, run.parent) if (run.parent / "seeds.json").exists() else (run,):
        try:
            runlock.acquire(folder, "validating it").release()
        except runlock.RunFolderBusy:
            info = runlock.owner(folder) or {}
            return f"pid {info.get('pid')} on {info.get('host')}"
    return None


def check_smoke():
    from src.distillation.chain import run_chain
    from src.spec.config import from_dict
    cfg = from_dict({
        "name": "smoke", "seed": 0,
        "data": {"source": "digits", "image_size": 16, "max_train_samples": 200, "max_test_samples": 100,
                 "augment": "crop_flip", "crop_padding": 2},
        "train": {"epochs": 1, "batch_size": 50, "lr": 0.002, "device": "cpu"},
        "stages": [{"name": "teacher", "model": "resnet18", "role": "teacher"},
                   {"name": "student", "model": "resnet10t", "role": "student", "teacher": "teacher"}],
    })
    with tempfile.TemporaryDirectory() as tmp:
        df = run_chain(cfg, Path(tmp) / "run", progress=False)
        check_run_folder(Path(tmp) / "run")
    return f"{len(df)} stages trained, run folder valid"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description="Validate the project and its run folders.")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder searched for run folders (default: runs/)")
    p.add_argument("--smoke", action="store_true", help="also run a tiny chain end to end (about a minute on CPU)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    c = Checker()
    c.check("layout", check_layout)
    c.check("imports", check_imports)
    c.check("guards self-test", check_self_test)
    c.check("presets", check_presets)
    if args.runs != p.get_default("runs"):  # a folder named on the command line must exist: a typo fails
        c.check("runs folder", lambda: check_runs_folder(args.runs))
    c.check("epoch CSV schemas", lambda: check_csvs(args.runs))
    if args.runs.is_dir():
        for cfg_file in sorted(args.runs.rglob("config.yaml")):
            run = cfg_file.parent
            c.check(f"run folder {run}", lambda run=run: check_run_folder(run))
    if args.smoke:
        c.check("smoke chain", check_smoke)
    if c.failed:
        print(f"✗ {len(c.failed)} check(s) failed: {', '.join(c.failed)}")
        return 1
    print("✓ All validations passed!")
    return 0


if __name__ == "__main__":
    sys.exit(main())

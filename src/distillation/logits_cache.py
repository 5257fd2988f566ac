"""Frozen teachers' logits on a training split, kept on disk beside a loaded teacher's checkpoint.

A stage whose teachers see the same inputs every epoch computes their logits once
(`Method.cache_teacher_logits`). When every teacher is loaded from a checkpoint in a stage folder
(`checkpoint:`: a search's trials, the reproduction's students, a study that loads its teachers),
many stages compute the same tables: each trial of a search, each seed of the final students.
The first stage writes them to `<teacher folder>/teacher_logits/<key>.pt`; the others read them.

The key holds everything the tables depend on: each teacher's stage, checkpoint file and exported
weights (size and modification time), the images (the data config, their number, a digest of
the labels and of a sample of the stored images), the batch the tables are computed in, the precision, the device,
the torch version and its thread count. A hit is therefore the same tensor the stage would
compute itself: a student's weights are the same bit for bit with and without the file. Any
doubt (another key, a file that does not read) computes the tables again; a folder that cannot be
written keeps them in memory only, as before.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ..runs.runfolder import StageFolder
from ..utils.logger import get_console

DIR = StageFolder.TEACHER_LOGITS
log = get_console()


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def _images_digest(loader) -> str:
    """The labels and up to 256 of the stored images, evenly spaced: which images, in which order."""
    labels, images = loader.labels, loader.images
    step = max(1, len(images) // 256)
    return ",".join([_digest(labels), str(tuple(labels.shape)), _digest(images[::step]), str(tuple(images.shape))])


def key_of(run, loader) -> Optional[dict]:
    """What the stage's teacher tables depend on, or None when some teacher is not loaded from a
    checkpoint in a stage folder (nothing to share: it trained in this run) or the images are not
    the loader's own tensors."""
    teachers = [run.cfg.stage(name) for name in run.method.teacher_names]
    files = []
    for t in teachers:
        if not t.checkpoint:
            return None
        path = Path(t.checkpoint).expanduser()
        if not path.is_file() or not (path.parent / StageFolder.SUMMARY).is_file():
            return None
        files.append(path.resolve())
        weights = path.parent / StageFolder.WEIGHTS  # a finished stage's best.pt names its export
        if weights.is_file() and weights.resolve() != path.resolve():
            files.append(weights.resolve())
    if getattr(loader, "images", None) is None:
        return None
    data = asdict(run.cfg.data)
    for k in ("num_workers", "read_test", "max_test_samples", "cache_dir"):
        data.pop(k, None)
    train = run.cfg.train
    device = run.device
    return {
        "teachers": [json.dumps(asdict(t), sort_keys=True, default=str) for t in teachers],
        "files": [{"file": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files],
        "data": json.dumps(data, sort_keys=True, default=str),
        "images": _images_digest(loader),
        "batch": loader.batch_size,
        "precision": f"{run.precision.device_type}/{run.precision.dtype}",
        "numerics": {"compile": bool(run.plan.compile), "channels_last": str(train.channels_last),
                     "deterministic": bool(run.cfg.deterministic)},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _path(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(key["files"][0]["file"]).parent / DIR / f"{name}.pt"


def load(key: dict, device: torch.device) -> Optional[list]:
    """The tables written under `key`, on `device`, or None (absent, unreadable, another key)."""
    path = _path(key)
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 (a truncated or foreign file: compute the tables again)
        return None
    if not isinstance(blob, dict) or blob.get("key") != json.dumps(key, sort_keys=True):
        return None
    return [t.to(device) for t in blob["tables"]]


def save(key: dict, tables: list) -> Optional[Path]:
    """Write the tables under `key` (atomically); None when the folder cannot be written."""
    path = _path(key)
    try:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"key": json.dumps(key, sort_keys=True), "tables": [t.cpu() for t in tables]}, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(f"  could not keep the teacher logits in {path.parent} ({exc}); they stay in memory")
        return None
    return path

"""Checkpoint files: written atomically, read with weights_only=True.

A checkpoint is written to `<name>.tmp` and moved over the old file with os.replace, so a
crash or a full disk mid-write leaves the previous checkpoint intact. Loading never unpickles
arbitrary objects: only tensors, numbers, strings and containers of them are accepted.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .errors import CheckpointError, UserError, write_failure
from .signals import protected


class SaveError(UserError):
    """A checkpoint or log could not be written (full disk, permissions)."""


def _atomic_write(path: Path, write) -> None:
    """write(file) into <path>.tmp, fsync, rename over `path`: a crash or a full disk keeps the old file.
    torch.save reports a full disk as RuntimeError ('enforce fail ... unexpected pos'), not OSError."""
    tmp = path.with_name(path.name + ".tmp")
    with protected():  # a Ctrl-C / SIGTERM waits until the file is whole
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:100]
            if isinstance(exc, RuntimeError):
                reason = f"the write stopped part-way, most likely a full disk ({reason})"
            kept = " (the previous version is kept)" if path.exists() else ""
            raise SaveError(write_failure(path, reason, kept)) from None


def atomic_save(obj: dict, path: str | os.PathLike) -> None:
    """torch.save, atomically (see _atomic_write)."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def slim_checkpoint(path: str | os.PathLike, drop=("model", "method", "optimizer", "scheduler", "scaler")) -> int:
    """Rewrite a finished stage's last.pt without what only resuming it needed: the last epoch's
    weights and the optimizer's state (twice the model's size under AdamW). A finished stage keeps
    its weights once at full size in best.pt and once exported (model.safetensors); last.pt keeps
    its bookkeeping (epoch, best epoch, the last CSV rows). Returns the bytes saved."""
    path = Path(path)
    if not path.exists():
        return 0
    before = path.stat().st_size
    ck = safe_load(path)
    if not any(ck.get(k) is not None for k in drop):
        return 0
    atomic_save({k: (None if k in drop else v) for k, v in ck.items()}, path)
    return before - path.stat().st_size


def atomic_write_file(path: str | os.PathLike, write) -> None:
    """write(binary file) into <path>.tmp, then renamed over `path` (a figure that a resumed run
    does not draw again: a kill part-way leaves no cut PNG behind)."""
    _atomic_write(Path(path), write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """A small text file (JSON, YAML), atomically."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def safe_load(path: str | os.PathLike, map_location="cpu") -> dict:
    """torch.load with weights_only=True; CheckpointError for missing, corrupt or pickled files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it contains pickled Python objects, which could run code "
            f"({str(exc).splitlines()[0][:160]}). Re-save only the state_dict (tensors) from a trusted source") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from None


def point_to_export(path: str | os.PathLike, export_name: str) -> int:
    """A finished stage's best.pt without its weights, which the export beside it (`export_name`,
    written and checked first) holds once at full size: best.pt keeps its bookkeeping (epoch,
    validation accuracy) and names the export. Returns the bytes saved."""
    path = Path(path)
    ck = safe_load(path)
    if ck.get("model") is None:
        return 0
    before = path.stat().st_size
    atomic_save({**ck, "model": None, "weights": export_name}, path)
    return before - path.stat().st_size


def read_weights(path: str | os.PathLike) -> dict:
    """The state dict a checkpoint holds: its own weights, or, for a finished stage's best.pt,
    those of the export it names (model.safetensors beside it)."""
    path = Path(path)
    if path.suffix == ".safetensors":  # an export itself (a `checkpoint:` of another run's model.safetensors)
        return read_safetensors(path)
    ck = safe_load(path)
    if isinstance(ck, dict) and ck.get("model") is None and ck.get("weights"):
        export = path.parent / ck["weights"]
        if not export.is_file():
            raise CheckpointError(f"{path} keeps its weights in {export}, which is missing")
        return read_safetensors(export)
    return extract_state_dict(ck)


def read_safetensors(path: Path) -> dict:
    """A model.safetensors file's tensors; a truncated or corrupt file is one CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 (safetensors' own SafetensorError, OSError, ...: one message)
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not readable weights (cut short or corrupt: {reason}); copy the file again "
                              f"from where the run was made, or retrain the stage") from None


def extract_state_dict(obj: dict) -> dict:
    """Model weights from one of our checkpoints, a {'state_dict': ...} file or a bare state_dict."""
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return obj[key]
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    raise CheckpointError("no model weights found in the checkpoint (expected a state_dict)")


def rng_state() -> dict:
    """Python, NumPy, torch and CUDA RNG states in a weights_only-loadable form."""
    py = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

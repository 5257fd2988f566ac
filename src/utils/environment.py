"""What produced a result: package versions, hardware, git commit, command line."""
from __future__ import annotations

import datetime as _dt
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from .devices import GiB, cuda_index

PACKAGES = ("torch", "torchvision", "timm", "transformers", "numpy", "pandas", "scikit-learn", "matplotlib",
            "PyYAML", "tqdm", "pillow")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_info() -> dict:
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None
    return {"commit": commit or None, "dirty": dirty, "branch": _git("rev-parse", "--abbrev-ref", "HEAD") or None}


def gpu_info(device=None) -> dict:
    """The training GPU (`device`, default the current one): name, capability, memory, CUDA/cuDNN."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return {"cuda_available": torch.cuda.is_available(), "used": False}
    i = cuda_index(device)
    p = torch.cuda.get_device_properties(i)
    return {"cuda_available": True, "used": True, "index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
            "total_memory_gib": round(p.total_memory / GiB, 2), "device_count": torch.cuda.device_count(),
            "cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version()}


def package_versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment_record(reproducibility: dict | None = None, extra: dict | None = None, device=None) -> dict:
    return {
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "gpu": gpu_info(device),
        "git": git_info(),
        "reproducibility": reproducibility or {},
        **(extra or {}),
    }

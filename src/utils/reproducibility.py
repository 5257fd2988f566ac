"""Seeding and determinism for every source of randomness."""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch


def setup_reproducibility(seed: int = 42, deterministic: bool = True) -> dict:
    """Seed Python, NumPy, torch (CPU and every CUDA device) and set determinism flags.

    With `deterministic=True`: cuDNN picks deterministic kernels and no benchmark autotuning,
    torch raises on ops with no deterministic implementation (warn_only, so training never
    stops for it), and cuBLAS gets the fixed workspace it needs for deterministic matmuls.
    Must run before the first CUDA call for the cuBLAS setting to take effect.

    Returns what was set, so the run can record it in env.json.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)  # lazily applied; harmless without CUDA
    os.environ["PYTHONHASHSEED"] = str(seed)  # for subprocesses (workers); this one is fixed at start-up

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return {
        "seed": seed,
        "deterministic": deterministic,
        "python_random": True,
        "numpy": True,
        "torch": True,
        "cuda": torch.cuda.is_available(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive NumPy/Python seeds from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def derive_seed(seed: int, stream: str) -> int:
    """The seed of one named random stream of a run (a stage's initial weights, its data order).

    Hashing (seed, name) keeps streams apart: with `seed + index`, seed s of stage i drew exactly
    what seed s+1 of stage i-1 drew. Stages that share a stream name share the draw, which is how
    the scratch, KD and TAKD students start from the same weights and see the same data order.
    """
    digest = hashlib.sha256(f"{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def epoch_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    """The seed of one epoch's draws of a loader (order, augmentation, erasing): the same in an
    interrupted and an uninterrupted run. `rank=None`: a stream every rank shares (the order
    every rank strides through); a rank number: a stream of that rank's own (its augmentation)."""
    base = seed * 100003 + epoch
    return base if rank is None else base + 7907 * (rank + 1)

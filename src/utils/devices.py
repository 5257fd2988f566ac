"""The training device, resolved once to an explicit index, and the CUDA memory calls that use it.

Several torch.cuda functions refuse `torch.device("cuda")` (no index), among them
`set_per_process_memory_fraction`; others silently use the *current* device, which is not
always the training one. So the run resolves its device once, at the entry, to `cuda:N`, makes
it the current device, and every torch.cuda call in this project gets that index.

Memory figures are *peak reserved* bytes (what the caching allocator holds from the driver:
what a 6 GB card runs out of, and what `train.vram_budget_gb` caps), not bytes allocated by
live tensors.
"""
from __future__ import annotations

import gc
import os
from typing import Optional, Union

import torch

from .errors import ConfigError

GiB = 1024 ** 3
MiB = 1024 ** 2
DeviceLike = Union[torch.device, str, int, None]


def resolve_device(name: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device('cpu') or torch.device('cuda', N).

    A CUDA result always carries its index and is made the current device. `local_rank`
    (distributed runs) picks the GPU of this rank. Raises ConfigError when CUDA is asked for
    and not there, or the index does not exist.
    """
    name = str(name).strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not (name == "auto" or name == "cuda" or name.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is visible (torch {torch.__version__}, "
                          f"built for CUDA {torch.version.cuda}). Use --device cpu, or check the driver / "
                          f"CUDA_VISIBLE_DEVICES")
    if local_rank is not None:
        index = local_rank
    elif name.startswith("cuda:"):
        try:
            index = int(name.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"device {name!r}: expected cuda:N with an integer N") from None
    else:
        index = torch.cuda.current_device()
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(f"train.device={name} but only {count} CUDA device(s) exist (cuda:0..cuda:{count - 1})")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cuda_index(device: DeviceLike = None) -> int:
    """The explicit CUDA index of `device` (None or an un-indexed 'cuda' mean the current device)."""
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"not a CUDA device: {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def is_cuda(device: DeviceLike) -> bool:
    if device is None:
        return torch.cuda.is_available()
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


def synchronize(device: DeviceLike = None) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if is_cuda(device) and torch.cuda.is_available():
        torch.cuda.synchronize(cuda_index(device))


def reset_peak_reserved(device: DeviceLike = None) -> bool:
    """Return cached blocks to the driver, then reset the peak counters of `device`.

    Emptying the cache first makes the next peak-reserved figure what the work after this call
    needed, not what earlier work left cached. False on CPU (nothing to reset).
    """
    if not (is_cuda(device) and torch.cuda.is_available()):
        return False
    index = cuda_index(device)
    torch.cuda.synchronize(index)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(index)
    return True


def peak_reserved_bytes(device: DeviceLike = None) -> int:
    """Peak bytes reserved by the caching allocator on `device` since the last reset; 0 on CPU."""
    if not (is_cuda(device) and torch.cuda.is_available()):
        return 0
    return int(torch.cuda.max_memory_reserved(cuda_index(device)))


def memory_now(device: DeviceLike = None) -> dict:
    """Allocated and reserved MiB on `device` now (zeros on CPU)."""
    if not (is_cuda(device) and torch.cuda.is_available()):
        return {"allocated_mib": 0.0, "reserved_mib": 0.0}
    index = cuda_index(device)
    return {"allocated_mib": torch.cuda.memory_allocated(index) / MiB,
            "reserved_mib": torch.cuda.memory_reserved(index) / MiB}


def alloc_retries(device: DeviceLike = None) -> int:
    """How often the caching allocator on `device` has so far met the memory cap (or the card's
    end), freed its whole cache and tried again; 0 on CPU. Each retry synchronises the device, so
    a count that grows during training means the batch barely fits and steps are slowed."""
    if not (is_cuda(device) and torch.cuda.is_available()):
        return 0
    return int(torch.cuda.memory_stats(cuda_index(device)).get("num_alloc_retries", 0))


def set_cpu_threads(device: torch.device, local_world_size: int = 1, threads: Optional[int] = None) -> Optional[int]:
    """On a CPU, give torch the cores this process may use (its CPU affinity, not the host's count,
    which a container or `taskset` limits), shared out between the ranks of this machine so that
    gloo runs do not oversubscribe them. `threads` (a study's plan fixes it per job) wins, then an
    explicit OMP_NUM_THREADS. Returns the count set (None when nothing was changed)."""
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
        return threads
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, local_world_size))
    torch.set_num_threads(threads)
    return threads


def freeze_import_heap() -> None:
    """For a process's entry point, once its modules are imported: what was imported (torch, timm,
    sklearn: about half a million objects) lives as long as the process. gc.freeze moves it out of
    the collector's sight, so that every later full collection (cleanup_training_state between
    stages, after each figure) scans only what training allocated: about 0.3 s less per collection
    on a CPU, several per stage. Not for library callers: what they hold would never be collected."""
    gc.collect()
    gc.freeze()

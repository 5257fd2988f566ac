"""DistributedDataParallel under torchrun: process-group set-up and the few collective helpers
the chain needs. A single process (no torchrun) sees world_size 1 and every helper is a no-op.

Rule when the world size changes: `train.batch_size` is the GLOBAL batch. Each of N ranks
trains on batch_size / N images per step and the learning rate is unchanged, so a run on
1, 2 or 8 GPUs follows the same optimisation trajectory up to data order and reduction
rounding, and a config never has to change with the number of GPUs.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class DistState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False  # a process group exists (torchrun), even with a single rank

    @property
    def enabled(self) -> bool:
        return self.initialized

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE = DistState()


def state() -> DistState:
    return _STATE


def is_main() -> bool:
    return _STATE.is_main


def init_from_env(device_name: str = "auto") -> DistState:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...).

    Backend: NCCL when ranks train on GPUs, gloo on CPU. Multi-node works through torchrun's
    own rendezvous flags (--nnodes, --node_rank, --rdzv_endpoint).
    """
    global _STATE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or "LOCAL_RANK" not in os.environ:  # a plain process, not started by torchrun
        _STATE = DistState()
        return _STATE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    _STATE = DistState(rank=rank, world_size=world, local_rank=local, initialized=True)
    return _STATE


def shutdown() -> None:
    global _STATE
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE = DistState()


def backend():
    """'nccl' or 'gloo' inside a process group, else None."""
    return dist.get_backend() if _STATE.enabled else None


def barrier() -> None:
    if _STATE.enabled:
        dist.barrier()


def gather_array(arr: np.ndarray) -> np.ndarray:
    """Concatenate every rank's array, in rank order (shards may differ in length)."""
    if not _STATE.enabled:
        return arr
    parts = [None] * _STATE.world_size
    dist.all_gather_object(parts, arr)
    return np.concatenate(parts)


def all_reduce_sum(value: float) -> float:
    if not _STATE.enabled:
        return value
    parts = [None] * _STATE.world_size
    dist.all_gather_object(parts, float(value))
    return float(sum(parts))


def all_reduce_max_(t: torch.Tensor) -> None:
    """In place: the element-wise maximum over ranks (asynchronous on NCCL: no host sync)."""
    if _STATE.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (so all ranks stop at the same step)."""
    if not _STATE.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj):
    """Rank 0's object on every rank."""
    if not _STATE.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def weights_checksum(model: torch.nn.Module) -> str:
    """A checksum of the model's parameters and buffers, to prove the ranks hold the same weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def all_checksums(model: torch.nn.Module) -> list:
    """Every rank's weights checksum, in rank order."""
    mine = weights_checksum(model)
    if not _STATE.enabled:
        return [mine]
    parts = [None] * _STATE.world_size
    dist.all_gather_object(parts, mine)
    return parts


def sync_buffers(model: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step each
    rank still holds the statistics of its own shard; evaluation and checkpoints need one set.
    """
    if not _STATE.enabled:
        return
    for buf in model.buffers():
        if buf.numel():
            dist.broadcast(buf.data, src=0)

"""Distributed setup, one place for every job that shards over processes (evaluation, bank builds,
training): under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined once with Gloo for CPU
tensors and, when CUDA is available, NCCL for CUDA tensors (``"cpu:gloo,cuda:nccl"``)."""

from __future__ import annotations

import os

import torch

__all__ = ["backend", "init_from_env", "dist_context", "dist_info"]


def backend() -> str:
    """The process-group backend weakseg uses: Gloo on the CPU, plus NCCL for CUDA tensors on a GPU machine."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def init_from_env() -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1) and not yet joined; returns
    whether a group is active."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend=backend())
    return dist.is_initialized()


def dist_context() -> tuple[int, int, bool]:
    """(rank, world size, distributed?) of this process, joining the group under torchrun."""
    import torch.distributed as dist

    if init_from_env():
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def dist_info(rank: int | None, world_size: int | None, what: str = "evaluate") -> tuple[int, int, bool]:
    """(rank, world size, whether torch.distributed carries the merge) for a sharded job: an explicit
    ``rank`` / ``world_size`` (checked: 0 <= rank < world_size; ``what`` names the caller in the error) or
    the torchrun environment."""
    import torch.distributed as dist

    if rank is not None or world_size is not None:
        r, w = rank or 0, world_size or 1
        if not 0 <= r < w:
            raise ValueError(f"{what}: need 0 <= rank < world_size, got rank={r}, world_size={w}")
        return r, w, dist.is_available() and dist.is_initialized()
    return dist_context()

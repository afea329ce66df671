"""Process-group setup for ``torchrun --nproc_per_node=K``: NCCL on GPU, gloo on CPU.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) everything runs in one process and the
collective helpers are no-ops, so the engine has a single code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` -> CUDA if available else CPU; ``'cuda'`` -> ``cuda:<local_rank>``.

    Raises:
        UserError: ``'cuda'`` requested but no CUDA device is available.
    """
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"resolve_device: preference must be one of ['auto', 'cpu', 'cuda'], got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun job described by the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``), or describe a single process when there is none.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend=backend)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend, owns)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if :func:`init_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """``obj`` from every rank, indexed by rank (``[obj]`` in a single process)."""
    if not env.is_distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across(env: DistEnv, value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (the tensor itself in a single process)."""
    if not env.is_distributed:
        return value
    v = value.detach().clone()
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return v / env.world_size

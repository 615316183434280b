"""This process's place among torchrun ranks, its device, and the collectives of both stages.

A single process (no torchrun) is a world of size 1 and every collective is a no-op, so the cache and
the trainer each have one code path. The trainer sums gradients with an explicit all-reduce after
backward (three tensors) rather than through DistributedDataParallel hooks: its loss is already
normalised by global-batch statistics, so the SUM of per-rank gradients is exactly the one-process
gradient.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .errors import MlsaeError

# how long a rank waits for the others at a collective (e.g. behind a slow rank's last shard or checkpoint)
TIMEOUT = datetime.timedelta(minutes=30)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """--device (cpu, cuda, cuda:N or auto: cuda when a GPU is visible) -> the device; plain cuda is GPU ``local_rank``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise MlsaeError(f"unknown --device {device}; use cpu, cuda or auto")
    if not torch.cuda.is_available():
        raise MlsaeError(f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)


@dataclass
class Distributed:
    """This process among torchrun's ranks (rank 0 of a world of 1 without torchrun) and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    local_rank: int = 0
    """torchrun's LOCAL_RANK: the rank among this machine's processes (plain --device cuda takes that GPU)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str, join: bool = True) -> Distributed:
        """This process's ranks from torchrun's environment, with --device checked and resolved.

        ``join``: join the process group now (WORLD_SIZE > 1); else :meth:`join` must be called before
        the first collective (the cache joins once its options are checked and the model is loaded).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch_device = resolve_device(device, local_rank)
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)  # NCCL's collectives run on the current device
        place = cls(rank=rank, world_size=world_size, device=torch_device, local_rank=local_rank)
        if join:
            place.join()
        return place

    def join(self) -> None:
        """Join the torchrun process group (NCCL on CUDA, gloo on CPU), unless alone or already in it."""
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo", timeout=TIMEOUT)

    def close(self) -> None:
        """Leave the process group (once no collective is left)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over all processes, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_error(self, message: str | None) -> str | None:
        """Share rank 0's error message (or None) with every rank, so that all stop together."""
        if self.world_size == 1:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]

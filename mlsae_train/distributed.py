"""Data parallelism under torchrun: who am I, which device, and sums across processes.

A single process (no torchrun) is a world of size 1 and every collective is a no-op, so the training
code has one path. Gradients are summed with an explicit all-reduce after backward (three tensors),
rather than through DistributedDataParallel hooks: the loss is already normalized by global-batch
statistics, so the SUM of per-rank gradients is exactly the one-process gradient.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mlsae_cache.errors import MlsaeError


@dataclass
class Distributed:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        """Join the torchrun process group if there is one (WORLD_SIZE > 1), and pick the device.

        device: "cpu", "cuda" or "auto" (cuda when available). Under torchrun with CUDA each rank takes
        the GPU numbered by LOCAL_RANK.
        """
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise MlsaeError("--device cuda: no CUDA device is visible to torch; use --device cpu")
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch_device = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
        if device == "cuda":
            torch.cuda.set_device(torch_device)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30)
            )
        return cls(rank=rank, world_size=world_size, device=torch_device)

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

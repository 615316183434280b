"""The torchrun helper both stages use, in a world of one process (2 processes: test_train_ddp.py, test_cache_resume.py)."""

from __future__ import annotations

import pytest
import torch

from mlsae_cache.distributed import Distributed, resolve_device
from mlsae_cache.errors import MlsaeError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_cpu_and_auto_without_a_gpu_resolve_to_the_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))


@pytest.mark.parametrize("device", ["gpu", "cudax", "cuda:", "cuda:one", "CPU"])
def test_an_unknown_device_is_one_error_naming_it(device):
    with pytest.raises(MlsaeError, match=f"unknown --device {device}; use cpu, cuda or auto"):
        resolve_device(device)


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_says_to_use_the_cpu(device):
    with pytest.raises(MlsaeError, match=f"--device {device} was asked for but no CUDA GPU is visible; use --device cpu"):
        resolve_device(device)


def test_without_torchrun_the_world_is_one_process_and_collectives_change_nothing(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    place = Distributed.from_env("cpu")
    assert (place.rank, place.world_size, place.local_rank, place.device, place.is_main) == (0, 1, 0, torch.device("cpu"), True)
    assert not torch.distributed.is_initialized()  # a world of one joins no process group
    tensor = torch.tensor([1.0, -2.0])
    assert place.all_reduce_sum_(tensor) is tensor and place.all_reduce_max_(tensor).tolist() == [1.0, -2.0]
    assert place.broadcast_error("bad shard") == "bad shard" and place.broadcast_error(None) is None
    place.barrier()
    place.close()


def test_the_ranks_come_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    place = Distributed.from_env("cpu", join=False)  # not joined: no other rank is listening
    assert (place.rank, place.world_size, place.local_rank, place.is_main) == (3, 4, 1, False)
    assert not torch.distributed.is_initialized()


def test_training_imports_the_same_helper():
    from mlsae_train.distributed import Distributed as TrainDistributed

    assert TrainDistributed is Distributed

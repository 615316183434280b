"""Parallel reads into storage-dtype host tensors (mlsae_cache.parallel_read) and the analysis encode
pass that uses them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from mlsae_cache import open_cache, write_array_cache
from mlsae_cache import parallel_read as pr
from mlsae_cache import shard_format as sf


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_row_reader_fills_every_row_once_across_threads(workers, monkeypatch):
    monkeypatch.setattr(pr, "CHUNK_BYTES", 64)  # 8-row chunks of 8-byte rows: many chunks per block
    filled = np.zeros(203, np.int64)
    threads = set()

    def fill(start, stop):
        filled[start:stop] += 1
        threads.add(threading.get_ident())

    with pr.RowReader(workers) as rows:
        rows.run(203, 8, fill)
        rows.run(0, 8, fill)  # an empty batch fills nothing
    assert (filled == 1).all()
    assert min(workers, 2) <= len(threads) <= workers  # the calling thread and the pool's (which may reuse one)


def test_row_reader_raises_the_error_of_the_first_failing_row(monkeypatch):
    monkeypatch.setattr(pr, "CHUNK_BYTES", 8)  # one row per chunk
    done = []

    def fill(start, stop):
        if start in (30, 90):
            raise ValueError(f"row {start}")
        done.append(start)

    with pr.RowReader(3) as rows:  # blocks [0, 40), [40, 80), [80, 120)
        with pytest.raises(ValueError, match="row 30"):
            rows.run(120, 8, fill)
    assert 85 in done and 29 in done  # the other blocks finished before the error was raised
    with pytest.raises(ValueError, match="at least 1"):
        pr.RowReader(0)


def test_default_workers_share_the_cores_among_the_local_processes(monkeypatch):
    monkeypatch.setattr(pr.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert pr.default_workers() == pr.MAX_DEFAULT_WORKERS
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert pr.default_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert pr.default_workers() == 1


@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_host_tensor_shares_memory_with_the_view_readers_fill(dtype):
    x, view = pr.host_tensor((3, 2, 4), dtype)
    assert x.dtype == sf.STORAGE_TORCH[dtype] and view.dtype == sf.STORAGE_NUMPY[dtype] and view.shape == (3, 2, 4)
    values = np.random.default_rng(0).normal(size=(3, 2, 4)).astype(np.float32)
    view[...] = sf.to_storage(values, dtype)
    expected = torch.from_numpy(values).to(sf.STORAGE_TORCH[dtype]).float()  # torch's own rounding
    torch.testing.assert_close(x.float(), expected, rtol=0, atol=0)
    assert pr.storage_dtype_of(view) == dtype


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layers", [None, [2, 0]])
def test_encode_pass_feeds_the_consumers_the_float32_values_of_the_cache(dtype, layers, tmp_path):
    from mlsae_analysis.encode import encode_cache, scan_latents
    from mlsae_analysis.inputs import RunAndCache
    from mlsae_train import MultiLayerSAE

    acts = np.random.default_rng(1).normal(size=(300, 3, 8)).astype(np.float32) * 5
    write_array_cache(tmp_path / "cache", acts, dtype=dtype, shard_tokens=128)
    cache = open_cache(tmp_path / "cache")
    columns = [0, 1, 2] if layers is None else layers
    sae = MultiLayerSAE(8, 32, 4, columns, generator=torch.Generator().manual_seed(0))
    data = RunAndCache(sae=sae, cache=cache, layer_columns=columns, run_info={})

    class Keep:
        def __init__(self):
            self.x = []

        def update(self, x, x_hat, values, indices):
            assert x.dtype == torch.float32
            self.x.append(x.clone())

    keep = Keep()
    latents = encode_cache(data, tmp_path / "out", 290, [keep], batch_tokens=100, progress=False, workers=2)
    seen = torch.cat(keep.x).numpy()  # [290, nL, 8]
    np.testing.assert_array_equal(seen, cache.read(np.arange(290), columns))  # the float32 read, bit for bit
    assert [len(x) for x in keep.x] == [100, 100, 90]
    rows = scan_latents(latents).collect()
    assert rows["token"].max() == 289 and rows["layer"].max() == len(columns) - 1


@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_host_buffers_are_recycled_only_once_nothing_holds_them(dtype):
    buffers = pr.HostBuffers(dtype, keep=4)
    x, array = buffers.take((4, 2, 3))
    base = x.data_ptr()
    del array
    bits = torch.int32 if dtype == "float32" else torch.int16
    holders = {
        "the tensor": lambda t: t,
        "a view": lambda t: t[1:],
        "a numpy array": lambda t: t.view(bits).numpy(),
        "its float32 form": lambda t: t.float(),  # the tensor itself for float32, a new tensor otherwise
    }
    for name, holder in holders.items():
        kept = holder(x)
        del x
        z = buffers.take((4, 2, 3))[0]  # (its numpy view, if kept, would hold the buffer too)
        holds = name != "its float32 form" or dtype == "float32"
        assert (z.data_ptr() != base) == holds, name  # a buffer in use is never handed out again
        del z, kept
        x = buffers.take((4, 2, 3))[0]  # nothing holds the first buffer any more: it comes back
        assert x.data_ptr() == base, name
    y, other = buffers.take((5, 2, 3))  # another shape: another buffer
    assert other.shape == (5, 2, 3) and y.data_ptr() != base

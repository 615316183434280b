"""Reading batches of a cache in parallel threads, into host tensors of the storage dtype.

The trainer's prefetcher and the analysis's encode pass fill each batch with :class:`RowReader`: the
batch's rows are cut into one block per worker thread, and each thread fills its block in chunks of
about ``CHUNK_BYTES`` (a chunk is gathered and then checked while it is still in the CPU cache). Threads
suffice: numpy's copies out of the memory-mapped shards release the GIL.

Batches stay in the storage dtype on the host (float16, float32, or bfloat16 as ``torch.bfloat16`` from
the stored uint16 bits: :func:`host_tensor`), so half the bytes of float32 cross to the device, where the
caller converts them to float32 (exactly: every stored value is a float32 value).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import shard_format as sf

# bytes a thread fills per call: small enough to stay in the CPU's last-level cache for the check that
# follows, large enough that the per-call overhead (~30 us, ~4% here) stays small
CHUNK_BYTES = 4 << 20
# beyond a few threads the copies are bound by memory bandwidth, and the cores serve the step too
MAX_DEFAULT_WORKERS = 8


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def io_threads(limit: int = 4) -> int:
    """Threads for file work whose hashing and writes release the GIL (shard writing, verifying): one per
    usable core, at most ``limit``."""
    return max(1, min(limit, usable_cores()))


def default_workers() -> int:
    """Reader threads for one process: the cores it may use, shared with the other processes of its node
    (torchrun's ``LOCAL_WORLD_SIZE``), at most ``MAX_DEFAULT_WORKERS``."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(MAX_DEFAULT_WORKERS, usable_cores() // local_processes))


def host_tensor(shape: tuple[int, ...], dtype: str, pin_memory: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised host tensor (``sf.STORAGE_TORCH[dtype]``) for a batch stored as ``dtype``, and the
    numpy view readers fill (``sf.STORAGE_NUMPY[dtype]``: uint16 bits for bfloat16). ``pin_memory``: page-locked,
    for asynchronous copies to a GPU."""
    if not pin_memory:  # numpy's allocator: huge pages for large arrays, 3x faster to fill than torch.empty's here
        array = np.empty(shape, sf.STORAGE_NUMPY[dtype])
        return sf.storage_tensor(array, dtype), array
    tensor = torch.empty(shape, dtype=sf.STORAGE_TORCH[dtype], pin_memory=True)  # torch's caching host allocator
    return tensor, sf.storage_numpy(tensor)


# references to a kept buffer that nothing else holds: HostBuffers' list, the loop variable, getrefcount's argument
_UNUSED_REFERENCES = 3


class HostBuffers:
    """Host tensors for the batches of one reader (:func:`host_tensor`), recycled once nothing holds them.

    Filling a fresh buffer costs its page faults on top of the gather (the kernel zeroes each new page:
    +50% CPU time for float16 pythia-70m batches here). Unpinned buffers are numpy arrays kept here and
    handed out again once no tensor made from them is alive: every tensor, view or numpy array made from
    a batch references its buffer, so CPython's reference count says when none is left. Pinned buffers
    come from torch's caching host allocator, which recycles them itself once the copies from them have
    finished.
    """

    def __init__(self, dtype: str, pin_memory: bool = False, keep: int = 4) -> None:
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.keep = keep
        self._arrays: list[np.ndarray] = []

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
        """(tensor, numpy view) of ``shape``, its contents undefined; see :func:`host_tensor`."""
        if self.pin_memory:
            return host_tensor(shape, self.dtype, pin_memory=True)
        for array in self._arrays:
            if array.shape == shape and sys.getrefcount(array) == _UNUSED_REFERENCES:
                return sf.storage_tensor(array, self.dtype), array
        tensor, array = host_tensor(shape, self.dtype)
        self._arrays = [*self._arrays[-(self.keep - 1) :], array] if self.keep > 1 else [array]
        return tensor, array


class RowReader:
    """Runs ``fill(start, stop)`` over the rows of a batch in ``workers`` threads (the calling thread is one).

    ``fill`` must write rows [start, stop) of the batch and nothing else; the blocks of the threads are
    disjoint. ``run`` returns once every thread is done, raising the error of the first failing row.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="mlsae-read") if workers > 1 else None

    def run(self, n_rows: int, row_bytes: int, fill: Callable[[int, int], None]) -> None:
        chunk = max(1, CHUNK_BYTES // max(1, row_bytes))  # rows per fill call
        n_blocks = max(1, min(self.workers, -(-n_rows // chunk)))
        edges = np.linspace(0, n_rows, n_blocks + 1).astype(np.int64).tolist()

        def fill_block(block: int) -> None:
            for start in range(edges[block], edges[block + 1], chunk):
                fill(start, min(start + chunk, edges[block + 1]))

        futures = [self._pool.submit(fill_block, block) for block in range(1, n_blocks)] if self._pool else []
        first_error: BaseException | None = None
        try:
            fill_block(0)
        except BaseException as exc:  # noqa: BLE001 - raised below, after the other blocks are done
            first_error = exc
        for future in futures:  # block order: the first error raised is that of the first failing row
            error = future.exception()
            if first_error is None:
                first_error = error
        if first_error is not None:
            raise first_error

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RowReader:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def storage_dtype_of(array: np.ndarray) -> str:
    """The storage dtype name of an array read with ``out_dtype="storage"`` (or float32)."""
    for name, numpy_dtype in sf.STORAGE_NUMPY.items():
        if array.dtype == numpy_dtype:
            return name
    raise ValueError(f"{array.dtype} is not a storage dtype of a cache")

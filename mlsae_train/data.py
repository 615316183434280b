"""Training batches: random tokens from all caches at once, read ahead by background threads.

- :class:`ActivationDataset` joins one or more caches into one global token index and picks layers.
- :class:`BatchOrder` says which tokens make up each step's batch: one seeded permutation of all
  tokens per epoch, cut into consecutive batches. It is a pure function of (seed, step), so a resumed
  run needs only the step number to continue the same stream.
- :class:`Prefetcher` reads the next batches while the current one trains, each batch gathered by
  several threads in the storage dtype (the trainer converts to float32 on its device).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from mlsae_cache import open_cache
from mlsae_cache import shard_format as sf
from mlsae_cache.errors import MlsaeError
from mlsae_cache.parallel_read import HostBuffers, RowReader, default_workers, storage_dtype_of
from mlsae_cache.reader import OutDtype


class ActivationDataset:
    """Several caches of the same model, width and layers, read as one: global index = cache order, then token order."""

    def __init__(self, paths: Sequence[str | Path], layers: Sequence[int] | None = None) -> None:
        if not paths:
            raise MlsaeError("no --shards given; name at least one cache directory written by mlsae-cache")
        resolved = [Path(p).resolve() for p in paths]
        if len(set(resolved)) != len(resolved):
            raise MlsaeError("a cache is named twice in --shards; name each cache once")
        self.caches = [open_cache(p) for p in paths]
        first = self.caches[0]
        for cache in self.caches[1:]:
            for what, mine, theirs in (
                ("model", cache.manifest.get("model"), first.manifest.get("model")),
                ("d_model", cache.d_model, first.d_model),
                ("layers", cache.layers, first.layers),
                ("lens", cache.manifest.get("lens"), first.manifest.get("lens")),
            ):
                if mine != theirs:
                    raise MlsaeError(
                        f"{cache.root} holds {what} {mine!r} but {first.root} holds {theirs!r}; "
                        "train on caches of one model, width, layer set and lens"
                    )
        self.d_model = first.d_model
        self.cache_layers = list(first.layers)
        if layers is None:
            self.layers = list(self.cache_layers)
            self._layer_positions = None  # all layers
        else:
            missing = [layer for layer in layers if layer not in self.cache_layers]
            if missing:
                raise MlsaeError(
                    f"--layers {' '.join(map(str, missing))}: the cache holds layers {self.cache_layers}; pick among those"
                )
            self.layers = list(layers)
            self._layer_positions = np.array([self.cache_layers.index(layer) for layer in layers])
        counts = np.array([cache.n_tokens for cache in self.caches], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # [n_caches + 1]: global index of each cache's first token
        self.n_tokens = int(self._starts[-1])
        dtypes = {cache.dtype for cache in self.caches}
        # what read(..., out_dtype="storage") returns: the caches' dtype, or float32 for caches of several dtypes
        self.storage_dtype: str = dtypes.pop() if len(dtypes) == 1 else "float32"

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def identity(self) -> list[dict]:
        """What a resumed run must find again: each cache's model, token count, layers and width."""
        return [
            {"model": c.manifest.get("model"), "n_tokens": c.n_tokens, "layers": c.layers, "d_model": c.d_model,
             "lens": c.manifest.get("lens")}
            for c in self.caches
        ]  # fmt: skip

    def damaged_shards(self) -> list[str]:
        """``cache/shard`` names whose checksum or size no longer matches the manifest (a full read)."""
        return [f"{cache.root}/shards/{name}" for cache in self.caches for name in cache.verify()]

    def read(self, indices: np.ndarray, *, out_dtype: OutDtype = "float32", out: np.ndarray | None = None) -> np.ndarray:
        """Activations of the global tokens ``indices`` (1-D int64): [len, n_layers, d_model] float32, or in
        ``storage_dtype`` (its numpy dtype, ``sf.STORAGE_NUMPY``) with ``out_dtype="storage"``; into ``out`` when given."""
        positions = self._layer_positions  # None: all layers
        if len(self.caches) == 1:
            return self.caches[0].read(indices, positions, out_dtype=out_dtype, out=out)
        numpy_dtype = np.float32 if out_dtype == "float32" else sf.STORAGE_NUMPY[self.storage_dtype]
        if out is None:
            out = np.empty((len(indices), self.n_layers, self.d_model), dtype=numpy_dtype)
        # a cache stored in another dtype than the batch (caches of mixed dtypes) is converted to float32 here
        cache_dtypes: list[OutDtype] = ["storage" if c.storage_numpy == numpy_dtype else "float32" for c in self.caches]
        cache_of = np.searchsorted(self._starts, indices, side="right") - 1
        if len(indices) < 2 or bool((indices[1:] >= indices[:-1]).all()):  # ascending: one run of rows per cache
            bounds = np.searchsorted(cache_of, np.arange(len(self.caches) + 1))
            for i, cache in enumerate(self.caches):
                rows = slice(bounds[i], bounds[i + 1])
                if rows.start < rows.stop:
                    cache.read(indices[rows] - self._starts[i], positions, out_dtype=cache_dtypes[i], out=out[rows])
            return out
        for i, cache in enumerate(self.caches):
            mask = cache_of == i
            if mask.any():
                out[mask] = cache.read(indices[mask] - self._starts[i], positions, out_dtype=cache_dtypes[i])
        return out

    def describe_token(self, index: int) -> str:
        """Where global token ``index`` is stored, for error messages."""
        cache_index = int(np.searchsorted(self._starts, index, side="right") - 1)
        cache = self.caches[cache_index]
        shard, row = cache.locate(int(index - self._starts[cache_index]))
        return f"token {index} (shard {shard}, row {row} of cache {cache.root})"

    def check_finite(self, batch: np.ndarray, indices: np.ndarray) -> None:
        """Raise an MlsaeError naming the first token of ``batch`` (float32 or stored) with a NaN or infinite activation."""
        bad = sf.first_non_finite(batch, storage_dtype_of(batch))
        if bad is None:
            return
        row, layer = bad
        raise MlsaeError(
            f"the activations of {self.describe_token(int(indices[row]))} at layer {self.layers[layer]} are NaN or "
            "infinite; rebuild that cache (or drop it from --shards)"
        )


class BatchOrder:
    """Step ``s`` trains on tokens ``s*B .. (s+1)*B - 1`` of the stream made by concatenating, for each
    epoch e, a permutation of all tokens drawn from ``numpy.random.default_rng([seed, e])``."""

    def __init__(self, n_tokens: int, batch_tokens: int, seed: int) -> None:
        self.n_tokens = n_tokens
        self.batch_tokens = batch_tokens
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:  # a batch spans at most two epochs
                self._permutations.pop(min(self._permutations))
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_tokens)
        return self._permutations[epoch]

    def global_batch(self, step: int) -> np.ndarray:
        """The global token indices of step ``step``'s batch, sorted (reading in file order is faster)."""
        start, stop = step * self.batch_tokens, (step + 1) * self.batch_tokens
        parts = []
        for epoch in range(start // self.n_tokens, (stop - 1) // self.n_tokens + 1):
            base = epoch * self.n_tokens
            parts.append(self._permutation(epoch)[max(start, base) - base : min(stop, base + self.n_tokens) - base])
        return np.sort(np.concatenate(parts))

    def local_batch(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """This process's contiguous share of the sorted global batch."""
        share = self.batch_tokens // world_size
        return self.global_batch(step)[rank * share : (rank + 1) * share]


class Prefetcher:
    """Reads the batches of ``steps`` ahead of training, ``depth`` batches ahead, each gathered by
    ``workers`` threads (None: sized to the cores, see :func:`mlsae_cache.parallel_read.default_workers`).

    Iterating yields ``(step, x)`` with x a CPU tensor [b, n_layers, d_model] in the caches' storage dtype
    (``dataset.storage_dtype``: torch.float16, torch.bfloat16 or torch.float32; pinned with ``pin_memory``):
    move it to the device and convert there, ``x.to(device, non_blocking=True).float()``, which is exact.
    Each batch is checked for NaN and infinite values as it is read; an error in the reader (a damaged
    shard, NaN activations) is raised in the training thread at the step it belongs to.
    """

    def __init__(
        self,
        dataset: ActivationDataset,
        order: BatchOrder,
        steps: range,
        rank: int = 0,
        world_size: int = 1,
        depth: int = 2,
        pin_memory: bool = False,
        *,
        workers: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.order = order
        self.steps = steps
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        self.workers = default_workers() if workers is None else workers
        self._rows = RowReader(self.workers)
        # every batch alive at once: depth queued, one being read, the trainer's current and previous one
        self._buffers = HostBuffers(dataset.storage_dtype, pin_memory, keep=depth + 3)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="mlsae-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for step in self.steps:
                if not self._put((step, self._read(step))):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread, which raises it
            self._put((None, exc))

    def _read(self, step: int) -> torch.Tensor:
        """This process's share of step ``step``'s batch, in the storage dtype, checked for NaN and inf."""
        indices = self.order.local_batch(step, self.rank, self.world_size)
        dataset = self.dataset
        x, stored = self._buffers.take((len(indices), dataset.n_layers, dataset.d_model))

        def fill(start: int, stop: int) -> None:  # rows [start, stop), in one of the reader threads
            dataset.read(indices[start:stop], out_dtype="storage", out=stored[start:stop])
            dataset.check_finite(stored[start:stop], indices[start:stop])  # while the rows are in the CPU cache

        self._rows.run(len(indices), stored[:1].nbytes, fill)
        return x

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        for _ in self.steps:
            step, x = self._queue.get()
            if step is None:
                raise x
            yield step, x

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._rows.close()

    def __enter__(self) -> Prefetcher:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

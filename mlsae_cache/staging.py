"""A shard in the making: the work after each forward, done where the activations are.

``ShardStager.add`` takes one batch's block outputs on the model's device and a mask of the tokens
to store. It casts them to the storage dtype on that device (bfloat16 rounded to nearest even, as
``shard_format.to_storage`` does), adds them to the shard's per-layer statistic sums there (float64 sums
of float32-reduced chunks on a CPU, float64 on a GPU: ``shard_format.LayerStatSums``, from the rounded
values the file will hold), and moves only the stored values to the host: into one buffer per shard
(pinned memory, copied on a side stream on CUDA, so the next forward runs meanwhile; on a CPU the cast is
the copy; ``adding_layers`` takes the batch block by block as the forward makes it, so that it is never
held as [B, S, L, d]). Each batch's rows go to the ``sink`` (the shard's writing thread) as soon as they
are staged, so that only the last batch is written after the last forward; ``finish`` gives the shard's
arrays and statistics, to complete the file with. ``HostBuffers`` hands the same few shard buffers round
again once the writer is done with them: fresh memory costs a page fault per 4 KiB at first touch, which
took longer than the cast and the statistics together.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from . import shard_format as sf

# below this many kept tokens per run of consecutive kept tokens, one masked gather beats a copy per run
_MIN_TOKENS_PER_RUN = 64


def kept_runs(keep: np.ndarray) -> np.ndarray:
    """[n_runs, 2] (start, stop) of each run of True in the flat bool mask ``keep``."""
    edges = np.flatnonzero(np.diff(np.r_[0, keep.astype(np.int8), 0]))
    return edges.reshape(-1, 2)


def stored_rows(rows: torch.Tensor, keep: torch.Tensor, storage: torch.dtype, all_kept: bool = False) -> torch.Tensor:
    """The kept rows of ``rows`` [N, L, d] (``keep`` [N] bool, same device) cast to ``storage``, on their device.

    float32 rounds to nearest even like ``shard_format.to_storage``; float16 and bfloat16 convert to each
    other through float32, as the model's output did when it was widened to float32 before storage.
    """
    kept = rows if all_kept else rows[keep]  # [n_kept, L, d]
    if kept.dtype in (storage, torch.float32):
        return kept.to(storage)
    return kept.float().to(storage)


def copy_on_this_thread(dest: torch.Tensor, src: torch.Tensor) -> None:
    """``dest.copy_(src)`` (same shape; ``dest``'s rows may be strided) in pieces of rows torch runs on the
    calling thread: measured here, a cast spread over the thread pool ran slower than one thread once the
    writer's threads and the statistics' threads wanted the same cores (and far slower on a machine busy
    with other work)."""
    step = max(1, sf.SERIAL_ELEMENTS // max(1, src[:1].numel()))
    for start in range(0, src.shape[0], step):
        dest[start : start + step].copy_(src[start : start + step])


class HostBuffers:
    """Shard-sized host buffers, handed out again once given back (from any thread)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
        """A tensor of ``shape`` (a view of a free buffer large enough, or a new one); contents undefined."""
        size = int(np.prod(shape))
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.dtype == dtype and buffer.numel() >= size and buffer.is_pinned() == pin_memory:
                    return self._free.pop(i)[:size].view(shape)
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)

    def give_back(self, tensor: torch.Tensor) -> None:
        """``tensor`` (from ``take``) is no longer read or written by anyone."""
        base = tensor._base if tensor._base is not None else tensor
        with self._lock:
            self._free.append(base.view(-1))


class ShardStager:
    """Collects the stored tokens of one shard, batch by batch, with their statistics."""

    def __init__(
        self, capacity: int, n_layers: int, d_model: int, dtype: str, device: torch.device | str, buffers: HostBuffers | None = None,
        sink: Callable[[sf.ShardContent, Callable[[], None] | None], None] | None = None,
    ) -> None:
        """``capacity``: the most tokens the shard can hold (its sequences x seq_len); ``buffers``: where
        the host buffer comes from (give ``self.host`` back to it once the shard is written); ``sink``: called
        with each batch's part of the shard (its stored rows, a view of ``self.host``, and identity) and a
        function that returns once those rows are on the host (None on a CPU), as soon as they are staged:
        ``CacheWriter``'s ``ShardWriting.append``, which writes them while the next batches are computed."""
        self.device = torch.device(device)
        self.dtype = dtype
        self.storage = sf.STORAGE_TORCH[dtype]
        on_cuda = self.device.type == "cuda"
        shape = (capacity, n_layers, d_model)
        self.host = buffers.take(shape, self.storage, on_cuda) if buffers else torch.empty(shape, dtype=self.storage, pin_memory=on_cuda)  # [capacity, L, d]
        self.stats = sf.LayerStatSums(n_layers, d_model, self.device)
        self.n_tokens = 0
        self._identity: list[tuple[np.ndarray, ...]] = []
        self._copy_stream = torch.cuda.Stream(self.device) if on_cuda else None
        self._sink = sink

    def add(self, acts: torch.Tensor, keep: torch.Tensor, first_sequence: int, input_ids: np.ndarray) -> None:
        """One batch: ``acts`` [B, S, L, d] (any float dtype, on the device), ``keep`` [B, S] bool (tokens
        to store), ``input_ids`` [B, S] the model input of sequences first_sequence.. first_sequence+B-1."""
        batch, seq_len = keep.shape
        keep_host, dest, identity = self._begin(keep, first_sequence, input_ids)
        rows = acts.reshape(batch * seq_len, *acts.shape[2:])  # [B*S, L, d]
        if self._copy_stream is None:
            self._stage_on_cpu(rows, keep_host, dest)
            self._end_on_cpu(dest, identity)
        else:
            staged = stored_rows(rows, keep.reshape(-1), self.storage, all_kept=len(dest) == len(keep_host))  # [n_kept, L, d] on the device
            self.stats.add(staged)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                dest.copy_(staged, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
            staged.record_stream(self._copy_stream)  # its memory is not reused before the copy is done
            self._hand_over(dest, identity, copied.synchronize)

    @contextmanager
    def adding_layers(self, keep: torch.Tensor, first_sequence: int, input_ids: np.ndarray) -> Iterator[Callable[[int, torch.Tensor], None]]:
        """One batch given block by block, on a CPU (``keep`` and ``input_ids`` as for ``add``): yields
        ``stage(slot, hidden)``, to call with each cached block's output [B, S, d] as the forward makes it
        (``slot``: the block's place among the cached layers; ``ResidualReader.read_each``). Each is cast
        straight into the shard's buffer, so the batch is never held as [B, S, L, d]; the shard gets exactly
        what ``add`` of the stacked outputs gives it. The batch is handed over and summed when the block ends."""
        if self._copy_stream is not None:
            raise ValueError("adding_layers stages on a CPU; use add on a GPU")
        keep_host, dest, identity = self._begin(keep, first_sequence, input_ids)

        def stage(slot: int, hidden: torch.Tensor) -> None:
            self._stage_on_cpu(hidden.reshape(len(keep_host), hidden.shape[-1]), keep_host, dest[:, slot])  # [B*S, d] -> [n_kept, d]

        yield stage
        self._end_on_cpu(dest, identity)

    def _begin(self, keep: torch.Tensor, first_sequence: int, input_ids: np.ndarray) -> tuple[np.ndarray, torch.Tensor, tuple[np.ndarray, ...]]:
        """A batch's kept-token mask [B*S] (host), its rows of the shard's buffer [n_kept, L, d] and its identity columns."""
        batch, seq_len = keep.shape
        keep_host = keep.cpu().numpy().reshape(-1)  # [B*S]
        n_kept = int(keep_host.sum())
        dest = self.host[self.n_tokens : self.n_tokens + n_kept]  # [n_kept, L, d]
        b_idx, pos = np.divmod(np.flatnonzero(keep_host), seq_len)
        identity = (
            (first_sequence + b_idx).astype(np.int64),
            pos.astype(np.int32),
            input_ids[b_idx, pos].astype(np.int32),
            np.arange(first_sequence, first_sequence + batch, dtype=np.int64),
            np.asarray(input_ids, dtype=np.int32),
        )
        self._identity.append(identity)
        self.n_tokens += n_kept
        return keep_host, dest, identity

    def _end_on_cpu(self, dest: torch.Tensor, identity: tuple[np.ndarray, ...]) -> None:
        self._hand_over(dest, identity, None)  # written while the statistics are summed
        self.stats.add(dest)

    def _hand_over(self, dest: torch.Tensor, identity: tuple[np.ndarray, ...], ready: Callable[[], None] | None) -> None:
        if self._sink is not None:
            self._sink(sf.ShardContent(sf.storage_numpy(dest), *identity), ready)

    def _stage_on_cpu(self, rows: torch.Tensor, keep: np.ndarray, dest: torch.Tensor) -> None:
        """Cast the kept rows of ``rows`` [N, ...] straight into ``dest`` [n_kept, ...] (its rows may be strided):
        one copy per run of kept tokens (the cast is the copy)."""
        runs = kept_runs(keep)
        needs_float32 = rows.dtype not in (self.storage, torch.float32)
        if needs_float32 or len(runs) * _MIN_TOKENS_PER_RUN > len(dest):
            dest.copy_(stored_rows(rows, torch.from_numpy(keep), self.storage))
            return
        offset = 0
        for start, stop in runs.tolist():
            copy_on_this_thread(dest[offset : offset + stop - start], rows[start:stop])
            offset += stop - start

    def finish(self) -> tuple[sf.ShardContent, dict]:
        """The shard's arrays (activations in the storage numpy dtype) and its statistic sums."""
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        columns = [np.concatenate(column) for column in zip(*self._identity)]
        content = sf.ShardContent(sf.storage_numpy(self.host[: self.n_tokens]), *columns)
        return content, self.stats.to_json()

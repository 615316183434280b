"""A shard in the making: the work after each forward, done where the activations are.

``ShardStager.add`` takes one batch's block outputs on the model's device and a mask of the tokens
to store. It casts them to the storage dtype on that device (bfloat16 rounded to nearest even, as
``shard_format.to_storage`` does), adds them to the shard's per-layer statistic sums there (float64 sums
of float32-reduced chunks on a CPU, float64 on a GPU: ``shard_format.LayerStatSums``, from the rounded
values the file will hold), and moves only the
stored values to the host: into one buffer per shard (pinned memory, copied on a side stream on CUDA,
so the next forward runs meanwhile; on a CPU the cast is the copy). ``finish`` hands the shard's arrays
and statistics to the writer. ``HostBuffers`` hands the same few shard buffers round again once the
writer is done with them: fresh memory costs a page fault per 4 KiB at first touch, which took longer
than the cast and the statistics together.
"""

from __future__ import annotations

import threading

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
    """``dest.copy_(src)`` (contiguous, same shape) in pieces torch runs on the calling thread: measured here,
    a cast spread over the thread pool ran slower than one thread once the writer's threads and the
    statistics' threads wanted the same cores (and far slower on a machine busy with other work)."""
    flat_dest, flat_src = dest.view(-1), src.reshape(-1)
    for start in range(0, flat_src.numel(), sf.SERIAL_ELEMENTS):
        flat_dest[start : start + sf.SERIAL_ELEMENTS].copy_(flat_src[start : start + sf.SERIAL_ELEMENTS])


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
        self, capacity: int, n_layers: int, d_model: int, dtype: str, device: torch.device | str, buffers: HostBuffers | None = None
    ) -> None:
        """``capacity``: the most tokens the shard can hold (its sequences x seq_len); ``buffers``: where
        the host buffer comes from (give ``self.host`` back to it once the shard is written)."""
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

    def add(self, acts: torch.Tensor, keep: torch.Tensor, first_sequence: int, input_ids: np.ndarray) -> None:
        """One batch: ``acts`` [B, S, L, d] (any float dtype, on the device), ``keep`` [B, S] bool (tokens
        to store), ``input_ids`` [B, S] the model input of sequences first_sequence.. first_sequence+B-1."""
        batch, seq_len = keep.shape
        keep_host = keep.cpu().numpy().reshape(-1)  # [B*S]
        rows = acts.reshape(batch * seq_len, *acts.shape[2:])  # [B*S, L, d]
        n_kept = int(keep_host.sum())
        dest = self.host[self.n_tokens : self.n_tokens + n_kept]  # [n_kept, L, d]
        if self._copy_stream is None:
            self._stage_on_cpu(rows, keep_host, dest)
            self.stats.add(dest)
        else:
            staged = stored_rows(rows, keep.reshape(-1), self.storage, all_kept=n_kept == len(keep_host))  # [n_kept, L, d] on the device
            self.stats.add(staged)
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                dest.copy_(staged, non_blocking=True)
            staged.record_stream(self._copy_stream)  # its memory is not reused before the copy is done
        self.n_tokens += n_kept
        b_idx, pos = np.divmod(np.flatnonzero(keep_host), seq_len)
        self._identity.append(
            (
                (first_sequence + b_idx).astype(np.int64),
                pos.astype(np.int32),
                input_ids[b_idx, pos].astype(np.int32),
                np.arange(first_sequence, first_sequence + batch, dtype=np.int64),
                np.asarray(input_ids, dtype=np.int32),
            )
        )

    def _stage_on_cpu(self, rows: torch.Tensor, keep: np.ndarray, dest: torch.Tensor) -> None:
        """Cast the kept rows straight into ``dest``: one copy per run of kept tokens (the cast is the copy)."""
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

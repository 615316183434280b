"""Reading a finished cache: the one interface the trainer and the analysis use.

``open_cache(path)`` returns a ``Cache`` whose ``read(indices)`` gathers tokens by global index (the
order of shards, then the order within each shard) as float32 ``[len(indices), n_layers, d_model]``,
from memory-mapped shards of either format. ``out_dtype="storage"`` skips the float32 conversion (the
caller converts on its device, moving half the bytes for float16 and bfloat16), ``out=`` gathers into a
buffer the caller owns (a pinned host tensor's numpy view), and several threads may read one ``Cache``
at once: numpy's copies out of the memory maps release the GIL.
"""

from __future__ import annotations

import threading
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from . import shard_format as sf
from .errors import CacheError
from .parallel_read import io_threads

OutDtype = Literal["float32", "storage"]


class Cache:
    """A finished activation cache. Cheap to open: shards are memory-mapped on first use."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.layers: list[int] = list(manifest["layers"])
        self.d_model: int = int(manifest["d_model"])
        self.dtype: str = manifest["dtype"]
        self.format: str = manifest["format"]
        self.shard_files: list[str] = [s["file"] for s in manifest["shards"]]
        counts = np.array([s["n_tokens"] for s in manifest["shards"]], dtype=np.int64)
        # shard_starts[i] = global index of shard i's first token; shard_starts[-1] = n_tokens
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])
        self.n_tokens: int = int(self.shard_starts[-1])
        # shards hold consecutive whole sequences: shard i covers sequences first[i] .. first[i]+count[i]-1
        self._shard_first_sequence = np.array([s["first_sequence"] for s in manifest["shards"]], dtype=np.int64)
        self.n_sequences: int = int(sum(s["n_sequences"] for s in manifest["shards"]))
        self._shards: dict[int, sf.ShardArrays] = {}
        self._opening = threading.Lock()  # readers in several threads open each shard once

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}, model={self.manifest.get('model')!r}, n_tokens={self.n_tokens}, layers={self.layers}, d_model={self.d_model})"

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def stats(self) -> dict[str, dict]:
        """Per-layer statistics gathered while writing, keyed by model layer index as a string."""
        return self.manifest["stats"]

    def layer_means(self) -> np.ndarray:
        """[n_layers, d_model] float64 mean activation vector of each stored layer."""
        return np.array([self.stats[str(layer)]["mean"] for layer in self.layers], dtype=np.float64)

    # -- shards

    @property
    def storage_numpy(self) -> np.dtype:
        """The numpy dtype of ``read(..., out_dtype="storage")``: float16, float32, or uint16 holding bfloat16 bits."""
        return sf.STORAGE_NUMPY[self.dtype]

    def _shard(self, i: int) -> sf.ShardArrays:
        shard = self._shards.get(i)
        if shard is not None:
            return shard
        with self._opening:
            return self._open_shard(i)

    def _open_shard(self, i: int) -> sf.ShardArrays:
        if i not in self._shards:
            path = self.root / sf.SHARD_DIR / self.shard_files[i]
            try:
                shard = sf.open_shard(path, self.format, self.dtype, self.n_layers, self.d_model)
            except (OSError, ValueError, KeyError) as exc:
                raise CacheError(f"shard {path} cannot be read ({exc}); run `mlsae-cache verify {self.root}` and rebuild the cache") from None
            if len(shard.sequence) != self.manifest["shards"][i]["n_tokens"]:
                raise CacheError(f"shard {path} holds a different number of tokens than the manifest records; rebuild the cache")
            self._shards[i] = shard  # only a shard that passed the checks is kept
        return self._shards[i]

    def locate(self, index: int) -> tuple[str, int]:
        """(shard file name, index within that shard) of a global token index."""
        if not 0 <= index < self.n_tokens:
            raise IndexError(f"token {index} out of range for a cache of {self.n_tokens} tokens")
        shard = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        return self.shard_files[shard], int(index - self.shard_starts[shard])

    # -- reading

    def read(
        self, indices, layer_positions=None, *, out_dtype: OutDtype = "float32", out: np.ndarray | None = None
    ) -> np.ndarray:
        """Activations of the tokens at global ``indices`` (any order, repeats allowed; ascending is fastest).

        ``layer_positions``: positions on the cache's layer axis (into ``self.layers``) to read, in the
        order given; only those vectors are gathered and converted (default: all layers).
        ``out_dtype``: ``"float32"``, or ``"storage"`` for the stored values unconverted (``storage_numpy``).
        ``out``: an array of the result's shape and dtype to gather into (returned); default a new one.
        Returns [len(indices), n_layers or len(layer_positions), d_model].
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(indices)
        ascending = n < 2 or bool((indices[1:] >= indices[:-1]).all())
        # (initial=0: no tokens, nothing out of range; 0 itself is in range)
        low, high = (indices[0], indices[-1]) if ascending and n else (indices.min(initial=0), indices.max(initial=0))
        if low < 0 or high >= self.n_tokens:
            raise IndexError(f"token indices must lie in [0, {self.n_tokens})")
        if layer_positions is not None:
            layer_positions = np.asarray(layer_positions, dtype=np.int64).reshape(-1)
            if len(layer_positions) and (layer_positions.min() < 0 or layer_positions.max() >= self.n_layers):
                raise IndexError(f"layer positions must lie in [0, {self.n_layers})")
        n_layers = self.n_layers if layer_positions is None else len(layer_positions)
        out = self._output(out, (n, n_layers, self.d_model), out_dtype)
        if n == 0:
            return out
        if ascending:  # the trainer's batches: each shard's tokens are one run of rows of out
            first, last = (np.searchsorted(self.shard_starts, indices[[0, -1]], side="right") - 1).tolist()
            cuts = np.searchsorted(indices, self.shard_starts[first + 1 : last + 1]).tolist()  # first row of each next shard
            for shard, start, stop in zip(range(first, last + 1), [0, *cuts], [*cuts, n]):
                if start < stop:
                    self._gather(shard, indices[start:stop] - self.shard_starts[shard], layer_positions, out[start:stop])
            return out
        shard_of = np.searchsorted(self.shard_starts, indices, side="right") - 1  # [n]
        order = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[order], np.arange(len(self.shard_files) + 1))
        for shard in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            picked = order[bounds[shard] : bounds[shard + 1]]
            local = indices[picked] - self.shard_starts[shard]
            # gathering rows in ascending file order is kinder to the page cache
            by_offset = np.argsort(local, kind="stable")
            rows = np.empty((len(picked), *out.shape[1:]), out.dtype)  # [m, n_layers, d]
            self._gather(shard, local[by_offset], layer_positions, rows)
            out[picked[by_offset]] = rows
        return out

    def read_range(
        self, start: int, stop: int, *, out_dtype: OutDtype = "float32", out: np.ndarray | None = None
    ) -> np.ndarray:
        """Activations of the contiguous global tokens [start, stop): [stop-start, n_layers, d_model] float32,
        or stored unconverted with ``out_dtype="storage"``; into ``out`` when given (see ``read``)."""
        start, stop = max(0, int(start)), min(int(stop), self.n_tokens)
        out = self._output(out, (max(0, stop - start), self.n_layers, self.d_model), out_dtype)
        first = int(np.searchsorted(self.shard_starts, start, side="right") - 1)
        pos = start
        for shard in range(first, len(self.shard_files)):
            if pos >= stop:
                break
            s0, s1 = self.shard_starts[shard], self.shard_starts[shard + 1]
            take = min(stop, s1) - pos
            if take <= 0:
                continue
            rows = self._shard(shard).acts[pos - s0 : pos - s0 + take]  # [take, n_layers, d] a view of the memory map
            self._convert(rows, out[pos - start : pos - start + take])
            pos += take
        return out

    def _output(self, out: np.ndarray | None, shape: tuple[int, ...], out_dtype: OutDtype) -> np.ndarray:
        if out_dtype not in ("float32", "storage"):
            raise ValueError(f"out_dtype must be 'float32' or 'storage', not {out_dtype!r}")
        dtype = np.dtype(np.float32) if out_dtype == "float32" else self.storage_numpy
        if out is None:
            return np.empty(shape, dtype)
        if out.shape != shape or out.dtype != dtype:
            raise ValueError(f"out must be a {dtype} array of shape {shape}, not {out.dtype} {out.shape}")
        return out

    def _gather(self, shard: int, local: np.ndarray, layer_positions: np.ndarray | None, dest: np.ndarray) -> None:
        """dest[i] = shard row local[i] (its layer_positions), converted to dest's dtype."""
        acts = self._shard(shard).acts  # [n, n_layers, d]
        if layer_positions is None and isinstance(acts, np.ndarray) and dest.dtype == acts.dtype:
            # straight from the memory map into dest (mode="clip": no buffered copy; local is in range)
            np.take(acts, local, axis=0, out=dest, mode="clip")
            return
        if layer_positions is None:
            rows = acts[local]  # [m, n_layers, d]
        else:  # one gather of the wanted (token, layer) vectors, not all layers then a selection
            rows = acts[local[:, None], layer_positions[None, :]]  # [m, len(layer_positions), d]
        self._convert(rows, dest)

    def _convert(self, stored: np.ndarray, dest: np.ndarray) -> None:
        if dest.dtype == stored.dtype:
            np.copyto(dest, stored)
        else:
            sf.from_storage(stored, self.dtype, out=dest)

    def sequence_tokens(self, sequences) -> np.ndarray:
        """The full model input (special tokens included) of the given sequence indices: int64 [n, seq_len]."""
        sequences = np.asarray(sequences, dtype=np.int64).reshape(-1)
        if len(sequences) and (sequences.min() < 0 or sequences.max() >= self.n_sequences):
            raise IndexError(f"sequence indices must lie in [0, {self.n_sequences})")
        out = np.empty((len(sequences), int(self.manifest["seq_len"])), dtype=np.int64)
        shard_of = np.searchsorted(self._shard_first_sequence, sequences, side="right") - 1
        for i, (seq, shard) in enumerate(zip(sequences, shard_of)):
            out[i] = self._shard(int(shard)).input_ids[seq - self._shard_first_sequence[shard]]
        return out

    @cached_property
    def _token_columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shards = [self._shard(i) for i in range(len(self.shard_files))]
        return (
            np.concatenate([s.sequence for s in shards]).astype(np.int64),
            np.concatenate([s.position for s in shards]).astype(np.int32),
            np.concatenate([s.token_id for s in shards]).astype(np.int32),
        )

    def token_table(self) -> pl.DataFrame:
        """One row per global token index: ``sequence``, ``position``, ``token_id``."""
        sequence, position, token_id = self._token_columns
        return pl.DataFrame({"sequence": sequence, "position": position, "token_id": token_id})

    # -- integrity

    def verify(self) -> list[str]:
        """Re-check every shard's size and checksum, and config.json and the sidecars, against the manifest;
        return the damaged files' names (shard file names, then relative paths of metadata files)."""
        return verify_shards(self.root, self.manifest) + sf.damaged_metadata(self.root, self.manifest)


def verify_shards(root: Path, manifest: dict[str, Any], progress: bool = False) -> list[str]:
    """Names of the shards that are missing, of another size, or fail the checksum their entry records
    (``"blake3"``, or ``"sha256"`` in caches written before it); a few shards are hashed at once."""
    from concurrent.futures import ThreadPoolExecutor

    def is_damaged(entry: dict[str, Any]) -> bool:
        path = Path(root) / sf.SHARD_DIR / entry["file"]
        recorded = sf.recorded_checksum(entry)
        try:
            return recorded is None or path.stat().st_size != entry["bytes"] or sf.file_checksum(path, recorded[0]) != recorded[1]
        except OSError:  # missing or unreadable
            return True

    shards = manifest["shards"]
    with ThreadPoolExecutor(max_workers=io_threads()) as pool:
        verdicts = pool.map(is_damaged, shards)  # in order
        if progress:
            from tqdm import tqdm

            verdicts = tqdm(verdicts, total=len(shards), desc="verify", unit="shard")
        return [entry["file"] for entry, damaged in zip(shards, verdicts) if damaged]


def open_cache(path: str | Path) -> Cache:
    """Open a finished cache directory; a missing, unfinished or foreign directory raises CacheError."""
    root = Path(path)
    if not root.is_dir():
        raise CacheError(f"no cache at {root}: the directory does not exist; build one with `mlsae-cache --out {root} ...`")
    manifest_path = root / sf.MANIFEST
    if not manifest_path.exists():
        if (root / sf.CONFIG).exists():
            raise CacheError(f"the cache at {root} is unfinished (no manifest.json); run its mlsae-cache command again to finish it")
        raise CacheError(f"{root} holds no cache (no manifest.json); point at a directory written by mlsae-cache")
    try:
        manifest = sf.read_json(manifest_path)
    except (ValueError, UnicodeDecodeError):
        raise CacheError(f"{manifest_path} is not valid JSON; rebuild the cache") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{manifest_path} is not a cache manifest; rebuild the cache")
    damage = sf.manifest_damage(manifest)
    if damage is not None:
        raise CacheError(
            f"{manifest_path} is damaged ({damage}); delete it and run the same mlsae-cache command again, "
            "which checks the shards and writes it anew"
        )
    if manifest.get("format_version") != sf.FORMAT_VERSION:
        raise CacheError(f"{root} was written by an incompatible mlsae-cache (format {manifest.get('format_version')}); rebuild it")
    if manifest.get("n_tokens", 0) == 0:
        raise CacheError(f"the cache at {root} holds no tokens; rebuild it with more text")
    return Cache(root, manifest)

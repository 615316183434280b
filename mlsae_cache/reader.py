"""Reading a finished cache: the one interface the trainer and the analysis use.

``open_cache(path)`` returns a ``Cache`` whose ``read(indices)`` gathers tokens by global index (the
order of shards, then the order within each shard) as float32 ``[len(indices), n_layers, d_model]``,
from memory-mapped shards of either format.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from . import shard_format as sf
from .errors import CacheError


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

    def _shard(self, i: int) -> sf.ShardArrays:
        if i not in self._shards:
            path = self.root / sf.SHARD_DIR / self.shard_files[i]
            try:
                self._shards[i] = sf.open_shard(path, self.format, self.dtype, self.n_layers, self.d_model)
            except (OSError, ValueError, KeyError) as exc:
                raise CacheError(f"shard {path} cannot be read ({exc}); run `mlsae-cache verify {self.root}` and rebuild the cache") from None
            if len(self._shards[i].sequence) != self.manifest["shards"][i]["n_tokens"]:
                raise CacheError(f"shard {path} holds a different number of tokens than the manifest records; rebuild the cache")
        return self._shards[i]

    def locate(self, index: int) -> tuple[str, int]:
        """(shard file name, index within that shard) of a global token index."""
        if not 0 <= index < self.n_tokens:
            raise IndexError(f"token {index} out of range for a cache of {self.n_tokens} tokens")
        shard = int(np.searchsorted(self.shard_starts, index, side="right") - 1)
        return self.shard_files[shard], int(index - self.shard_starts[shard])

    # -- reading

    def read(self, indices, layer_positions=None) -> np.ndarray:
        """Activations of the tokens at global ``indices`` (any order, repeats allowed).

        ``layer_positions``: positions on the cache's layer axis (into ``self.layers``) to read, in the
        order given; only those vectors are gathered and converted (default: all layers).
        Returns float32 [len(indices), n_layers or len(layer_positions), d_model].
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n_tokens):
            raise IndexError(f"token indices must lie in [0, {self.n_tokens})")
        if layer_positions is not None:
            layer_positions = np.asarray(layer_positions, dtype=np.int64).reshape(-1)
            if len(layer_positions) and (layer_positions.min() < 0 or layer_positions.max() >= self.n_layers):
                raise IndexError(f"layer positions must lie in [0, {self.n_layers})")
        n_layers = self.n_layers if layer_positions is None else len(layer_positions)
        out = np.empty((len(indices), n_layers, self.d_model), dtype=np.float32)
        shard_of = np.searchsorted(self.shard_starts, indices, side="right") - 1  # [n]
        order = np.argsort(shard_of, kind="stable")
        bounds = np.searchsorted(shard_of[order], np.arange(len(self.shard_files) + 1))
        for shard in range(len(self.shard_files)):
            picked = order[bounds[shard] : bounds[shard + 1]]
            if len(picked) == 0:
                continue
            local = indices[picked] - self.shard_starts[shard]
            # gathering rows in ascending file order is kinder to the page cache
            by_offset = np.argsort(local, kind="stable")
            acts = self._shard(shard).acts  # [n, n_layers, d]
            if layer_positions is None:
                rows = acts[local[by_offset]]  # [m, n_layers, d]
            else:  # one gather of the wanted (token, layer) vectors, not all layers then a selection
                rows = acts[local[by_offset][:, None], layer_positions[None, :]]  # [m, len(layer_positions), d]
            out[picked[by_offset]] = sf.from_storage(rows, self.dtype)
        return out

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Activations of the contiguous global tokens [start, stop): float32 [stop-start, n_layers, d_model]."""
        start, stop = max(0, int(start)), min(int(stop), self.n_tokens)
        out = np.empty((max(0, stop - start), self.n_layers, self.d_model), dtype=np.float32)
        first = int(np.searchsorted(self.shard_starts, start, side="right") - 1)
        pos = start
        for shard in range(first, len(self.shard_files)):
            if pos >= stop:
                break
            s0, s1 = self.shard_starts[shard], self.shard_starts[shard + 1]
            take = min(stop, s1) - pos
            if take <= 0:
                continue
            rows = self._shard(shard).acts[pos - s0 : pos - s0 + take]
            out[pos - start : pos - start + take] = sf.from_storage(rows, self.dtype)
            pos += take
        return out

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
        """Re-check every shard's size and sha256 against the manifest; return the damaged shard names."""
        return verify_shards(self.root, self.manifest)


def verify_shards(root: Path, manifest: dict[str, Any], progress: bool = False) -> list[str]:
    damaged = []
    shards = manifest["shards"]
    if progress:
        from tqdm import tqdm

        shards = tqdm(shards, desc="verify", unit="shard")
    for entry in shards:
        path = Path(root) / sf.SHARD_DIR / entry["file"]
        if not path.exists() or path.stat().st_size != entry["bytes"] or sf.file_sha256(path) != entry["sha256"]:
            damaged.append(entry["file"])
    return damaged


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
    except ValueError:
        raise CacheError(f"{manifest_path} is not valid JSON; rebuild the cache") from None
    if manifest.get("format_version") != sf.FORMAT_VERSION:
        raise CacheError(f"{root} was written by an incompatible mlsae-cache (format {manifest.get('format_version')}); rebuild it")
    if manifest.get("n_tokens", 0) == 0:
        raise CacheError(f"the cache at {root} holds no tokens; rebuild it with more text")
    return Cache(root, manifest)

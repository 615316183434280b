"""Writing a cache: shards in a background thread, sidecars after shards, the manifest last.

The writer knows nothing about language models: it takes finished arrays per shard. ``CacheWriter``
is driven by the activation runner (``mlsae_cache.runner``) and by ``write_array_cache`` (synthetic
caches for tests and benchmarks).
"""

from __future__ import annotations

import queue
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import shard_format as sf
from .errors import CacheError

# config keys that must match for a directory to be resumed rather than refused
IDENTITY_KEYS = (
    "model", "revision", "tokenizer", "dataset", "split", "text_column", "seq_len", "tokens",
    "layers", "d_model", "dtype", "format", "lens", "shard_sequences", "format_version",
)  # fmt: skip

STAT_CHUNK_TOKENS = 8192


def check_or_claim_directory(root: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Make ``root`` hold a cache of exactly ``config`` (claiming it if empty), or refuse.

    A directory holding another cache, or files that are not a cache, is refused unless
    ``overwrite``; with ``overwrite`` the old cache files are removed first.
    """
    root = Path(root)
    config_path = root / sf.CONFIG
    if root.exists() and not root.is_dir():
        raise CacheError(f"--out {root} is a file, not a directory; choose a directory path")
    if config_path.exists():
        stored = sf.read_json(config_path)
        differing = [k for k in IDENTITY_KEYS if stored.get(k) != config.get(k)]
        if differing and not overwrite:
            raise CacheError(
                f"{root} holds a cache of another configuration (differs in: {', '.join(differing)}); "
                "choose another --out or pass --overwrite to replace it"
            )
        if differing:
            _remove_cache_files(root)
    elif root.exists() and any(root.iterdir()):
        if not overwrite:
            raise CacheError(f"{root} is not empty and holds no cache; choose another --out or pass --overwrite")
        _remove_cache_files(root)
    (root / sf.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    # temporary files of writes killed half-way: never part of the cache, safe to drop
    for debris in (root / sf.SHARD_DIR).glob(".*.tmp"):
        debris.unlink(missing_ok=True)
    if not config_path.exists():
        sf.atomic_write_json(config_path, config)


def _remove_cache_files(root: Path) -> None:
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


class CacheWriter:
    """Writes the shards of one cache directory; one instance per process (rank)."""

    def __init__(self, root: Path, config: dict[str, Any], queue_depth: int = 2) -> None:
        self.root = Path(root)
        self.config = config
        self.fmt: str = config["format"]
        self.dtype: str = config["dtype"]
        self.shard_dir = self.root / sf.SHARD_DIR
        self._queue: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="mlsae-shard-writer", daemon=True)
        self._thread.start()

    # -- which shards exist

    def shard_path(self, index: int) -> Path:
        return self.shard_dir / sf.shard_name(index, self.fmt)

    def sidecar_path(self, index: int) -> Path:
        return self.shard_dir / sf.sidecar_name(index)

    def is_done(self, index: int) -> bool:
        return shard_is_done(self.shard_dir, index, self.fmt)

    # -- writing

    def submit(self, index: int, content: sf.ShardContent) -> None:
        """Queue a shard for writing; blocks while ``queue_depth`` shards are already waiting."""
        self._raise_pending()
        self._queue.put((index, content))

    def close(self) -> None:
        """Wait until every queued shard is on disk; re-raise any error from the writer thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain: the first error is reported, nothing more is written
            try:
                self._write(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._error = exc

    def _write(self, index: int, content: sf.ShardContent) -> None:
        path = self.shard_path(index)
        sf.write_shard(path, content, self.fmt, self.dtype)
        stats = _stat_sums_chunked(content.acts, self.dtype)
        sidecar = {
            "index": index,
            "file": path.name,
            "n_tokens": int(content.acts.shape[0]),
            "n_sequences": int(len(content.input_sequence)),
            "first_sequence": int(content.input_sequence[0]) if len(content.input_sequence) else None,
            "bytes": path.stat().st_size,
            "sha256": sf.file_sha256(path),
            "stats": stats,
        }
        sf.atomic_write_json(self.sidecar_path(index), sidecar)

def _stat_sums_chunked(stored: np.ndarray, dtype: str) -> dict:
    """Per-layer statistic sums of a shard, in chunks so float64 temporaries stay small."""
    n, n_layers, _ = stored.shape
    if n == 0:
        return {"count": 0, "sum": [], "sum_sq_norm": [0.0] * n_layers, "sum_norm": [0.0] * n_layers}
    parts = [sf.layer_stat_sums(sf.from_storage(stored[i : i + STAT_CHUNK_TOKENS], dtype)) for i in range(0, n, STAT_CHUNK_TOKENS)]
    return {
        "count": n,
        "sum": np.sum([p["sum"] for p in parts], axis=0).tolist(),
        "sum_sq_norm": np.sum([p["sum_sq_norm"] for p in parts], axis=0).tolist(),
        "sum_norm": np.sum([p["sum_norm"] for p in parts], axis=0).tolist(),
    }


def finalize_cache(root: Path, config: dict[str, Any], n_shards: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Merge the sidecars of shards 0..n_shards-1 into ``manifest.json`` (written last, atomically)."""
    shard_dir = Path(root) / sf.SHARD_DIR
    missing = [i for i in range(n_shards) if not shard_is_done(shard_dir, i, config["format"])]
    if missing:
        raise CacheError(f"{len(missing)} shard(s) are not written yet (first: {missing[0]}); run the same command again to finish")
    sidecars = [sf.read_json(shard_dir / sf.sidecar_name(i)) for i in range(n_shards)]
    manifest = build_manifest(config, sidecars, extra)
    sf.atomic_write_json(Path(root) / sf.MANIFEST, manifest)
    return manifest


def shard_is_done(shard_dir: Path, index: int, fmt: str) -> bool:
    """A shard is done when its sidecar exists and the shard file has the size the sidecar records."""
    side, shard = shard_dir / sf.sidecar_name(index), shard_dir / sf.shard_name(index, fmt)
    if not (side.exists() and shard.exists()):
        return False
    try:
        return sf.read_json(side)["bytes"] == shard.stat().st_size
    except (ValueError, KeyError, OSError):
        return False


def build_manifest(config: dict[str, Any], sidecars: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
    shards = [
        {k: side[k] for k in ("file", "n_tokens", "n_sequences", "first_sequence", "bytes", "sha256")} for side in sidecars
    ]
    n_tokens = sum(s["n_tokens"] for s in shards)
    return {
        **config,
        **extra,
        "n_tokens": n_tokens,
        "n_shards": len(shards),
        "shards": shards,
        "stats": sf.merge_layer_stats(sidecars, config["layers"]),
    }


def write_array_cache(
    out_dir: str | Path,
    acts: np.ndarray,
    *,
    token_ids: np.ndarray | None = None,
    layers: list[int] | None = None,
    model: str = "synthetic",
    dtype: str = "float32",
    format: str = "hdf5",  # noqa: A002 - mirrors the CLI option
    shard_tokens: int = 65536,
    seq_len: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write an in-memory array ``acts`` [N, n_layers, d_model] as a finished cache (tests, benchmarks).

    Token i is at position ``i % seq_len`` of sequence ``i // seq_len``; shards hold whole sequences
    (``shard_tokens`` is rounded down to a multiple of ``seq_len``).
    """
    acts = np.asarray(acts, dtype=np.float32)
    n, n_layers, d_model = acts.shape
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    if len(layers) != n_layers:
        raise ValueError(f"{len(layers)} layers named for an array with {n_layers} layers")
    token_ids = np.zeros(n, np.int32) if token_ids is None else np.asarray(token_ids, np.int32)
    config = {
        "format_version": sf.FORMAT_VERSION, "model": model, "revision": None, "tokenizer": None,
        "dataset": "array", "split": None, "text_column": None, "seq_len": seq_len, "tokens": n,
        "layers": layers, "d_model": d_model, "dtype": dtype, "format": format, "lens": None,
        "shard_sequences": shard_tokens,
    }  # fmt: skip
    root = Path(out_dir)
    check_or_claim_directory(root, config, overwrite)
    writer = CacheWriter(root, config)
    shard_tokens = max(seq_len, shard_tokens - shard_tokens % seq_len)
    n_shards = 0
    try:
        for index, start in enumerate(range(0, n, shard_tokens)):
            stop = min(start + shard_tokens, n)
            token = np.arange(start, stop, dtype=np.int64)
            input_sequence = np.arange(start // seq_len, -(-stop // seq_len), dtype=np.int64)
            input_ids = np.zeros((len(input_sequence), seq_len), np.int32)  # the last sequence may be partial
            input_ids.reshape(-1)[: stop - start] = token_ids[start:stop]
            content = sf.ShardContent(sf.to_storage(acts[start:stop], dtype), token // seq_len, (token % seq_len).astype(np.int32),
                                      token_ids[start:stop], input_sequence, input_ids)  # fmt: skip
            writer.submit(index, content)
            n_shards += 1
    finally:
        writer.close()
    finalize_cache(root, config, n_shards, {"n_sequences": -(-n // seq_len), "n_model_tokens": n, "world_size": 1})
    return root

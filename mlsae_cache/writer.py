"""Writing a cache: shards in background threads, sidecars after shards, the manifest last.

The writer knows nothing about language models: it takes the arrays of each shard, whole or in parts
of whole sequences as they are computed. ``CacheWriter``
is driven by the activation runner (``mlsae_cache.runner``) and by ``write_array_cache`` (synthetic
caches for tests and benchmarks).
"""

from __future__ import annotations

import queue
import re
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import shard_format as sf
from .errors import CacheError
from .parallel_read import io_threads

# config keys that must match for a directory to be resumed rather than refused
IDENTITY_KEYS = (
    "model", "revision", "tokenizer", "dataset", "split", "text_column", "seq_len", "tokens",
    "layers", "d_model", "dtype", "format", "lens", "shard_sequences", "format_version", "token_filter",
)  # fmt: skip


def check_or_claim_directory(root: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Make ``root`` hold a cache of exactly ``config`` (claiming it if empty), or refuse.

    A cache of another configuration is refused unless ``overwrite`` or it has no shard yet (a run that
    failed on its inputs before writing any: the corrected command replaces it). Whatever is removed is
    a file mlsae-cache wrote; a directory holding anything else is refused, ``overwrite`` or not.
    """
    root = Path(root)
    config_path = root / sf.CONFIG
    if root.exists() and not root.is_dir():
        raise CacheError(f"--out {root} is a file, not a directory; choose a directory path")
    if config_path.exists() and config_path.is_file() and _is_cache_json(config_path):
        stored = read_stored_config(config_path)
        differing = [k for k in IDENTITY_KEYS if stored.get(k) != config.get(k)]
        if differing and holds_shards(root) and not overwrite:
            raise CacheError(
                f"{root} holds a cache of another configuration (its {sf.CONFIG} differs in: {', '.join(differing)}); "
                "choose another --out or pass --overwrite to replace it"
            )
        if differing:
            _remove_cache_files(root)
    elif root.exists() and any(root.iterdir()):
        refuse_foreign_files(root, "is not empty and holds no cache")
        if holds_shards(root) and not overwrite:
            raise CacheError(f"{root} holds cache shards but no {sf.CONFIG}; choose another --out or pass --overwrite to replace them")
        _remove_cache_files(root)
    (root / sf.SHARD_DIR).mkdir(parents=True, exist_ok=True)
    # temporary files of writes killed half-way: never part of the cache, safe to drop
    for folder, in_shard_dir in ((root / sf.SHARD_DIR, True), (root, False)):
        for debris in folder.glob(".*.tmp"):
            if _is_cache_file(debris.name, in_shard_dir):
                debris.unlink(missing_ok=True)
    if not config_path.exists():
        sf.atomic_write_json(config_path, config)


# what mlsae-cache writes: at the top, the config, the manifest and the shard folder (and the atomic
# writes' temporary files, ".NAME.XXXX.tmp"); in the shard folder, shards, sidecars and their temporaries
_ROOT_FILE = re.compile(r"(config|manifest)\.json|\.(config|manifest)\.json\..+\.tmp")
_SHARD_FILE = re.compile(r"\.?shard-\d{6,}\.(h5|tar|json)(\..+\.tmp)?")


def _is_cache_file(name: str, in_shard_dir: bool) -> bool:
    return bool((_SHARD_FILE if in_shard_dir else _ROOT_FILE).fullmatch(name))


def _first_foreign_file(root: Path) -> Path | None:
    """The first path under ``root`` that mlsae-cache did not write (None if every path is its own)."""
    for child in sorted(root.iterdir()):
        if child.name == sf.SHARD_DIR and child.is_dir() and not child.is_symlink():
            for inner in sorted(child.iterdir()):
                if not (inner.is_file() and not inner.is_symlink() and _is_cache_file(inner.name, in_shard_dir=True)):
                    return inner
        elif not (child.is_file() and not child.is_symlink() and _is_cache_file(child.name, in_shard_dir=False)):
            return child
        elif child.suffix == ".json" and not _is_cache_json(child):  # config.json and manifest.json are common names
            return child
    return None


def _is_cache_json(path: Path) -> bool:
    """Whether a config.json or manifest.json is a cache's (every one records its format version and model)."""
    try:
        content = sf.read_json(path)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(content, dict) and "format_version" in content and "model" in content


def refuse_foreign_files(root: Path, what: str) -> None:
    foreign = _first_foreign_file(root)
    if foreign is not None:
        raise CacheError(
            f"{root} {what} ({foreign.relative_to(root)} was not written by mlsae-cache); "
            "choose a new or empty --out (--overwrite only ever removes a cache's own files)"
        )


def holds_shards(root: Path) -> bool:
    """Whether any shard or sidecar was written (not counting temporary files)."""
    shard_dir = root / sf.SHARD_DIR
    return shard_dir.is_dir() and any(p.name.startswith("shard-") and _is_cache_file(p.name, True) for p in shard_dir.iterdir())


def read_stored_config(config_path: Path) -> dict[str, Any]:
    try:
        stored = sf.read_json(config_path)
    except (ValueError, UnicodeDecodeError):
        stored = None
    if not isinstance(stored, dict):
        raise CacheError(f"{config_path} is not a cache config (not a JSON object); choose another --out")
    return stored


def _remove_cache_files(root: Path) -> None:
    """Remove a cache's own files from ``root``, after checking that it holds nothing else."""
    refuse_foreign_files(root, "holds files besides a cache")
    shard_dir = root / sf.SHARD_DIR
    if shard_dir.is_dir():
        for child in shard_dir.iterdir():
            child.unlink()
    for child in root.iterdir():
        if child.is_file():
            child.unlink()


class CacheWriter:
    """Writes the shards of one cache directory, each in a thread of its own; one instance per process (rank).

    A shard is written while it is computed: ``open_shard`` gives a :class:`ShardWriting` whose parts
    (batches of whole sequences) are written in order by its thread as they are handed over, and whose
    ``finish`` completes, checksums and fsyncs the file, then writes its sidecar. ``submit`` hands a whole
    shard over at once. Shards finish in any order but each one is a pure function of its content: the
    files are those of a serial run.
    """

    def __init__(self, root: Path, config: dict[str, Any], queue_depth: int = 2, threads: int | None = None) -> None:
        """At most ``threads + queue_depth`` shards are being written at once (each holds its activations in
        memory until written): ``open_shard`` waits for one to finish beyond that."""
        self.root = Path(root)
        self.config = config
        self.fmt: str = config["format"]
        self.dtype: str = config["dtype"]
        self.shard_dir = self.root / sf.SHARD_DIR
        self._slots = threading.BoundedSemaphore((threads or io_threads()) + queue_depth)
        self._writings: list[ShardWriting] = []
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._stopping = False  # set by abort(): what is not being written yet is dropped

    # -- which shards exist

    def shard_path(self, index: int) -> Path:
        return self.shard_dir / sf.shard_name(index, self.fmt)

    def sidecar_path(self, index: int) -> Path:
        return self.shard_dir / sf.sidecar_name(index)

    def is_done(self, index: int) -> bool:
        """Whether shard ``index`` is already written and intact (a resumed run rewrites a damaged one)."""
        return shard_is_done(self.shard_dir, index, self.fmt, check_checksum=True)

    # -- writing

    def open_shard(self, index: int) -> "ShardWriting":
        """Start writing shard ``index``: hand its parts over with ``append`` as they are computed, then call
        ``finish``. Waits while ``threads + queue_depth`` shards are being written."""
        self._raise_pending()
        self._slots.acquire()
        writing = ShardWriting(self, index)
        self._writings = [w for w in self._writings if w.thread.is_alive()] + [writing]
        return writing

    def submit(
        self, index: int, content: sf.ShardContent, stats: dict[str, Any] | None = None, done: Callable[[], None] | None = None
    ) -> None:
        """Hand a whole shard over for writing (``ShardWriting.finish`` says what ``stats`` and ``done`` are)."""
        writing = self.open_shard(index)
        writing.append(content)
        writing.finish(content, stats, done)

    def close(self) -> None:
        """Wait until every shard handed over is on disk; re-raise the first error of a writing thread."""
        self._stop_threads()
        self._raise_pending()

    def abort(self) -> None:
        """After a failure: finish the shards being committed now, drop the rest (their temporary files
        too), and return only once no thread writes any more, so that the caller's clean-up never races a
        late rename."""
        self._stopping = True
        self._stop_threads()

    def _stop_threads(self) -> None:
        for writing in self._writings:
            writing._steps.put(None)  # a shard never finished (a run stopped half-way) is dropped
        for writing in self._writings:
            writing.thread.join()

    def _raise_pending(self) -> None:
        with self._error_lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _failed(self, exc: BaseException) -> None:
        with self._error_lock:
            self._error = self._error or exc
            self._stopping = True  # after an error nothing more is written: the first is reported

    def _write_sidecar(self, index: int, content: sf.ShardContent, digest: str, stats: dict[str, Any] | None) -> None:
        path = self.shard_path(index)
        sidecar = {
            "index": index,
            "file": path.name,
            "n_tokens": int(content.acts.shape[0]),
            "n_sequences": int(len(content.input_sequence)),
            "first_sequence": int(content.input_sequence[0]) if len(content.input_sequence) else None,
            "bytes": path.stat().st_size,
            sf.SHARD_CHECKSUM: digest,
            "stats": stats if stats is not None else sf.stored_stat_sums(content.acts, self.dtype),
        }
        sidecar.update(content.sidecar_extra or {})  # e.g. token_filter's counts
        sf.atomic_write_json(self.sidecar_path(index), sidecar)


class ShardWriting:
    """One shard being written by its own thread, which takes the steps handed to it in order."""

    def __init__(self, writer: CacheWriter, index: int) -> None:
        self.writer, self.index = writer, index
        self._steps: queue.Queue = queue.Queue()  # ("append", part, ready), ("finish", content, stats, done); None: stop
        self.thread = threading.Thread(target=self._work, name=f"mlsae-shard-writer-{index}", daemon=True)
        self.thread.start()

    def append(self, part: sf.ShardContent, ready: Callable[[], None] | None = None) -> None:
        """Write ``part`` (the next sequences of the shard) once ``ready()`` returns (e.g. a copy from the GPU
        is done). Its arrays must stay unchanged until ``finish``'s ``done`` is called."""
        self.writer._raise_pending()
        self._steps.put(("append", part, ready))

    def finish(self, content: sf.ShardContent, stats: dict[str, Any] | None = None, done: Callable[[], None] | None = None) -> None:
        """Complete the shard: ``content`` is all of it (the parts appended, joined); ``stats`` its statistic sums
        (``sf.LayerStatSums.to_json()``) when the caller gathered them on its device, computed from
        ``content.acts`` here otherwise. ``done`` is called (in the writing thread) once the arrays of
        ``content`` and of the parts are no longer needed, written or not."""
        self._steps.put(("finish", content, stats, done))

    def _work(self) -> None:
        writer, shard = self.writer, None
        try:
            while (step := self._steps.get()) is not None:
                kind, *args = step
                if kind == "append":
                    part, ready = args
                    if writer._stopping:
                        continue
                    try:
                        if ready is not None:
                            ready()
                        shard = shard or sf.open_shard_file(writer.shard_path(self.index), writer.fmt, writer.dtype)
                        shard.append(part)
                    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                        writer._failed(exc)
                    continue
                content, stats, done = args
                try:
                    if not writer._stopping:
                        shard = shard or sf.open_shard_file(writer.shard_path(self.index), writer.fmt, writer.dtype)
                        digest, shard = shard.commit(content), None
                        writer._write_sidecar(self.index, content, digest, stats)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    writer._failed(exc)
                finally:
                    if done is not None:
                        done()
                return
        finally:
            if shard is not None:  # stopped, or failed, before the shard was whole
                shard.discard()
            writer._slots.release()


def finalize_cache(root: Path, config: dict[str, Any], n_shards: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Merge the sidecars of shards 0..n_shards-1 into ``manifest.json`` (written last, atomically)."""
    shard_dir = Path(root) / sf.SHARD_DIR
    missing = [i for i in range(n_shards) if not shard_is_done(shard_dir, i, config["format"])]
    if missing:
        raise CacheError(f"{len(missing)} shard(s) are not written yet (first: {missing[0]}); run the same command again to finish")
    sidecars = [sf.read_json(shard_dir / sf.sidecar_name(i)) for i in range(n_shards)]
    manifest = sf.seal_manifest(root, build_manifest(config, sidecars, extra), n_shards)
    sf.atomic_write_json(Path(root) / sf.MANIFEST, manifest)
    return manifest


def shard_is_done(shard_dir: Path, index: int, fmt: str, check_checksum: bool = False) -> bool:
    """A shard is done when its sidecar exists and the shard file has the size the sidecar records
    (``check_checksum``: and the checksum, a full read of the shard)."""
    side, shard = shard_dir / sf.sidecar_name(index), shard_dir / sf.shard_name(index, fmt)
    if not (side.exists() and shard.exists()):
        return False
    try:
        sidecar = sf.read_json(side)
        if sidecar["bytes"] != shard.stat().st_size:
            return False
        if not check_checksum:
            return True
        recorded = sf.recorded_checksum(sidecar)
        return recorded is not None and sf.file_checksum(shard, recorded[0]) == recorded[1]
    except (ValueError, KeyError, TypeError, OSError):
        return False


def build_manifest(config: dict[str, Any], sidecars: list[dict], extra: dict[str, Any]) -> dict[str, Any]:
    shards = [
        {k: side[k] for k in ("file", "n_tokens", "n_sequences", "first_sequence", "bytes", *sf.CHECKSUM_KEYS) if k in side}
        for side in sidecars
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

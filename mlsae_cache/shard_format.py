"""The on-disk cache format: the one module that both the writer and the reader import.

A cache is a directory::

    CACHE/
      config.json               identity of the cache (model, data, layers, dtype, format, ...), written first
      shards/shard-000000.h5    activations of a run of whole sequences (HDF5) ...
      shards/shard-000000.tar   ... or the same as a WebDataset tar (one sample per sequence)
      shards/shard-000000.json  sidecar: token count, checksum of the shard file (blake3; older caches sha256),
                                per-layer statistic sums
      manifest.json             written last: config + every shard + merged statistics + token counts

Every file is written under a temporary name and renamed into place, and a shard's sidecar is written
only after the shard itself, so a shard with a sidecar is complete. A cache is finished when
``manifest.json`` exists.

Each stored token has activations ``[n_layers, d_model]`` and an identity (sequence, position,
token id). Each shard also keeps the full model input of its sequences (special tokens included), so
that reconstructions can be spliced back into exactly the forward pass that produced them. Activations are stored uncompressed and contiguous, so readers memory-map them and gather
random tokens without decoding. bfloat16 has no numpy dtype: it is stored as its raw uint16 bits.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import io
import json
import os
import tarfile
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import h5py
import numpy as np
import torch

from .atomic import _UMASK, atomic_write_json  # noqa: F401 - the writer imports atomic_write_json from here

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
SHARD_DIR = "shards"
FORMATS = ("hdf5", "webdataset")
SHARD_SUFFIX = {"hdf5": ".h5", "webdataset": ".tar"}
DTYPES = ("float16", "bfloat16", "float32")
# numpy dtype each storage dtype is written as
STORAGE_NUMPY = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}
# bytes of token identity per token: sequence int64 + position int32 + token id int32, plus the
# model input id (int32) of every position, stored per sequence
IDENTITY_BYTES = 20


# ----------------------------------------------------------------------------------------------
# dtype conversion


def to_storage(acts: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations -> the array written to disk for ``dtype`` (bfloat16 as rounded uint16 bits)."""
    acts = np.ascontiguousarray(acts, dtype=np.float32)
    if dtype == "bfloat16":
        bits = acts.view(np.uint32)
        # round to nearest even, as torch does when casting float32 -> bfloat16
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16)
    return acts.astype(STORAGE_NUMPY[dtype], copy=False)


def from_storage(stored: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """The stored array (any shape) -> float32, into ``out`` (float32, same shape) when given."""
    if out is None:
        if dtype == "bfloat16":
            return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.asarray(stored, dtype=np.float32)
    if dtype == "bfloat16":  # the bits of a bfloat16 are the high half of its float32
        bits = out.view(np.uint32)
        np.copyto(bits, stored)
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, stored)
    return out


# the exponent field of each storage dtype (a value is NaN or infinite when all its bits are set), and
# the unsigned and signed integer types of its width
_EXPONENT_BITS = {
    "float16": (0x7C00, np.uint16, np.int16),
    "bfloat16": (0x7F80, np.uint16, np.int16),
    "float32": (0x7F800000, np.uint32, np.int32),
}


def all_finite(stored: np.ndarray, dtype: str) -> bool:
    """Whether no value of the stored array (storage numpy dtype of ``dtype``) is NaN or infinite.

    Two integer max reductions over the stored bits, no temporary array (several times ``np.isfinite``
    on float16): read as unsigned, the negative NaNs and infinities are the largest patterns (all
    exponent bits and the sign set); read as signed, the positive ones are.
    """
    if stored.size == 0:
        return True
    exponent, unsigned, signed = _EXPONENT_BITS[dtype]
    bits = np.ascontiguousarray(stored).view(unsigned)
    sign = unsigned(1) << unsigned(8 * bits.itemsize - 1)
    return bool(bits.max() < (exponent | sign) and bits.view(signed).max() < exponent)


def first_non_finite(stored: np.ndarray, dtype: str) -> tuple[int, int] | None:
    """(row, layer) of the first NaN or infinite vector of a stored ``[n, n_layers, d]`` array, or None."""
    if all_finite(stored, dtype):  # the common case, on the stored bits
        return None
    finite = np.isfinite(from_storage(stored, dtype)).all(axis=2)  # [n, n_layers]
    row, layer = np.argwhere(~finite)[0]
    return int(row), int(layer)


# ----------------------------------------------------------------------------------------------
# atomic files and checksums


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# A shard's checksum is recorded under the name of its algorithm ("blake3": hex digest) in its sidecar
# and manifest entry. New shards get BLAKE3 (about 4 GB/s a core here, sha256 under 2); caches written
# with "sha256" keep verifying.
SHARD_CHECKSUM = "blake3"
CHECKSUM_KEYS = ("blake3", "sha256")


def new_hasher(algorithm: str):
    """An incremental hasher (``update``, ``hexdigest``) of one of ``CHECKSUM_KEYS``."""
    if algorithm == "blake3":  # a large update is hashed on every core (the digest is the same)
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}; known: {', '.join(CHECKSUM_KEYS)}")


def recorded_checksum(entry: dict) -> tuple[str, str] | None:
    """(algorithm, hex digest) recorded in a sidecar or manifest shard entry; None if it records none."""
    for algorithm in CHECKSUM_KEYS:
        if isinstance(entry.get(algorithm), str):
            return algorithm, entry[algorithm]
    return None


MANIFEST_DIGEST = "digest"  # manifest key: the manifest's own digest (over everything else in it)
MANIFEST_FILES = "files"  # manifest key: {relative path: digest} of config.json and every sidecar


def json_digest(obj: Any, algorithm: str = SHARD_CHECKSUM) -> str:
    """``"algorithm:hex"`` of a JSON value's canonical text (sorted keys; floats round-trip exactly)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    hasher = new_hasher(algorithm)
    hasher.update(text.encode())
    return f"{algorithm}:{hasher.hexdigest()}"


def seal_manifest(root: Path, manifest: dict[str, Any], n_shards: int) -> dict[str, Any]:
    """``manifest`` with the digests of config.json and the sidecars of shards 0..n_shards-1, then its own
    digest: what :func:`manifest_damage` and :func:`damaged_metadata` check."""
    names = [CONFIG] + [f"{SHARD_DIR}/{sidecar_name(i)}" for i in range(n_shards)]
    files = {name: f"{SHARD_CHECKSUM}:{file_checksum(Path(root) / name, SHARD_CHECKSUM)}" for name in names}
    sealed = {**manifest, MANIFEST_FILES: files}
    return {**sealed, MANIFEST_DIGEST: json_digest(sealed)}


def manifest_damage(manifest: dict[str, Any]) -> str | None:
    """Why a manifest read from disk fails its own digest, or None (also for manifests written before it)."""
    recorded = manifest.get(MANIFEST_DIGEST)
    if recorded is None:
        return None
    algorithm = str(recorded).partition(":")[0]
    if algorithm not in CHECKSUM_KEYS:
        return f"its digest names an unknown algorithm {algorithm!r}"
    body = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}
    return None if json_digest(body, algorithm) == recorded else "its content does not match the digest written with it"


def damaged_metadata(root: Path, manifest: dict[str, Any]) -> list[str]:
    """config.json and sidecars (relative paths) that are missing or differ from the digests the manifest
    recorded (none for manifests written before it recorded them)."""
    damaged = []
    for name, recorded in sorted(manifest.get(MANIFEST_FILES, {}).items()):
        algorithm, _, digest = str(recorded).partition(":")
        path = Path(root) / name
        try:
            if algorithm not in CHECKSUM_KEYS or file_checksum(path, algorithm) != digest:
                damaged.append(name)
        except OSError:  # missing or unreadable
            damaged.append(name)
    return damaged


def file_checksum(path: Path, algorithm: str) -> str:
    """Hex digest of a file's bytes (BLAKE3 hashes a large file on every core)."""
    if algorithm == "sha256":
        return file_sha256(path)
    hasher = new_hasher(algorithm)
    if Path(path).stat().st_size > 0:  # an empty file cannot be memory-mapped
        hasher.update_mmap(str(path))
    return hasher.hexdigest()


# ----------------------------------------------------------------------------------------------
# names


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX[fmt]}"


def sidecar_name(index: int) -> str:
    return f"shard-{index:06d}.json"


# ----------------------------------------------------------------------------------------------
# statistics gathered while writing


# torch dtype each storage dtype is held in on the device (its bits are what the file holds)
STORAGE_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_tensor(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored numpy array (bfloat16 as uint16 bits) as a torch tensor of ``STORAGE_TORCH[dtype]``, sharing memory."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(stored).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(stored))


def storage_numpy(stored: torch.Tensor) -> np.ndarray:
    """A CPU tensor of ``STORAGE_TORCH`` values as the numpy array written to disk (bfloat16 as uint16 bits), sharing memory."""
    if stored.dtype == torch.bfloat16:
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


# torch runs an op of at most this many elements on the calling thread (at::internal::GRAIN_SIZE): the
# statistics' small conversions stay off the thread pool, whose barriers cost more than they save on
# chunks this small (and far more on a machine busy with other work)
SERIAL_ELEMENTS = 32768


class LayerStatSums:
    """float64 sums over tokens, per layer, of one shard's stored activations, on the device that holds them.

    ``add(stored)`` takes [n, L, d] values in the storage dtype (as rounded for the file); ``to_json()``
    gives the sidecar's ``stats``: count, sum [L][d], sum of squared norms [L], sum of norms [L]. Sums
    (not means), so that shards written in any order, by any number of processes, merge to the same
    statistics. Each ``add`` is cut into fixed chunks of tokens whose partial sums are added in float64,
    in order: the result is a function of the values and the calls alone, not of thread counts. On a CPU
    the chunks go through numpy, ``torch.get_num_threads()`` chunks at a time in a small thread pool
    (numpy releases the GIL); elsewhere through torch in float64 on the device.

    On the CPU, 16-bit storage dtypes are summed in float32 within a chunk (``_numpy_chunk_sums``): the
    products of float16/bfloat16 values are exact in float32, so a token's squared norm is off by at most
    (d_model - 1) * 2**-24 of itself, and a chunk's per-dimension sum by (chunk_tokens - 1) * 2**-24 of
    the sum of its absolute values: float rounding, at twice the speed of float64 throughout (the
    writer's bottleneck). float32 storage keeps float64 throughout.
    """

    # float64 elements of one chunk: a CPU chunk stays in the L2 cache, a GPU chunk is a few hundred MB
    CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 26}

    def __init__(self, n_layers: int, d_model: int, device: torch.device | str = "cpu", use_numpy: bool | None = None) -> None:
        self.device = torch.device(device)
        self.use_numpy = self.device.type == "cpu" if use_numpy is None else use_numpy
        per_token = n_layers * d_model
        self.chunk_tokens = max(1, self.CHUNK_ELEMENTS.get(self.device.type, 1 << 26) // per_token)
        self.count = 0
        if self.use_numpy:
            self._sum, self._sq, self._norm = np.zeros((n_layers, d_model)), np.zeros(n_layers), np.zeros(n_layers)
        else:
            zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=self.device)  # noqa: E731
            self._sum, self._sq, self._norm = zeros(n_layers, d_model), zeros(n_layers), zeros(n_layers)

    def add(self, stored: torch.Tensor) -> None:
        """Add the tokens of ``stored`` [n, L, d] (any float dtype holding the stored values exactly)."""
        chunks = [stored[start : start + self.chunk_tokens] for start in range(0, stored.shape[0], self.chunk_tokens)]  # [m, L, d] each
        if self.use_numpy:
            threads = torch.get_num_threads()
            chunk_sums = _numpy_chunk_sums_float64 if stored.dtype == torch.float32 else _numpy_chunk_sums
            parts = _stats_pool(threads).map(chunk_sums, chunks) if threads > 1 and len(chunks) > 1 else map(chunk_sums, chunks)
            for chunk_sum, chunk_sq, chunk_norm in parts:  # in chunk order, whichever thread summed each
                self._sum += chunk_sum
                self._sq += chunk_sq
                self._norm += chunk_norm
        else:
            for chunk in chunks:
                x = chunk.to(torch.float64)  # [m, L, d]
                sq_norm = (x * x).sum(-1)  # [m, L]
                self._sum += x.sum(0)
                self._sq += sq_norm.sum(0)
                self._norm += sq_norm.sqrt().sum(0)
        self.count += int(stored.shape[0])

    def to_json(self) -> dict[str, Any]:
        if self.count == 0:
            return {"count": 0, "sum": [], "sum_sq_norm": [0.0] * len(self._sq), "sum_norm": [0.0] * len(self._sq)}
        as_numpy = (lambda a: a) if self.use_numpy else (lambda t: t.cpu().numpy())  # noqa: E731
        return {
            "count": self.count,
            "sum": as_numpy(self._sum).tolist(),  # [L][d]
            "sum_sq_norm": as_numpy(self._sq).tolist(),  # [L]
            "sum_norm": as_numpy(self._norm).tolist(),  # [L]
        }


_workspaces = threading.local()  # each thread's float32 and float64 chunk buffers, reused


@functools.lru_cache(maxsize=None)
def _stats_pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mlsae-stats")


def _widened_float32(chunk: torch.Tensor) -> np.ndarray:
    """A CPU chunk [m, L, d] of storage values widened (exactly) to float32, in this thread's reused buffer."""
    size = chunk.numel()
    buffer = getattr(_workspaces, "float32", None)
    if buffer is None or buffer.numel() < size:
        buffer = _workspaces.float32 = torch.empty(size, dtype=torch.float32)
    flat_in, x32 = chunk.reshape(-1), buffer[:size]
    for start in range(0, size, SERIAL_ELEMENTS):
        x32[start : start + SERIAL_ELEMENTS].copy_(flat_in[start : start + SERIAL_ELEMENTS])
    return x32.numpy().reshape(chunk.shape)


def _numpy_chunk_sums(chunk: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (sum [L, d], sum of squared norms [L], sum of norms [L]) of a CPU chunk [m, L, d] of 16-bit
    values, reduced in float32 (bounds in ``LayerStatSums``): one token's squared norm per SIMD dot product,
    the per-dimension sums over the chunk's tokens, each widened to float64 before anything else is added."""
    m, n_layers, d_model = chunk.shape
    x = _widened_float32(chunk)  # [m, L, d] float32
    rows = x.reshape(m * n_layers, d_model)
    sq_norm = np.einsum("ij,ij->i", rows, rows).astype(np.float64).reshape(m, n_layers)  # [m, L]
    return x.sum(axis=0, dtype=np.float32).astype(np.float64), sq_norm.sum(axis=0), np.sqrt(sq_norm).sum(axis=0)


def _numpy_chunk_sums_float64(chunk: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (sum [L, d], sum of squared norms [L], sum of norms [L]) of a CPU chunk [m, L, d], in float64 throughout."""
    size = chunk.numel()
    buffer = getattr(_workspaces, "float64", None)
    if buffer is None or buffer.size < size:
        buffer = _workspaces.float64 = np.empty(size)
    x = buffer[:size].reshape(chunk.shape)  # [m, L, d] float64
    x[...] = _widened_float32(chunk)  # exact: every storage dtype widens to float32
    sq_norm = np.einsum("nld,nld->nl", x, x)  # [m, L]
    return x.sum(axis=0), sq_norm.sum(axis=0), np.sqrt(sq_norm).sum(axis=0)


def stored_stat_sums(stored: np.ndarray, dtype: str) -> dict[str, Any]:
    """The sidecar ``stats`` of a whole stored array [n, L, d] (storage numpy dtype), computed on the CPU."""
    sums = LayerStatSums(stored.shape[1], stored.shape[2])
    sums.add(storage_tensor(stored, dtype))
    return sums.to_json()


def merge_layer_stats(sidecars: list[dict], layers: list[int]) -> dict[str, dict]:
    """Per-layer mean vector, mean squared norm, mean norm and count, merged over shard sidecars."""
    d_sum = None
    count = 0
    sq = np.zeros(len(layers))
    nrm = np.zeros(len(layers))
    for side in sidecars:
        stats = side["stats"]
        if stats["count"] == 0:
            continue
        part = np.asarray(stats["sum"], dtype=np.float64)
        d_sum = part if d_sum is None else d_sum + part
        sq += np.asarray(stats["sum_sq_norm"])
        nrm += np.asarray(stats["sum_norm"])
        count += stats["count"]
    merged = {}
    for pos, layer in enumerate(layers):
        merged[str(layer)] = {
            "count": count,
            "mean": (d_sum[pos] / max(count, 1)).tolist() if d_sum is not None else [],
            "mean_sq_norm": float(sq[pos] / max(count, 1)),
            "mean_norm": float(nrm[pos] / max(count, 1)),
        }
    return merged


# ----------------------------------------------------------------------------------------------
# shard writing


@dataclass
class ShardContent:
    """One shard: its stored tokens in global-index order, and the model input of its sequences."""

    acts: np.ndarray  # [n, n_layers, d] in the storage numpy dtype
    sequence: np.ndarray  # [n] int64: index of the sequence in the token stream
    position: np.ndarray  # [n] int32: position within the sequence
    token_id: np.ndarray  # [n] int32
    input_sequence: np.ndarray  # [n_seq] int64: the consecutive sequence indices this shard covers
    input_ids: np.ndarray  # [n_seq, seq_len] int32: the model input of those sequences
    sidecar_extra: dict | None = None  # more entries for the shard's sidecar (e.g. token_filter's counts)

    def __post_init__(self) -> None:
        n = self.acts.shape[0]
        assert self.sequence.shape == (n,) and self.position.shape == (n,) and self.token_id.shape == (n,)
        assert self.input_ids.shape[0] == self.input_sequence.shape[0]


def write_shard(path: Path, content: ShardContent, fmt: str, dtype: str) -> str:
    """Write one shard file atomically (temporary name, then rename); returns its ``SHARD_CHECKSUM`` digest.

    The same file as a :class:`ShardFile` given the shard in parts as they are computed."""
    shard = open_shard_file(path, fmt, dtype)
    try:
        shard.append(content)
    except BaseException:
        shard.discard()
        raise
    return shard.commit(content)


def open_shard_file(path: Path, fmt: str, dtype: str) -> "ShardFile":
    """A new, empty :class:`ShardFile` of format ``fmt`` that becomes ``path`` when committed."""
    return {"hdf5": HDF5ShardFile, "webdataset": TarShardFile}[fmt](path, dtype)


class ShardFile:
    """A shard file written while its shard is computed: ``append`` its parts (runs of whole sequences, in
    order) as they come, then ``commit`` it (fsync, rename into place) or ``discard`` it.

    Until committed it lives under a temporary name beside ``path`` (``.NAME.XXXX.tmp``, which the next run
    drops if this one is killed), so a shard under its own name is always whole. A shard appended in one
    part or in many is the same file, byte for byte. Its digest is taken from the activations in memory,
    not read back: the arrays of every part must stay unchanged until ``commit`` returns.
    """

    def __init__(self, path: Path, dtype: str) -> None:
        self.path, self.dtype = Path(path), dtype
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.fd, self.tmp = fd, Path(tmp)
        self.n_rows = 0  # activation rows appended so far

    def append(self, part: ShardContent) -> None:
        """Write the next sequences of the shard (``part``: their stored tokens and model input)."""
        raise NotImplementedError

    def _complete(self, content: ShardContent) -> None:
        """Write whatever the file still lacks once every part is in (``content``: the whole shard)."""
        raise NotImplementedError

    def _digest(self, content: ShardContent) -> str:
        """The ``SHARD_CHECKSUM`` digest of the completed file."""
        raise NotImplementedError

    def commit(self, content: ShardContent) -> str:
        """Complete the file for ``content`` (the whole shard: the parts appended, joined), fsync it and rename
        it into place; returns its digest. The fsync runs while the digest is computed (it waits on the disk,
        the digest on the CPU). On any error the temporary file is removed and ``path`` is untouched."""
        try:
            if content.acts.shape[0] != self.n_rows:
                raise ValueError(f"{self.path.name}: {self.n_rows} activation rows were appended, the shard has {content.acts.shape[0]}")
            self._complete(content)
            os.chmod(self.tmp, 0o666 & ~_UMASK)
            synced = _in_thread(os.fsync, self.fd)
            try:
                digest = self._digest(content)
            finally:
                synced()  # the file is not closed (or removed) under a running fsync
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        return digest

    def discard(self) -> None:
        """Drop the temporary file (after an error, or a run that stops before the shard is whole)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


def _in_thread(function, *args) -> Any:
    """Start ``function(*args)`` in a new thread; returns a callable that waits for it and re-raises its error."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            function(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the waiting caller
            error.append(exc)

    thread = threading.Thread(target=run, name="mlsae-fsync", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if error:
            raise error[0]

    return wait


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


@functools.lru_cache(maxsize=None)
def _sync_file_range() -> Any:
    """Linux's sync_file_range(2) from the C library, or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing bytes [offset, offset + nbytes) of ``fd`` to the disk now, without
    waiting (SYNC_FILE_RANGE_WRITE): the parts written while the next batches are computed are then on
    the disk by the time the shard is fsynced, which waits only for the rest. Durability still rests on
    that fsync alone; where the call does not exist or fails, nothing happens."""
    function = _sync_file_range()
    if function is not None and nbytes > 0:
        function(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


def _as_bytes(array: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")


class HDF5ShardFile(ShardFile):
    """An HDF5 shard: each part's activations are written straight to their place in the file (the dataset's
    offset does not depend on the number of rows, :func:`hdf5_activations_offset`), the HDF5 structure and
    identity columns around them at ``commit`` (:func:`_write_hdf5`)."""

    def append(self, part: ShardContent) -> None:
        n, n_layers, d_model = part.acts.shape
        if n:
            row_bytes = n_layers * d_model * STORAGE_NUMPY[self.dtype].itemsize
            start = hdf5_activations_offset(self.dtype, n_layers, d_model) + self.n_rows * row_bytes
            _pwrite_all(self.fd, _as_bytes(part.acts), start)
            _start_writeback(self.fd, start, n * row_bytes)
        self.n_rows += n

    def _complete(self, content: ShardContent) -> None:
        _write_hdf5(self.tmp, content, self.dtype)

    def _digest(self, content: ShardContent) -> str:
        return _hdf5_digest(self.tmp, content.acts)


def _create_hdf5_layout(f: h5py.File, c: ShardContent, shape: tuple[int, ...], dtype: str) -> int | None:
    """Create a shard's datasets in ``f``; the activations [shape] are allocated, never filled. Returns their offset."""
    # contiguous, uncompressed: the reader memory-maps this dataset directly. Its space is allocated now and
    # never filled: its bytes are written outside h5py (and its global lock), by HDF5ShardFile.append.
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)  # the same content gives the same bytes (resumed runs are bit-identical)
    space = h5py.h5s.create_simple(shape)
    offset = h5py.h5d.create(f.id, b"activations", h5py.h5t.py_create(STORAGE_NUMPY[dtype]), space, dcpl=dcpl).get_offset()
    f.create_dataset("sequence", data=c.sequence.astype("<i8"))
    f.create_dataset("position", data=c.position.astype("<i4"))
    f.create_dataset("token_id", data=c.token_id.astype("<i4"))
    f.create_dataset("input_sequence", data=c.input_sequence.astype("<i8"))
    f.create_dataset("input_ids", data=c.input_ids.astype("<i4"))
    f.attrs["dtype"] = dtype
    f.attrs["format_version"] = FORMAT_VERSION
    return offset


_probe_lock = threading.Lock()  # HDF5 refuses a second in-memory file of the same name while one is open


@functools.lru_cache(maxsize=None)
def hdf5_activations_offset(dtype: str, n_layers: int, d_model: int) -> int:
    """Where the activations [n, n_layers, d_model] of ``dtype`` start in a shard file, for any n > 0: what
    precedes them (superblock, root group, the dataset's header) does not depend on n, which the dataset's
    header records in fixed-width fields. :func:`_write_hdf5` checks it for every shard all the same."""
    empty = ShardContent(np.zeros((0, n_layers, d_model), STORAGE_NUMPY[dtype]), np.zeros(0, np.int64), np.zeros(0, np.int32),
                         np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros((0, 1), np.int32))  # fmt: skip
    with _probe_lock, h5py.File("activations-offset-probe", "w", driver="core", backing_store=False, libver="latest") as f:
        offset = _create_hdf5_layout(f, empty, (1, n_layers, d_model), dtype)
    assert offset is not None
    return offset


def hdf5_layout_scratch(path: Path) -> Path:
    """The scratch file :func:`_write_hdf5` makes beside ``path`` (``.shard-N.h5.XXXX.layout.tmp`` beside a
    shard's temporary file: one of the cache's temporary files, which the next run drops if this one is killed)."""
    return path.with_name(f"{path.name.removesuffix('.tmp')}.layout.tmp")


def _write_hdf5(path: Path, c: ShardContent, dtype: str) -> None:
    """Complete the file ``path`` as the HDF5 shard of ``c``, whose activations are already in it at
    :func:`hdf5_activations_offset` (written by ``HDF5ShardFile.append``).

    h5py writes the structure and identity columns to a scratch file beside it (sparse: the activations'
    space is allocated, never written); its bytes before and after the activations are copied into ``path``,
    which then holds exactly the file h5py and a raw write of the activations would have made together."""
    acts = c.acts
    scratch = hdf5_layout_scratch(path)
    try:
        with h5py.File(scratch, "w", libver="latest") as f:
            offset = _create_hdf5_layout(f, c, acts.shape, dtype)
        with open(scratch, "rb") as layout, open(path, "r+b") as out:
            size = os.fstat(layout.fileno()).st_size
            if acts.size == 0:  # no activations: the scratch file is the shard
                head_end = tail_start = size
            else:
                head_end, tail_start = offset, offset + acts.nbytes
                if offset != hdf5_activations_offset(dtype, *acts.shape[1:]):  # not where append put them
                    out.seek(offset)
                    out.write(_as_bytes(acts))
            out.seek(0)
            out.write(layout.read(head_end))
            layout.seek(tail_start)
            out.seek(tail_start)
            while chunk := layout.read(1 << 22):
                out.write(chunk)
            out.truncate(size)
    finally:
        scratch.unlink(missing_ok=True)


def _hdf5_digest(path: Path, acts: np.ndarray) -> str:
    """``SHARD_CHECKSUM`` of an HDF5 shard whose activations dataset holds exactly ``acts``."""
    with h5py.File(path, "r") as f:
        offset = f["activations"].id.get_offset()
    hasher = new_hasher(SHARD_CHECKSUM)
    with open(path, "rb") as raw:
        if offset is None or acts.size == 0:
            while chunk := raw.read(1 << 22):
                hasher.update(chunk)
            return hasher.hexdigest()
        hasher.update(raw.read(offset))  # the metadata before the activations
        hasher.update(_as_bytes(acts))
        raw.seek(offset + acts.nbytes)
        while chunk := raw.read(1 << 22):  # the identity columns and metadata after them
            hasher.update(chunk)
    return hasher.hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class _HashingWriter:
    """A write-only file that hashes every byte on its way to ``raw`` (tarfile writes strictly in order)."""

    def __init__(self, raw, hasher) -> None:
        self.raw, self.hasher = raw, hasher

    def write(self, data) -> int:
        self.hasher.update(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()


class TarShardFile(ShardFile):
    """WebDataset layout: one sample per sequence, keyed by the zero-padded sequence index, written and
    hashed as each part is appended (a tar is written strictly in order).

    Members: ``<key>.acts.npy`` [n_kept, n_layers, d], ``<key>.tokens.npy`` [n_kept, 3] int64
    (sequence, position, token id) and ``<key>.input_ids.npy`` [seq_len] int32 (the model input).
    Streaming consumers read samples with any WebDataset loader.
    """

    def __init__(self, path: Path, dtype: str) -> None:
        super().__init__(path, dtype)
        self._hasher = new_hasher(SHARD_CHECKSUM)
        self._raw = open(self.fd, "wb", closefd=False)  # noqa: SIM115 - closed in _complete / discard
        self._tar = tarfile.open(fileobj=_HashingWriter(self._raw, self._hasher), mode="w", format=tarfile.USTAR_FORMAT)

    def append(self, c: ShardContent) -> None:
        # kept tokens of sequence input_sequence[i] are rows bounds[i]:bounds[i+1]
        bounds = np.searchsorted(c.sequence, np.r_[c.input_sequence, np.iinfo(np.int64).max])
        for i, seq in enumerate(c.input_sequence):
            start, end = bounds[i], bounds[i + 1]
            key = f"{int(seq):09d}"
            tokens = np.stack([c.sequence[start:end], c.position[start:end], c.token_id[start:end]], axis=1).astype("<i8")
            members = ((f"{key}.acts.npy", c.acts[start:end]), (f"{key}.tokens.npy", tokens), (f"{key}.input_ids.npy", c.input_ids[i].astype("<i4")))
            for member, array in members:
                data = _npy_bytes(array)
                info = tarfile.TarInfo(member)
                info.size = len(data)
                info.mode = 0o644
                self._tar.addfile(info, io.BytesIO(data))
        self.n_rows += c.acts.shape[0]

    def _complete(self, content: ShardContent) -> None:
        self._tar.close()  # the end-of-archive blocks
        self._raw.close()

    def _digest(self, content: ShardContent) -> str:
        return self._hasher.hexdigest()

    def discard(self) -> None:
        self._raw.close()
        super().discard()


# ----------------------------------------------------------------------------------------------
# shard reading


@dataclass
class ShardArrays:
    """A shard opened for reading: activations memory-mapped, identity columns loaded."""

    acts: np.ndarray  # [n, n_layers, d] storage dtype (memmap for HDF5; concatenated memmaps for tar)
    sequence: np.ndarray
    position: np.ndarray
    token_id: np.ndarray
    input_sequence: np.ndarray  # [n_seq]
    input_ids: np.ndarray  # [n_seq, seq_len]


def open_shard(path: Path, fmt: str, dtype: str, n_layers: int, d_model: int) -> ShardArrays:
    if fmt == "hdf5":
        return _open_hdf5(path, dtype, n_layers, d_model)
    return _open_tar(path, dtype, n_layers, d_model)


def _open_hdf5(path: Path, dtype: str, n_layers: int, d_model: int) -> ShardArrays:
    with h5py.File(path, "r") as f:
        dset = f["activations"]
        shape = dset.shape
        if shape[1:] != (n_layers, d_model):
            raise ValueError(f"activations have shape {shape}, expected [n, {n_layers}, {d_model}]")
        offset = dset.id.get_offset()
        identity = [np.asarray(f[name][:]) for name in ("sequence", "position", "token_id", "input_sequence", "input_ids")]
    if shape[0] == 0:
        acts = np.zeros(shape, STORAGE_NUMPY[dtype])
    else:
        if offset is None:
            raise ValueError("activations are not stored contiguously")
        acts = np.memmap(path, dtype=STORAGE_NUMPY[dtype], mode="r", offset=offset, shape=shape)
    return ShardArrays(acts, *identity)


def _member_array(f, member: tarfile.TarInfo, mmap: bool, path: Path) -> np.ndarray:
    f.seek(member.offset_data)
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dt = read_header(f)
    if fortran:
        raise ValueError(f"{member.name} is Fortran-ordered")
    if mmap and int(np.prod(shape)) > 0:
        return np.memmap(path, dtype=dt, mode="r", offset=f.tell(), shape=shape)
    return np.frombuffer(f.read(int(np.prod(shape)) * dt.itemsize), dtype=dt).reshape(shape)


def _open_tar(path: Path, dtype: str, n_layers: int, d_model: int) -> ShardArrays:
    acts_parts, tokens_parts, input_parts, input_keys = [], [], [], []
    with tarfile.open(path, "r") as tar, open(path, "rb") as f:
        for member in tar.getmembers():
            if member.name.endswith(".acts.npy"):
                acts_parts.append(_member_array(f, member, mmap=True, path=path))
            elif member.name.endswith(".tokens.npy"):
                tokens_parts.append(_member_array(f, member, mmap=False, path=path))
            elif member.name.endswith(".input_ids.npy"):
                input_parts.append(_member_array(f, member, mmap=False, path=path))
                input_keys.append(int(member.name.split(".")[0]))
    for part in acts_parts:
        if part.shape[1:] != (n_layers, d_model):
            raise ValueError(f"activations have shape {part.shape}, expected [n, {n_layers}, {d_model}]")
    tokens = np.concatenate(tokens_parts) if tokens_parts else np.zeros((0, 3), np.int64)
    acts = _ConcatRows(acts_parts, (n_layers, d_model), STORAGE_NUMPY[dtype])
    input_ids = np.stack(input_parts) if input_parts else np.zeros((0, 0), np.int32)
    return ShardArrays(acts, tokens[:, 0], tokens[:, 1].astype(np.int32), tokens[:, 2].astype(np.int32), np.array(input_keys, np.int64), input_ids)  # type: ignore[arg-type]


class _ConcatRows:
    """Row-indexable view over several memory-mapped arrays, without copying them together."""

    def __init__(self, parts: list[np.ndarray], row_shape: tuple[int, int], dtype: np.dtype) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *row_shape)
        self.dtype = dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        """``acts[rows]`` -> [m, n_layers, d], or ``acts[rows[:, None], layers[None, :]]`` -> [m, len(layers), d]
        (numpy's advanced indexing of the few forms the reader uses)."""
        layers = None
        if isinstance(key, tuple):
            key, layers = key
            layers = np.asarray(layers).reshape(-1)
        rows = np.arange(*key.indices(self.shape[0])) if isinstance(key, slice) else np.asarray(key).reshape(-1)
        row_shape = self.shape[1:] if layers is None else (len(layers), self.shape[2])
        out = np.empty((len(rows), *row_shape), self.dtype)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for p in np.unique(part_of):
            sel = part_of == p
            local = rows[sel] - self.starts[p]
            out[sel] = self.parts[p][local] if layers is None else self.parts[p][local[:, None], layers[None, :]]
        return out

"""The on-disk cache format: the one module that both the writer and the reader import.

A cache is a directory::

    CACHE/
      config.json               identity of the cache (model, data, layers, dtype, format, ...), written first
      shards/shard-000000.h5    activations of a run of whole sequences (HDF5) ...
      shards/shard-000000.tar   ... or the same as a WebDataset tar (one sample per sequence)
      shards/shard-000000.json  sidecar: token count, sha256 of the shard file, per-layer statistic sums
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

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from .atomic import atomic_write, atomic_write_json  # noqa: F401 - the writer imports atomic_write_json from here

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


def from_storage(stored: np.ndarray, dtype: str) -> np.ndarray:
    """The stored array (any shape) -> float32."""
    if dtype == "bfloat16":
        return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(stored, dtype=np.float32)


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


# ----------------------------------------------------------------------------------------------
# names


def shard_name(index: int, fmt: str) -> str:
    return f"shard-{index:06d}{SHARD_SUFFIX[fmt]}"


def sidecar_name(index: int) -> str:
    return f"shard-{index:06d}.json"


# ----------------------------------------------------------------------------------------------
# statistics gathered while writing


def layer_stat_sums(acts: np.ndarray) -> dict[str, list | float | int]:
    """Exact float64 sums over tokens, per layer, of one shard's activations.

    acts: [n, n_layers, d] float32. Returns lists indexed by layer position. Sums (not means) so that
    shards written in any order, by any number of processes, merge to identical statistics.
    """
    acts64 = acts.astype(np.float64)  # [n, L, d]
    sq_norm = np.einsum("nld,nld->nl", acts64, acts64)  # [n, L]
    return {
        "count": int(acts.shape[0]),
        "sum": acts64.sum(axis=0).tolist(),  # [L][d]
        "sum_sq_norm": sq_norm.sum(axis=0).tolist(),  # [L]
        "sum_norm": np.sqrt(sq_norm).sum(axis=0).tolist(),  # [L]
    }


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

    def __post_init__(self) -> None:
        n = self.acts.shape[0]
        assert self.sequence.shape == (n,) and self.position.shape == (n,) and self.token_id.shape == (n,)
        assert self.input_ids.shape[0] == self.input_sequence.shape[0]


def write_shard(path: Path, content: ShardContent, fmt: str, dtype: str) -> None:
    """Write one shard file atomically (temporary name, then rename)."""
    if fmt == "hdf5":
        atomic_write(path, lambda tmp: _write_hdf5(Path(tmp), content, dtype))
    else:
        atomic_write(path, lambda tmp: _write_tar(Path(tmp), content))


def _write_hdf5(path: Path, c: ShardContent, dtype: str) -> None:
    with h5py.File(path, "w", libver="latest") as f:
        # contiguous, uncompressed: the reader memory-maps this dataset directly
        f.create_dataset("activations", data=c.acts)
        f.create_dataset("sequence", data=c.sequence.astype("<i8"))
        f.create_dataset("position", data=c.position.astype("<i4"))
        f.create_dataset("token_id", data=c.token_id.astype("<i4"))
        f.create_dataset("input_sequence", data=c.input_sequence.astype("<i8"))
        f.create_dataset("input_ids", data=c.input_ids.astype("<i4"))
        f.attrs["dtype"] = dtype
        f.attrs["format_version"] = FORMAT_VERSION


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_tar(path: Path, c: ShardContent) -> None:
    """WebDataset layout: one sample per sequence, keyed by the zero-padded sequence index.

    Members: ``<key>.acts.npy`` [n_kept, n_layers, d], ``<key>.tokens.npy`` [n_kept, 3] int64
    (sequence, position, token id) and ``<key>.input_ids.npy`` [seq_len] int32 (the model input).
    Streaming consumers read samples with any WebDataset loader.
    """
    # kept tokens of sequence input_sequence[i] are rows bounds[i]:bounds[i+1]
    bounds = np.searchsorted(c.sequence, np.r_[c.input_sequence, np.iinfo(np.int64).max])
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
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
                tar.addfile(info, io.BytesIO(data))


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


def iter_shard_files(root: Path) -> Iterator[Path]:
    yield from sorted((Path(root) / SHARD_DIR).glob("shard-*"))

"""Checksums of the files the pipeline writes, checked by every reader: the one owner of that job.

Two carriers of one digest (``"blake3:<hex>"``, the algorithm of the cache's shards):

- **inside the file**, for safetensors files (SAE weights, training checkpoints): the metadata entry
  ``mlsae_digest`` covers every tensor (name, dtype, shape, bytes) and every other metadata entry.
  It is written with the file, in the same atomic rename, so a kill can never leave a file and its
  checksum out of step (checkpoints are rewritten all through a run). :func:`object_digest` does the
  same for other self-describing files (a pickled lens checkpoint holds its own digest).
- **a folder record**, ``checksums.json``, for files whose format has no room for one (a lens's
  ``params.pt`` and ``config.json`` in the tuned-lens format, the parquet, CSV and JSON of an
  analysis): file name -> size and digest of its bytes, written atomically AFTER the files it covers,
  before whatever marks the folder finished.

A mismatch, a truncated or unreadable file is one :class:`IntegrityError` line naming the file and the
fix. Files written before checksums existed load with a one-line ``warning:`` (once per file).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from . import shard_format as sf
from .atomic import atomic_write, atomic_write_json
from .errors import MlsaeError, first_line

ALGORITHM = sf.SHARD_CHECKSUM  # the shards' hash (BLAKE3); a digest names its algorithm, so records of another keep verifying
DIGEST_KEY = "mlsae_digest"
"""The safetensors metadata entry that holds the file's digest."""
RECORD_FILE = "checksums.json"
RECORD_FORMAT = 1

_warned: set[str] = set()


class IntegrityError(MlsaeError):
    """A file the pipeline wrote is truncated, damaged or missing."""


def warn_once(key: str, message: str) -> None:
    """Print ``warning: message`` on stderr, once per ``key`` in this process."""
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# digests


def algorithm_of(digest: str) -> str:
    """The algorithm a digest names (``"blake3:..."`` -> ``"blake3"``)."""
    return digest.partition(":")[0]


def file_digest(path: str | Path, algorithm: str = ALGORITHM) -> str:
    """The digest of a file's bytes."""
    return f"{algorithm}:{sf.file_checksum(Path(path), algorithm)}"


def _update_tensor(hasher, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    hasher.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        hasher.update(t.reshape(-1).view(torch.uint8).numpy().data)


def _update_object(hasher, obj: Any) -> None:
    if torch.is_tensor(obj):
        hasher.update(b"T")
        _update_tensor(hasher, obj)
    elif isinstance(obj, Mapping):
        hasher.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            hasher.update(repr(key).encode())
            _update_object(hasher, obj[key])
    elif isinstance(obj, (list, tuple)):
        hasher.update(f"L{len(obj)}".encode())
        for item in obj:
            _update_object(hasher, item)
    else:  # numbers, strings, booleans, None
        hasher.update(f"V{obj!r}".encode())


def object_digest(obj: Any, algorithm: str = ALGORITHM) -> str:
    """The digest of nested dicts / lists / tensors / scalars (dict keys in sorted order)."""
    hasher = sf.new_hasher(algorithm)
    _update_object(hasher, obj)
    return f"{algorithm}:{hasher.hexdigest()}"


EMBEDDED_KEY = "digest"
"""The key under which a self-describing dict (a lens checkpoint, a lens's training.json) holds its digest."""


def with_digest(obj: dict) -> dict:
    """``obj`` with its :func:`object_digest` under :data:`EMBEDDED_KEY`, to be written in the same file."""
    return {**obj, EMBEDDED_KEY: object_digest(obj)}


def without_checked_digest(obj: dict, path: Path, fix: str) -> dict:
    """``obj`` read from ``path`` less its embedded digest, which must match the rest (IntegrityError naming
    ``path`` and ``fix`` if not; a one-line warning when ``obj`` predates digests)."""
    body = {key: value for key, value in obj.items() if key != EMBEDDED_KEY}
    expected = obj.get(EMBEDDED_KEY)
    if expected is None:
        warn_once(str(path), f"{path} carries no checksum (written before mlsae recorded them); read unverified")
    elif not matches(expected, lambda algorithm: object_digest(body, algorithm)):
        raise IntegrityError(f"{path} is damaged: its content does not match the checksum written with it; {fix}")
    return body


def tensors_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], algorithm: str = ALGORITHM) -> str:
    """The digest of a safetensors file's content: its tensors and its metadata (less the digest itself)."""
    return object_digest({"tensors": dict(tensors), "metadata": {k: v for k, v in metadata.items() if k != DIGEST_KEY}}, algorithm)


def matches(digest: str, compute) -> bool:
    """Whether ``compute(algorithm)`` reproduces ``digest`` (in the algorithm it was made with); an unknown
    algorithm does not match."""
    try:
        return compute(algorithm_of(digest)) == digest
    except ValueError:  # an algorithm this mlsae does not know
        return False


# ----------------------------------------------------------------------------------------------
# safetensors files: the digest inside the metadata


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def _write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """The safetensors format, written here rather than by safetensors.save_file, whose metadata order
    changes from call to call: the same tensors and metadata must give the same bytes (a resumed run is
    compared byte for byte with an uninterrupted one)."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in sorted(tensors):
            if tensors[name].numel():
                f.write(tensors[name].reshape(-1).view(torch.uint8).numpy().data)


def save_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` (moved to the CPU) and ``metadata`` atomically, with their digest in the metadata."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = {**metadata, DIGEST_KEY: tensors_digest(tensors, metadata)}
    atomic_write(path, lambda tmp: _write_safetensors(tmp, tensors, metadata))


def _unreadable(path: Path, exc: BaseException, fix: str) -> IntegrityError:
    reason = first_line(exc)
    return IntegrityError(f"{path} is truncated or not a safetensors file ({reason}); {fix}")


def read_safetensors_metadata(path: str | Path, fix: str) -> dict[str, str]:
    """The metadata of a safetensors file, from its header only (not verified: the tensors are not read)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types, OSError, or ValueError for a torn header
        raise _unreadable(path, exc, fix) from None


def load_safetensors(path: str | Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, checked against the digest in its metadata.

    A truncated, unreadable or damaged file raises IntegrityError naming it, ending with ``fix``; a
    file without a digest (written before they existed) loads with a one-line warning.
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    except Exception as exc:
        raise _unreadable(path, exc, fix) from None
    expected = metadata.get(DIGEST_KEY)
    if expected is None:
        warn_once(str(path), f"{path} carries no checksum (written before mlsae recorded them); loaded unverified")
    elif not matches(expected, lambda algorithm: tensors_digest(tensors, metadata, algorithm)):
        raise IntegrityError(f"{path} is damaged: its content does not match the checksum written with it; {fix}")
    return tensors, metadata


# ----------------------------------------------------------------------------------------------
# folder records: checksums.json beside the files


def _record_path(folder: Path) -> Path:
    return Path(folder) / RECORD_FILE


def _read_record(folder: Path) -> dict[str, dict] | None:
    """The folder's {name: {"bytes", "digest"}}, or None when it has no record."""
    path = _record_path(folder)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{path} is damaged (not a checksum record); the files it covers cannot be verified: write them again") from None
    return files


def _files_under(folder: Path) -> list[str]:
    """Every file below ``folder`` as a relative posix path, except the record and hidden temporaries."""
    names = []
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and relative.as_posix() != RECORD_FILE and not any(part.startswith(".") for part in relative.parts):
            names.append(relative.as_posix())
    return names


def record_files(folder: str | Path, names: Iterable[str] | None = None, *, create: bool = True) -> None:
    """Write (or update) ``folder``'s record with the size and digest of ``names`` (relative paths; default:
    every file below it). Call it after those files are complete. ``create=False``: only update an existing
    record (a file added to a folder written before checksums stays unrecorded, as its siblings)."""
    folder = Path(folder)
    files = _read_record(folder)
    if files is None:
        if not create:
            return
        files = {}
    for name in _files_under(folder) if names is None else names:
        path = folder / name
        files[Path(name).as_posix()] = {"bytes": path.stat().st_size, "digest": file_digest(path)}
    atomic_write_json(_record_path(folder), {"format": RECORD_FORMAT, "algorithm": ALGORITHM, "files": dict(sorted(files.items()))})


def has_record(folder: str | Path) -> bool:
    return _record_path(Path(folder)).exists()


def recorded_files(folder: str | Path) -> list[str] | None:
    """The relative paths ``folder``'s record lists, or None when it has no record."""
    files = _read_record(Path(folder))
    return None if files is None else list(files)


def verify_files(folder: str | Path, names: Iterable[str] | None, fix: str, *, warn_unrecorded: bool = True) -> None:
    """Check ``names`` (relative paths; None: every recorded file) against ``folder``'s record.

    A missing, resized or changed file raises IntegrityError naming it, ending with ``fix``. Without a
    record (a folder written before checksums existed), or for a file the record does not list, a
    one-line warning (``warn_unrecorded=False``: silently).
    """
    folder = Path(folder)
    files = _read_record(folder)
    if files is None:
        if warn_unrecorded:
            warn_once(str(folder), f"{folder} has no {RECORD_FILE} (written before mlsae recorded checksums); its files are read unverified")
        return
    for name in files if names is None else [Path(n).as_posix() for n in names]:
        path = folder / name
        entry = files.get(name)
        if entry is None:
            if warn_unrecorded and path.exists():
                warn_once(str(path), f"{path} is not listed in {folder / RECORD_FILE}; read unverified")
            continue
        if not path.is_file():
            raise IntegrityError(f"{path} is missing (it is listed in {folder / RECORD_FILE}); {fix}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IntegrityError(f"{path} is damaged: {size} bytes where {entry['bytes']} were written; {fix}")
        if not matches(entry["digest"], lambda algorithm: file_digest(path, algorithm)):
            raise IntegrityError(f"{path} is damaged: its checksum differs from the one recorded when it was written; {fix}")


def verified(path: str | Path, fix: str) -> Path:
    """``path`` after checking it against the record of its folder (see :func:`verify_files`)."""
    path = Path(path)
    verify_files(path.parent, [path.name], fix)
    return path

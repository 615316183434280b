"""Which kind of folder a path is (a cache, a training run, something else), so that a path of the
wrong kind is named as such in one line instead of being reported as missing or unfinished."""

from __future__ import annotations

import json
from pathlib import Path

from . import shard_format as sf
from .errors import CacheError, MlsaeError

# the files mlsae-train writes into a run directory (mlsae_train.checkpoint owns these names; they are
# repeated here because mlsae_cache does not import mlsae_train)
RUN_MARKERS = ("sae.safetensors", "checkpoint.safetensors", "metrics.jsonl")


def is_cache_dir(path: Path) -> bool:
    """A folder mlsae-cache wrote (finished or not): a manifest, or a cache config beside a shard folder."""
    path = Path(path)
    return path.is_dir() and ((path / sf.MANIFEST).is_file() or (path / sf.SHARD_DIR).is_dir())


def is_run_dir(path: Path) -> bool:
    """A folder mlsae-train wrote: its weights, checkpoint or metrics log, or a run config (which has "sae")."""
    path = Path(path)
    if not path.is_dir():
        return False
    if any((path / name).is_file() for name in RUN_MARKERS):
        return True
    try:
        return "sae" in json.loads((path / sf.CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def require_cache_path(path: str | Path, flag: str) -> None:
    """Refuse a path that exists but cannot be a cache: a file, or a training run's folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CacheError(f"{flag} {path} is a file, not a cache directory; point {flag} at a directory written by mlsae-cache")
    if is_run_dir(path) and not is_cache_dir(path):
        raise CacheError(
            f"{flag} {path} is a training run (written by mlsae-train), not a cache; "
            f"point {flag} at a directory written by mlsae-cache"
        )


def require_run_path(path: str | Path, flag: str = "--run", cache_goes_to: str | None = "--shards") -> None:
    """Refuse a cache passed where a training run (or its sae.safetensors) is expected; ``cache_goes_to``: the
    option of the same command that takes a cache, named in the fix (None: the command takes none)."""
    path = Path(path)
    if is_cache_dir(path) and not is_run_dir(path):
        elsewhere = f" (and the cache at {cache_goes_to})" if cache_goes_to else ""
        raise MlsaeError(
            f"{flag} {path} is an activation cache (written by mlsae-cache), not a training run; "
            f"point {flag} at the --out of mlsae-train{elsewhere}"
        )

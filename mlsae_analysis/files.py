"""Atomic writes: every file appears under its final name complete, or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import polars as pl


def atomic_write(path: Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` for a temporary name beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_csv(df: pl.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: df.write_csv(tmp))


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: df.write_parquet(tmp))

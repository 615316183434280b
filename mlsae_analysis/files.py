"""Atomic writes: every file appears under its final name complete, or not at all; so does an output directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import polars as pl

from mlsae_cache.atomic import atomic_write  # noqa: F401 - the analysis modules import it from here
from mlsae_cache.errors import MlsaeError


def write_csv(df: pl.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: df.write_csv(tmp))


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: df.write_parquet(tmp))


def write_fresh_directory(out: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill`` on a hidden sibling of ``out`` and rename it to ``out`` once it has finished.

    ``out`` must not exist yet; on any error the sibling is removed, so ``out`` is either complete or
    absent. The sibling sits beside ``out``, so relative paths written inside it stay valid after the rename.
    """
    if out.exists():
        raise MlsaeError(f"--out {out} already exists; choose a new directory or remove it")
    if not out.parent.is_dir():
        raise MlsaeError(f"the parent directory of --out {out} does not exist; create it first")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        fill(partial)
        os.rename(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)

"""Atomic writes: every file appears under its final name complete, or not at all."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mlsae_cache.atomic import atomic_write  # noqa: F401 - the analysis modules import it from here


def write_csv(df: pl.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: df.write_csv(tmp))


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    return atomic_write(path, lambda tmp: df.write_parquet(tmp))

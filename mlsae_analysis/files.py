"""Atomic writes: every file appears under its final name complete, or not at all; so does an output directory."""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
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
    Siblings left by a killed run (kill -9: no cleanup ran) are removed first, once their process is gone.
    """
    if out.exists():
        raise MlsaeError(f"--out {out} already exists; choose a new directory or remove it")
    if not out.parent.is_dir():
        raise MlsaeError(f"the parent directory of --out {out} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise MlsaeError(f"cannot write to {out.parent}: permission denied; choose a writable --out")
    remove_stale_partials(out)
    partial = out.parent / f"{_partial_prefix(out)}{os.getpid()}"
    try:
        fill(partial)
        os.rename(partial, out)
    except OSError as exc:  # name the file the user asked for, not its place in the hidden sibling
        if exc.filename and str(exc.filename).startswith(str(partial)):
            exc.filename = str(out) + str(exc.filename)[len(str(partial)) :]
        raise
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def _partial_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def remove_stale_partials(out: Path, prefix: str | None = None) -> list[Path]:
    """Remove the hidden siblings ``PREFIX<PID>`` of ``out`` (default prefix: ``.NAME.partial-``) whose process
    no longer runs (or is this one, which has not made its own yet); returns them.

    Only folders of exactly this naming pattern are touched; another live process's sibling is left alone.
    """
    prefix = _partial_prefix(out) if prefix is None else prefix
    removed = []
    for path in sorted(out.parent.glob(f"{glob.escape(prefix)}*")):
        # PREFIX<PID>, or PREFIX<N>.partial-<PID>: the partial of a folder that was itself being made
        found = re.fullmatch(r"(?:\d+\.partial-)?(\d+)", path.name[len(prefix) :])
        if not (found and path.is_dir() and not path.is_symlink()):
            continue
        pid = found.group(1)
        if int(pid) != os.getpid() and _process_runs(int(pid)):
            continue
        shutil.rmtree(path)
        removed.append(path)
        print(f"removed {path}: left unfinished by process {pid}, which is no longer writing it", file=sys.stderr)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

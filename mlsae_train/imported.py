"""PLACEHOLDER: being written. Other tools' TopK SAEs as a per-layer baseline."""

from __future__ import annotations

from pathlib import Path

from .dictionary import Dictionary
from .formats import SAEFormat


class ImportedTopKSAEs(Dictionary):
    arch = "per-layer"


def load_imported(dirs: list[tuple[SAEFormat, Path]]) -> ImportedTopKSAEs:
    raise NotImplementedError

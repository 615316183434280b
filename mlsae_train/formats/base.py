"""The interface every other tool's SAE folder format implements, and the one-layer SAE it reads into.

A format (SAELens, sparsify, the MLSAE paper's reference code) knows its own folder layout: which files make one
SAE, how to read one into a :class:`ForeignTopK` (its weights in our orientation, and exactly how that tool
computes its forward), and, where the format can hold our dictionaries, how to write a run's layers in that
tool's own layout.

The forward a :class:`ForeignTopK` describes (the tool's own; the imported dictionary reproduces it):

    u     = normalise_in(x)                   "none": u = x;  "standardize": SAELens's layer_norm (the reference
                                              code's standardize too), u = (x - mean) / (std + eps)
    pre   = (u - b_dec * apply_b_dec_to_input) @ W_enc.T + b_enc          [.., n]
    pre  *= ||W_dec[j]||                      only with rescale_acts_by_decoder_norm
    h     = ReLU(TopK_k(pre))                 (sparsify's TopK(ReLU(pre)) keeps the same latents and values)
    u_hat = h @ W_dec + b_dec                 with rescale_acts_by_decoder_norm: (h / ||W_dec[j]||) @ W_dec + b_dec
    x_hat = u_hat * std + mean                "standardize" only (SAELens and the reference code map back with std,
                                              not std + eps)
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from mlsae_cache.errors import MlsaeError, first_line

if TYPE_CHECKING:
    from ..dictionary import Dictionary

InputNorm = Literal["none", "standardize"]


@dataclass
class ForeignTopK:
    """One TopK SAE of another tool on one residual-stream layer (or on every layer: ``layer`` None), in our
    orientation (rows are latents)."""

    W_enc: torch.Tensor
    """[n, d] encoder rows."""
    b_enc: torch.Tensor
    """[n] encoder bias."""
    W_dec: torch.Tensor
    """[n, d] decoder rows (not necessarily unit norm)."""
    b_dec: torch.Tensor
    """[d] decoder bias (subtracted from the input first when ``apply_b_dec_to_input``)."""
    k: int
    """Active latents per vector."""
    layer: int | None
    """The model block whose output (the residual stream after it) the SAE reads; None: one SAE shared by every
    layer's residual stream (an MLSAE, as the reference code's: it loads as an ImportedMLSAE)."""
    input_norm: InputNorm
    """How the tool normalises each input vector (module docstring)."""
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False
    """SAELens's option (module docstring); a reader may instead fold the decoder norms into W_enc, b_enc and
    W_dec (the same latents, with values on unit-norm rows) and leave it False."""
    eps: float = 1e-5
    """The standardisation's eps (``input_norm == "standardize"`` only)."""
    source: dict = field(default_factory=dict)
    """Where it came from, recorded in the analysis summary: ``format``, ``path``, ``model``, ``hook``, and
    ``normalisation``: one sentence saying how its input normalisation differs from ours (SPEC 3)."""


class SAEFormat(ABC):
    """One other tool's on-disk SAE format."""

    name: ClassVar[str]
    """The format's name (``mlsae-export NAME``, the ``format`` recorded with an imported SAE)."""

    @abstractmethod
    def recognises(self, folder: Path) -> bool:
        """Whether ``folder`` holds ONE SAE in this format (its files, not yet validated)."""

    @abstractmethod
    def read(self, folder: Path) -> ForeignTopK:
        """The SAE in ``folder``; anything we cannot reproduce exactly (another architecture or activation, an
        unknown normalisation, a hook that is not the residual stream) is refused in one MlsaeError line."""

    def check_repo_name(self, repo_id: str) -> None:
        """Refuse, in one MlsaeError line and before anything is downloaded, a hub repo this format knows by its name
        to hold something mlsae cannot read (default: none)."""

    def export(self, sae: Dictionary, run_info: dict, out: Path, model_name: str | None = None) -> list[Path]:
        """Write ``sae`` (with its run's config.json, ``run_info``) into the fresh folder ``out``, one SAE per
        layer in this format's own layout; returns the SAE folders written. ``model_name``: the model id to record
        (default: the model as the run recorded it, which may be a local path). Formats that cannot hold a
        dictionary say so in one MlsaeError line."""
        raise MlsaeError(f"mlsae cannot export to the {self.name} format; use mlsae-export saelens")


_HOOK_PATTERNS = (
    # TransformerLens: the residual stream after block l, or before block l (= after block l - 1)
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),
    # a decoder block's output as a Hugging Face module path (sparsify's hookpoints): layers.l, gpt_neox.layers.l,
    # model.layers.l, transformer.h.l, ...
    (re.compile(r"^(?:[A-Za-z_][\w]*\.)*(?:layers|h|blocks|layer)\.(\d+)$"), 0),
)


def layer_of_hook(hook: str) -> int | None:
    """The block index l whose output the hook reads (the residual stream after block l), or None when the hook
    is not a residual-stream hook we know (an attention or MLP output, the embeddings)."""
    for pattern, shift in _HOOK_PATTERNS:
        match = pattern.match(hook)
        if match:
            layer = int(match.group(1)) + shift
            return layer if layer >= 0 else None
    return None


def transformer_lens_hook(layer: int) -> str:
    """The TransformerLens hook name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """The JSON object in ``path`` (a format's config); one MlsaeError line naming ``what`` it should be and the
    ``fix`` when it is missing, unreadable, not JSON or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlsaeError(f"{path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MlsaeError(f"{path} is not valid JSON, so not a readable {what} ({type(exc).__name__}); {fix}") from None
    if not isinstance(value, dict):
        raise MlsaeError(f"{path} holds no JSON object, so no {what}; {fix}")
    return value


def read_float_weights(path: Path, required: tuple[str, ...], what: str, fix: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file ``path`` in float32 (the tools save float32 or bfloat16); one MlsaeError
    line, naming ``what`` it should be and the ``fix``, when it is unreadable, lacks one of ``required`` (saying what
    it holds instead) or holds a non-finite value."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        reason = first_line(exc)
        raise MlsaeError(f"{path} is not a readable {what} ({reason}); {fix}") from None
    missing = [name for name in required if name not in tensors]
    if missing:
        held = ", ".join(sorted(tensors)[:5]) + (", ..." if len(tensors) > 5 else "")
        raise MlsaeError(f"{path} lacks {missing[0]} (it holds {held or 'no tensor'}); {fix}")
    out = {name: tensor.to(torch.float32) for name, tensor in tensors.items()}
    bad = next((name for name, tensor in out.items() if not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise MlsaeError(f"{path} holds non-finite weights ({bad}); {fix}")
    return out

"""How the analysis sees each dictionary family (SPEC sections 3 and 9; mlsae_train/dictionary.py).

Every step of ``mlsae-analyse`` works on a dictionary's latents through one :class:`AnalysedFamily`:

    family        latents stored (latents/part-*.parquet)            codes the per-layer metrics get
    "mlsae"       token, layer, latent (0..n-1), activation           [B, L, k]: k per (token, layer) vector
    "per-layer"   token, layer, latent = l*n + j, activation           [B, L, k]: SAE l's k latents of layer l
    "crosscoder"  token, latent (0..n-1), activation (NO layer)        [B, k]: k per token, for all its layers

- The per-layer suite's latent j of layer l's SAE gets the global id ``l*n + j``, so that the examples, the
  latent browser and the dead fraction run over its L*n latents unchanged; its layer column is the layer
  whose SAE it belongs to (each of its latents fires only there).
- A crosscoder latent fires for a TOKEN, writing to every layer at once: its rows carry no layer column
  (one that said 0 would be read as layer 0). Its layer profile comes from its decoder blocks
  (family_layers.py), and the examples and the page show its contexts without a layer.
- L0 and L1 are counted per vector (per (token, layer)) for the MLSAE and the per-layer suite and per
  token for the crosscoder (:attr:`AnalysedFamily.sparsity_unit`; metrics.csv names the columns
  ``l0``/``l1`` and ``l0_per_token``/``l1_per_token``).
- Decoder neighbours and MMCS (SPEC 4) are searched within each dictionary: among the MLSAE's n rows,
  within each layer's SAE of the per-layer suite (as L single-layer runs would report them; ids global),
  among the crosscoder's n flattened blocks W_dec[j] [L*d].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import polars as pl
import torch

from mlsae_cache.errors import MlsaeError
from mlsae_train.dictionary import Dictionary, Reconstruction

LATENT_SCHEMA = {"token": pl.Int64, "layer": pl.Int16, "latent": pl.Int32, "activation": pl.Float32}
"""The columns of the stored sparse latents (a crosscoder's have no layer)."""


def _sorted_codes(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ascending within each row of [..., k] codes, whichever kernel picked them."""
    indices, order = indices.sort(dim=-1)
    return values.gather(-1, order), indices


@dataclass(frozen=True)
class AnalysedFamily:
    """The MLSAE's view; the other families override what differs (module docstring)."""

    arch: ClassVar[str] = "mlsae"
    sparsity_unit: ClassVar[str] = "vector"
    """What L0 and L1 count: active latents per (token, layer) "vector", or per "token"."""
    has_layer_column: ClassVar[bool] = True
    """Whether each stored latent row names the layer it fired at."""

    def total_latents(self, sae: Dictionary) -> int:
        """How many latents the latent ids of the stored rows run over."""
        return sae.n_latents

    def codes(self, recon: Reconstruction, n_tokens: int, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of a batch's reconstruction as the metrics take them: [B, L, k] each
        (indices: the latent of the vector's own dictionary, 0..n-1), or [B, k] per token."""
        return recon.values.view(n_tokens, n_layers, -1), recon.indices.view(n_tokens, n_layers, -1)

    def sparse_rows(self, token_start: int, values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> pl.DataFrame:
        """The active latents of a batch as rows (LATENT_SCHEMA), in ascending token, layer, latent order.
        values, indices: :meth:`codes` of tokens token_start.."""
        batch, n_layers, k = values.shape
        values, indices = _sorted_codes(values, indices)
        global_ids = indices + self._layer_offsets(n_layers, n_latents, indices.device)[:, None]  # [B, L, k]
        values_np = values.reshape(-1).cpu().numpy()  # [B * L * k]
        keep = values_np > 0
        token = np.repeat(np.arange(token_start, token_start + batch, dtype=np.int64), n_layers * k)
        layer = np.tile(np.repeat(np.arange(n_layers, dtype=np.int16), k), batch)
        return pl.DataFrame(
            {"token": token[keep], "layer": layer[keep], "latent": global_ids.reshape(-1).cpu().numpy().astype(np.int32)[keep],
             "activation": values_np.astype(np.float32)[keep]},
            schema=LATENT_SCHEMA,
        )  # fmt: skip

    def _layer_offsets(self, n_layers: int, n_latents: int, device: torch.device) -> torch.Tensor:
        """[L] what is added to a layer's latent indices to make its global ids (0: one shared dictionary)."""
        return torch.zeros(n_layers, dtype=torch.int64, device=device)

    def dead_fraction(self, active: torch.Tensor) -> float:
        """The fraction of the dictionary's latents never active on the test set, from active [L, n]
        (latent j seen active at layer l; ReconstructionMetrics.active): for the MLSAE, never at any layer."""
        return float(1.0 - active.any(dim=0).double().mean())

    def decoder_groups(self, sae: Dictionary) -> list[tuple[int, torch.Tensor]]:
        """(first global id, decoder rows [m, D]) of each dictionary whose rows are each other's neighbours."""
        return [(0, sae.W_dec.detach())]


@dataclass(frozen=True)
class PerLayerFamily(AnalysedFamily):
    arch: ClassVar[str] = "per-layer"

    def total_latents(self, sae: Dictionary) -> int:
        return len(sae.layers) * sae.n_latents

    def _layer_offsets(self, n_layers: int, n_latents: int, device: torch.device) -> torch.Tensor:
        return torch.arange(n_layers, dtype=torch.int64, device=device) * n_latents  # latent j of layer l: l*n + j

    def dead_fraction(self, active: torch.Tensor) -> float:
        """Over the L*n latents: each belongs to one layer, so this is the mean of the per-layer fractions."""
        return float(1.0 - active.double().mean())

    def decoder_groups(self, sae: Dictionary) -> list[tuple[int, torch.Tensor]]:
        W_dec = sae.W_dec.detach()  # [L, n, d]
        return [(layer * sae.n_latents, W_dec[layer]) for layer in range(W_dec.shape[0])]


@dataclass(frozen=True)
class CrosscoderFamily(AnalysedFamily):
    arch: ClassVar[str] = "crosscoder"
    sparsity_unit: ClassVar[str] = "token"
    has_layer_column: ClassVar[bool] = False

    def codes(self, recon: Reconstruction, n_tokens: int, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        return recon.values, recon.indices  # [B, k] each: one latent vector per token

    def sparse_rows(self, token_start: int, values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> pl.DataFrame:
        """token, latent, activation (no layer: a crosscoder latent writes to every layer)."""
        batch, k = values.shape
        values, indices = _sorted_codes(values, indices)
        values_np = values.reshape(-1).cpu().numpy()  # [B * k]
        keep = values_np > 0
        token = np.repeat(np.arange(token_start, token_start + batch, dtype=np.int64), k)
        schema = {name: dtype for name, dtype in LATENT_SCHEMA.items() if name != "layer"}
        return pl.DataFrame(
            {"token": token[keep], "latent": indices.reshape(-1).cpu().numpy().astype(np.int32)[keep],
             "activation": values_np.astype(np.float32)[keep]},
            schema=schema,
        )  # fmt: skip

    def dead_fraction(self, active: torch.Tensor) -> float:
        """A latent fires for a token, hence at every layer at once (ReconstructionMetrics marks it so)."""
        return float(1.0 - active.any(dim=0).double().mean())

    def decoder_groups(self, sae: Dictionary) -> list[tuple[int, torch.Tensor]]:
        return [(0, sae.W_dec.detach().reshape(sae.n_latents, -1))]  # [n, L*d]: each latent's whole block


FAMILIES: dict[str, AnalysedFamily] = {family.arch: family for family in (AnalysedFamily(), PerLayerFamily(), CrosscoderFamily())}


def family_of(sae: Dictionary) -> AnalysedFamily:
    """The analysis's view of the dictionary's family (its ``arch``); one line for a family it does not know."""
    arch = sae.arch
    if arch not in FAMILIES:
        raise MlsaeError(f"mlsae-analyse cannot analyse a {arch} dictionary (it analyses {', '.join(FAMILIES)}); "
                         "analyse a run trained by this mlsae-train")  # fmt: skip
    return FAMILIES[arch]

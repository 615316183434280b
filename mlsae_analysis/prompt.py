"""Latents of one prompt (paper fig. 3): run the model on it, drop special tokens, encode."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from torch import nn

from mlsae_cache.errors import MlsaeError
from mlsae_cache.lens import Lens
from mlsae_cache.lm import ResidualReader
from mlsae_cache.text import special_token_ids
from mlsae_train import MultiLayerSAE


def prompt_tokens(prompt: str, tokenizer) -> tuple[list[int], np.ndarray]:
    """The prompt's model input ids and a [S] bool mask of its ordinary (non-special) tokens."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    special = set(special_token_ids(tokenizer).tolist())
    keep = np.array([token not in special for token in ids], dtype=bool)
    if not keep.any():
        raise MlsaeError(f"--prompt {prompt!r} tokenizes to no ordinary token; give a prompt with some text")
    return ids, keep


@torch.no_grad()
def prompt_latents(
    prompt: str, tokenizer, model: nn.Module, sae: MultiLayerSAE, layers: list[int], lens: Lens | None
) -> tuple[pl.DataFrame, list[str]]:
    """Sparse latents (token = position among kept tokens, layer, latent, activation) and the kept tokens' text."""
    ids, keep = prompt_tokens(prompt, tokenizer)
    device = next(model.parameters()).device
    x = ResidualReader(model, layers).read(torch.tensor([ids], device=device))[0].float()  # [S, nL, d]
    x = x[torch.from_numpy(keep).to(device)]  # [T, nL, d]
    if lens is not None:
        x = lens.forward_stack(x, layers)
    values, indices = sae.encode(x)  # [T, nL, k]
    n_tokens, n_layers, k = values.shape
    values_np = values.reshape(-1).cpu().numpy()
    active = values_np > 0
    rows = pl.DataFrame(
        {
            "token": np.repeat(np.arange(n_tokens), n_layers * k)[active],
            "layer": np.tile(np.repeat(np.arange(n_layers), k), n_tokens)[active],
            "latent": indices.reshape(-1).cpu().numpy()[active],
            "activation": values_np[active],
        }
    )
    texts = [tokenizer.decode([token]) for token, kept in zip(ids, keep) if kept]
    return rows, texts

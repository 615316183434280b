"""Nearest decoder neighbours of every latent: the k other latents whose decoder rows are most cosine-similar.

The search itself is ``mmcs.nearest_neighbours`` (chunked: one [chunk_size, n_latents] block at a
time, never the n x n matrix); this module runs it once over all latents, and mlsae-analyse stores
the result as a long table, neighbours.parquet (layout.NEIGHBOURS), beside the other tables of an analysis:

    latent (Int32), rank (Int8, 0 = most similar), neighbour (Int32), cosine (Float32)
"""

from __future__ import annotations

import polars as pl
import torch

from mlsae_cache.errors import MlsaeError

from .mmcs import nearest_neighbours

DEFAULT_K = 5


@torch.no_grad()
def decoder_neighbours(
    W_dec: torch.Tensor, k: int = DEFAULT_K, chunk_size: int = 4096, progress: bool = True, screen: bool | None = None
) -> pl.DataFrame:
    """For every row of W_dec [n_latents, d_model], its k most cosine-similar other rows (long table, see above).

    k is capped at n_latents - 1. Memory beyond W_dec: a unit-norm copy and one [chunk_size, n_latents]
    block. ``screen``: as in ``mmcs.nearest_neighbours`` (None: where bfloat16 matmuls are fast).
    """
    n = W_dec.shape[0]
    if n < 2:
        raise MlsaeError(f"the decoder has {n} latent(s); neighbours need at least 2")
    k = min(k, n - 1)
    query = torch.arange(n, device=W_dec.device)
    indices, cosines = nearest_neighbours(W_dec.detach(), query, k, chunk_size, progress, screen)
    indices, cosines = indices.cpu(), cosines.float().cpu()  # [n, k] each
    return pl.DataFrame(
        {
            "latent": torch.arange(n).repeat_interleave(k).numpy(),
            "rank": torch.arange(k).repeat(n).numpy(),
            "neighbour": indices.reshape(-1).numpy(),
            "cosine": cosines.reshape(-1).numpy(),
        },
        schema={"latent": pl.Int32, "rank": pl.Int8, "neighbour": pl.Int32, "cosine": pl.Float32},
    )

"""How the latents of the per-layer suite and of the crosscoder spread over layers (SPEC section 9), as
tables with the columns of the MLSAE's latent_layers.parquet (latent_layer_table in layer_distributions.py):

    latent, mean_layer, var_layer, n_tokens, [family's columns], p_layer_0 .. p_layer_{L-1}

so that the heatmaps, the latent browser and cross-dictionary matching read every family alike. Layers are
numbered by their position on the run's layer axis, 0..L-1, as the MLSAE's E[L | J] is.

- Per-layer suite: latent l*n + j (families.py) lives in layer l: p_layer is one-hot there, E[L | J] = l
  and Var(L | J) = 0. Every latent of the suite has a row (n_tokens 0: never active on the test set).
- Crosscoder (every latent has a row; its weights define the profile):
    p_layer_l = s_j(l) = ||W_dec[j, l]||^2, which sums to 1 over l because every block W_dec[j] has unit norm
    mean_layer = E[L | J=j] = sum_l l s_j(l);  var_layer = sum_l (l - E[L | J=j])^2 s_j(l)
    w_layer_l = sum_t h_j[t] ||W_dec[j, l]|| / sum_t sum_l' h_j[t] ||W_dec[j, l']||  (activation-weighted share,
                over the test tokens, from the stored latents; null for a latent never active)
    weighted_mean_layer = sum_l l w_layer_l;  total_activation = sum_t h_j[t];  n_tokens = #{t : h_j[t] > 0}
  As SPEC 9 defines it, h_j[t] is one number per token, so it factors out of w_layer_l: for every active
  latent w_layer_l = ||W_dec[j, l]|| / sum_l' ||W_dec[j, l']||, the decoder-norm share counted linearly
  rather than squared. It is computed from the latents as specified (and tested against that formula); a
  share that depended on the tokens would have to weight each layer by the token's own scale at that layer
  (x_hat = z_hat * scale + mean), which the stored latents do not hold.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from .layer_distributions import LAYER_PROB_PREFIX, distribution_moments

WEIGHTED_PREFIX = "w_layer_"
"""The activation-weighted share columns of a crosscoder's latent table."""


def _per_latent_activity(latents: pl.LazyFrame) -> pl.DataFrame:
    """latent, n_tokens (rows with activation > 0: one per active (token, latent)), total_activation; streamed."""
    return (
        latents.filter(pl.col("activation") > 0)
        .group_by("latent")
        .agg(n_tokens=pl.len(), total_activation=pl.col("activation").cast(pl.Float64).sum())
        .collect(engine="streaming")
    )


def _dense_column(n: int, latent: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    out = np.full(n, fill, dtype=np.asarray(values).dtype if len(values) else np.float64)
    out[latent] = values
    return out


def per_layer_latent_table(latents: pl.LazyFrame, n_layers: int, n_latents: int) -> pl.DataFrame:
    """One row per latent of a per-layer suite (L*n, global ids l*n + j), sorted by layer then id."""
    total = n_layers * n_latents
    latent = np.arange(total, dtype=np.int64)
    layer = latent // n_latents  # [L*n]
    activity = _per_latent_activity(latents)
    n_tokens = _dense_column(total, activity["latent"].to_numpy(), activity["n_tokens"].to_numpy().astype(np.int64), 0)
    one_hot = np.zeros((total, n_layers))
    one_hot[latent, layer] = 1.0
    return pl.DataFrame(
        {"latent": latent, "mean_layer": layer.astype(np.float64), "var_layer": np.zeros(total), "n_tokens": n_tokens,
         **{f"{LAYER_PROB_PREFIX}{l}": one_hot[:, l] for l in range(n_layers)}}
    )  # fmt: skip


@torch.no_grad()
def decoder_layer_shares(W_dec: torch.Tensor) -> np.ndarray:
    """s [n, L]: s_j(l) = ||W_dec[j, l]||^2 / ||W_dec[j]||^2 of a crosscoder decoder W_dec [n, L, d] (float64).
    Trained blocks have unit norm, so this is ||W_dec[j, l]||^2; dividing by the block's norm keeps the rows
    summing to 1 to float precision. A zero block (never trained, never seen) has no profile: NaN."""
    squared = W_dec.detach().double().square().sum(dim=2).cpu().numpy()  # [n, L]
    block = squared.sum(axis=1, keepdims=True)  # [n, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(block > 0, squared / block, np.nan)


@torch.no_grad()
def activation_weighted_shares(latents: pl.LazyFrame, W_dec: torch.Tensor) -> pl.DataFrame:
    """latent, n_tokens, total_activation and w_layer_0 .. w_layer_{L-1} of every latent active on the test
    set (module docstring), from the stored latents (token, latent, activation) and W_dec [n, L, d].

    The sums over tokens run in polars' streaming engine, so memory is O(latents x layers), not O(tokens)."""
    norms = torch.linalg.vector_norm(W_dec.detach().double(), dim=2).cpu().numpy()  # [n, L] ||W_dec[j, l]||
    n_layers = norms.shape[1]
    norm_table = pl.DataFrame({"latent": np.arange(norms.shape[0], dtype=np.int32),
                               **{f"norm_{l}": norms[:, l] for l in range(n_layers)}})  # fmt: skip
    activity = _per_latent_activity(latents).with_columns(pl.col("latent").cast(pl.Int32))
    written = activity.join(norm_table, on="latent", how="left").with_columns(
        # sum_t h_j[t] ||W_dec[j, l]||: the reconstruction of latent j written to layer l over the test tokens
        [(pl.col("total_activation") * pl.col(f"norm_{l}")).alias(f"written_{l}") for l in range(n_layers)]
    )
    total = pl.sum_horizontal([f"written_{l}" for l in range(n_layers)])
    return written.select(
        pl.col("latent").cast(pl.Int64), "n_tokens", "total_activation",
        *[(pl.col(f"written_{l}") / total).alias(f"{WEIGHTED_PREFIX}{l}") for l in range(n_layers)],
    ).sort("latent")  # fmt: skip


def crosscoder_latent_table(latents: pl.LazyFrame, W_dec: torch.Tensor) -> pl.DataFrame:
    """One row per crosscoder latent, sorted by E[L | J] then id (module docstring for the columns)."""
    shares = decoder_layer_shares(W_dec)  # [n, L]
    n_latents, n_layers = shares.shape
    mean_layer, var_layer = distribution_moments(np.nan_to_num(shares))
    weighted = activation_weighted_shares(latents, W_dec)
    table = pl.DataFrame(
        {"latent": np.arange(n_latents, dtype=np.int64), "mean_layer": mean_layer, "var_layer": var_layer,
         **{f"{LAYER_PROB_PREFIX}{l}": shares[:, l] for l in range(n_layers)}}
    ).join(weighted, on="latent", how="left")  # fmt: skip
    weighted_columns = [f"{WEIGHTED_PREFIX}{l}" for l in range(n_layers)]
    table = table.with_columns(
        pl.col("n_tokens").fill_null(0).cast(pl.Int64),
        pl.col("total_activation").fill_null(0.0),
        weighted_mean_layer=pl.sum_horizontal([pl.col(c) * l for l, c in enumerate(weighted_columns)]),
    ).with_columns(
        weighted_mean_layer=pl.when(pl.col("n_tokens") > 0).then(pl.col("weighted_mean_layer")).otherwise(None)
    )
    first = ["latent", "mean_layer", "var_layer", "n_tokens", "total_activation", "weighted_mean_layer"]
    return table.select(*first, pl.exclude(first)).sort("mean_layer", "latent")


def weighted_layer_table(table: pl.DataFrame) -> pl.DataFrame:
    """The active latents of a crosscoder latent table with their activation-weighted shares as p_layer_*,
    ordered by E[L | J] (the decoder-norm one), for its heatmap."""
    weighted = [c for c in table.columns if c.startswith(WEIGHTED_PREFIX)]
    active = table.filter(pl.col("n_tokens") > 0)
    return active.select(
        "latent", "mean_layer", *[pl.col(c).alias(LAYER_PROB_PREFIX + c[len(WEIGHTED_PREFIX):]) for c in weighted]
    )  # fmt: skip

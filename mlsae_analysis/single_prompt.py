"""Single-prompt heatmap data (paper fig. 3; SPEC section 5).

For one prompt, each latent's activation is summed over the prompt's tokens at each layer and the
sums are normalized over layers: P(L = l | prompt, J = j) = sum_t h_j(x[t,l]) / sum_t,l' h_j(x[t,l']).
(Unlike the aggregate heatmap, tokens are weighted by their activation, not uniformly: this is the
paper's fig. 3 recipe, not eq. 10 averaged over tokens.)

Latents are dropped when their maximum activation is below `min_activation` (1e-3 in the paper).
"Maximum activation" is pinned here as the largest single activation h_j(x[t, l]) of the latent over
all of the prompt's tokens t and layers l; a latent is kept when that maximum is >= min_activation.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mlsae_cache.errors import MlsaeError

from .layer_distributions import Latents, checked_latents, resolve_n_layers, wide_layer_table

PAPER_MIN_ACTIVATION = 1e-3


def single_prompt_layer_table(
    latents: Latents,
    n_layers: int | None = None,
    min_activation: float = PAPER_MIN_ACTIVATION,
) -> pl.DataFrame:
    """One row per kept latent of one prompt, sorted by expected layer (ties by latent id).

    latents: the prompt's sparse latents (token, layer, latent, activation).
    n_layers: the number of layers nL; by default one more than the largest layer index present.
    Columns: latent, mean_layer, var_layer, max_activation, total_activation, n_tokens (tokens of
    the prompt where the latent is active), then p_layer_0 .. p_layer_{nL-1}.
    """
    if not min_activation >= 0:
        raise MlsaeError(f"min_activation must be >= 0, got {min_activation}")
    rows = checked_latents(latents).collect()
    if rows.height == 0:
        raise MlsaeError("the prompt has no active latent (activation > 0); check the prompt's latents")
    if rows["latent"].min() < 0 or rows["layer"].min() < 0:  # type: ignore[operator]
        raise MlsaeError("latents hold a negative latent or layer index; indices must be >= 0")
    n_layers = resolve_n_layers(int(rows["layer"].max()) + 1, n_layers)  # type: ignore[arg-type]

    per_latent = (
        rows.group_by("latent")
        .agg(
            max_activation=pl.col("activation").max(),
            total_activation=pl.col("activation").sum(),
            n_tokens=pl.col("token").n_unique(),
        )
        .filter(pl.col("max_activation") >= min_activation)
        .sort("latent")
    )
    latent = per_latent["latent"].to_numpy()  # [J]
    per_layer = (
        rows.join(per_latent.select("latent"), on="latent", how="semi")
        .group_by("latent", "layer")
        .agg(pl.col("activation").sum())
    )
    activation_sum = np.zeros((latent.size, n_layers))  # [J, nL] sum over tokens per layer
    row_of_latent = np.searchsorted(latent, per_layer["latent"].to_numpy())
    activation_sum[row_of_latent, per_layer["layer"].to_numpy()] = per_layer["activation"].to_numpy()
    total = per_latent["total_activation"].to_numpy()  # [J]
    layer_prob = activation_sum / total[:, None] if latent.size else activation_sum  # [J, nL]
    return wide_layer_table(
        latent,
        layer_prob,
        max_activation=per_latent["max_activation"].to_numpy(),
        total_activation=total,
        n_tokens=per_latent["n_tokens"].to_numpy().astype(np.int64),
    )

"""Top activating examples per latent: the (token, layer) pairs with the largest activations, with context."""

from __future__ import annotations

import numpy as np
import polars as pl


def top_examples(latents: pl.LazyFrame, tokens: pl.DataFrame, n_examples: int, context_tokens: int) -> pl.DataFrame:
    """For each latent its ``n_examples`` largest activations, with their token's context.

    latents: token, layer, latent, activation; tokens: token, sequence, position, token_id.
    Returns latent, rank (0 = largest), token, layer, activation, sequence, position, token_id and
    context_ids (token ids at positions position-c .. position+c of the same sequence that the
    cache stores; special positions are absent) and context_offset (the example's index in it).
    """
    top = (
        latents.group_by("latent")
        .agg(pl.col("token", "layer", "activation").top_k_by("activation", n_examples))
        .explode("token", "layer", "activation")
        .with_columns(rank=pl.col("activation").rank("ordinal", descending=True).over("latent").cast(pl.Int32) - 1)
        .collect(engine="streaming")
        .join(tokens, on="token", how="left")
        .sort("latent", "rank")
    )
    # Context: the tokens of the same sequence within +-c positions, found by searching the sorted
    # (sequence, position) keys of the token table.
    seq_len = int(tokens["position"].max()) + 1 if tokens.height else 1  # type: ignore[arg-type]
    keys = tokens["sequence"].to_numpy() * seq_len + tokens["position"].to_numpy()  # [N] ascending
    token_ids = tokens["token_id"].to_numpy()
    example_keys = top["sequence"].to_numpy() * seq_len + top["position"].to_numpy()  # [E]
    lo = np.searchsorted(keys, example_keys - np.minimum(context_tokens, top["position"].to_numpy()), side="left")
    hi = np.searchsorted(keys, example_keys - top["position"].to_numpy() + np.minimum(
        top["position"].to_numpy() + context_tokens, seq_len - 1), side="right")
    at = np.searchsorted(keys, example_keys, side="left")
    context = [token_ids[a:b].tolist() for a, b in zip(lo, hi)]
    return top.with_columns(
        context_ids=pl.Series(context, dtype=pl.List(pl.Int64)),
        context_offset=pl.Series((at - lo).astype(np.int32)),
    )

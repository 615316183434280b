"""Top activating examples per latent: the (token, layer) pairs with the largest activations, with context
(a crosscoder's: tokens, their layer null).

Both inputs are streamed: the latents one batch of rows at a time against a running per-latent
threshold (the n-th best activation so far), the token table filtered down to the rows near an
example. Memory is O(latents x examples x context), flat in the number of tokens.
"""

from __future__ import annotations

import numpy as np
import polars as pl

DEFAULT_BATCH_ROWS = 1_000_000
_ROW_COLUMNS = ("token", "layer", "latent", "activation")
# Among equal activations the earlier token (then the lower layer) ranks first.
_RANK_ORDER = (["latent", "activation", "token", "layer"], [False, True, False, False])


def with_layer_column(latents: pl.LazyFrame) -> pl.LazyFrame:
    """The latents with their layer column; a crosscoder's rows have none (its latents fire per token,
    families.py), so theirs is null: an example of a crosscoder latent is a token, not a (token, layer) pair."""
    if "layer" in latents.collect_schema().names():
        return latents
    return latents.with_columns(layer=pl.lit(None, dtype=pl.Int16))


def _best_per_latent(rows: pl.DataFrame, n_examples: int) -> pl.DataFrame:
    """The ``n_examples`` highest-ranked rows of each latent, sorted by latent then rank."""
    by, descending = _RANK_ORDER
    ranked = rows.sort(by, descending=descending).group_by("latent", maintain_order=True).head(n_examples)
    return ranked.select(rows.columns)


def top_activations(latents: pl.LazyFrame, n_examples: int, batch_rows: int = DEFAULT_BATCH_ROWS) -> pl.DataFrame:
    """For each latent its ``n_examples`` largest activations: latent, rank (0 = largest), token, layer, activation.

    One pass over ``latents`` (token, layer, latent, activation; rows with activation <= 0 ignored).
    A row enters only if it beats its latent's current n-th best, so after the first batches almost
    every row is rejected by one vectorised comparison; only the latents that gained a row are re-ranked.
    """
    rows = with_layer_column(latents).select(_ROW_COLUMNS).filter(pl.col("activation") > 0)
    best = rows.head(0).collect()  # [E, 4] the current top rows, all latents
    threshold = np.zeros(0)  # [n_latents seen] activation to beat: the n-th best, -inf while fewer are known
    for batch in rows.collect_batches(chunk_size=batch_rows, maintain_order=True):
        latent = batch["latent"].to_numpy()
        if latent.size == 0:
            continue
        if latent.max() >= threshold.size:
            threshold = np.concatenate([threshold, np.full(int(latent.max()) + 1 - threshold.size, -np.inf)])
        keep = batch["activation"].to_numpy() > threshold[latent]  # [rows]
        if not keep.any():
            continue
        entering = batch.filter(pl.Series(keep))
        touched = np.zeros(threshold.size, dtype=bool)
        touched[latent[keep]] = True
        in_touched = pl.Series(touched[best["latent"].to_numpy()])  # [E] rows of latents to re-rank
        reranked = _best_per_latent(pl.concat([best.filter(in_touched), entering]), n_examples)
        best = pl.concat([best.filter(~in_touched), reranked])
        full = reranked.group_by("latent").agg(pl.len(), pl.col("activation").min()).filter(pl.col("len") == n_examples)
        threshold[full["latent"].to_numpy()] = full["activation"].to_numpy()
    ranked = _best_per_latent(best, n_examples)
    return ranked.select(
        "latent", "token", "layer", "activation", rank=pl.int_range(pl.len()).over("latent").cast(pl.Int32)
    )


def top_examples(
    latents: pl.LazyFrame, tokens: pl.DataFrame | pl.LazyFrame, n_examples: int, context_tokens: int
) -> pl.DataFrame:
    """For each latent its ``n_examples`` largest activations, with their token's context.

    latents: token, layer, latent, activation; tokens: token, sequence, position, token_id (one row
    per stored token, token = row index, in (sequence, position) order, e.g. scanned from parquet).
    Returns latent, token, layer, activation, rank (0 = largest), sequence, position, token_id and
    context_ids (token ids at positions position-c .. position+c of the same sequence that the
    cache stores; special positions are absent) and context_offset (the example's index in it).
    """
    top = top_activations(latents, n_examples)
    # Positions rise by at least one per stored token of a sequence, so every token of an example's
    # context lies within c rows of it: only those rows of the token table are read.
    offsets = np.arange(-context_tokens, context_tokens + 1)  # [2c + 1]
    wanted = np.unique(top["token"].to_numpy()[:, None] + offsets[None, :])  # [<= E * (2c + 1)]
    near = (
        tokens.lazy()
        .join(pl.LazyFrame({"token": wanted[wanted >= 0]}), on="token", how="semi")
        .sort("token")
        .collect(engine="streaming")
    )
    top = top.join(near, on="token", how="left", maintain_order="left")
    # Context: the tokens of the same sequence within +-c positions, found by searching the sorted
    # (sequence, position) keys of the rows read.
    seq_len = int(near["position"].max()) + 1 if near.height else 1  # type: ignore[arg-type]
    keys = near["sequence"].to_numpy() * seq_len + near["position"].to_numpy()  # [M] ascending
    token_ids = near["token_id"].to_numpy()
    position = top["position"].to_numpy()
    example_keys = top["sequence"].to_numpy() * seq_len + position  # [E]
    lo = np.searchsorted(keys, example_keys - np.minimum(context_tokens, position), side="left")
    hi = np.searchsorted(keys, example_keys + context_tokens, side="right")
    hi = np.minimum(hi, np.searchsorted(keys, (top["sequence"].to_numpy() + 1) * seq_len, side="left"))
    at = np.searchsorted(keys, example_keys, side="left")
    context = [token_ids[a:b].tolist() for a, b in zip(lo, hi)]
    return top.with_columns(
        context_ids=pl.Series(context, dtype=pl.List(pl.Int64)),
        context_offset=pl.Series((at - lo).astype(np.int32)),
    )

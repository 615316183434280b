"""Distributions of MLSAE latent activations over layers (paper 4.2 and appendix C; SPEC section 5).

Random variables: the layer L, the token T and the latent J. For a latent j active at token t
(h_j(x[t, l]) > 0 at some layer l), eq. 10 is

    P(L = l | T = t, J = j) = h_j(x[t, l]) / sum_l' h_j(x[t, l']).

P(T | J = j) is uniform over the tokens where j is active, and P(J) is uniform over the latents
active at least once. Hence P(L | J = j) is the mixture of eq. 10 over those tokens and P(L) the
mixture of P(L | J) over latents. The law of total variance (eq. 14, 15) links the variances:

    Var(L)        = E_J[Var(L | J)]       + Var_J(E[L | J])
    E_J[Var(L|J)] = E_{J,T}[Var(L | J,T)] + E_J[Var_T(E[L | T, J])]

Every term on both sides is computed by its own route (never one as the difference of the others),
so that the two identities are a real check on the arithmetic. Ratio 11 = E_J[Var(L|J)] / Var(L)
and ratio 12 = E_{J,T}[Var(L|J,T)] / E_J[Var(L|J)].

Input rows are sparse latents with columns `token` (global token index), `layer` (position in the
layer axis, 0..nL-1), `latent` and `activation`; rows with activation <= 0 are not active and are
ignored. The statistics are sums over tokens, so they are computed one batch of whole tokens at a
time: the rows stream from the LazyFrame (e.g. `pl.scan_parquet` over the chunk files of a cache) in
batches, polars groups each batch by (token, latent) and then by latent, and only per-latent sums
stay in memory. Memory is therefore flat in the number of tokens, provided the rows of each token
are contiguous and tokens come in ascending order, as a latent cache writes them. An unsorted
DataFrame is sorted up front; a LazyFrame found out of order is read again sorted by token, with a
warning, which costs memory in proportion to the rows.

Variances are computed in float64 and centred (sum p * (l - mean)^2 with the mean computed first)
rather than as E[L^2] - E[L]^2; the per-latent spread of the token means is merged across batches
with Chan's parallel formula, which is also centred.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import polars as pl

from mlsae_cache.errors import MlsaeError

Latents = Union[pl.DataFrame, pl.LazyFrame]

REQUIRED_COLUMNS = ("token", "layer", "latent", "activation")
LAYER_PROB_PREFIX = "p_layer_"
DEFAULT_BATCH_ROWS = 1_000_000
_PAIR = ("token", "latent")


def checked_latents(latents: Latents) -> pl.LazyFrame:
    """The active rows (activation > 0) with token, layer and latent as Int64 and activation as Float64."""
    if not isinstance(latents, (pl.DataFrame, pl.LazyFrame)):
        raise MlsaeError(
            f"latents must be a polars DataFrame or LazyFrame, not {type(latents).__name__}; "
            "load them with pl.read_parquet or pl.scan_parquet"
        )
    lazy = latents.lazy()
    schema = lazy.collect_schema()
    missing = [name for name in REQUIRED_COLUMNS if name not in schema]
    if missing:
        raise MlsaeError(
            f"latents lack the column(s) {', '.join(missing)}; "
            f"give sparse latents with columns {', '.join(REQUIRED_COLUMNS)}"
        )
    for name in ("token", "layer", "latent"):
        if not schema[name].is_integer():
            raise MlsaeError(f"latents column {name!r} has type {schema[name]}; it must hold integers")
    if not schema["activation"].is_numeric():
        raise MlsaeError(f"latents column 'activation' has type {schema['activation']}; it must hold numbers")
    return lazy.select(
        pl.col("token").cast(pl.Int64),
        pl.col("layer").cast(pl.Int64),
        pl.col("latent").cast(pl.Int64),
        pl.col("activation").cast(pl.Float64),
    ).filter(pl.col("activation") > 0)


def _with_layer_prob(rows: pl.LazyFrame, pair: str | Sequence[str]) -> pl.LazyFrame:
    """Add eq. 10 as column `prob`: each row's activation over its (token, latent) pair's total.

    pair: the column(s) identifying a (token, latent) pair.
    """
    activation = pl.col("activation")
    return rows.with_columns(prob=activation / activation.sum().over(pair))


def layer_distributions(latents: Latents) -> pl.LazyFrame:
    """Eq. 10 for every active (token, latent): columns token, latent, layer, prob (summing to 1 over layers)."""
    return _with_layer_prob(checked_latents(latents), _PAIR).select("token", "latent", "layer", "prob")


def write_layer_distributions(latents: Latents, path: str | Path, batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
    """Write ``layer_distributions(latents)`` to one parquet file, one batch of whole tokens at a time.

    polars runs the window over (token, latent) pairs in memory, so sinking layer_distributions()
    directly holds every row; latents in ascending token order (as mlsae-analyse stores them) are
    written batch by batch instead, with flat memory. Latents out of token order are sorted in memory.
    """
    import pyarrow.parquet as pq  # a dependency of polars' to_arrow and of datasets

    rows = checked_latents(latents)
    schema = layer_distributions(rows.head(0)).collect().to_arrow().schema
    try:
        with pq.ParquetWriter(str(path), schema) as writer:
            for batch in _token_ordered_batches(rows, batch_rows):
                writer.write_table(layer_distributions(batch).collect().to_arrow())
    except _NotTokenOrdered:
        layer_distributions(rows.sort("token", maintain_order=True)).sink_parquet(path)


# --------------------------------------------------------------------------------------------------
# Per-latent sums over tokens, accumulated one batch of whole tokens at a time.


def _batch_sums(rows: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-latent sums over the (complete) tokens of one batch.

    Returns (layer_mass, token_moments):
      layer_mass:    latent, layer, mass = sum_t P(L=layer | T=t, J=latent)
      token_moments: latent, n_tokens, mean_token_mean, m2_token_mean, sum_token_var, where
                     token_mean = E[L | T=t, J] and token_var = Var(L | T=t, J) for each token t,
                     and m2 is the centred sum of squares of the token means within this batch.
    """
    # One int64 key per (token, latent) pair, as grouping on one column is cheaper than on two:
    # rle_id numbers the batch's (sorted) tokens 0, 1, 2, ... and latent ids are below 2^32
    # (checked by the caller).
    keyed = rows.lazy().with_columns(
        pair=pl.col("token").rle_id().cast(pl.Int64) * (1 << 32) + pl.col("latent")
    )
    layer = pl.col("layer").cast(pl.Float64)
    prob = pl.col("prob")
    with_token_mean = _with_layer_prob(keyed, "pair").with_columns(token_mean=(prob * layer).sum().over("pair"))
    layer_mass = with_token_mean.group_by("latent", "layer").agg(mass=prob.sum())
    pairs = with_token_mean.group_by("pair").agg(
        pl.col("latent").first(),
        pl.col("token_mean").first(),
        token_var=(prob * (layer - pl.col("token_mean")) ** 2).sum(),
    )
    token_mean = pl.col("token_mean")
    token_moments = pairs.group_by("latent").agg(
        n_tokens=pl.len(),
        mean_token_mean=token_mean.mean(),
        m2_token_mean=((token_mean - token_mean.mean()) ** 2).sum(),
        sum_token_var=pl.col("token_var").sum(),
    )
    layer_mass, token_moments = pl.collect_all([layer_mass, token_moments], engine="streaming")
    return layer_mass, token_moments


class _LatentSums:
    """Per-latent sums over tokens, indexed by latent id; arrays grow as larger ids and layers appear."""

    def __init__(self) -> None:
        self.n_tokens = np.zeros(0, dtype=np.int64)  # [n_latents]
        self.mean_token_mean = np.zeros(0)  # [n_latents] E_T[E[L | T, J=j]] over the tokens seen
        self.m2_token_mean = np.zeros(0)  # [n_latents] sum_t (E[L|t,j] - mean_token_mean)^2
        self.sum_token_var = np.zeros(0)  # [n_latents] sum_t Var(L | t, j)
        self.layer_mass = np.zeros((0, 0))  # [n_latents, n_layers] sum_t P(L=l | t, j)
        self.n_distinct_tokens = 0

    def _grow(self, n_latents: int, n_layers: int) -> None:
        old_latents, old_layers = self.layer_mass.shape
        if n_latents <= old_latents and n_layers <= old_layers:
            return
        new_latents = max(n_latents, old_latents)
        new_layers = max(n_layers, old_layers)

        def padded(array: np.ndarray) -> np.ndarray:
            out = np.zeros(new_latents, dtype=array.dtype)
            out[: array.shape[0]] = array
            return out

        self.n_tokens = padded(self.n_tokens)
        self.mean_token_mean = padded(self.mean_token_mean)
        self.m2_token_mean = padded(self.m2_token_mean)
        self.sum_token_var = padded(self.sum_token_var)
        mass = np.zeros((new_latents, new_layers))
        mass[:old_latents, :old_layers] = self.layer_mass
        self.layer_mass = mass

    def add_batch(self, rows: pl.DataFrame) -> None:
        """Add the sums of a batch whose tokens appear in no other batch."""
        if rows.height == 0:
            return
        if rows["latent"].min() < 0 or rows["layer"].min() < 0:  # type: ignore[operator]
            raise MlsaeError("latents hold a negative latent or layer index; indices must be >= 0")
        if rows["latent"].max() >= 1 << 32:  # type: ignore[operator]
            raise MlsaeError("latents hold a latent index >= 2^32; latent indices must be below 2^32")
        layer_mass, moments = _batch_sums(rows)
        self._grow(int(layer_mass["latent"].max()) + 1, int(layer_mass["layer"].max()) + 1)  # type: ignore[arg-type]
        self.n_distinct_tokens += rows["token"].n_unique()

        # (latent, layer) pairs are unique within a batch, so plain fancy-index addition is exact.
        self.layer_mass[layer_mass["latent"].to_numpy(), layer_mass["layer"].to_numpy()] += layer_mass[
            "mass"
        ].to_numpy()

        latent = moments["latent"].to_numpy()
        n_batch = moments["n_tokens"].to_numpy().astype(np.int64)
        mean_batch = moments["mean_token_mean"].to_numpy()
        m2_batch = moments["m2_token_mean"].to_numpy()
        n_before = self.n_tokens[latent]
        mean_before = self.mean_token_mean[latent]
        n_after = n_before + n_batch
        # Chan et al.'s pairwise update of a mean and a centred sum of squares.
        delta = mean_batch - mean_before
        self.mean_token_mean[latent] = mean_before + delta * (n_batch / n_after)
        self.m2_token_mean[latent] += m2_batch + delta**2 * (n_before * n_batch / n_after)
        self.n_tokens[latent] = n_after
        self.sum_token_var[latent] += moments["sum_token_var"].to_numpy()


class _NotTokenOrdered(Exception):
    """The rows of the input are not in ascending token order."""


def _token_ordered_batches(rows: pl.LazyFrame, batch_rows: int) -> Iterator[pl.DataFrame]:
    """Yield DataFrames of whole tokens; raise _NotTokenOrdered when tokens are not ascending."""
    carry: pl.DataFrame | None = None
    for batch in rows.collect_batches(chunk_size=batch_rows, maintain_order=True):
        if batch.height == 0:
            continue
        if carry is not None:
            if batch["token"][0] < carry["token"][-1]:
                raise _NotTokenOrdered
            batch = pl.concat([carry, batch])
        tokens = batch["token"]
        if not tokens.is_sorted():
            raise _NotTokenOrdered
        # The last token may continue in the next batch: hold its rows back.
        cut = int(tokens.search_sorted(tokens[-1], side="left"))
        carry = batch[cut:]
        yield batch[:cut]
    if carry is not None:
        yield carry


@dataclass(frozen=True)
class LayerStatistics:
    """Per-latent distributions over layers, for the latents active at least once (ascending latent id)."""

    latent: np.ndarray  # [J] int64 latent ids
    n_tokens: np.ndarray  # [J] int64 tokens where the latent is active (at any layer)
    layer_prob: np.ndarray  # [J, nL] P(L = l | J = j), the mixture of eq. 10 over tokens
    mean_layer: np.ndarray  # [J] E[L | J = j], from layer_prob
    var_layer: np.ndarray  # [J] Var(L | J = j), from layer_prob, centred
    mean_token_var: np.ndarray  # [J] E_T[Var(L | T, J = j)]
    mean_token_mean: np.ndarray  # [J] E_T[E[L | T, J = j]] (equals mean_layer; computed separately)
    var_token_mean: np.ndarray  # [J] Var_T(E[L | T, J = j])
    n_distinct_tokens: int  # tokens with at least one active latent

    @property
    def n_layers(self) -> int:
        return int(self.layer_prob.shape[1])


def layer_statistics(
    latents: Latents, n_layers: int | None = None, batch_rows: int = DEFAULT_BATCH_ROWS
) -> LayerStatistics:
    """One streaming pass over the latents: the per-latent statistics behind eqs. 10-15.

    n_layers: the number of layers nL; by default one more than the largest layer index present.
    batch_rows: rows per streamed batch (memory is about a few hundred bytes per batch row).
    """
    rows = checked_latents(latents)
    if isinstance(latents, pl.DataFrame) and not latents["token"].is_sorted():
        rows = rows.sort("token", maintain_order=True)
    sums = _LatentSums()
    try:
        for batch in _token_ordered_batches(rows, batch_rows):
            sums.add_batch(batch)
    except _NotTokenOrdered:
        warnings.warn(
            "latent rows are not in ascending token order; sorting them by token first, "
            "which holds all rows in memory (write latents in token order to avoid this)",
            stacklevel=2,
        )
        sums = _LatentSums()
        for batch in _token_ordered_batches(rows.sort("token", maintain_order=True), batch_rows):
            sums.add_batch(batch)
    return _finish(sums, n_layers)


def distribution_moments(layer_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and centred variance of distributions over layers 0..nL-1: layer_prob [J, nL] -> ([J], [J])."""
    layers = np.arange(layer_prob.shape[1], dtype=np.float64)  # [nL]
    mean = layer_prob @ layers  # [J]
    var = np.einsum("jl,jl->j", layer_prob, (layers[None, :] - mean[:, None]) ** 2)  # [J]
    return mean, var


def resolve_n_layers(present_layers: int, n_layers: int | None) -> int:
    """The length of the layer axis: ``n_layers`` if given (checked to cover the data), else what the data holds."""
    if n_layers is None:
        return present_layers
    if present_layers > n_layers:
        raise MlsaeError(
            f"latents hold layer index {present_layers - 1} but n_layers is {n_layers}; "
            "pass the number of layers in the layer axis"
        )
    return n_layers


def _finish(sums: _LatentSums, n_layers: int | None) -> LayerStatistics:
    active = np.flatnonzero(sums.n_tokens > 0)
    if active.size == 0:
        raise MlsaeError("no latent is active (activation > 0) in the given latents; check the latents file")
    present_layers = sums.layer_mass.shape[1]
    n_layers = resolve_n_layers(present_layers, n_layers)
    mass = np.zeros((active.size, n_layers))  # [J, nL]
    mass[:, :present_layers] = sums.layer_mass[active]
    n_tokens = sums.n_tokens[active]
    layer_prob = mass / n_tokens[:, None]  # [J, nL]
    mean_layer, var_layer = distribution_moments(layer_prob)
    return LayerStatistics(
        latent=active.astype(np.int64),
        n_tokens=n_tokens,
        layer_prob=layer_prob,
        mean_layer=mean_layer,
        var_layer=var_layer,
        mean_token_var=sums.sum_token_var[active] / n_tokens,
        mean_token_mean=sums.mean_token_mean[active],
        var_token_mean=sums.m2_token_mean[active] / n_tokens,
        n_distinct_tokens=sums.n_distinct_tokens,
    )


def _statistics(latents: Latents | LayerStatistics, n_layers: int | None) -> LayerStatistics:
    if isinstance(latents, LayerStatistics):
        if n_layers is not None and n_layers != latents.n_layers:
            raise MlsaeError(
                f"n_layers={n_layers} disagrees with the precomputed statistics ({latents.n_layers} layers); "
                "omit n_layers"
            )
        return latents
    return layer_statistics(latents, n_layers)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def variance_ratios(latents: Latents | LayerStatistics, n_layers: int | None = None) -> dict[str, float | int]:
    """Eqs. 11 and 12 and every term of the laws of total variance (eqs. 14, 15).

    Keys:
      ratio_11 = mean_var_given_latent / total_var
      ratio_12 = mean_var_given_latent_token / mean_var_given_latent
      total_var                      Var(L), L from the mixture over latents of P(L | J)
      mean_var_given_latent          E_J[Var(L | J)]
      var_mean_given_latent          Var_J(E[L | J])
      mean_var_given_latent_token    E_{J,T}[Var(L | J, T)]
      mean_var_mean_given_latent_token  E_J[Var_T(E[L | T, J])]
      n_latents_active, n_tokens (tokens with an active latent), n_pairs (active (token, latent)
      pairs), n_layers.
    A ratio whose denominator is zero (all mass at one layer) is NaN.
    """
    stats = _statistics(latents, n_layers)
    layer_prob = stats.layer_prob.mean(axis=0, keepdims=True)  # [1, nL] P(L = l), P(J) uniform
    total_var = float(distribution_moments(layer_prob)[1][0])
    mean_var_given_latent = float(stats.var_layer.mean())
    var_mean_given_latent = float(((stats.mean_layer - stats.mean_layer.mean()) ** 2).mean())
    mean_var_given_latent_token = float(stats.mean_token_var.mean())
    mean_var_mean_given_latent_token = float(stats.var_token_mean.mean())
    return {
        "ratio_11": _ratio(mean_var_given_latent, total_var),
        "ratio_12": _ratio(mean_var_given_latent_token, mean_var_given_latent),
        "total_var": total_var,
        "mean_var_given_latent": mean_var_given_latent,
        "var_mean_given_latent": var_mean_given_latent,
        "mean_var_given_latent_token": mean_var_given_latent_token,
        "mean_var_mean_given_latent_token": mean_var_mean_given_latent_token,
        "n_latents_active": int(stats.latent.size),
        "n_tokens": int(stats.n_distinct_tokens),
        "n_pairs": int(stats.n_tokens.sum()),
        "n_layers": stats.n_layers,
    }


def layer_prob_columns(table: pl.DataFrame) -> list[str]:
    """The P(L = l | ...) columns of a layer table, in layer order."""
    columns = [name for name in table.columns if name.startswith(LAYER_PROB_PREFIX)]
    return sorted(columns, key=lambda name: int(name[len(LAYER_PROB_PREFIX) :]))


def wide_layer_table(latent: np.ndarray, layer_prob: np.ndarray, **columns: np.ndarray) -> pl.DataFrame:
    """A table with one row per latent: latent, E[L], Var(L), the extra columns, P(L = l) for every l.

    latent: [J]; layer_prob: [J, nL], rows summing to 1. Rows are sorted by E[L], ties by latent id.
    """
    mean_layer, var_layer = distribution_moments(layer_prob)
    table = pl.DataFrame(
        {
            "latent": latent.astype(np.int64),
            "mean_layer": mean_layer,
            "var_layer": var_layer,
            **columns,
            **{f"{LAYER_PROB_PREFIX}{l}": layer_prob[:, l] for l in range(layer_prob.shape[1])},
        }
    )
    return table.sort("mean_layer", "latent")


def latent_layer_table(latents: Latents | LayerStatistics, n_layers: int | None = None) -> pl.DataFrame:
    """The aggregate heatmap data (fig. 2): one row per active latent, sorted by E[L | J = j].

    Columns: latent, mean_layer = E[L | J=j], var_layer = Var(L | J=j), n_tokens,
    mean_token_var = E_T[Var(L | T, J=j)], then p_layer_0 .. p_layer_{nL-1} = P(L = l | J = j).
    """
    stats = _statistics(latents, n_layers)
    return wide_layer_table(
        stats.latent,
        stats.layer_prob,
        n_tokens=stats.n_tokens,
        mean_token_var=stats.mean_token_var,
    )

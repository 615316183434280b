"""Cross-dictionary matching (SPEC section 9, last bullet; issue 13 item 4): which layer's dictionary of
another family each MLSAE latent resembles most, and whether that agrees with where the latent is active.

For an MLSAE latent j (decoder row W_dec[j], [d]) and another run with one [m, d] dictionary per layer,

    sim[j, l] = max_i cos(W_dec[j], D_l[i])          (a latents x layers matrix [n, L])

where D_l is layer l's SAE decoder of a per-layer run (W_dec [L, m, d]), or the crosscoder's blocks
W_dec[:, l, :] of a crosscoder run (W_dec [m, L, d]), each block normalised to unit norm (a zero block has
no direction: its cosine is 0, never NaN). The best layer b_j = argmax_l sim[j, l] (ties: the first) is
compared with E[L | J=j] (section 5) by Pearson's and Spearman's correlation over the latents active on
the test set (the others have no E[L | J]).

The functions here work on tensors and arrays, whatever family class holds them (:func:`match_runs`
loads two runs and the MLSAE's analysis and calls them). Each layer's decoder is compared with the
MLSAE's rows in chunks by ``mmcs.max_cosine_to`` (the kernel MMCS uses), on the device of the MLSAE
decoder: memory beyond the inputs and the [n, L] result is one unit-norm layer [m, d], one chunk of
MLSAE rows [chunk_size, d] and one [chunk_size, m] block, whatever n (131,072 latents x 24 layers x
m = 131,072, d = 1,024 in float32 with the default chunk: 0.5 + 0.5 GiB).

Written by :func:`write_matching` into a folder (an analysis's or a comparison's), under a stem
(:data:`STEMS`: ``match_per_layer`` or ``match_crosscoder``):

    STEM.parquet    latent, expected_layer (E[L | J]; null: not active on the test set), best_layer (the
                    model's block number, layers[b_j]), best_similarity, sim_layer_<block> per layer
    STEM.json       the correlations and the counts behind them (see :class:`LayerCorrelation`)
    STEM.png, .pdf  the heatmap: active latents ordered by E[L | J] against layers, colour = sim

E[L | J] is measured on the position in the run's layer axis (0..L-1, as layer_distributions.py gives
it), so the correlations use b_j's position on that axis too: Spearman's does not depend on how blocks
are numbered, and Pearson's neither when the layers are evenly spaced.

The other run may cover only SOME of the MLSAE's layers (per-layer SAEs trained elsewhere, e.g. published
SAEs of layers 1, 3 and 5 only: mlsae_train/imported.py). The matrix keeps the MLSAE's L columns, and a
layer without an SAE is a column of NaN (null in the table, blank in the heatmap, listed as
``layers_without_sae`` in the JSON): b_j is the argmax over the layers the other run has, and the
correlations still use its position on the MLSAE's axis, so that they mean what they mean in the full
case. A layer of the other run that the MLSAE lacks is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from mlsae_cache.atomic import atomic_write_json
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files, verified
from mlsae_train import load_sae

from . import layout, plots
from .files import write_parquet
from .mmcs import max_cosine_to

STEMS = {"per-layer": layout.MATCH_PER_LAYER, "crosscoder": layout.MATCH_CROSSCODER}
"""The file stem of a matching against each family (its ``arch``)."""
SIM_PREFIX = "sim_layer_"
DEFAULT_CHUNK = 1024
"""MLSAE rows per block: a [1024, 131,072] float32 block is 0.5 GiB."""


# ----------------------------------------------------------------------------------------------
# the similarity matrix


def _check_mlsae(mlsae_W_dec: torch.Tensor) -> None:
    if mlsae_W_dec.ndim != 2:
        raise MlsaeError(f"the MLSAE decoder must be [n_latents, d], got shape {tuple(mlsae_W_dec.shape)}")


@torch.no_grad()
def match_per_layer(mlsae_W_dec: torch.Tensor, per_layer_W_dec: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """sim [n, L]: the max cosine similarity of each MLSAE decoder row [n, d] with the rows of each layer's
    SAE, per_layer_W_dec [L, m, d]. Runs on the MLSAE decoder's device, one layer at a time (the per-layer
    decoders may stay on the CPU)."""
    _check_mlsae(mlsae_W_dec)
    if per_layer_W_dec.ndim != 3 or per_layer_W_dec.shape[2] != mlsae_W_dec.shape[1]:
        raise MlsaeError(
            f"the per-layer decoders must be [n_layers, n_latents, d] with d = {mlsae_W_dec.shape[1]} as the MLSAE's; "
            f"got shape {tuple(per_layer_W_dec.shape)}"
        )
    return _match_layers(mlsae_W_dec, per_layer_W_dec, chunk_size)


@torch.no_grad()
def match_crosscoder(mlsae_W_dec: torch.Tensor, crosscoder_W_dec: torch.Tensor, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """sim [n, L]: the max cosine similarity of each MLSAE decoder row [n, d] with the crosscoder's blocks
    W_dec[i, l] of each layer l, crosscoder_W_dec [m, L, d], each block normalised to unit norm."""
    _check_mlsae(mlsae_W_dec)
    if crosscoder_W_dec.ndim != 3 or crosscoder_W_dec.shape[2] != mlsae_W_dec.shape[1]:
        raise MlsaeError(
            f"the crosscoder decoder must be [n_latents, n_layers, d] with d = {mlsae_W_dec.shape[1]} as the MLSAE's; "
            f"got shape {tuple(crosscoder_W_dec.shape)}"
        )
    return _match_layers(mlsae_W_dec, crosscoder_W_dec.transpose(0, 1), chunk_size)  # a view [L, m, d]


def _match_layers(mlsae_W_dec: torch.Tensor, layer_rows: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """layer_rows [L, m, d] (any strides) -> sim [n, L], column l from max_cosine_to(rows, layer_rows[l])."""
    n_layers, m = layer_rows.shape[0], layer_rows.shape[1]
    if n_layers == 0 or m == 0:
        raise MlsaeError(f"the other dictionary has {n_layers} layer(s) of {m} latent(s); matching needs at least one of each")
    dtype = torch.promote_types(torch.promote_types(mlsae_W_dec.dtype, layer_rows.dtype), torch.float32)
    sim = torch.empty((mlsae_W_dec.shape[0], n_layers), dtype=dtype, device=mlsae_W_dec.device)  # [n, L]
    for layer in range(n_layers):
        max_cosine_to(mlsae_W_dec, layer_rows[layer], chunk_size, out=sim[:, layer])
    return sim


def on_layer_axis(similarity: torch.Tensor, other_layers: Sequence[int], layers: Sequence[int]) -> torch.Tensor:
    """similarity [n, L_other] of a run on other_layers (block numbers), spread over the MLSAE's layers
    [n, L]: column i goes to other_layer[i]'s position in ``layers``; the layers the other run lacks are
    columns of NaN. other_layers must be a subset of layers (one line naming the rest otherwise)."""
    other_layers, layers = [int(layer) for layer in other_layers], [int(layer) for layer in layers]
    if similarity.ndim != 2 or similarity.shape[1] != len(other_layers):
        raise MlsaeError(f"the similarity matrix {tuple(similarity.shape)} must be [n_latents, {len(other_layers)}]: "
                         f"one column per layer of {other_layers}")  # fmt: skip
    foreign = [layer for layer in other_layers if layer not in layers]
    if foreign or not other_layers or len(set(other_layers)) != len(other_layers):
        what = f"layer(s) {foreign}, which the MLSAE lacks" if foreign else f"layers {other_layers}"
        raise MlsaeError(f"the other run covers {what}; the MLSAE covers {layers}, and matching needs the other run "
                         "on some of the MLSAE's layers (each once) and no other")  # fmt: skip
    if other_layers == layers:
        return similarity
    spread = torch.full((similarity.shape[0], len(layers)), float("nan"), dtype=similarity.dtype, device=similarity.device)
    spread[:, [layers.index(layer) for layer in other_layers]] = similarity  # [n, L]
    return spread


# ----------------------------------------------------------------------------------------------
# the summary: best layer and its correlation with E[L | J]


@dataclass(frozen=True)
class LayerCorrelation:
    """Pearson's and Spearman's correlation of E[L | J=j] with the best layer b_j over the usable latents.

    ``pearson`` and ``spearman`` are None (null in JSON) when undefined, with ``reason`` saying why:
    fewer than 2 latents active on the test set, or every one of them with the same best layer (or the
    same E[L | J]), which leaves a variance of 0 in the denominator.
    """

    n_latents: int  # latents in the dictionary
    n_active: int  # latents with an E[L | J] (active on the test set): those the correlations are over
    pearson: float | None
    spearman: float | None
    reason: str | None  # why the correlations are None; None when they are defined


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of values [n], ties sharing the mean of the ranks they span (Spearman's convention)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # runs of equal values: [start, stop) in sorted order, each gets the mean rank (start + 1 + stop) / 2
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])  # [runs]
    stops = np.r_[starts[1:], values.size]  # [runs]
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + 1 + stops) / 2.0, stops - starts)
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's correlation of x and y [n] in float64, centred; NaN when either has variance 0."""
    dx = x.astype(np.float64) - x.mean(dtype=np.float64)
    dy = y.astype(np.float64) - y.mean(dtype=np.float64)
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def layer_correlation(expected_layer: np.ndarray, best_index: np.ndarray) -> LayerCorrelation:
    """Correlations of expected_layer [n] (E[L | J]; NaN: not active, left out) with best_index [n]."""
    expected_layer = np.asarray(expected_layer, dtype=np.float64)
    best_index = np.asarray(best_index)
    if expected_layer.shape != best_index.shape or expected_layer.ndim != 1:
        raise MlsaeError(f"expected layers {expected_layer.shape} and best layers {best_index.shape} must be [n_latents] each")
    active = np.isfinite(expected_layer)  # [n]
    x, y = expected_layer[active], best_index[active].astype(np.float64)
    n_latents, n_active = int(expected_layer.size), int(active.sum())
    reason = None
    if n_active < 2:
        reason = f"{n_active} latent(s) active on the test set; a correlation needs at least 2"
    elif np.all(y == y[0]):
        reason = f"all {n_active} active latents have the same best layer (position {int(y[0])}); the correlation is undefined"
    elif np.all(x == x[0]):
        reason = f"all {n_active} active latents have the same E[L | J] ({x[0]:g}); the correlation is undefined"
    if reason is not None:
        return LayerCorrelation(n_latents, n_active, None, None, reason)
    return LayerCorrelation(n_latents, n_active, pearson(x, y), pearson(average_ranks(x), average_ranks(y)), None)


@dataclass(frozen=True)
class LayerMatch:
    """The matching of one MLSAE against one other dictionary, per latent and summarised."""

    against: str  # the other family: "per-layer" or "crosscoder"
    layers: tuple[int, ...]  # [L] the model's block number of each layer column
    similarity: np.ndarray  # [n, L] sim[j, l]; a column of NaN: a layer the other run has no SAE for
    expected_layer: np.ndarray  # [n] E[L | J=j] on the layer axis 0..L-1; NaN: not active on the test set
    best_index: np.ndarray  # [n] int64 b_j, the position of the best layer on the layer axis
    best_similarity: np.ndarray  # [n] sim[j, b_j]
    correlation: LayerCorrelation

    @property
    def best_layer(self) -> np.ndarray:
        """[n] int64 the model's block number of each latent's best layer, layers[b_j]."""
        return np.asarray(self.layers, dtype=np.int64)[self.best_index]

    @property
    def missing(self) -> np.ndarray:
        """[L] bool: the layer columns the other run has no dictionary for (all NaN)."""
        return _missing_columns(self.similarity)

    @property
    def layers_without_sae(self) -> list[int]:
        """The block numbers of the MLSAE's layers that the other run lacks ([] when it covers them all)."""
        return [layer for layer, missing in zip(self.layers, self.missing) if missing]


def _missing_columns(similarity: np.ndarray) -> np.ndarray:
    """[L] bool: the columns of similarity [n, L] that are NaN through and through (none when n = 0)."""
    if similarity.shape[0] == 0:
        return np.zeros(similarity.shape[1], dtype=bool)
    return np.isnan(similarity).all(axis=0)


def summarise_match(
    similarity: torch.Tensor | np.ndarray, layers: Sequence[int], expected_layer: np.ndarray, against: str
) -> LayerMatch:
    """Best layers and their correlation with E[L | J] from sim [n, L].

    layers: the model's block number of each column (the MLSAE's layers, e.g. ``sae.layers``).
    expected_layer: [n] E[L | J=j] per latent on the layer axis 0..L-1, NaN for latents not active on
    the test set (:func:`expected_layer_per_latent` builds it from latent_layers.parquet).
    A column entirely NaN is a layer the other run has no SAE for (:func:`on_layer_axis`): it is never
    the best; any other NaN is refused.
    """
    if torch.is_tensor(similarity):
        similarity = similarity.detach().cpu().numpy()
    similarity = np.asarray(similarity)
    layers = tuple(int(layer) for layer in layers)
    expected_layer = np.asarray(expected_layer, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[1] != len(layers) or len(layers) == 0:
        raise MlsaeError(
            f"the similarity matrix {similarity.shape} must be [n_latents, {len(layers)}]: one column per layer of {list(layers)}"
        )
    if expected_layer.shape != (similarity.shape[0],):
        raise MlsaeError(
            f"E[L | J] has shape {expected_layer.shape} but there are {similarity.shape[0]} latents; "
            "pass one value per latent (NaN: inactive)"
        )
    missing = _missing_columns(similarity)  # [L] layers without an SAE
    if np.isnan(similarity[:, ~missing]).any():
        raise MlsaeError("the similarity matrix holds NaN outside whole columns of layers without an SAE; "
                         "compute it with match_per_layer or match_crosscoder")  # fmt: skip
    if missing.all():
        raise MlsaeError(f"the similarity matrix has no SAE at any of the layers {list(layers)} (every column is NaN); "
                         "match a run that covers at least one of the MLSAE's layers")  # fmt: skip
    scored = np.where(missing, -np.inf, similarity) if missing.any() else similarity  # [n, L] a missing layer never wins
    best_index = scored.argmax(axis=1).astype(np.int64)  # [n], ties: the first layer
    best_similarity = np.take_along_axis(similarity, best_index[:, None], axis=1)[:, 0]  # [n]
    correlation = layer_correlation(expected_layer, best_index)
    return LayerMatch(against, layers, similarity, expected_layer, best_index, best_similarity, correlation)


def expected_layer_per_latent(latent_table: pl.DataFrame, n_latents: int) -> np.ndarray:
    """[n_latents] E[L | J] from a latent layer table (latent_layers.parquet: latent, mean_layer), NaN for
    the latents it does not list (not active on the test set)."""
    missing = [name for name in ("latent", "mean_layer") if name not in latent_table.columns]
    if missing:
        raise MlsaeError(f"the latent layer table lacks {', '.join(missing)}; pass latent_layers.parquet of the MLSAE's analysis")
    latent = latent_table["latent"].to_numpy()
    if latent.size and (latent.min() < 0 or latent.max() >= n_latents):
        raise MlsaeError(f"the latent layer table names latents {latent.min()}..{latent.max()}, outside 0..{n_latents - 1}; "
                         "pass the analysis of this MLSAE")  # fmt: skip
    expected = np.full(n_latents, np.nan)  # [n]
    expected[latent] = latent_table["mean_layer"].to_numpy()
    return expected


# ----------------------------------------------------------------------------------------------
# writing


def matching_table(match: LayerMatch) -> pl.DataFrame:
    """One row per latent, in latent order: latent, expected_layer (null: not active), best_layer (block
    number), best_similarity, then sim_layer_<block> for every layer of the MLSAE (null throughout for a
    layer the other run has no SAE for)."""
    n = match.similarity.shape[0]
    missing = match.missing  # [L]
    return pl.DataFrame(
        {
            "latent": np.arange(n, dtype=np.int64),
            "expected_layer": pl.Series(match.expected_layer, dtype=pl.Float64).fill_nan(None),
            "best_layer": match.best_layer,
            "best_similarity": match.best_similarity,
            **{f"{SIM_PREFIX}{layer}": pl.Series(match.similarity[:, i]).fill_nan(None) if missing[i] else match.similarity[:, i]
               for i, layer in enumerate(match.layers)},  # fmt: skip
        }
    )


def read_matching_table(path: str | Path) -> LayerMatch:
    """A LayerMatch from a matching table written by :func:`write_matching` (``against`` from its JSON
    beside it when present; a sim column null throughout: a layer without an SAE, back to NaN)."""
    fix = "write the matching again"
    if not Path(path).is_file():
        raise MlsaeError(f"there is no matching table at {path}; write it with write_matching")
    table = pl.read_parquet(verified(path, fix))
    columns = [name for name in table.columns if name.startswith(SIM_PREFIX)]
    layers = [int(name[len(SIM_PREFIX) :]) for name in columns]
    summary_path = Path(path).with_suffix(".json")
    against = "unknown"
    if summary_path.exists():
        against = json.loads(verified(summary_path, fix).read_text()).get("against", against)
    table = table.sort("latent")
    return summarise_match(table.select(columns).to_numpy(), layers, table["expected_layer"].to_numpy(), against)


def correlation_summary(match: LayerMatch) -> dict:
    """The JSON beside the table: the correlations, what they are over, and how many latents each layer wins
    (0 for the ``layers_without_sae``, the MLSAE's layers the other run has no SAE for)."""
    active = np.isfinite(match.expected_layer)
    won = np.bincount(match.best_index[active], minlength=len(match.layers))  # [L]
    return {
        "against": match.against,
        "layers": list(match.layers),
        **asdict(match.correlation),
        "correlated": "E[L | J] with the best layer's position on the layer axis, over latents active on the test set",
        "best_similarity_mean": float(match.best_similarity[active].mean()) if active.any() else None,
        "best_layer_counts": {str(layer): int(count) for layer, count in zip(match.layers, won)},
        "layers_without_sae": match.layers_without_sae,
    }


def write_matching(match: LayerMatch, folder: str | Path, stem: str | None = None, title: str | None = None) -> list[Path]:
    """Write STEM.parquet, STEM.json and the heatmap STEM.png / STEM.pdf into ``folder`` (each atomically),
    then record their checksums in the folder's checksums.json; returns the paths written.
    ``stem``: by default the family's, :data:`STEMS`."""
    folder = Path(folder)
    if stem is None:
        if match.against not in STEMS:
            raise MlsaeError(f"no file stem for a matching against {match.against!r}; pass stem")
        stem = STEMS[match.against]
    table_path = write_parquet(matching_table(match), folder / f"{stem}.parquet")
    summary_path = atomic_write_json(folder / f"{stem}.json", correlation_summary(match))
    figures = plots.plot_matching_heatmap(
        match.similarity, match.expected_layer, match.layers, folder / stem,
        title=title or _default_title(match), best_index=match.best_index,
    )  # fmt: skip
    written = [table_path, summary_path, *figures]
    record_files(folder, [path.name for path in written])
    return written


def _default_title(match: LayerMatch) -> str:
    c = match.correlation
    if c.reason is None:
        stats = f"Pearson {c.pearson:.3f}, Spearman {c.spearman:.3f} over {c.n_active:,} active latents"
    else:
        stats = f"correlation undefined: {c.reason}"
    heading = f"MLSAE decoder rows against the {match.against} decoders: max cosine similarity per layer"
    lacking = match.layers_without_sae
    if lacking:
        named = f"layer{'s' if len(lacking) > 1 else ''} {', '.join(map(str, lacking))}"
        heading += f"\n(no SAE at {named}: left blank; best layer among the others)"
    return f"{heading}\nE[L | J] vs best layer: {stats}"


# ----------------------------------------------------------------------------------------------
# from runs


def match_runs(
    mlsae_run: str | Path,
    other_run: str | Path,
    mlsae_analysis: str | Path,
    chunk_size: int = DEFAULT_CHUNK,
    device: str | torch.device = "cpu",
) -> LayerMatch:
    """The matching of an MLSAE run against a per-layer or crosscoder run on the same layers or on some of
    them (per-layer SAEs trained elsewhere may cover fewer: the missing layers are NaN columns, see the
    module docstring); a layer the MLSAE lacks is refused in one line.

    Runs are run directories or .safetensors files (``mlsae_train.load_sae``); E[L | J] comes from the
    MLSAE's analysis folder (its latent_layers.parquet, checked against its checksums). The MLSAE's layer
    axis is the run's layers, or, for an imported MLSAE that records none, its analysis's (summary.json).
    The similarity is computed on ``device``; the other run's decoders stay on the CPU and go there one
    layer at a time. Write the result with :func:`write_matching`.
    """
    mlsae = load_sae(mlsae_run, device=device)
    other = load_sae(other_run)
    if mlsae.arch != "mlsae":
        raise MlsaeError(f"{mlsae_run} holds a {mlsae.arch} dictionary; the first run must be an MLSAE")
    matchers = {"per-layer": match_per_layer, "crosscoder": match_crosscoder}
    if other.arch not in matchers:
        raise MlsaeError(f"{other_run} holds a {other.arch} dictionary; match against a {' or a '.join(matchers)} run")
    layers = _mlsae_layers(mlsae, mlsae_analysis, other.layers)  # the MLSAE's layer axis, E[L | J]'s
    lacking = sorted(set(int(layer) for layer in other.layers) - set(layers))
    if lacking or not other.layers:
        raise MlsaeError(
            f"the MLSAE was trained on layers {layers} but {other_run} on {list(other.layers)}, layer(s) {lacking} of "
            "which the MLSAE lacks; match runs trained on the same layers of the same cache, or SAEs of some of the MLSAE's layers"
        )  # fmt: skip
    if not (Path(mlsae_analysis) / layout.LATENT_LAYERS).is_file():
        raise MlsaeError(f"{mlsae_analysis} holds no {layout.LATENT_LAYERS}; pass the folder mlsae-analyse wrote for {mlsae_run}")
    expected = expected_layer_per_latent(layout.read_table(mlsae_analysis, layout.LATENT_LAYERS), mlsae.n_latents)
    similarity = matchers[other.arch](mlsae.W_dec, other.W_dec, chunk_size)  # [n, L_other]
    return summarise_match(on_layer_axis(similarity, other.layers, layers), layers, expected, other.arch)  # [n, L]


def _mlsae_layers(mlsae, mlsae_analysis: str | Path, other_layers: Sequence[int]) -> list[int]:
    """The MLSAE's layer axis: its run's layers; for one that records none (an imported MLSAE), its
    analysis's (summary.json); with neither, the other run's (nothing says they differ)."""
    if mlsae.layers:
        return [int(layer) for layer in mlsae.layers]
    if (Path(mlsae_analysis) / layout.SUMMARY).is_file():
        analysed = layout.read_summary(mlsae_analysis).get("layers")
        if analysed:
            return [int(layer) for layer in analysed]
    return [int(layer) for layer in other_layers]

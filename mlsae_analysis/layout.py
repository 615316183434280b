"""The layout of the analysis stage's folders: the one module that names their files and reads and
writes ``summary.json`` (as ``mlsae_cache/shard_format.py`` owns the cache's layout).

An analysis (``mlsae-analyse --out ANALYSIS``) is a folder::

    ANALYSIS/
      latents/part-NNNNN.parquet   the sparse latents: token, layer, latent, activation (encode.py; per family: families.py)
      latents/tokens.parquet       token, sequence, position, token_id of every analysed token
      metrics.csv                  per layer and mean: FVU, MSE, L0, L1, dead fractions, delta CE, KL, outliers (Table 1)
      splice_all_layers.csv        crosscoder only: delta CE and KL with every layer spliced at once (downstream.py)
      neighbours.parquet           each latent's nearest decoder rows (neighbours.py)
      mmcs.csv                     mean max cosine similarity of decoder rows (Table 2)
      residual.csv                 adjacent-layer cosine similarity and mean norm of the residual stream (figs 1, 4)
      layer_distributions.parquet  eq. 10 per (token, latent) (MLSAE only)
      latent_layers.parquet        per latent: E[L | J], Var(L | J), n_tokens, p_layer_*: P(L | J) (MLSAE, fig 2), its one
                                   layer (per-layer suite), s_j(l) and w_layer_* (crosscoder; family_layers.py)
      variance_ratios.csv          ratios 11 and 12 (MLSAE only)
      single_prompt.csv            the single prompt's latents (fig 3; MLSAE only, not with --no-downstream)
      examples.parquet             each latent's top activating (token, layer) pairs with their context
      token_texts.parquet          token_id, text: every token of examples.parquet's contexts, as the page shows it
      STEM.png, STEM.pdf           the figures (stems below)
      summary.json                 configuration, mean metrics, MMCS, ratios, warnings: written after the files above
      checksums.json               size and digest of every file (mlsae_cache/integrity.py), written after them
      report.html                  the page (html_report.py), made from these files only, then added to checksums.json

A cross-run report (``mlsae-analyse report ... --out REPORT``, report.py) holds the ``REPORT_*`` tables
and figures below, its own ``checksums.json`` and ``report.html``.

Readers go through :func:`read_summary` and :func:`read_table`, which check each file against
``checksums.json`` first: a damaged file is one line naming it and the fix (:data:`FIX`).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from mlsae_cache.atomic import atomic_write_text
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files, verified, verify_files

FIX = "analyse the run again with mlsae-analyse (or restore the file)"
"""What to do about a damaged file of an analysis (or report) folder."""

# ----------------------------------------------------------------------------- an analysis folder

# Names are relative to the folder (as checksums.json lists them): ``folder / TOKENS`` is the token table.
SUMMARY = "summary.json"
LATENTS_DIR = "latents"
TOKENS = f"{LATENTS_DIR}/tokens.parquet"
LATENT_PART_GLOB = "part-*.parquet"
"""The parts of the sparse latents, inside LATENTS_DIR (:func:`latent_part`)."""
METRICS = "metrics.csv"
SPLICE_ALL_LAYERS = "splice_all_layers.csv"
NEIGHBOURS = "neighbours.parquet"
MMCS = "mmcs.csv"
RESIDUAL = "residual.csv"
LAYER_DISTRIBUTIONS = "layer_distributions.parquet"
LATENT_LAYERS = "latent_layers.parquet"
VARIANCE_RATIOS = "variance_ratios.csv"
SINGLE_PROMPT = "single_prompt.csv"
EXAMPLES = "examples.parquet"
TOKEN_TEXTS = "token_texts.parquet"
PAGE = "report.html"

# figures: stems, each written as STEM.png and STEM.pdf (plots.save_figure)
METRICS_FIGURE = "metrics"
RESIDUAL_COS_NEXT_FIGURE = "residual_cos_next"
RESIDUAL_NORM_FIGURE = "residual_norm"
HEATMAP_FIGURE = "heatmap"
WEIGHTED_HEATMAP_FIGURE = "heatmap_activation_weighted"
"""The crosscoder's activation-weighted share per layer (HEATMAP_FIGURE is its decoder-norm share)."""
VARIANCE_RATIOS_FIGURE = "variance_ratios"
SINGLE_PROMPT_FIGURE = "single_prompt"

# ----------------------------------------------------------------------------- a cross-run report folder

REPORT_RUNS = "tables.csv"
REPORT_TABLE1 = "table1.csv"
REPORT_TABLE2 = "table2.csv"
REPORT_VARIANCE_RATIOS = VARIANCE_RATIOS
REPORT_PER_LAYER = "per_layer.csv"
REPORT_VARIANCE_RATIOS_FIGURE = VARIANCE_RATIOS_FIGURE
REPORT_HEATMAPS_FIGURE = "heatmaps"
REPORT_PER_LAYER_FIGURE = "per_layer"

# ----------------------------------------------------------------------------- a comparison folder (mlsae-analyse compare)

COMPARISON = "comparison.csv"
COMPARISON_MARKDOWN = "comparison.md"
COMPARISON_FIGURE = "comparison"
MATCH_PER_LAYER = "match_per_layer"
MATCH_CROSSCODER = "match_crosscoder"
"""Stems of the cross-dictionary matchings (matching.py): STEM.parquet, STEM.json, STEM.png and STEM.pdf."""


def latent_part(index: int) -> str:
    """The ``index``-th part of the sparse latents; parts are numbered in token order."""
    return f"{LATENTS_DIR}/part-{index:05d}.parquet"


def variance_ratios_vs_figure(swept: str) -> str:
    """The report's figure of the variance ratios against ``swept`` (expansion_factor or k)."""
    return f"variance_ratios_vs_{swept}"


def mmcs_vs_figure(swept: str) -> str:
    """The report's figure of MMCS against ``swept`` (expansion_factor or k)."""
    return f"mmcs_vs_{swept}"


# ----------------------------------------------------------------------------- reading and writing


def read_summary(directory: str | Path) -> dict:
    """An analysis's summary.json, checked against its checksums.json; one line when absent, damaged or not JSON."""
    summary_file = Path(directory) / SUMMARY
    if not summary_file.exists():
        raise MlsaeError(f"{directory} holds no {SUMMARY}; give a directory written by mlsae-analyse")
    try:
        return json.loads(verified(summary_file, FIX).read_text())
    except ValueError:
        raise MlsaeError(f"{summary_file} is not valid JSON; {FIX}") from None


def write_summary(directory: str | Path, summary: dict) -> Path:
    """Write summary.json atomically (numbers numpy gives are written as floats).

    In a folder that already has a checksum record, the record follows (an edited summary is not a
    damaged one); an analysis being written records every file at its end instead.
    """
    path = atomic_write_text(Path(directory) / SUMMARY, json.dumps(summary, indent=1, default=float) + "\n")
    record_files(directory, [SUMMARY], create=False)
    return path


def verified_file(directory: str | Path, name: str) -> Path:
    """``directory / name`` (a name above, e.g. TOKENS) after checking it against the folder's checksums.json."""
    verify_files(directory, [name], FIX)
    return Path(directory) / name


def read_table(directory: str | Path, name: str, **read_options) -> pl.DataFrame:
    """A CSV or parquet table of an analysis or report folder, checked against its checksums.json first."""
    path = verified_file(directory, name)
    if path.suffix == ".csv":
        return pl.read_csv(path, **read_options)
    return pl.read_parquet(path, **read_options)

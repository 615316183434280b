"""Figures of the paper's kind, written as PNG and PDF beside a path stem.

- plot_layer_heatmap / plot_layer_heatmaps: distributions over layers per latent (figs. 2, 3, 7, 8),
  latents on x sorted by expected layer, layers on y (layer 0 at the top, as in the paper).
- plot_variance_ratios: eqs. 11 and 12 across runs (figs. 5, 6).
- plot_per_layer_curves: metrics against layer, one line per run (figs. 1, 4, 9-11).

Figures are built with matplotlib's object API (no pyplot, so no global backend or figure state)
and rendered by Agg. Each file is written under a temporary name and moved into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from mlsae_cache.atomic import atomic_write
from mlsae_cache.errors import MlsaeError

from .layer_distributions import layer_prob_columns

FORMATS = ("png", "pdf")
PNG_DPI = 200
# A heatmap has more latents (up to ~10^5) than the figure has pixel columns. Consecutive latents in
# sort order are averaged into at most this many columns, and those are drawn without interpolation:
# letting the renderer smooth instead would also blur across the (few, discrete) layer rows.
MAX_HEATMAP_COLUMNS = 1200


def save_figure(figure: Figure, path_stem: str | os.PathLike[str]) -> list[Path]:
    """Write `figure` as <stem>.png and <stem>.pdf atomically; return the two paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in FORMATS:
        final = stem.with_name(f"{stem.name}.{fmt}")
        atomic_write(final, lambda tmp: figure.savefig(tmp, format=fmt, dpi=PNG_DPI))
        written.append(final)
    return written


def heatmap_matrix(table: pl.DataFrame) -> np.ndarray:
    """The heatmap image [nL, J]: column i is the i-th latent in ascending E[L] (ties by latent id)."""
    columns = layer_prob_columns(table)
    if not columns:
        raise MlsaeError("the table has no p_layer_* columns; build it with latent_layer_table or single_prompt_layer_table")
    ordered = table.sort("mean_layer", "latent")
    return ordered.select(columns).to_numpy().T  # [nL, J]


def binned_columns(image: np.ndarray, max_columns: int) -> np.ndarray:
    """Average consecutive columns of image [nL, J] into min(J, max_columns) columns of near-equal width."""
    n_latents = image.shape[1]
    if n_latents <= max_columns:
        return image
    edges = np.linspace(0, n_latents, max_columns + 1).round().astype(np.int64)  # [max_columns + 1]
    sums = np.add.reduceat(image, edges[:-1], axis=1)  # [nL, max_columns]
    return sums / np.diff(edges)[None, :]


def _draw_heatmap(axes: Axes, table: pl.DataFrame, title: str | None) -> object:
    image = heatmap_matrix(table)  # [nL, J]
    n_layers, n_latents = image.shape
    drawn = axes.imshow(
        binned_columns(image, MAX_HEATMAP_COLUMNS),
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        vmin=0.0,
        vmax=1.0,
        extent=(-0.5, n_latents - 0.5, n_layers - 0.5, -0.5),
    )
    axes.set_ylabel("Layer")
    if n_layers <= 8:
        axes.set_yticks(range(n_layers))
    else:
        axes.yaxis.set_major_locator(MaxNLocator(nbins=7, integer=True))
    axes.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    if title:
        axes.set_title(title, fontsize=10, loc="left")
    return drawn


def plot_layer_heatmaps(
    tables: Mapping[str, pl.DataFrame],
    path_stem: str | os.PathLike[str],
    title: str | None = None,
    value_label: str = "P(L = layer | J = latent)",
) -> list[Path]:
    """One heatmap panel per table (e.g. per model), stacked as in the paper's fig. 2."""
    if not tables:
        raise MlsaeError("no table to plot; pass at least one latent layer table")
    heights = [max(len(layer_prob_columns(table)), 1) for table in tables.values()]
    panel_heights = [min(0.9 + 0.12 * height, 2.4) for height in heights]
    figure = Figure(figsize=(7.0, sum(panel_heights) + 0.9), layout="constrained")
    axes_list = figure.subplots(len(tables), 1, squeeze=False, height_ratios=panel_heights)[:, 0]
    drawn = None
    for axes, (label, table) in zip(axes_list, tables.items()):
        drawn = _draw_heatmap(axes, table, label)
    axes_list[-1].set_xlabel("Latent (sorted by expected layer)")
    figure.align_ylabels(list(axes_list))
    # aspect grows with the panel count so that a tall stack does not get a thick colour bar.
    colorbar = figure.colorbar(drawn, ax=list(axes_list), shrink=0.9, aspect=20 * len(tables) ** 0.7)  # type: ignore[arg-type]
    colorbar.set_label(value_label)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path_stem)


def plot_layer_heatmap(
    table: pl.DataFrame,
    path_stem: str | os.PathLike[str],
    title: str,
    value_label: str = "P(L = layer | J = latent)",
) -> list[Path]:
    """Heatmap of a latent layer table (latent_layer_table or single_prompt_layer_table)."""
    return plot_layer_heatmaps({title: table}, path_stem, value_label=value_label)


def _require_columns(df: pl.DataFrame, columns: Sequence[str]) -> None:
    missing = [name for name in columns if name not in df.columns]
    if missing:
        raise MlsaeError(f"the data frame lacks column(s) {', '.join(missing)}; it has {', '.join(df.columns)}")


def _series_groups(df: pl.DataFrame, series: str | None) -> list[tuple[str | None, pl.DataFrame]]:
    if series is None:
        return [(None, df)]
    labels = df[series].unique(maintain_order=True).to_list()
    return [(str(label), df.filter(pl.col(series) == label)) for label in labels]


def plot_variance_ratios(
    df: pl.DataFrame,
    path_stem: str | os.PathLike[str],
    x: str = "model",
    series: str | None = None,
    title: str | None = None,
    log_x: bool = False,
) -> list[Path]:
    """Ratios 11 and 12 (as percentages) against `x`, one line per value of `series` (figs. 5, 6).

    df: one row per run with columns `x`, ratio_11, ratio_12 (fractions) and optionally `series`.
    A string `x` is categorical, in order of first appearance; a numeric `x` is a numeric axis.
    """
    _require_columns(df, [x, "ratio_11", "ratio_12"] + ([series] if series else []))
    categorical = not df.schema[x].is_numeric()
    categories = df[x].unique(maintain_order=True).to_list() if categorical else []
    figure = Figure(figsize=(8.0, 3.2), layout="constrained")
    axes_pair = figure.subplots(1, 2)
    panels = (
        ("ratio_11", "E_J[Var(L|J)] / Var(L)  (eq. 11)"),
        ("ratio_12", "E_J,T[Var(L|J,T)] / E_J[Var(L|J)]  (eq. 12)"),
    )
    for axes, (column, label) in zip(axes_pair, panels):
        for name, group in _series_groups(df, series):
            xs = [categories.index(value) for value in group[x].to_list()] if categorical else group[x].to_list()
            axes.plot(xs, (group[column] * 100).to_list(), marker="o", label=name)
        axes.set_title(label, fontsize=9)
        axes.yaxis.set_major_formatter(PercentFormatter(xmax=100))
        axes.set_ylim(bottom=0)
        axes.set_xlabel(x)
        if categorical:
            axes.set_xticks(range(len(categories)), [str(value) for value in categories])
        elif log_x:
            axes.set_xscale("log", base=2)
            values = sorted(set(df[x].drop_nulls().to_list()))
            axes.set_xticks(values, [f"{value:g}" for value in values])
            axes.minorticks_off()
        axes.grid(alpha=0.3)
    if series:
        axes_pair[1].legend(title=series, fontsize=8)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path_stem)


def plot_per_layer_curves(
    df: pl.DataFrame,
    metrics: Sequence[str],
    path_stem: str | os.PathLike[str],
    layer: str = "layer",
    series: str | None = "run",
    relative_layer: bool = False,
    log_metrics: Sequence[str] = (),
    title: str | None = None,
) -> list[Path]:
    """One panel per metric against layer, one line per value of `series` (figs. 1, 4, 9-11).

    relative_layer: plot layer / nL (fig. 4), with nL from an `n_layers` column when present,
    otherwise one more than the series' largest layer index.
    log_metrics: metrics drawn on a log y axis.
    """
    if not metrics:
        raise MlsaeError("no metric to plot; name at least one metric column")
    _require_columns(df, [layer, *metrics] + ([series] if series else []))
    n_rows = math.ceil(len(metrics) / 3)
    n_columns = math.ceil(len(metrics) / n_rows)
    figure = Figure(figsize=(3.4 * n_columns + 0.6, 2.8 * n_rows + 0.4), layout="constrained")
    axes_grid = figure.subplots(n_rows, n_columns, squeeze=False)
    for index, metric in enumerate(metrics):
        axes = axes_grid[index // n_columns, index % n_columns]
        for name, group in _series_groups(df, series):
            group = group.sort(layer)
            xs = group[layer].cast(pl.Float64).to_numpy()
            if relative_layer:
                n_layers = group["n_layers"].to_numpy() if "n_layers" in group.columns else xs.max() + 1
                xs = xs / n_layers
            axes.plot(xs, group[metric].to_numpy(), marker="o", markersize=3, label=name)
        axes.set_title(metric, fontsize=10)
        axes.set_xlabel("Relative layer (layer / nL)" if relative_layer else "Layer")
        if metric in log_metrics:
            axes.set_yscale("log")
        if not relative_layer:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    for index in range(len(metrics), n_rows * n_columns):
        axes_grid[index // n_columns, index % n_columns].set_visible(False)
    if series:
        axes_grid.flat[len(metrics) - 1].legend(title=series, fontsize=8)
    if title:
        figure.suptitle(title)
    return save_figure(figure, path_stem)

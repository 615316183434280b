"""Figures of the paper's kind, written as PNG and PDF beside a path stem.

- plot_layer_heatmap / plot_layer_heatmaps / plot_layer_heatmap_grid: distributions over layers per
  latent (figs. 2, 3, 7, 8), latents on x sorted by expected layer, layers on y (layer 0 at the top, as
  in the paper), on a square-root colour scale so that the spread-out mass of the aggregate heatmaps
  (values near 1/nL) is visible next to the single-layer latents (values near 1).
- plot_variance_ratios: eqs. 11 and 12 across runs (figs. 5, 6); plot_against: any run-level columns
  against a categorical or numeric (optionally log2) x, one line per series (e.g. MMCS, fig. 13).
- plot_per_layer_curves: metrics against layer, one line per run (figs. 1, 4, 9-11).

Many series (up to ~30 runs) get distinct colours and a legend outside the panels.

Figures are built with matplotlib's object API (no pyplot, so no global backend or figure state)
and rendered by Agg. Each file is written under a temporary name and moved into place, so a reader
never sees half a file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm
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
# Square-root colour scale: P(L | J) spread evenly over 30 layers is 0.033, which a linear scale
# draws as black; under sqrt it shows at 18% brightness while 1.0 stays the top of the scale.
HEATMAP_NORM_GAMMA = 0.5
HEATMAP_TICKS = (0.0, 0.02, 0.1, 0.25, 0.5, 0.75, 1.0)  # evenly spaced under the square root

# Titles of the metric columns written by mlsae-analyse (a column not named here is shown as is).
METRIC_LABELS = {
    "fvu": "FVU",
    "mse": "MSE",
    "l0": "L0 norm",
    "l1": "L1 norm",
    "dead_fraction": "Dead latents (fraction)",
    "delta_ce": "Delta CE loss (nats)",
    "kl_per_token": "KL divergence (nats / token)",
    "kl_per_sequence": "KL divergence (nats / sequence)",
    "cos_next": "Cosine similarity, layers l and l+1 (centred)",
    "mean_norm": "Mean L2 norm",
    "mmcs_mean": "Mean max cosine similarity of decoder rows (MMCS)",
    "variant": "Variant",
    "ratio_11": r"$E_J[\mathrm{Var}(L|J)]\ /\ \mathrm{Var}(L)$  (eq. 11)",
    "ratio_12": r"$E_{J,T}[\mathrm{Var}(L|J,T)]\ /\ E_J[\mathrm{Var}(L|J)]$  (eq. 12)",
    "expansion_factor": "Expansion factor R",
    "k": "Sparsity k",
    "model": "Model",
    "run": "Run",
}
# Above this many series the legend moves outside the panels, to the right of the figure.
LEGEND_INSIDE_MAX = 3


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


@dataclass(frozen=True)
class HeatmapImage:
    """A heatmap ready to draw: the binned image [nL, columns] and how many latents it stands for."""

    image: np.ndarray
    n_latents: int

    @classmethod
    def from_table(cls, table: pl.DataFrame, max_columns: int = MAX_HEATMAP_COLUMNS) -> "HeatmapImage":
        """From a latent layer table; only the binned image is kept (small, whatever the latent count)."""
        image = heatmap_matrix(table)  # [nL, J]
        return cls(binned_columns(image, max_columns), image.shape[1])

    @property
    def n_layers(self) -> int:
        return int(self.image.shape[0])


def _draw_heatmap(axes: Axes, heatmap: HeatmapImage, title: str | None, max_layer_ticks: int = 8) -> object:
    n_layers, n_latents = heatmap.n_layers, heatmap.n_latents
    drawn = axes.imshow(
        heatmap.image,
        aspect="auto",
        interpolation="nearest",
        cmap="magma",
        norm=PowerNorm(HEATMAP_NORM_GAMMA, vmin=0.0, vmax=1.0),
        extent=(-0.5, n_latents - 0.5, n_layers - 0.5, -0.5),
    )
    if n_layers <= max_layer_ticks:
        axes.set_yticks(range(n_layers))
    else:
        axes.yaxis.set_major_locator(MaxNLocator(nbins=max(max_layer_ticks - 1, 1), integer=True))
    axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    if title:
        axes.set_title(title, fontsize=9, loc="left")
    return drawn


def _as_image(heatmap: pl.DataFrame | HeatmapImage, max_columns: int) -> HeatmapImage:
    return heatmap if isinstance(heatmap, HeatmapImage) else HeatmapImage.from_table(heatmap, max_columns)


def _heatmap_row_height(n_layers: int, n_rows: int) -> float:
    """Inches for a row of heatmap panels: taller for more layers, smaller when many rows are stacked."""
    if n_rows <= 4:
        return min(0.9 + 0.12 * n_layers, 2.4)
    return min(0.9 + 0.06 * n_layers, 1.7)


def plot_layer_heatmap_grid(
    grid: Sequence[Sequence[Optional[tuple[str, pl.DataFrame | HeatmapImage]]]],
    path_stem: str | os.PathLike[str],
    column_titles: Sequence[str] | None = None,
    title: str | None = None,
    value_label: str = "P(L = layer | J = latent)",
) -> list[Path]:
    """Heatmap panels in a grid: ``grid[row][column]`` is (panel title, latent layer table or its
    HeatmapImage) or None (an empty cell). Used for many runs at once (figs. 2 and 7 side by side);
    one shared colour bar.
    """
    n_rows = len(grid)
    n_columns = max((len(row) for row in grid), default=0)
    if not any(cell is not None for row in grid for cell in row):
        raise MlsaeError("no table to plot; pass at least one latent layer table")
    max_columns = MAX_HEATMAP_COLUMNS if n_columns == 1 else MAX_HEATMAP_COLUMNS // n_columns
    grid = [
        [None if cell is None else (cell[0], _as_image(cell[1], max_columns)) for cell in row] for row in grid
    ]
    row_layers = [max((cell[1].n_layers for cell in row if cell is not None), default=1) for row in grid]
    heights = [_heatmap_row_height(n_layers, n_rows) for n_layers in row_layers]
    width = {1: 7.0, 2: 11.0}.get(n_columns, 4.4 * n_columns)
    figure = Figure(figsize=(width, sum(heights) + 1.0), layout="constrained")
    axes_grid = figure.subplots(n_rows, n_columns, squeeze=False, height_ratios=heights)
    drawn, used = None, []
    for r in range(n_rows):
        for c in range(n_columns):
            axes = axes_grid[r, c]
            cell = grid[r][c] if c < len(grid[r]) else None
            if cell is None:
                axes.set_visible(False)
                continue
            # about one layer label per 0.17 inch of the panel's image (its title and x labels take ~0.45)
            drawn = _draw_heatmap(axes, cell[1], cell[0], max(2, int((heights[r] - 0.45) / 0.17)))
            used.append(axes)
            if c == 0:
                axes.set_ylabel("Layer")
    if column_titles:
        for c, column_title in enumerate(column_titles[:n_columns]):
            top = next((axes_grid[r, c] for r in range(n_rows) if c < len(grid[r]) and grid[r][c] is not None), None)
            if top is not None:
                top.annotate(column_title, xy=(0.5, 1.0), xytext=(0, 18), xycoords="axes fraction",
                             textcoords="offset points", ha="center", va="bottom", fontsize=11, weight="bold")  # fmt: skip
    x_label = "Latent (sorted by expected layer)"
    if len(used) == 1:
        used[0].set_xlabel(x_label)
    else:
        figure.supxlabel(x_label, fontsize=10)
    figure.align_ylabels(used)
    # aspect grows with the panel count so that a tall stack does not get a thick colour bar.
    shrink, aspect = (0.9, 20 * n_rows**0.7) if n_rows <= 4 else (0.5, 20 * 6**0.7)
    colorbar = figure.colorbar(drawn, ax=used, shrink=shrink, aspect=aspect)  # type: ignore[arg-type]
    colorbar.set_ticks(list(HEATMAP_TICKS))
    colorbar.set_label(f"{value_label}\n(square-root colour scale)")
    if title:
        figure.suptitle(title)
    return save_figure(figure, path_stem)


def plot_layer_heatmaps(
    tables: Mapping[str, pl.DataFrame],
    path_stem: str | os.PathLike[str],
    title: str | None = None,
    value_label: str = "P(L = layer | J = latent)",
) -> list[Path]:
    """One heatmap panel per table (e.g. per model), stacked as in the paper's fig. 2."""
    if not tables:
        raise MlsaeError("no table to plot; pass at least one latent layer table")
    grid = [[(label, table)] for label, table in tables.items()]
    return plot_layer_heatmap_grid(grid, path_stem, title=title, value_label=value_label)


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


def series_colours(n_series: int) -> list:
    """Distinct colours for n series: tab10, tab20, then evenly spaced along turbo (up to ~30 and beyond)."""
    if n_series <= 10:
        return [colormaps["tab10"](i) for i in range(n_series)]
    if n_series <= 20:
        return [colormaps["tab20"](i) for i in range(n_series)]
    return [colormaps["turbo"](x) for x in np.linspace(0.03, 0.97, n_series)]


def _legend_columns(n_series: int) -> int:
    return 1 if n_series <= 20 else 2


def legend_width(labels: Sequence[str]) -> float:
    """Inches that a legend outside the panels needs (0 when it fits inside one): fontsize 7 is about
    0.055 inch a character, plus the line sample and padding."""
    if len(labels) <= LEGEND_INSIDE_MAX:
        return 0.0
    return _legend_columns(len(labels)) * (0.6 + 0.055 * max(len(str(label)) for label in labels))


def _add_legend(figure: Figure, axes: Axes, title: str | None) -> None:
    """A legend inside `axes` for a few series; outside the panels, right of the figure, for many."""
    handles, labels = axes.get_legend_handles_labels()
    if not handles:
        return
    if len(handles) <= LEGEND_INSIDE_MAX:
        axes.legend(title=title, fontsize=8, title_fontsize=8)
    else:
        figure.legend(handles, labels, title=title, loc="outside right center", fontsize=7, title_fontsize=8,
                      ncols=_legend_columns(len(handles)))  # fmt: skip


def metric_label(column: str) -> str:
    return METRIC_LABELS.get(column, column)


def plot_against(
    df: pl.DataFrame,
    columns: Sequence[str],
    path_stem: str | os.PathLike[str],
    x: str,
    series: str | None = None,
    title: str | None = None,
    log_x: bool = False,
    percent: bool = False,
    y_from_zero: bool = False,
) -> list[Path]:
    """One panel per column of `columns` against `x`, one line per value of `series`.

    A string `x` is categorical, in order of first appearance; many or long categories (run labels)
    go on the vertical axis, one row each, so that they stay readable. A numeric `x` is a numeric
    axis (log2 with `log_x`, ticks at the values present). `percent`: the columns are fractions,
    drawn as %. With at most 4 points in a panel each point is labelled with its value.
    """
    _require_columns(df, [x, *columns] + ([series] if series else []))
    categorical = not df.schema[x].is_numeric()
    categories = [str(value) for value in df[x].unique(maintain_order=True).to_list()] if categorical else []
    sideways = categorical and (len(categories) > 6 or max(map(len, categories)) > 16)
    groups = _series_groups(df, series)
    colours = series_colours(len(groups))
    n_panels = len(columns)
    extra_width = legend_width([name or "" for name, _ in groups]) if series else 0.0
    if sideways:
        extra_width += 0.075 * max(map(len, categories))  # the category labels, fontsize 8
        height = 1.3 + 0.24 * len(categories)
    else:
        height = 3.3
    figure = Figure(figsize=(max(4.0 * n_panels, 5.0) + extra_width, height), layout="constrained")
    axes_row = figure.subplots(1, n_panels, squeeze=False, sharey=sideways)[0]
    scale = 100.0 if percent else 1.0
    for index, (axes, column) in enumerate(zip(axes_row, columns)):
        values_axis = axes.xaxis if sideways else axes.yaxis
        for (name, group), colour in zip(groups, colours):
            group = group if categorical else group.sort(x)
            positions = [categories.index(str(value)) for value in group[x].to_list()] if categorical else group[x].to_list()
            values = [None if value is None else value * scale for value in group[column].to_list()]
            xs, ys = (values, positions) if sideways else (positions, values)
            # sideways rows are separate runs: points, not a line through them
            axes.plot(xs, ys, marker="o", linestyle="none" if sideways else "-", color=colour, label=name)
            if df.height <= 4:
                for x_value, y_value, value in zip(xs, ys, values):
                    if value is not None and math.isfinite(value):
                        axes.annotate(f"{value:.3g}{'%' if percent else ''}", (x_value, y_value), xytext=(6, 4),
                                      textcoords="offset points", fontsize=8)  # fmt: skip
        axes.set_title(metric_label(column), fontsize=9)
        if percent:
            values_axis.set_major_formatter(PercentFormatter(xmax=100))
        if percent or y_from_zero:
            top = np.nanmax([value * scale for value in df[column].to_list() if value is not None] or [1.0])
            headroom = top * 1.15 if np.isfinite(top) and top > 0 else None  # room for the value labels
            limits = (0, min(headroom, 105.0) if percent and headroom else headroom)
            axes.set_xlim(*limits) if sideways else axes.set_ylim(*limits)
        elif df.height <= 4:
            axes.margins(y=0.15)
        if sideways:
            axes.set_xlabel(metric_label(column) if len(metric_label(column)) <= 20 else "")
        else:
            axes.set_xlabel(metric_label(x))
        if categorical:
            if sideways and index == 0:  # the panels share this axis
                axes.set_yticks(range(len(categories)), categories, fontsize=8)
                axes.set_ylim(len(categories) - 0.5, -0.5)  # first category at the top
                axes.set_ylabel(metric_label(x))
            elif not sideways:
                axes.set_xticks(range(len(categories)), categories)
                axes.set_xlim(-0.5, len(categories) - 0.5)
        elif log_x:
            axes.set_xscale("log", base=2)
            present = sorted(set(df[x].drop_nulls().to_list()))
            axes.set_xticks(present, [f"{value:g}" for value in present])
            axes.minorticks_off()
        axes.grid(alpha=0.3)
    if series:
        _add_legend(figure, axes_row[-1], metric_label(series))
    if title:
        figure.suptitle(title, fontsize=10)
    return save_figure(figure, path_stem)


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
    return plot_against(df, ["ratio_11", "ratio_12"], path_stem, x, series, title, log_x, percent=True)


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
    groups = _series_groups(df, series)
    extra_width = legend_width([name or "" for name, _ in groups]) if series else 0.0
    figure = Figure(figsize=(3.4 * n_columns + 0.6 + extra_width, 2.8 * n_rows + 0.4), layout="constrained")
    axes_grid = figure.subplots(n_rows, n_columns, squeeze=False)
    colours = series_colours(len(groups))
    for index, metric in enumerate(metrics):
        axes = axes_grid[index // n_columns, index % n_columns]
        for (name, group), colour in zip(groups, colours):
            group = group.sort(layer)
            xs = group[layer].cast(pl.Float64).to_numpy()
            if relative_layer:
                n_layers = group["n_layers"].to_numpy() if "n_layers" in group.columns else xs.max() + 1
                xs = xs / n_layers
            axes.plot(xs, group[metric].to_numpy(), marker="o", markersize=3, color=colour, label=name)
        axes.set_title(metric_label(metric) + ("  (log scale)" if metric in log_metrics else ""), fontsize=10)
        axes.set_xlabel("Relative layer (layer / nL)" if relative_layer else "Layer")
        if metric in log_metrics:
            axes.set_yscale("log")
        if not relative_layer:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    for index in range(len(metrics), n_rows * n_columns):
        axes_grid[index // n_columns, index % n_columns].set_visible(False)
    if series:
        _add_legend(figure, axes_grid.flat[len(metrics) - 1], metric_label(series))
    if title:
        figure.suptitle(title)
    return save_figure(figure, path_stem)


def plot_matching_heatmap(
    similarity: np.ndarray,
    expected_layer: np.ndarray,
    layers: Sequence[int],
    path_stem: str | os.PathLike[str],
    title: str | None = None,
    best_index: np.ndarray | None = None,
    max_columns: int = MAX_HEATMAP_COLUMNS,
) -> list[Path]:
    """Cross-dictionary matching (matching.py): latents on x sorted by E[L | J], layers on y (layer 0 at
    the top, as the other heatmaps), colour = the latent's max cosine similarity with that layer's decoder
    rows (linear, 0 to 1). similarity [n, L]; expected_layer [n] on the layer axis 0..L-1 (NaN: not
    active on the test set, left out: it has no place in the order); layers: the block number of each
    row. Consecutive latents are averaged into at most ``max_columns`` columns; over them, a line of the
    mean E[L | J] and (given best_index [n]) dots at the mean best layer, both in layer-axis units. A
    layer whose similarities are all NaN (the other run has no SAE there) is a blank row, labelled so.
    """
    from matplotlib import patheffects

    similarity = np.asarray(similarity, dtype=np.float64)
    expected_layer = np.asarray(expected_layer, dtype=np.float64)
    n_layers = len(layers)
    if similarity.ndim != 2 or similarity.shape[1] != n_layers or expected_layer.shape != similarity.shape[:1]:
        raise MlsaeError(
            f"similarity {similarity.shape} must be [n_latents, {n_layers}] and E[L | J] {expected_layer.shape} [n_latents]"
        )
    active = np.flatnonzero(np.isfinite(expected_layer))  # [J] latent ids
    if active.size == 0:
        raise MlsaeError("no latent has an E[L | J] (none is active on the test set); there is nothing to order the heatmap by")
    order = active[np.lexsort((active, expected_layer[active]))]  # [J] ascending E[L | J], ties by latent id
    image = binned_columns(similarity[order].T, max_columns)  # [L, columns]
    without_sae = np.isnan(similarity).all(axis=0)  # [L] rows left blank
    if without_sae.any():
        image = np.ma.masked_invalid(image)  # masked cells are not painted: the axes' white shows
    n_columns = image.shape[1]
    edges = np.linspace(0, order.size, n_columns + 1).round()  # [columns + 1] the bins of binned_columns
    centres = (edges[:-1] + edges[1:]) / 2 - 0.5  # [columns]

    figure = Figure(figsize=(7.5, min(max(2.0 + 0.13 * n_layers, 3.0), 5.5)), layout="constrained")
    axes = figure.subplots()
    drawn = axes.imshow(image, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0,
                        extent=(-0.5, order.size - 0.5, n_layers - 0.5, -0.5))  # fmt: skip
    outlined = [patheffects.Stroke(linewidth=2.6, foreground="black"), patheffects.Normal()]  # seen on any colour
    axes.plot(centres, binned_columns(expected_layer[order][None, :], max_columns)[0], color="white", linewidth=1.2,
              path_effects=outlined, label="E[L | J]")  # fmt: skip
    if best_index is not None:
        best = np.asarray(best_index, dtype=np.float64)[order][None, :]  # [1, J]
        axes.plot(centres, binned_columns(best, max_columns)[0], linestyle="none", marker=".",
                  markersize=2.5 if n_columns > 100 else 6, color="tab:red", label="best-matching layer")  # fmt: skip
    for row in np.flatnonzero(without_sae):  # at the left edge, under the line and dots that may cross the row
        axes.text(0.01, row, f"no SAE at layer {layers[row]}", transform=axes.get_yaxis_transform(), ha="left", va="center",
                  fontsize=7, color="0.4", zorder=1.5)  # fmt: skip
    step = max(1, math.ceil(n_layers / 12))
    axes.set_yticks(range(0, n_layers, step), [str(layers[i]) for i in range(0, n_layers, step)])
    axes.set_ylim(n_layers - 0.5, -0.5)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    binned = f", mean of {order.size / n_columns:.3g} per column" if n_columns < order.size else ""
    axes.set_xlabel(f"{order.size:,} active latents, sorted by E[L | J]{binned}")
    axes.set_ylabel("Layer")
    legend_title = "mean per column of latents" if binned else None
    figure.legend(loc="outside lower center", ncols=2, fontsize=7, title=legend_title, title_fontsize=7)
    colorbar = figure.colorbar(drawn, ax=axes, shrink=0.9)
    colorbar.set_label("max cosine similarity")
    if title:
        axes.set_title(title, fontsize=9, loc="left")
    return save_figure(figure, path_stem)

"""Figures: heatmap ordering and binning, and PNG + PDF files that hold a real picture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread

from mlsae_analysis.layer_distributions import wide_layer_table
from mlsae_analysis.plots import (
    binned_columns,
    heatmap_matrix,
    plot_layer_heatmap,
    plot_layer_heatmaps,
    plot_per_layer_curves,
    plot_variance_ratios,
)
from mlsae_cache.errors import MlsaeError


def layer_table(n_latents: int, n_layers: int, seed: int = 0) -> pl.DataFrame:
    prob = np.random.default_rng(seed).dirichlet(np.full(n_layers, 0.3), size=n_latents)  # [J, nL]
    return wide_layer_table(np.arange(n_latents), prob)


def assert_real_figure(paths: list[Path], stem: Path) -> None:
    assert paths == [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    png, pdf = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2000
    pixels = imread(png)[..., :3]  # [height, width, 3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    rgb = (pixels * 255).round().astype(np.int64)  # [height, width, 3]
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 20  # not blank, not a flat colour
    assert not list(stem.parent.glob("*.tmp"))  # temporary files were moved into place


def test_heatmap_matrix_orders_latents_by_expected_layer() -> None:
    table = pl.DataFrame(
        {
            "latent": [10, 11, 12, 13],
            "mean_layer": [2.0, 0.0, 1.0, 1.0],
            "p_layer_0": [0.0, 1.0, 0.5, 0.0],
            "p_layer_1": [0.0, 0.0, 0.0, 1.0],
            "p_layer_2": [1.0, 0.0, 0.5, 0.0],
        }
    )
    image = heatmap_matrix(table)  # columns: latent 11 (E=0), 12 and 13 (E=1, by id), 10 (E=2)
    np.testing.assert_array_equal(image, [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 1.0]])


def test_heatmap_matrix_sorts_layers_numerically() -> None:
    table = layer_table(5, 12)
    shuffled = table.select("latent", "mean_layer", *reversed([f"p_layer_{l}" for l in range(12)]))
    np.testing.assert_array_equal(heatmap_matrix(shuffled), heatmap_matrix(table))
    np.testing.assert_array_equal(heatmap_matrix(table)[11], table["p_layer_11"].to_numpy())


def test_binned_columns_average_consecutive_latents() -> None:
    image = np.arange(20, dtype=np.float64).reshape(2, 10)  # [nL=2, J=10]
    binned = binned_columns(image, 4)  # edges 0, 2, 5, 8, 10 (rounded from 0, 2.5, 5, 7.5, 10)
    np.testing.assert_allclose(binned, [[0.5, 3.0, 6.0, 8.5], [10.5, 13.0, 16.0, 18.5]])
    assert binned_columns(image, 10) is image
    distributions = np.random.default_rng(1).dirichlet(np.ones(6), size=1000).T  # [6, 1000]
    np.testing.assert_allclose(binned_columns(distributions, 7).sum(axis=0), 1.0)  # still distributions


def test_layer_heatmaps_are_written(tmp_path: Path) -> None:
    stem = tmp_path / "figs" / "aggregate"
    assert_real_figure(plot_layer_heatmap(layer_table(5000, 6), stem, "Pythia-70m"), stem)
    stem = tmp_path / "stacked"
    tables = {"6 layers": layer_table(300, 6), "36 layers": layer_table(40, 36, seed=1), "1 layer": layer_table(3, 1)}
    assert_real_figure(plot_layer_heatmaps(tables, stem, title="Aggregate"), stem)


def test_variance_ratio_plot_is_written(tmp_path: Path) -> None:
    runs = pl.DataFrame(
        {
            "model": ["pythia-70m", "pythia-160m", "pythia-410m"] * 2,
            "lens": ["standard"] * 3 + ["tuned lens"] * 3,
            "ratio_11": [0.54, 0.62, 0.75, 0.37, 0.39, 0.41],
            "ratio_12": [0.011, 0.009, 0.012, 0.02, 0.018, 0.007],
        }
    )
    stem = tmp_path / "ratios"
    assert_real_figure(plot_variance_ratios(runs, stem, x="model", series="lens"), stem)
    by_r = runs.with_columns(expansion=pl.Series([16, 32, 64] * 2))
    assert_real_figure(plot_variance_ratios(by_r, stem, x="expansion", series="lens", log_x=True), stem)
    with pytest.raises(MlsaeError, match="lacks column"):
        plot_variance_ratios(runs.drop("ratio_12"), stem)


def test_per_layer_curves_are_written(tmp_path: Path) -> None:
    rows = [
        {"run": run, "layer": layer, "fvu": 0.05 + 0.01 * layer / scale, "mse": 0.01 * 1.2**layer, "kl": 1 / (layer + scale)}
        for scale, (run, n_layers) in enumerate([("70m", 6), ("160m", 12)], start=1)
        for layer in range(n_layers)
    ]
    stem = tmp_path / "curves"
    curves = pl.DataFrame(rows)
    assert_real_figure(plot_per_layer_curves(curves, ["fvu", "mse", "kl"], stem, log_metrics=["mse"]), stem)
    assert_real_figure(plot_per_layer_curves(curves, ["fvu"], stem, relative_layer=True), stem)
    with pytest.raises(MlsaeError, match="no metric"):
        plot_per_layer_curves(curves, [], stem)
    with pytest.raises(MlsaeError, match="lacks column"):
        plot_per_layer_curves(curves, ["delta_ce"], stem)

"""Cross-dictionary matching (matching.py): the chunked similarity against the full cosine matrices, planted
decoders, the correlations against their textbook formulas, degenerate inputs, the files and the figure."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from matplotlib.image import imread

from mlsae_analysis import layout
from mlsae_analysis.files import write_parquet
from mlsae_analysis.matching import (
    average_ranks,
    expected_layer_per_latent,
    layer_correlation,
    match_crosscoder,
    match_per_layer,
    match_runs,
    matching_table,
    read_matching_table,
    summarise_match,
    write_matching,
)
from mlsae_analysis.mmcs import max_cosine_similarity, max_cosine_to
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import IntegrityError, record_files, recorded_files
from mlsae_train import Crosscoder, MultiLayerSAE, PerLayerSAEs, save_sae


def brute_force_sim(mlsae: np.ndarray, layer_rows: np.ndarray) -> np.ndarray:
    """sim [n, L] from the full [n, m] cosine matrix of every layer, in float64; a zero row's cosines are 0."""
    def unit(rows: np.ndarray) -> np.ndarray:
        norms = np.linalg.norm(rows, axis=-1, keepdims=True)
        return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)

    return np.stack([(unit(mlsae) @ unit(rows).T).max(axis=1) for rows in layer_rows.astype(np.float64)], axis=1)


def random_decoders(n: int, n_layers: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(n, 1, generator=g) * 5 + 0.1  # rows of all norms: cosines must not depend on them
    return torch.randn(n, d, generator=g) * scale, torch.randn(n_layers, m, d, generator=g)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 200])
def test_per_layer_chunked_equals_brute_force(chunk_size: int) -> None:
    mlsae, per_layer = random_decoders(37, 3, 11, 6)
    sim = match_per_layer(mlsae, per_layer, chunk_size=chunk_size)
    assert sim.shape == (37, 3) and sim.dtype == torch.float32
    np.testing.assert_allclose(sim.numpy(), brute_force_sim(mlsae.numpy(), per_layer.numpy()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [2, 5, 64])
def test_crosscoder_chunked_equals_brute_force_over_normalised_blocks(chunk_size: int) -> None:
    mlsae, blocks = random_decoders(23, 4, 9, 5, seed=1)  # blocks [L, m, d]
    crosscoder = blocks.transpose(0, 1).contiguous() * torch.rand(9, 4, 1)  # [m, L, d], blocks of unequal norms
    crosscoder[2, 1] = 0.0  # a block with no direction
    sim = match_crosscoder(mlsae, crosscoder, chunk_size=chunk_size)
    expected = brute_force_sim(mlsae.numpy(), crosscoder.transpose(0, 1).numpy())
    np.testing.assert_allclose(sim.numpy(), expected, rtol=0, atol=1e-6)


def test_planted_per_layer_rows_match_at_their_layer() -> None:
    """MLSAE rows copied (rescaled) from layer l's SAE have sim 1 at l and best layer l."""
    g = torch.Generator().manual_seed(2)
    n_layers, m, d = 4, 8, 16
    per_layer = torch.randn(n_layers, m, d, generator=g)
    source = [(0, 3), (2, 0), (3, 7), (1, 5), (2, 2), (3, 1)]  # (layer, row) of each MLSAE latent
    mlsae = torch.stack([per_layer[l, i] * (j + 0.5) for j, (l, i) in enumerate(source)])  # [6, d]
    sim = match_per_layer(mlsae, per_layer, chunk_size=4)
    layers = [5, 6, 7, 8]  # the run's blocks: b_j is reported as the block number
    match = summarise_match(sim, layers, np.arange(len(source), dtype=float), "per-layer")
    for j, (l, _) in enumerate(source):
        assert sim[j, l].item() == pytest.approx(1.0, abs=1e-6)
        assert (sim[j, torch.arange(n_layers) != l] < 0.999).all()  # random rows in 16-d are far from parallel
    assert match.best_index.tolist() == [l for l, _ in source]
    assert match.best_layer.tolist() == [layers[l] for l, _ in source]
    np.testing.assert_allclose(match.best_similarity, 1.0, atol=1e-6)


def test_crosscoder_blocks_of_known_norms() -> None:
    """Latent 0 writes e0 with norm 3 at layer 0, 4 * e1 at layer 1 and nothing at layer 2; latent 1 writes
    0.1 * (e0 + e1) at layer 2: the cosines are those of the unit blocks, whatever their norms."""
    crosscoder = torch.zeros(2, 3, 3)  # [m, L, d]
    crosscoder[0, 0, 0], crosscoder[0, 1, 1] = 3.0, 4.0
    crosscoder[1, 2, :2] = 0.1
    mlsae = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    sim = match_crosscoder(mlsae, crosscoder, chunk_size=2)
    half = 1 / math.sqrt(2)
    expected = [
        [1.0, 0.0, half],  # e0: block (0, 0) exactly; block (1, 2) at 45 degrees; layer 1's blocks are e1 and 0
        [0.0, 1.0, half],
        [half, half, 1.0],
        [0.0, 0.0, 0.0],  # e2: orthogonal to every block, and the zero block (0, 2) counts as 0, not NaN
        [0.0, 0.0, 0.0],  # a zero MLSAE row
    ]
    np.testing.assert_allclose(sim.numpy(), expected, atol=1e-6)
    assert not torch.isnan(sim).any()


def test_memory_does_not_grow_with_the_number_of_latents() -> None:
    """Peak CPU memory of the matching minus its [n, L] result is the same for n = 64 and n = 512 (chunk 8)
    and below the chunk bound; materialising a unit copy or an [n, m] block would add n-proportional bytes."""
    from torch.profiler import ProfilerActivity, profile

    def peak_bytes(n: int) -> int:
        mlsae, per_layer = random_decoders(n, 2, 40, 8, seed=3)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            match_per_layer(mlsae, per_layer, chunk_size=8)
        events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
        live = peak = 0
        for event in events:  # allocations (positive) and frees (negative) in time order
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        return peak - n * 2 * 4  # less the float32 result [n, L]

    small, large = peak_bytes(64), peak_bytes(512)
    bound = 4 * (40 * 8 + 8 * 8 + 8 * 40) * 2  # unit layer [m, d], query chunk [8, d], block [8, m]; x2 for temporaries
    assert 0 < large <= bound
    assert abs(large - small) < 1024  # an [n, d] copy would add (512 - 64) * 8 * 4 = 14,336 bytes


def test_mmcs_is_the_same_kernel_with_the_diagonal_left_out() -> None:
    W = torch.randn(30, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(max_cosine_similarity(W, chunk_size=7), max_cosine_to(W, W, chunk_size=7, exclude_same_index=True))
    # without leaving it out every row finds itself
    np.testing.assert_allclose(max_cosine_to(W, W.clone(), chunk_size=7).numpy(), 1.0, atol=1e-6)


def brute_pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def brute_ranks(values: list[float]) -> list[float]:
    """rank_i = 1 + #{values below} + (#{equal others}) / 2: the mean rank of a tie group."""
    return [1 + sum(v < u for v in values) + (sum(v == u for v in values) - 1) / 2 for u in values]


def test_average_ranks_share_ties() -> None:
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5])
    assert average_ranks(values).tolist() == [5.0, 2.0, 5.0, 3.0, 5.0, 1.0]
    rng = np.random.default_rng(5)
    for _ in range(5):
        values = rng.integers(0, 6, size=40).astype(float)
        assert average_ranks(values).tolist() == brute_ranks(values.tolist())


def test_correlations_against_their_formulas_with_inactive_latents_left_out() -> None:
    rng = np.random.default_rng(6)
    n = 60
    best = rng.integers(0, 5, size=n)  # [n] many ties
    expected = best + rng.normal(0, 1.5, size=n)
    expected[[3, 10, 11, 40]] = np.nan  # not active on the test set
    got = layer_correlation(expected, best)
    keep = ~np.isnan(expected)
    x, y = expected[keep].tolist(), best[keep].astype(float).tolist()
    assert (got.n_latents, got.n_active, got.reason) == (60, 56, None)
    assert got.pearson == pytest.approx(brute_pearson(x, y), abs=1e-12)
    assert got.spearman == pytest.approx(brute_pearson(brute_ranks(x), brute_ranks(y)), abs=1e-12)
    assert 0.3 < got.pearson < 1  # the planted dependence shows
    # laws: a monotone map of E[L | J] keeps Spearman's; reversing the layer axis flips both signs
    assert layer_correlation(np.exp(expected), best).spearman == pytest.approx(got.spearman, abs=1e-12)
    flipped = layer_correlation(-expected, best)
    assert (flipped.pearson, flipped.spearman) == pytest.approx((-got.pearson, -got.spearman), abs=1e-12)


def test_perfectly_ordered_latents_correlate_fully() -> None:
    got = layer_correlation(np.array([0.1, 0.9, 2.2, 2.9, np.nan]), np.array([0, 1, 2, 3, 0]))
    assert got.spearman == pytest.approx(1.0) and got.pearson == pytest.approx(brute_pearson([0.1, 0.9, 2.2, 2.9], [0, 1, 2, 3]))


@pytest.mark.parametrize(
    "expected, best, reason",
    [
        ([np.nan, np.nan, np.nan], [0, 1, 2], "0 latent(s) active"),
        ([np.nan, 1.5, np.nan], [0, 1, 2], "1 latent(s) active"),
        ([0.5, 1.5, 2.5], [2, 2, 2], "same best layer"),
        ([1.0, 1.0, np.nan], [0, 1, 2], "same E[L | J]"),
    ],
)
def test_degenerate_correlations_are_none_with_a_reason(expected, best, reason) -> None:
    got = layer_correlation(np.array(expected, dtype=float), np.array(best))
    assert got.pearson is None and got.spearman is None
    assert reason in got.reason


def test_ties_between_layers_go_to_the_first_and_summary_checks_shapes() -> None:
    match = summarise_match(np.array([[0.0, 0.0, 0.0], [0.2, 0.7, 0.7]]), [1, 3, 5], np.array([1.0, np.nan]), "per-layer")
    assert match.best_index.tolist() == [0, 1] and match.best_layer.tolist() == [1, 3]
    with pytest.raises(MlsaeError, match="one column per layer"):
        summarise_match(np.zeros((2, 3)), [0, 1], np.zeros(2), "per-layer")
    with pytest.raises(MlsaeError, match="one value per latent"):
        summarise_match(np.zeros((2, 3)), [0, 1, 2], np.zeros(3), "per-layer")


def test_bad_shapes_are_one_line_errors() -> None:
    with pytest.raises(MlsaeError, match=r"\[n_layers, n_latents, d\] with d = 4"):
        match_per_layer(torch.ones(3, 4), torch.ones(2, 3, 5))
    with pytest.raises(MlsaeError, match=r"\[n_latents, n_layers, d\]"):
        match_crosscoder(torch.ones(3, 4), torch.ones(3, 4))
    with pytest.raises(MlsaeError, match="MLSAE decoder"):
        match_per_layer(torch.ones(4), torch.ones(2, 3, 4))
    with pytest.raises(MlsaeError, match="chunk_size"):
        match_per_layer(torch.ones(3, 4), torch.ones(2, 3, 4), chunk_size=0)
    with pytest.raises(MlsaeError, match="at least one"):
        match_per_layer(torch.ones(3, 4), torch.ones(2, 0, 4))


def test_expected_layer_from_the_latent_layer_table() -> None:
    table = pl.DataFrame({"latent": [4, 1], "mean_layer": [2.5, 0.25], "var_layer": [0.1, 0.2]})
    got = expected_layer_per_latent(table, 6)
    np.testing.assert_array_equal(got, [np.nan, 0.25, np.nan, np.nan, 2.5, np.nan])
    with pytest.raises(MlsaeError, match="outside 0..3"):
        expected_layer_per_latent(table, 4)


def test_written_files_round_trip_and_are_checksummed(tmp_path) -> None:
    mlsae, per_layer = random_decoders(50, 3, 12, 6, seed=7)
    sim = match_per_layer(mlsae, per_layer, chunk_size=8)
    expected = np.linspace(0, 2, 50)
    expected[::7] = np.nan
    match = summarise_match(sim, [2, 4, 6], expected, "per-layer")
    written = write_matching(match, tmp_path, layout.MATCH_PER_LAYER)
    assert sorted(p.name for p in written) == sorted(f"{layout.MATCH_PER_LAYER}.{ext}" for ext in ("parquet", "json", "png", "pdf"))
    assert sorted(recorded_files(tmp_path)) == sorted(p.name for p in written)

    table = pl.read_parquet(tmp_path / f"{layout.MATCH_PER_LAYER}.parquet")
    sims = ["sim_layer_2", "sim_layer_4", "sim_layer_6"]
    assert table.columns == ["latent", "expected_layer", "best_layer", "best_similarity", *sims]
    assert table["expected_layer"].null_count() == 8  # inactive latents: null, not NaN
    assert table.equals(matching_table(match))
    back = read_matching_table(tmp_path / f"{layout.MATCH_PER_LAYER}.parquet")
    assert back.layers == (2, 4, 6) and back.against == "per-layer"
    np.testing.assert_array_equal(back.similarity, sim.numpy())
    np.testing.assert_array_equal(back.best_layer, match.best_layer)
    assert back.correlation == match.correlation

    summary = json.loads((tmp_path / f"{layout.MATCH_PER_LAYER}.json").read_text())
    assert summary["pearson"] == pytest.approx(match.correlation.pearson) and summary["n_active"] == 42
    assert sum(summary["best_layer_counts"].values()) == 42
    assert not list(tmp_path.glob(".*.tmp"))

    with pytest.raises(MlsaeError, match="no matching table"):
        read_matching_table(tmp_path / "absent.parquet")
    # a damaged table is refused on reading
    path = tmp_path / f"{layout.MATCH_PER_LAYER}.parquet"
    path.write_bytes(path.read_bytes()[:-9] + b"x" * 9)
    with pytest.raises(IntegrityError, match="damaged"):
        read_matching_table(path)


def test_heatmap_is_a_real_picture_and_needs_an_active_latent(tmp_path) -> None:
    from mlsae_analysis.plots import plot_matching_heatmap

    rng = np.random.default_rng(8)
    n, n_layers = 3000, 6  # more latents than heatmap columns: binned
    expected = rng.uniform(0, n_layers - 1, size=n)
    similarity = np.clip(1 - 0.3 * np.abs(np.arange(n_layers)[None, :] - expected[:, None]), 0, 1)  # [n, L]
    stem = tmp_path / "heatmap"
    paths = plot_matching_heatmap(similarity, expected, list(range(n_layers)), stem, title="t", best_index=similarity.argmax(1))
    assert [p.name for p in paths] == ["heatmap.png", "heatmap.pdf"]
    pixels = imread(paths[0])[..., :3]
    assert pixels.shape[0] > 200 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    with pytest.raises(MlsaeError, match="no latent has an E"):
        plot_matching_heatmap(similarity[:2], np.full(2, np.nan), list(range(n_layers)), stem)


def test_heatmap_orders_active_latents_by_expected_layer(tmp_path, monkeypatch) -> None:
    """The drawn image: active latents in ascending E[L | J] (ties by latent id), layers as rows; the line
    follows E[L | J] and the dots the best layer, column by column."""
    from mlsae_analysis import plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, stem: drawn.setdefault("figure", figure) and [])
    similarity = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8], [0.9, 0.0]])  # [5, 2]
    expected = np.array([1.0, np.nan, 0.0, 0.5, 0.0])  # order: latents 2, 4 (tie, by id), 3, 0; 1 inactive
    best = similarity.argmax(axis=1)
    plots.plot_matching_heatmap(similarity, expected, [7, 9], tmp_path / "h", best_index=best)
    axes = drawn["figure"].axes[0]
    order = [2, 4, 3, 0]
    np.testing.assert_array_equal(axes.images[0].get_array(), similarity[order].T)
    line, dots = axes.lines
    np.testing.assert_array_equal(line.get_ydata(), expected[order])
    np.testing.assert_array_equal(dots.get_ydata(), best[order])
    assert [label.get_text() for label in axes.get_yticklabels()] == ["7", "9"]


def test_match_runs_loads_both_families_and_the_expected_layers(tmp_path) -> None:
    """Saved runs of tiny dictionaries: an MLSAE whose rows are (rescaled) per-layer rows and crosscoder
    blocks is matched to their layers; E[L | J] comes from the analysis's latent_layers.parquet."""
    layers = [1, 2, 3]
    per_layer, crosscoder = PerLayerSAEs(8, 16, 2, layers), Crosscoder(8, 16, 2, layers)
    mlsae = MultiLayerSAE(8, 6, 2, layers)
    source = [2, 0, 1, 2, 0, 1]  # the layer each MLSAE latent copies
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # random decoders: a fresh family may start every layer from the same directions
        per_layer.W_dec.copy_(torch.randn(per_layer.W_dec.shape, generator=g))
        crosscoder.W_dec.copy_(torch.randn(crosscoder.W_dec.shape, generator=g))
        for j, l in enumerate(source):
            mlsae.W_dec[j] = per_layer.W_dec[l, j] * 3 if j < 3 else crosscoder.W_dec[j, l] * 0.5
    for name, model in [("mlsae", mlsae), ("per_layer", per_layer), ("crosscoder", crosscoder)]:
        save_sae(model, tmp_path / f"{name}.safetensors")
    analysis = tmp_path / "analysis"
    write_parquet(pl.DataFrame({"latent": [0, 1, 2, 4], "mean_layer": [1.8, 0.1, 1.2, 0.3]}), analysis / layout.LATENT_LAYERS)
    record_files(analysis)

    got = match_runs(tmp_path / "mlsae.safetensors", tmp_path / "per_layer.safetensors", analysis, chunk_size=4)
    assert got.against == "per-layer" and got.layers == (1, 2, 3)
    np.testing.assert_array_equal(got.similarity, match_per_layer(mlsae.W_dec, per_layer.W_dec, chunk_size=4).numpy())
    assert got.best_layer[:3].tolist() == [3, 1, 2]  # the copied rows' layers, as block numbers
    np.testing.assert_array_equal(got.expected_layer, [1.8, 0.1, 1.2, np.nan, 0.3, np.nan])
    assert got.correlation.n_active == 4
    crossed = match_runs(tmp_path / "mlsae.safetensors", tmp_path / "crosscoder.safetensors", analysis)
    assert crossed.against == "crosscoder" and crossed.best_layer[3:].tolist() == [3, 1, 2]
    np.testing.assert_allclose(crossed.best_similarity[3:], 1.0, atol=1e-6)
    assert [p.name for p in write_matching(crossed, tmp_path / "out")][0] == f"{layout.MATCH_CROSSCODER}.parquet"

    with pytest.raises(MlsaeError, match="must be an MLSAE"):
        match_runs(tmp_path / "per_layer.safetensors", tmp_path / "crosscoder.safetensors", analysis)
    with pytest.raises(MlsaeError, match="match against a per-layer or a crosscoder run"):
        match_runs(tmp_path / "mlsae.safetensors", tmp_path / "mlsae.safetensors", analysis)
    save_sae(PerLayerSAEs(8, 16, 2, [1, 2, 4]), tmp_path / "other_layers.safetensors")
    with pytest.raises(MlsaeError, match="same layers"):
        match_runs(tmp_path / "mlsae.safetensors", tmp_path / "other_layers.safetensors", analysis)
    with pytest.raises(MlsaeError, match="holds no latent_layers.parquet"):
        match_runs(tmp_path / "mlsae.safetensors", tmp_path / "per_layer.safetensors", tmp_path)

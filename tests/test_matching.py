"""Cross-dictionary matching (matching.py): the chunked similarity against the full cosine matrices, planted
decoders, the correlations against their textbook formulas, degenerate inputs, the files and the figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
    on_layer_axis,
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


# ---- another run on only some of the MLSAE's layers (SAEs trained elsewhere: issue 14) ----


def brute_subset_match(mlsae: np.ndarray, layer_rows: np.ndarray, positions: list[int], n_layers: int, expected: np.ndarray):
    """By hand: sim [n, n_layers] with NaN at the layers without an SAE, the best position on the MLSAE's axis
    (argmax over the present layers, ties to the first) and both correlations over the active latents."""
    sim = np.full((mlsae.shape[0], n_layers), np.nan)
    sim[:, positions] = brute_force_sim(mlsae, layer_rows)
    best = np.array([max(positions, key=lambda p: (row[p], -p)) for row in sim])  # [n] the first of the largest
    active = np.isfinite(expected)
    x, y = expected[active].tolist(), best[active].astype(float).tolist()
    return sim, best, brute_pearson(x, y), brute_pearson(brute_ranks(x), brute_ranks(y))


def test_subset_of_layers_equals_brute_force_on_the_mlsae_axis() -> None:
    """The other run has SAEs at blocks 3, 6 and 7 of the MLSAE's 2..7: its columns land at positions 1, 4
    and 5, the others are NaN; b_j and the correlations are on the MLSAE's axis 0..5, as computed by hand."""
    layers, other_layers, positions = [2, 3, 4, 5, 6, 7], [3, 6, 7], [1, 4, 5]
    mlsae, sub = random_decoders(40, 3, 9, 6, seed=10)  # sub [3, m, d]
    with torch.no_grad():  # plant: latents 0..5 copy a row of layer position i % 3 (rescaled), so they win there
        for j in range(6):
            mlsae[j] = sub[j % 3, j] * (j + 1)
    rng = np.random.default_rng(11)
    expected = rng.uniform(0, 5, size=40)
    expected[[7, 19, 33]] = np.nan
    sim = on_layer_axis(match_per_layer(mlsae, sub, chunk_size=7), other_layers, layers)
    match = summarise_match(sim, layers, expected, "per-layer")
    brute_sim, brute_best, brute_r, brute_rho = brute_subset_match(mlsae.numpy(), sub.numpy(), positions, 6, expected)
    np.testing.assert_allclose(match.similarity, brute_sim, rtol=0, atol=1e-6)  # NaN at the same places
    assert np.isnan(match.similarity[:, [0, 2, 3]]).all() and match.layers == tuple(layers)
    assert match.best_index.tolist() == brute_best.tolist()
    assert match.best_index[:6].tolist() == [positions[j % 3] for j in range(6)]  # the planted layers
    assert set(match.best_layer.tolist()) <= set(other_layers)
    np.testing.assert_array_equal(match.best_similarity, np.take_along_axis(match.similarity, match.best_index[:, None], 1)[:, 0])
    c = match.correlation
    assert (c.n_latents, c.n_active, c.reason) == (40, 37, None)
    assert (c.pearson, c.spearman) == pytest.approx((brute_r, brute_rho), abs=1e-12)
    # the position on the MLSAE's axis, not on the other run's (0, 1, 2): Pearson's differs, the gaps being uneven
    active = np.isfinite(expected)
    own_axis = np.searchsorted(positions, match.best_index)[active].astype(float)
    assert abs(c.pearson - brute_pearson(expected[active].tolist(), own_axis.tolist())) > 1e-3
    assert match.layers_without_sae == [2, 4, 5]


def test_the_full_case_is_untouched_by_the_layer_axis() -> None:
    sim = torch.rand(5, 3)
    assert on_layer_axis(sim, [1, 2, 3], [1, 2, 3]) is sim  # nothing copied, nothing reordered
    match = summarise_match(sim, [1, 2, 3], np.arange(5.0), "per-layer")
    assert match.layers_without_sae == [] and not match.missing.any()
    assert match.best_index.tolist() == sim.argmax(dim=1).tolist()


def test_a_missing_layer_never_wins_and_other_nans_are_refused() -> None:
    nan = np.nan
    similarity = np.array([[-0.5, nan, -0.2], [-0.1, nan, -0.9], [0.3, nan, 0.3]])  # cosines may all be negative
    match = summarise_match(similarity, [0, 1, 2], np.array([0.0, 2.0, 1.0]), "per-layer")
    assert match.best_index.tolist() == [2, 0, 0] and match.layers_without_sae == [1]
    with pytest.raises(MlsaeError, match="holds NaN outside whole columns"):
        summarise_match(np.array([[0.1, nan], [0.2, 0.3]]), [0, 1], np.zeros(2), "per-layer")
    with pytest.raises(MlsaeError, match="no SAE at any of the layers"):
        summarise_match(np.full((2, 2), nan), [0, 1], np.zeros(2), "per-layer")


def test_one_layer_leaves_the_correlation_undefined_with_its_reason() -> None:
    mlsae, sub = random_decoders(12, 1, 5, 4, seed=12)
    sim = on_layer_axis(match_per_layer(mlsae, sub), [4], [2, 3, 4])
    match = summarise_match(sim, [2, 3, 4], np.linspace(0, 2, 12), "per-layer")
    assert match.best_layer.tolist() == [4] * 12
    assert match.correlation.pearson is None and "same best layer (position 2)" in match.correlation.reason


def test_other_layers_than_the_mlsaes_are_refused_in_one_line() -> None:
    for other, says in (([1, 5], r"layer\(s\) \[5\], which the MLSAE lacks"), ([], "layers \\[\\]"), ([1, 1], r"layers \[1, 1\]")):
        with pytest.raises(MlsaeError, match=says) as refused:
            on_layer_axis(torch.zeros(3, len(other)), other, [0, 1, 2])
        assert "\n" not in str(refused.value)


def test_subset_files_have_null_columns_and_round_trip(tmp_path) -> None:
    mlsae, sub = random_decoders(30, 2, 8, 5, seed=13)
    expected = np.linspace(0, 3, 30)
    expected[::5] = np.nan
    match = summarise_match(on_layer_axis(match_per_layer(mlsae, sub), [0, 3], [0, 1, 2, 3]), [0, 1, 2, 3], expected, "per-layer")
    write_matching(match, tmp_path)
    table = pl.read_parquet(tmp_path / f"{layout.MATCH_PER_LAYER}.parquet")
    assert table.columns[4:] == [f"sim_layer_{layer}" for layer in (0, 1, 2, 3)]
    assert [table[f"sim_layer_{layer}"].null_count() for layer in (0, 1, 2, 3)] == [0, 30, 30, 0]
    assert table["sim_layer_1"].is_nan().sum() == 0  # null, not NaN
    assert set(table["best_layer"].to_list()) <= {0, 3}
    back = read_matching_table(tmp_path / f"{layout.MATCH_PER_LAYER}.parquet")
    assert back.layers == (0, 1, 2, 3) and back.layers_without_sae == [1, 2]
    np.testing.assert_array_equal(back.similarity, match.similarity)  # NaN at the same places
    np.testing.assert_array_equal(back.best_index, match.best_index)
    assert back.correlation == match.correlation
    summary = json.loads((tmp_path / f"{layout.MATCH_PER_LAYER}.json").read_text())
    assert summary["layers"] == [0, 1, 2, 3] and summary["layers_without_sae"] == [1, 2]
    assert summary["best_layer_counts"]["1"] == summary["best_layer_counts"]["2"] == 0
    assert summary["best_layer_counts"]["0"] + summary["best_layer_counts"]["3"] == 24 == summary["n_active"]
    # a table with a null inside a present column is refused on reading, as any other NaN
    damaged = table.with_columns(pl.when(pl.col("latent") == 3).then(None).otherwise(pl.col("sim_layer_0")).alias("sim_layer_0"))
    write_parquet(damaged, tmp_path / "damaged.parquet")
    record_files(tmp_path, ["damaged.parquet"])
    with pytest.raises(MlsaeError, match="holds NaN outside whole columns"):
        read_matching_table(tmp_path / "damaged.parquet")


def test_subset_heatmap_leaves_the_missing_layers_blank(tmp_path, monkeypatch) -> None:
    """The PNG: the rows of layers without an SAE are white (the axes' background), the others painted; the
    line and dots stay in the MLSAE's layer-axis units; the blank rows say so."""
    from mlsae_analysis import plots

    real_save, drawn = plots.save_figure, {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, stem: (drawn.setdefault("figure", figure), real_save(figure, stem))[1])
    rng = np.random.default_rng(14)
    n, layers = 400, [0, 1, 2, 3, 4]
    expected = rng.uniform(0, 4, size=n)
    similarity = np.clip(1 - 0.3 * np.abs(np.arange(5)[None, :] - expected[:, None]), 0.05, 1)  # [n, 5]
    similarity[:, [1, 3]] = np.nan
    match = summarise_match(similarity, layers, expected, "per-layer")
    png = write_matching(match, tmp_path)[2]
    axes = drawn["figure"].axes[0]
    image = axes.images[0].get_array()
    assert np.ma.getmaskarray(image)[[1, 3]].all() and not np.ma.getmaskarray(image)[[0, 2, 4]].any()
    texts = [text.get_text() for text in axes.texts]
    assert texts == ["no SAE at layer 1", "no SAE at layer 3"]
    order = np.lexsort((np.arange(n), expected))
    np.testing.assert_allclose(axes.lines[1].get_ydata(), match.best_index[order])  # positions 0, 2 or 4
    pixels = imread(png)[..., :3]  # [H, W, 3] in 0..1
    height, width = pixels.shape[:2]

    def pixel(x: float, row: int) -> np.ndarray:  # the PNG pixel at data point (x, row), via figure fractions
        fx, fy = drawn["figure"].transFigure.inverted().transform(axes.transData.transform((x, row + 0.3)))
        return pixels[int((1 - fy) * height), int(fx * width)]

    for x in (n * 0.5, n * 0.9):  # away from the label (left) and the E[L | J] line (it crosses rows 1 and 3 near n/4, 3n/4)
        assert np.allclose(pixel(x, 1), 1.0) and np.allclose(pixel(x, 3), 1.0)  # blank
        assert not np.allclose(pixel(x, 0), 1.0) and not np.allclose(pixel(x, 4), 1.0)  # painted


def test_match_runs_on_some_of_the_mlsaes_layers(tmp_path, monkeypatch) -> None:
    """A per-layer run on blocks 1 and 3 of the MLSAE's 1, 2, 3 is matched on the MLSAE's axis (block 2 empty);
    an MLSAE that records no layers takes its analysis's (summary.json)."""
    g = torch.Generator().manual_seed(15)
    per_layer, mlsae = PerLayerSAEs(8, 16, 2, [1, 3]), MultiLayerSAE(8, 6, 2, [1, 2, 3])
    with torch.no_grad():
        per_layer.W_dec.copy_(torch.randn(per_layer.W_dec.shape, generator=g))
        mlsae.W_dec.copy_(torch.randn(mlsae.W_dec.shape, generator=g))
        mlsae.W_dec[0] = per_layer.W_dec[1, 4] * 2  # latent 0 is block 3's row 4
    save_sae(per_layer, tmp_path / "per_layer.safetensors")
    save_sae(mlsae, tmp_path / "mlsae.safetensors")
    analysis = tmp_path / "analysis"
    write_parquet(pl.DataFrame({"latent": [0, 1, 2, 3, 5], "mean_layer": [1.9, 0.2, 1.0, 0.7, 1.4]}), analysis / layout.LATENT_LAYERS)
    record_files(analysis)
    got = match_runs(tmp_path / "mlsae.safetensors", tmp_path / "per_layer.safetensors", analysis, chunk_size=4)
    assert got.layers == (1, 2, 3) and got.layers_without_sae == [2]
    np.testing.assert_array_equal(got.similarity[:, [0, 2]], match_per_layer(mlsae.W_dec, per_layer.W_dec, chunk_size=4).numpy())
    assert np.isnan(got.similarity[:, 1]).all() and got.best_layer[0] == 3 and got.best_index[0] == 2
    brute = brute_subset_match(mlsae.W_dec.detach().numpy(), per_layer.W_dec.detach().numpy(), [0, 2], 3, got.expected_layer)
    assert got.best_index.tolist() == brute[1].tolist()
    assert (got.correlation.pearson, got.correlation.spearman) == pytest.approx(brute[2:], abs=1e-12)

    class NoLayers:  # an imported MLSAE records no layers: the analysis's summary.json gives the axis
        arch, layers, n_latents, W_dec = "mlsae", [], 6, mlsae.W_dec.detach()

    from mlsae_analysis import matching

    (analysis / layout.SUMMARY).write_text(json.dumps({"layers": [0, 1, 2, 3]}))
    record_files(analysis, [layout.SUMMARY], create=False)
    loaded = {"mlsae": NoLayers(), "per_layer": per_layer}
    monkeypatch.setattr(matching, "load_sae", lambda run, device="cpu": loaded[Path(run).stem])
    on_summary = match_runs(tmp_path / "mlsae.safetensors", tmp_path / "per_layer.safetensors", analysis)
    assert on_summary.layers == (0, 1, 2, 3) and on_summary.layers_without_sae == [0, 2]
    assert on_summary.best_index[0] == 3  # block 3 is position 3 on this axis


def test_compare_skips_a_run_on_a_layer_the_mlsae_lacks_with_a_line(tmp_path) -> None:
    """write_matchings: SAEs at layers 2 and 3 beside an MLSAE on 0..2 are not matched (layer 3 has no
    E[L | J]); the line names the layer, and nothing is written or loaded."""
    from mlsae_analysis.compare import AnalysedRun, write_matchings

    def analysed(name: str, arch: str, layers: list[int]) -> AnalysedRun:
        summary = {"run": str(tmp_path / name), "layers": layers}  # no run there: a matching would fail to load it
        return AnalysedRun(tmp_path / f"{name}-analysis", summary, arch, pl.DataFrame({"layer": layers}), [], {}, {})

    lines = write_matchings([analysed("m", "mlsae", [0, 1, 2]), analysed("p", "per-layer", [2, 3])], tmp_path / "out", "cpu")
    assert len(lines) == 1 and "not matched" in lines[0] and "with layer(s) [3] the MLSAE lacks" in lines[0]
    assert not (tmp_path / "out").exists()

"""Single-prompt heatmap data (fig. 3): activation-weighted over tokens, threshold on the max activation."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mlsae_analysis.layer_distributions import layer_prob_columns
from mlsae_analysis.single_prompt import single_prompt_layer_table
from mlsae_cache.errors import MlsaeError


def frame(rows: list[tuple[int, int, int, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["token", "layer", "latent", "activation"], orient="row")


def test_hand_worked_prompt() -> None:
    rows = [
        # latent 5: token 0 h=1 at layer 0, token 1 h=3 at layer 1 -> sums (1, 3, 0) -> (1/4, 3/4, 0).
        # (Eq. 10 averaged over tokens would give (1/2, 1/2, 0): the recipe weights by activation.)
        (0, 0, 5, 1.0),
        (1, 1, 5, 3.0),
        # latent 2: layer 2 only -> (0, 0, 1), E[L] = 2
        (0, 2, 2, 0.5),
        (1, 2, 2, 0.25),
        # latent 9: layers 0 and 2 equally -> (1/2, 0, 1/2), E[L] = 1, Var = 1
        (1, 0, 9, 2.0),
        (1, 2, 9, 2.0),
    ]
    table = single_prompt_layer_table(frame(rows))
    assert table["latent"].to_list() == [5, 9, 2]  # E[L] = 0.75, 1, 2
    assert table["mean_layer"].to_list() == pytest.approx([0.75, 1.0, 2.0])
    assert table["var_layer"].to_list() == pytest.approx([0.1875, 1.0, 0.0])
    assert table.select(layer_prob_columns(table)).rows() == [
        pytest.approx((0.25, 0.75, 0.0)),
        pytest.approx((0.5, 0.0, 0.5)),
        pytest.approx((0.0, 0.0, 1.0)),
    ]
    assert table["max_activation"].to_list() == [3.0, 2.0, 0.5]
    assert table["n_tokens"].to_list() == [2, 1, 2]


def test_threshold_drops_exactly_the_latents_whose_largest_activation_is_below_it() -> None:
    rows = [
        (0, 0, 1, 1e-3),  # max exactly at the threshold: kept
        (0, 1, 2, 0.000999),  # just below: dropped
        (0, 0, 3, 6e-4),  # each activation below, their sum (1.2e-3) above: dropped (max, not sum)
        (1, 1, 3, 6e-4),
        (0, 0, 4, 5e-4),  # one activation above: kept
        (1, 2, 4, 2e-3),
        (1, 0, 6, 0.0),  # not active at all
    ]
    table = single_prompt_layer_table(frame(rows))
    assert sorted(table["latent"].to_list()) == [1, 4]
    assert table.filter(pl.col("latent") == 4)["p_layer_2"].item() == pytest.approx(0.8)
    assert sorted(single_prompt_layer_table(frame(rows), min_activation=0.0)["latent"].to_list()) == [1, 2, 3, 4]
    assert single_prompt_layer_table(frame(rows), min_activation=1.0).height == 0


def test_random_prompt_against_numpy() -> None:
    rng = np.random.default_rng(3)
    n_tokens, n_layers, n_latents = 9, 12, 40
    rows = [
        (t, l, int(j), float(rng.exponential() * 10.0 ** rng.integers(-5, 1)))
        for t in range(n_tokens)
        for l in range(n_layers)
        for j in rng.choice(n_latents, size=4, replace=False)
    ]
    dense = np.zeros((n_latents, n_layers))
    largest = np.zeros(n_latents)
    for _, l, j, a in rows:
        dense[j, l] += a
        largest[j] = max(largest[j], a)
    kept = np.flatnonzero(largest >= 1e-3)
    assert 0 < kept.size < np.count_nonzero(largest)  # the threshold bites in this sample
    prob = dense[kept] / dense[kept].sum(axis=1, keepdims=True)
    mean = prob @ np.arange(n_layers)
    order = np.lexsort((kept, mean))

    table = single_prompt_layer_table(frame(rows).lazy(), n_layers=n_layers)
    assert table["latent"].to_list() == kept[order].tolist()
    np.testing.assert_allclose(table.select(layer_prob_columns(table)).to_numpy(), prob[order], rtol=1e-12)
    assert table["mean_layer"].is_sorted()


def test_user_errors() -> None:
    with pytest.raises(MlsaeError, match="no active latent"):
        single_prompt_layer_table(frame([(0, 0, 1, 0.0)]))
    with pytest.raises(MlsaeError, match="n_layers is 1"):
        single_prompt_layer_table(frame([(0, 1, 1, 1.0)]), n_layers=1)
    with pytest.raises(MlsaeError, match="min_activation"):
        single_prompt_layer_table(frame([(0, 1, 1, 1.0)]), min_activation=-1.0)

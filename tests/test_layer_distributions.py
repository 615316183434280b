"""Eqs. 10-15 against a hand-worked case and a brute-force loop over latents and tokens."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest

from mlsae_analysis.layer_distributions import (
    layer_distributions,
    layer_statistics,
    latent_layer_table,
    layer_prob_columns,
    variance_ratios,
)
from mlsae_cache.errors import MlsaeError


def frame(rows: list[tuple[int, int, int, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["token", "layer", "latent", "activation"], orient="row")


# Worked by hand (nL = 3):
#   latent 7, token 0: h = 1 at layer 0, 3 at layer 2 -> p = (1/4, 0, 3/4), mean 1.5, var 0.75
#   latent 7, token 1: h = 5 at layer 1               -> p = (0, 1, 0),     mean 1,   var 0
#   latent 3, token 0: h = 3 at layer 2               -> p = (0, 0, 1),     mean 2,   var 0
#   latent 9, token 1: h = 0 (not active)
# P(L|J=7) = (1/8, 1/2, 3/8): E = 1.25, Var = 0.4375.  P(L|J=3) = (0, 0, 1): E = 2, Var = 0.
# P(L) = (1/16, 1/4, 11/16): E = 1.625, Var = 23/64.
# E_J[Var(L|J)] = 7/32, Var_J(E[L|J]) = 9/64, E_{J,T}[Var(L|J,T)] = (0.375 + 0) / 2 = 3/16,
# E_J[Var_T(E[L|T,J])] = (1/16 + 0) / 2 = 1/32. Ratio 11 = 14/23, ratio 12 = 6/7.
HAND_ROWS = [(0, 0, 7, 1.0), (0, 2, 7, 3.0), (1, 1, 7, 5.0), (0, 2, 3, 3.0), (1, 0, 9, 0.0)]


def test_hand_worked_case() -> None:
    ratios = variance_ratios(frame(HAND_ROWS))
    assert ratios["total_var"] == pytest.approx(23 / 64, abs=1e-15)
    assert ratios["mean_var_given_latent"] == pytest.approx(7 / 32, abs=1e-15)
    assert ratios["var_mean_given_latent"] == pytest.approx(9 / 64, abs=1e-15)
    assert ratios["mean_var_given_latent_token"] == pytest.approx(3 / 16, abs=1e-15)
    assert ratios["mean_var_mean_given_latent_token"] == pytest.approx(1 / 32, abs=1e-15)
    assert ratios["ratio_11"] == pytest.approx(14 / 23, abs=1e-15)
    assert ratios["ratio_12"] == pytest.approx(6 / 7, abs=1e-15)
    assert (ratios["n_latents_active"], ratios["n_tokens"], ratios["n_pairs"], ratios["n_layers"]) == (2, 2, 3, 3)


def test_hand_worked_table_and_eq10() -> None:
    table = latent_layer_table(frame(HAND_ROWS))
    assert table["latent"].to_list() == [7, 3]  # ascending E[L|J]: 1.25 then 2
    assert table["mean_layer"].to_list() == pytest.approx([1.25, 2.0])
    assert table["var_layer"].to_list() == pytest.approx([0.4375, 0.0])
    assert table["n_tokens"].to_list() == [2, 1]
    assert table["mean_token_var"].to_list() == pytest.approx([0.375, 0.0])
    assert table.select(layer_prob_columns(table)).row(0) == pytest.approx((1 / 8, 1 / 2, 3 / 8))

    probs = layer_distributions(frame(HAND_ROWS)).collect().sort("token", "latent", "layer")
    assert probs.rows() == [(0, 3, 2, 1.0), (0, 7, 0, 0.25), (0, 7, 2, 0.75), (1, 7, 1, 1.0)]


def random_latents(seed: int, n_tokens: int, n_layers: int, n_latents: int) -> pl.DataFrame:
    """Random sparse latents plus three latents of known shape:
    latent n_latents:   always at layer 2 only (Var(L|J) = 0),
    latent n_latents+1: at every layer of every token where it appears,
    latent n_latents+2: at one layer per token, a different one per token (Var(L|J,T) = 0 < Var(L|J)).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for token in range(n_tokens):
        for layer in range(n_layers):
            for latent in rng.choice(n_latents, size=rng.integers(0, 4), replace=False):
                rows.append((token, layer, int(latent), float(rng.lognormal(0, 2))))
        if token % 3 == 0:
            rows.append((token, 2, n_latents, float(rng.lognormal(0, 2))))
        if token % 4 == 1:
            rows += [(token, layer, n_latents + 1, float(rng.lognormal(0, 2))) for layer in range(n_layers)]
        if token % 5 == 2:
            rows.append((token, int(rng.integers(n_layers)), n_latents + 2, float(rng.lognormal(0, 2))))
    rows.append((0, 0, n_latents + 3, 0.0))  # inactive: must be ignored
    return frame(rows).sample(fraction=1.0, shuffle=True, seed=seed).sort("token")


def brute_force(latents: pl.DataFrame, n_layers: int) -> dict:
    """Loops over latents and tokens, straight from the definitions."""
    active = latents.filter(pl.col("activation") > 0)
    layers = np.arange(n_layers, dtype=np.float64)
    per_latent = {}
    for latent in sorted(set(active["latent"].to_list())):
        rows = active.filter(pl.col("latent") == latent)
        token_probs, token_means, token_vars = [], [], []
        for token in sorted(set(rows["token"].to_list())):
            h = np.zeros(n_layers)
            for _, layer, _, activation in rows.filter(pl.col("token") == token).iter_rows():
                h[layer] += activation
            p = h / h.sum()  # eq. 10
            mean = (p * layers).sum()
            token_probs.append(p)
            token_means.append(mean)
            token_vars.append((p * (layers - mean) ** 2).sum())
        prob = np.mean(token_probs, axis=0)
        mean = (prob * layers).sum()
        per_latent[latent] = dict(
            prob=prob,
            mean=mean,
            var=(prob * (layers - mean) ** 2).sum(),
            mean_token_var=np.mean(token_vars),
            var_token_mean=np.var(token_means),
            n_tokens=len(token_probs),
        )
    prob = np.mean([v["prob"] for v in per_latent.values()], axis=0)
    mean = (prob * layers).sum()
    total_var = (prob * (layers - mean) ** 2).sum()
    e_var = np.mean([v["var"] for v in per_latent.values()])
    e_token_var = np.mean([v["mean_token_var"] for v in per_latent.values()])
    return dict(
        per_latent=per_latent,
        total_var=total_var,
        mean_var_given_latent=e_var,
        mean_var_given_latent_token=e_token_var,
        ratio_11=e_var / total_var,
        ratio_12=e_token_var / e_var,
    )


@pytest.mark.parametrize("n_layers", [6, 36])
def test_against_brute_force(n_layers: int) -> None:
    latents = random_latents(seed=n_layers, n_tokens=60, n_layers=n_layers, n_latents=25)
    expected = brute_force(latents, n_layers)
    ratios = variance_ratios(latents)
    for key in ("total_var", "mean_var_given_latent", "mean_var_given_latent_token", "ratio_11", "ratio_12"):
        assert ratios[key] == pytest.approx(expected[key], rel=1e-12, abs=0), key

    table = latent_layer_table(latents)
    assert table.height == len(expected["per_latent"]) == ratios["n_latents_active"]
    probs = table.select(layer_prob_columns(table)).to_numpy()
    for row, latent in enumerate(table["latent"].to_list()):
        reference = expected["per_latent"][latent]
        np.testing.assert_allclose(probs[row], reference["prob"], rtol=1e-12, atol=1e-15)
        assert table["mean_layer"][row] == pytest.approx(reference["mean"], rel=1e-12)
        assert table["var_layer"][row] == pytest.approx(reference["var"], rel=1e-12, abs=1e-15)
        assert table["mean_token_var"][row] == pytest.approx(reference["mean_token_var"], rel=1e-12, abs=1e-15)
        assert table["n_tokens"][row] == reference["n_tokens"]
    assert table["mean_layer"].is_sorted()

    by_latent = dict(zip(table["latent"].to_list(), table.iter_rows(named=True)))
    one_layer, all_layers, one_per_token = (by_latent[25 + i] for i in range(3))
    assert one_layer["var_layer"] == 0.0 and one_layer["mean_token_var"] == 0.0
    assert one_layer["p_layer_2"] == 1.0
    assert all_layers["mean_token_var"] > 0 and min(all_layers[c] for c in layer_prob_columns(table)) > 0
    assert one_per_token["mean_token_var"] == 0.0 < one_per_token["var_layer"]
    assert 25 + 3 not in by_latent  # activation 0 only


@pytest.mark.parametrize("n_layers", [6, 36])
def test_law_of_total_variance(n_layers: int) -> None:
    latents = random_latents(seed=100 + n_layers, n_tokens=80, n_layers=n_layers, n_latents=30)
    ratios = variance_ratios(latents, n_layers=n_layers)
    # eq. 14 over latents, eq. 15 over tokens; each term computed by its own route.
    assert ratios["total_var"] == pytest.approx(
        ratios["mean_var_given_latent"] + ratios["var_mean_given_latent"], rel=1e-12, abs=0
    )
    assert ratios["mean_var_given_latent"] == pytest.approx(
        ratios["mean_var_given_latent_token"] + ratios["mean_var_mean_given_latent_token"], rel=1e-12, abs=0
    )
    stats = layer_statistics(latents, batch_rows=13)  # many batches: Chan merges of the token means
    np.testing.assert_allclose(stats.var_layer, stats.mean_token_var + stats.var_token_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stats.mean_token_mean, stats.mean_layer, rtol=1e-12)


def test_single_layer_latent_has_exactly_zero_variance_at_extreme_scales() -> None:
    rows = [(t, 35, 0, a) for t, a in enumerate([1e-6, 1.0, 1e3, 3.7e-2])] + [(0, 0, 1, 1.0)]
    table = latent_layer_table(frame(rows), n_layers=36)
    row = table.filter(pl.col("latent") == 0).row(0, named=True)
    assert row["mean_layer"] == 35.0 and row["var_layer"] == 0.0 and row["mean_token_var"] == 0.0


def test_inputs_agree_lazy_dataframe_parquet_batches_and_unsorted(tmp_path) -> None:
    latents = random_latents(seed=7, n_tokens=50, n_layers=6, n_latents=20)
    for chunk in range(5):  # chunk files of 10 tokens each, as a latent cache writes them
        latents.filter(pl.col("token") // 10 == chunk).write_parquet(tmp_path / f"chunk_{chunk:03d}.parquet")
    reference = variance_ratios(latents)
    table = latent_layer_table(latents)

    def same(ratios: dict) -> None:
        for key, value in reference.items():
            assert ratios[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key

    same(variance_ratios(latents.lazy()))
    same(variance_ratios(pl.scan_parquet(tmp_path / "*.parquet")))
    same(variance_ratios(layer_statistics(latents, batch_rows=5)))  # rows of a token span batches
    same(variance_ratios(latents.reverse()))  # an unsorted DataFrame is sorted up front, silently
    with pytest.warns(UserWarning, match="not in ascending token order"):
        same(variance_ratios(latents.lazy().reverse()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        variance_ratios(pl.scan_parquet(tmp_path / "*.parquet"))  # token-ordered: no warning
    batched = latent_layer_table(layer_statistics(latents, batch_rows=3))
    assert batched["latent"].to_list() == table["latent"].to_list()
    np.testing.assert_allclose(batched.drop("latent").to_numpy(), table.drop("latent").to_numpy(), rtol=1e-12)


def test_n_layers_pads_missing_layers() -> None:
    table = latent_layer_table(frame(HAND_ROWS), n_layers=5)
    assert layer_prob_columns(table) == [f"p_layer_{l}" for l in range(5)]
    assert table["p_layer_4"].to_list() == [0.0, 0.0]
    assert variance_ratios(frame(HAND_ROWS), n_layers=5)["ratio_11"] == pytest.approx(14 / 23)


def test_user_errors() -> None:
    with pytest.raises(MlsaeError, match="lack the column"):
        variance_ratios(frame(HAND_ROWS).drop("layer"))
    with pytest.raises(MlsaeError, match="n_layers is 2"):
        variance_ratios(frame(HAND_ROWS), n_layers=2)
    with pytest.raises(MlsaeError, match="no latent is active"):
        variance_ratios(frame([(0, 0, 1, 0.0)]))
    with pytest.raises(MlsaeError, match="negative"):
        variance_ratios(frame([(0, 0, -1, 1.0)]))
    with pytest.raises(MlsaeError, match="must hold integers"):
        variance_ratios(frame(HAND_ROWS).with_columns(pl.col("layer").cast(pl.Float64)))
    with pytest.raises(MlsaeError, match="DataFrame or LazyFrame"):
        variance_ratios([(0, 0, 1, 1.0)])  # type: ignore[arg-type]


def test_zero_total_variance_gives_nan_ratios() -> None:
    ratios = variance_ratios(frame([(0, 1, 0, 1.0), (1, 1, 2, 2.0)]))
    assert ratios["total_var"] == 0.0
    assert np.isnan(ratios["ratio_11"]) and np.isnan(ratios["ratio_12"])


def test_sparse_huge_token_indices() -> None:
    # Global token indices far apart (a sampled test set) must not overflow any internal key.
    spread = [(token * 10**12 + 3, layer, latent, activation) for token, layer, latent, activation in HAND_ROWS]
    ratios = variance_ratios(frame(spread))
    assert ratios["ratio_11"] == pytest.approx(14 / 23, abs=1e-15)
    assert ratios["ratio_12"] == pytest.approx(6 / 7, abs=1e-15)
    assert ratios["n_tokens"] == 2

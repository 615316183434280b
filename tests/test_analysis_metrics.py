"""mlsae-analyse on a synthetic cache (no language model): FVU, MSE, L0, L1, dead fraction, residual
statistics and the stored sparse latents against brute force; run/cache mismatches refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from models import assert_one_line_error

from mlsae_analysis import variance_ratios
from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.examples import top_activations, top_examples
from mlsae_analysis.metrics import NormOutliers, ReconstructionMetrics, concentration_warnings, top_count
from mlsae_cache.writer import write_array_cache
from mlsae_train import MultiLayerSAE, save_sae

N_TOKENS, N_LAYERS, D_MODEL, N_LATENTS, K = 300, 3, 16, 64, 4


@pytest.fixture(scope="module")
def acts() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(N_TOKENS, N_LAYERS, D_MODEL)) + rng.normal(size=(1, N_LAYERS, D_MODEL))).astype(np.float32)


@pytest.fixture(scope="module")
def cache_dir(acts, tmp_path_factory) -> Path:
    return write_array_cache(tmp_path_factory.mktemp("cache") / "c", acts, seq_len=10, shard_tokens=100)


@pytest.fixture(scope="module")
def sae() -> MultiLayerSAE:
    model = MultiLayerSAE(D_MODEL, N_LATENTS, K, layers=list(range(N_LAYERS)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.b_pre.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def run_file(sae, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run") / "sae.safetensors"
    save_sae(sae, path)
    return path


def analyse(run, cache, out, *extra) -> int:
    return analyse_main(["--run", str(run), "--shards", str(cache), "--out", str(out), "--no-downstream",
                         "--no-progress", "--batch-tokens", "64", *extra])  # fmt: skip


def brute_force(acts: np.ndarray, sae: MultiLayerSAE) -> dict[str, np.ndarray]:
    x = torch.from_numpy(acts).double()  # [N, nL, d]
    with torch.no_grad():
        x_hat = sae(torch.from_numpy(acts)).double()
        values, indices = sae.encode(torch.from_numpy(acts))  # [N, nL, k]
    err = ((x - x_hat) ** 2).sum(dim=(0, 2))  # [nL]
    var = ((x - x.mean(dim=0)) ** 2).sum(dim=(0, 2))  # [nL]
    dead = [1 - len(set(indices[:, l][values[:, l] > 0].tolist())) / N_LATENTS for l in range(N_LAYERS)]
    return {
        "fvu": (err / var).numpy(),
        "mse": (err / (N_TOKENS * D_MODEL)).numpy(),
        "l0": (values > 0).double().sum(dim=2).mean(dim=0).numpy(),
        "l1": values.double().sum(dim=2).mean(dim=0).numpy(),
        "dead_fraction": np.array(dead),
        "dead_any": 1 - len(set(indices[values > 0].tolist())) / N_LATENTS,
        "values": values,
        "indices": indices,
    }


def test_accumulator_over_uneven_batches_equals_brute_force(acts, sae):
    expected = brute_force(acts, sae)
    metrics = ReconstructionMetrics(N_LAYERS, D_MODEL, N_LATENTS)
    for start, stop in ((0, 7), (7, 150), (150, 151), (151, 300)):
        x = torch.from_numpy(acts[start:stop])
        recon = sae.reconstruct(x)
        metrics.update(x, recon.x_hat.view(x.shape), recon.values.view(stop - start, N_LAYERS, K),
                       recon.indices.view(stop - start, N_LAYERS, K))  # fmt: skip
    got = metrics.per_layer()
    for name in ("fvu", "mse", "l0", "l1", "dead_fraction"):
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=name)
    assert metrics.dead_fraction_any_layer() == pytest.approx(expected["dead_any"])


@pytest.mark.parametrize("screen", ["on", "off"])  # the bfloat16 screen and the trainer's float32 kernel
def test_cli_writes_exact_metrics_latents_and_residual(acts, sae, cache_dir, run_file, tmp_path, screen):
    out = tmp_path / "out"
    assert analyse(run_file, cache_dir, out, "--screen", screen) == 0
    assert json.loads((out / "summary.json").read_text())["encode_kernel"].startswith("bfloat16" if screen == "on" else "float32")
    expected = brute_force(acts, sae)
    metrics = pl.read_csv(out / "metrics.csv")
    assert metrics["layer"].to_list() == ["0", "1", "2", "mean"]
    for name in ("fvu", "mse", "l0", "l1", "dead_fraction"):
        np.testing.assert_allclose(metrics[name][:3].to_numpy(), expected[name], rtol=1e-5, err_msg=name)
    assert metrics["fvu"][3] == pytest.approx(expected["fvu"].mean(), rel=1e-5)
    assert metrics["dead_fraction"][3] == pytest.approx(expected["dead_fraction"].mean())  # the mean row is a mean
    assert metrics["dead_every_layer"][3] == pytest.approx(expected["dead_any"])
    assert metrics["dead_every_layer"][:3].is_nan().all()
    assert json.loads((out / "summary.json").read_text())["metrics_mean"]["dead_every_layer"] == pytest.approx(expected["dead_any"])
    assert metrics["delta_ce"].is_nan().all()

    # the stored latents are exactly the active latents, in ascending order of token, layer, latent
    latents = pl.read_parquet(out / "latents" / "part-*.parquet")
    active = expected["values"] > 0
    token, layer, slot = np.nonzero(active.numpy())
    reference = pl.DataFrame(
        {"token": token, "layer": layer, "latent": expected["indices"].numpy()[token, layer, slot],
         "activation": expected["values"].numpy()[token, layer, slot]}  # fmt: skip
    ).sort("token", "layer", "latent")
    assert latents.select("token", "layer", "latent").rows() == reference.select("token", "layer", "latent").rows()
    np.testing.assert_allclose(latents["activation"].to_numpy(), reference["activation"].to_numpy(), rtol=1e-6)
    tokens = pl.read_parquet(out / "latents" / "tokens.parquet")
    assert tokens["token"].to_list() == list(range(N_TOKENS))
    assert tokens["position"].to_list() == [i % 10 for i in range(N_TOKENS)]

    # residual statistics against brute force (cache means are the dataset means)
    residual = pl.read_csv(out / "residual.csv")
    x = acts.astype(np.float64)
    centred = x - x.mean(axis=0)
    unit = centred / np.linalg.norm(centred, axis=2, keepdims=True)
    np.testing.assert_allclose(residual["cos_next"][:2].to_numpy(), (unit[:, :-1] * unit[:, 1:]).sum(2).mean(0), rtol=1e-5)
    np.testing.assert_allclose(residual["mean_norm"].to_numpy(), np.linalg.norm(x, axis=2).mean(0), rtol=1e-5)

    # variance ratios and distributions are computed from the stored latents
    ratios = pl.read_csv(out / "variance_ratios.csv").row(0, named=True)
    assert ratios["ratio_11"] == pytest.approx(variance_ratios(latents)["ratio_11"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_tokens"] == N_TOKENS and summary["k"] == K
    mmcs = pl.read_csv(out / "mmcs.csv")
    assert 0 < mmcs["mmcs_mean"][0] <= 1
    examples = pl.read_parquet(out / "examples.parquet")
    top = examples.filter(pl.col("rank") == 0).sort("latent")
    best = latents.group_by("latent").agg(pl.col("activation").max()).sort("latent")
    np.testing.assert_allclose(top["activation"].to_numpy(), best["activation"].to_numpy())
    for name in ("metrics", "heatmap", "variance_ratios", "residual_cos_next", "residual_norm"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.pdf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_max_tokens_limits_the_analysis(cache_dir, run_file, tmp_path):
    assert analyse(run_file, cache_dir, tmp_path / "out", "--max-tokens", "50") == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_tokens"] == 50
    assert pl.read_parquet(tmp_path / "out" / "latents" / "part-*.parquet")["token"].max() == 49


def test_bad_input_is_one_line_and_leaves_no_out(acts, cache_dir, run_file, tmp_path, capsys):
    narrow = write_array_cache(tmp_path / "narrow", acts[:, :, :8], seq_len=10)
    other_layers = write_array_cache(tmp_path / "other_layers", acts[:, :2], layers=[0, 1], seq_len=10)
    cases = [
        (run_file, narrow, "width"),
        (run_file, other_layers, "lacks layer 2"),
        (tmp_path / "no_such_run", cache_dir, "does not exist"),
        (tmp_path, cache_dir, "sae.safetensors"),  # a directory without a checkpoint
        (run_file, tmp_path / "no_cache", "no cache"),
    ]
    for run, cache, fragment in cases:
        out = tmp_path / "out"
        assert analyse(run, cache, out) == 2
        assert_one_line_error(capsys.readouterr().err, fragment)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    (tmp_path / "taken").mkdir()
    assert analyse(run_file, cache_dir, tmp_path / "taken") == 2
    assert_one_line_error(capsys.readouterr().err, "already exists")


def test_run_trained_on_another_model_is_refused(acts, cache_dir, sae, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    save_sae(sae, run / "sae.safetensors")
    identity = {"model": "another-model", "n_tokens": 10, "layers": [0, 1, 2], "d_model": D_MODEL, "lens": None}
    (run / "config.json").write_text(json.dumps({"data": [identity]}))
    assert analyse(run, cache_dir, tmp_path / "out") == 2
    assert_one_line_error(capsys.readouterr().err, "another-model")
    assert not (tmp_path / "out").exists()


def test_report_gathers_analysed_runs(cache_dir, run_file, tmp_path, capsys):
    for name, tokens in (("a", "300"), ("b", "100")):
        assert analyse(run_file, cache_dir, tmp_path / name, "--max-tokens", tokens) == 0
    assert analyse_main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "report")]) == 0
    tables = pl.read_csv(tmp_path / "report" / "tables.csv")
    assert tables.height == 2 and tables["run"].n_unique() == 2
    assert tables["fvu"][0] == pytest.approx(pl.read_csv(tmp_path / "a" / "metrics.csv")["fvu"][3])
    assert (tmp_path / "report" / "per_layer.png").exists() and (tmp_path / "report" / "variance_ratios.pdf").exists()
    assert analyse_main(["report", str(tmp_path), "--out", str(tmp_path / "report2")]) == 2
    assert_one_line_error(capsys.readouterr().err, "summary.json")
    assert not (tmp_path / "report2").exists()


def test_float32_per_token_sums_stay_exact_for_large_offsets():
    """Activations far from zero (mean 300, spread 1, as in late layers): the accumulator's float32
    per-token sums and float64 totals match float64 brute force."""
    rng = np.random.default_rng(3)
    x = (300 + rng.normal(size=(2000, 2, 64))).astype(np.float32)  # [N, nL, d]
    x_hat = (x + 0.05 * rng.normal(size=x.shape)).astype(np.float32)
    values = torch.from_numpy(rng.random((2000, 2, 4)).astype(np.float32))
    indices = torch.from_numpy(rng.integers(0, 50, size=(2000, 2, 4)))
    metrics = ReconstructionMetrics(2, 64, 50)
    for start in range(0, 2000, 300):
        part = slice(start, start + 300)
        metrics.update(torch.from_numpy(x[part]), torch.from_numpy(x_hat[part]), values[part], indices[part])
    x64, err = x.astype(np.float64), x.astype(np.float64) - x_hat.astype(np.float64)
    fvu = (err**2).sum(axis=(0, 2)) / ((x64 - x64.mean(axis=0)) ** 2).sum(axis=(0, 2))
    np.testing.assert_allclose(metrics.per_layer()["fvu"], fvu, rtol=1e-6)
    np.testing.assert_allclose(metrics.per_layer()["l1"], values.double().sum(dim=2).mean(dim=0).numpy(), rtol=1e-6)


def test_top_examples_against_brute_force():
    """Top activations per latent with their contexts, streamed in small batches, against a direct search;
    the token table has several sequences and missing (special) positions."""
    rng = np.random.default_rng(4)
    n_tokens, n_layers, k, n_latents, n_examples, context = 400, 3, 3, 20, 4, 2
    token = np.repeat(np.arange(n_tokens), n_layers * k)
    layer = np.tile(np.repeat(np.arange(n_layers), k), n_tokens)
    latent = rng.integers(0, n_latents, token.size)
    activation = rng.permutation(token.size).astype(np.float32) / token.size  # distinct: no ties
    activation[rng.random(token.size) < 0.2] = 0.0  # not active: never an example
    latents = pl.DataFrame({"token": token, "layer": layer.astype(np.int16), "latent": latent.astype(np.int32),
                            "activation": activation})  # fmt: skip
    kept = np.sort(rng.choice(12 * 50, n_tokens, replace=False))  # 12 sequences of 50 positions, some absent
    tokens = pl.DataFrame({"token": np.arange(n_tokens), "sequence": kept // 50, "position": (kept % 50).astype(np.int32),
                           "token_id": rng.integers(0, 1000, n_tokens).astype(np.int32)})  # fmt: skip

    got = top_examples(latents.lazy(), tokens.lazy(), n_examples, context)
    assert top_activations(latents.lazy(), n_examples, batch_rows=97).equals(top_activations(latents.lazy(), n_examples))
    by_token = {row["token"]: row for row in tokens.iter_rows(named=True)}
    expected = []
    for j in range(n_latents):
        rows = sorted((-a, t, l) for t, l, lat, a in zip(token, layer, latent, activation) if lat == j and a > 0)
        for rank, (neg_activation, t, l) in enumerate(rows[:n_examples]):
            seq, pos = by_token[t]["sequence"], by_token[t]["position"]
            near = [r for r in tokens.iter_rows(named=True) if r["sequence"] == seq and abs(r["position"] - pos) <= context]
            expected.append((j, rank, t, l, -neg_activation, [r["token_id"] for r in near], [r["token"] for r in near].index(t)))
    columns = ["latent", "rank", "token", "layer", "activation", "context_ids", "context_offset"]
    assert got.sort("latent", "rank").select(columns).rows() == expected


# ----------------------------------------------------------------------------- outliers (issue 12 item 5)


def outlier_reference(x: np.ndarray, x_hat: np.ndarray) -> dict[str, np.ndarray]:
    """Brute force of metrics.py's outlier definitions: sort each layer's tokens by norm (stable: the
    first token wins a tie), take the top ceil(f n), and recompute everything from scratch in float64."""
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    n, n_layers, _ = x.shape
    out: dict[str, list[float]] = {"var_share_top_0.1pct": [], "var_share_top_1pct": [], "fvu_without_top_0.1pct": []}
    for layer in range(n_layers):
        xl, hl = x[:, layer], x_hat[:, layer]
        order = np.argsort(-np.linalg.norm(xl, axis=1), kind="stable")
        centred = ((xl - xl.mean(axis=0)) ** 2).sum(axis=1)
        top, wide = order[: max(1, int(np.ceil(n / 1000)))], order[: max(1, int(np.ceil(n / 100)))]
        rest = np.setdiff1d(np.arange(n), top)
        out["var_share_top_0.1pct"].append(centred[top].sum() / centred.sum())
        out["var_share_top_1pct"].append(centred[wide].sum() / centred.sum())
        rest_var = ((xl[rest] - xl[rest].mean(axis=0)) ** 2).sum()
        out["fvu_without_top_0.1pct"].append(((xl[rest] - hl[rest]) ** 2).sum() / rest_var)
    return {k: np.array(v) for k, v in out.items()}


def planted_outliers(acts: np.ndarray) -> np.ndarray:
    """acts with a few sequence-start-like outliers: layer 1 has two tokens 300x the others (they carry
    nearly all of its variance); layer 0 has an exact tie in norm between tokens 5 and 200 (5 must win)."""
    planted = acts.copy()
    planted[[0, 150], 1] *= 300.0
    planted[5, 0] = planted[200, 0] = 40.0 * acts[5, 0]
    return planted


@torch.no_grad()
def feed(consumers, acts: np.ndarray, sae: MultiLayerSAE, bounds) -> np.ndarray:
    """Feeds acts in uneven batches to the consumers; returns the reconstructions [N, nL, d]."""
    x_hats = []
    for start, stop in bounds:
        x = torch.from_numpy(acts[start:stop])
        recon = sae.reconstruct(x)
        x_hat = recon.x_hat.view(x.shape)
        for consumer in consumers:
            consumer.update(x, x_hat, recon.values.view(stop - start, N_LAYERS, K), recon.indices.view(stop - start, N_LAYERS, K))
        x_hats.append(x_hat.numpy())
    return np.concatenate(x_hats)


def test_top_count_rounds_up_and_keeps_one() -> None:
    assert [top_count(n, 0.001) for n in (0, 1, 300, 1000, 1001, 4096)] == [0, 1, 1, 1, 2, 5]
    assert [top_count(n, 0.01) for n in (99, 100, 101, 4096)] == [1, 1, 2, 41]


@pytest.mark.parametrize("bounds", [((0, 300),), ((0, 7), (7, 150), (150, 151), (151, 300))])
def test_outlier_columns_equal_brute_force_with_planted_outliers_and_ties(acts, sae, bounds):
    planted = planted_outliers(acts)
    recon, outliers = ReconstructionMetrics(N_LAYERS, D_MODEL, N_LATENTS), NormOutliers(N_LAYERS, N_TOKENS)
    x_hat = feed([recon, outliers], planted, sae, bounds)
    read_calls = []
    got = outliers.per_layer(recon, lambda ids: read_calls.append(ids) or planted[ids], chunk=2)
    expected = outlier_reference(planted, x_hat)
    for name, values in expected.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-5, err_msg=name)
    assert got["var_share_top_1pct"][1] > 0.99 and got["var_share_top_1pct"][2] < 0.1  # the planted layer only
    assert sorted(np.concatenate(read_calls).tolist()) == sorted(set(np.concatenate(read_calls).tolist()))  # each token read once
    # the tie at layer 0: token 5 (first) is the one left out; leaving out 200 instead gives another FVU
    wrong = np.delete(np.arange(N_TOKENS), 200)
    x0, h0 = planted[wrong, 0].astype(np.float64), x_hat[wrong, 0].astype(np.float64)
    assert got["fvu_without_top_0.1pct"][0] != pytest.approx(((x0 - h0) ** 2).sum() / ((x0 - x0.mean(0)) ** 2).sum(), rel=1e-9)
    # without outliers, leaving one token out barely changes FVU
    assert got["fvu_without_top_0.1pct"][2] == pytest.approx(recon.per_layer()["fvu"][2], rel=0.05)


def test_concentration_warning_names_the_layers() -> None:
    assert concentration_warnings([0, 1, 2], np.array([0.1, 0.5, 0.2]), 4096) == []  # exactly half is not over half
    (line,) = concentration_warnings([3, 4, 5, 9], np.array([0.6, 0.97, 0.4, 0.51]), 4096)
    assert line.startswith("warning: at layer(s) 3-4, 9 the top 1% of tokens by norm (41 of 4,096) carry over half")
    assert "up to 97% at layer 4" in line and "\n" not in line


def test_cli_reports_outliers_and_warns_once(acts, sae, tmp_path, capsys):
    planted = planted_outliers(acts)
    cache = write_array_cache(tmp_path / "cache", planted, seq_len=10, shard_tokens=100)
    run = tmp_path / "sae.safetensors"
    save_sae(sae, run)
    capsys.readouterr()
    assert analyse(run, cache, tmp_path / "out") == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "of tokens by norm" in line]
    metrics = pl.read_csv(tmp_path / "out" / "metrics.csv")
    with torch.no_grad():
        x_hat = sae(torch.from_numpy(planted)).numpy()
    expected = outlier_reference(planted, x_hat)
    assert (expected["var_share_top_1pct"] > 0.5).tolist() == [True, True, False]  # both planted layers, not layer 2
    assert len(warnings) == 1 and "layer(s) 0-1 " in warnings[0]
    for name, values in expected.items():
        np.testing.assert_allclose(metrics[name][:3].to_numpy(), values, rtol=1e-4, err_msg=name)
        assert metrics[name][3] == pytest.approx(values.mean(), rel=1e-4)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["warnings"] == warnings

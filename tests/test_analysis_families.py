"""mlsae-analyse on every dictionary family (issue 13 item 2; SPEC 9): tiny runs of the MLSAE, the per-layer
suite and the crosscoder trained on one cache and analysed end to end on another, each number checked
against a brute-force computation with the dictionary itself (``model(x)``, ``encode(x)``, W_dec)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from models import assert_one_line_error, build_tiny_model, write_english

from mlsae_analysis import layout
from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.downstream import downstream_metrics, kept_positions, make_reconstructor
from mlsae_analysis.encode import scan_verified_latents
from mlsae_analysis.family_layers import WEIGHTED_PREFIX
from mlsae_analysis.layer_distributions import layer_prob_columns
from mlsae_cache import open_cache
from mlsae_cache import shard_format as sf
from mlsae_cache.cli import main as cache_main
from mlsae_cache.lm import load_model
from mlsae_cache.writer import write_array_cache
from mlsae_train import Crosscoder, TrainConfig, load_sae, save_sae, train

N_LAYERS, D_MODEL, K = 3, 8, 2
ARCHS = ("mlsae", "per-layer", "crosscoder")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict:
    """Runs of the three families trained on one synthetic cache (layers of different scales) and their
    analyses (no language model) of a second cache."""
    root = tmp_path_factory.mktemp("families")
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(160, N_LAYERS, D_MODEL)).astype(np.float32) * np.array([1, 2, 4], dtype=np.float32)[None, :, None]
    write_array_cache(root / "train", acts[:100], seq_len=10, shard_tokens=50)
    write_array_cache(root / "test", acts[100:], seq_len=10, shard_tokens=30)
    out = {"root": root, "x": torch.from_numpy(acts[100:])}
    for seed, arch in enumerate(ARCHS):
        train(TrainConfig(shards=[str(root / "train")], out=str(root / f"run-{arch}"), arch=arch, expansion_factor=8, k=K,
                          batch_tokens=20, epochs=1, seed=seed, progress=False, verify=False))  # fmt: skip
        assert analyse_main(["--run", str(root / f"run-{arch}"), "--shards", str(root / "test"), "--out", str(root / arch),
                             "--no-downstream", "--no-progress", "--batch-tokens", "25"]) == 0  # fmt: skip
        out[arch] = root / arch
    return out


def _metrics(folder: Path) -> pl.DataFrame:
    return layout.read_table(folder, layout.METRICS).filter(pl.col("layer") != "mean")


@pytest.mark.parametrize("arch", ARCHS)
def test_per_layer_fvu_is_that_of_the_dictionarys_own_reconstruction(analysed, arch):
    sae = load_sae(analysed["root"] / f"run-{arch}")
    x = analysed["x"].double()  # [N, L, d]
    with torch.no_grad():
        x_hat = sae(analysed["x"]).double()  # [N, L, d]
    error = (x - x_hat).square().sum(dim=(0, 2))  # [L]
    fvu = error / (x - x.mean(dim=0)).square().sum(dim=(0, 2))
    metrics = _metrics(analysed[arch])
    np.testing.assert_allclose(metrics["fvu"].to_numpy(), fvu.numpy(), rtol=1e-5)
    np.testing.assert_allclose(metrics["mse"].to_numpy(), (error / (x.shape[0] * D_MODEL)).numpy(), rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_stored_latents_dead_fractions_and_sparsity_units(analysed, arch):
    """The stored rows are encode(x) in the family's numbering; dead fractions and L0/L1 follow from them."""
    sae = load_sae(analysed["root"] / f"run-{arch}")
    with torch.no_grad():
        values, indices = sae.encode(analysed["x"])  # [N, L, k] (crosscoder [N, k])
    stored = scan_verified_latents(analysed[arch]).collect()
    metrics, summary = _metrics(analysed[arch]), layout.read_summary(analysed[arch])
    n = sae.n_latents
    assert summary["arch"] == arch and summary["n_latents"] == n and summary["k"] == K and summary["layers"] == [0, 1, 2]
    if arch == "crosscoder":
        assert stored.columns == ["token", "latent", "activation"]  # per token: no layer column to mistake for layer 0
        token = np.repeat(np.arange(values.shape[0]), K)
        expected = pl.DataFrame({"token": token, "latent": indices.reshape(-1).numpy(), "activation": values.reshape(-1).numpy()})
        active = np.zeros(n, dtype=bool)
        active[indices[values > 0].numpy()] = True
        dead = np.full(N_LAYERS, 1 - active.mean())  # a latent fires for a token, at every layer
        assert summary["sparsity_unit"] == "token" and "l0" not in metrics.columns
        np.testing.assert_allclose(metrics["l0_per_token"].to_numpy(), (values > 0).sum(dim=1).double().mean().item())
        np.testing.assert_allclose(metrics["l1_per_token"].to_numpy(), values.double().sum(dim=1).mean().item(), rtol=1e-6)
        dead_overall = 1 - active.mean()
    else:
        offsets = torch.arange(N_LAYERS)[None, :, None] * (n if arch == "per-layer" else 0)  # per-layer ids: l*n + j
        layer = np.broadcast_to(np.arange(N_LAYERS)[None, :, None], values.shape)
        token = np.broadcast_to(np.arange(values.shape[0])[:, None, None], values.shape)
        expected = pl.DataFrame({"token": token.reshape(-1), "layer": layer.reshape(-1), "latent": (indices + offsets).reshape(-1).numpy(),
                                 "activation": values.reshape(-1).numpy()})  # fmt: skip
        active = np.zeros((N_LAYERS, n), dtype=bool)
        for l in range(N_LAYERS):
            active[l, indices[:, l][values[:, l] > 0].numpy()] = True
        dead = 1 - active.mean(axis=1)
        assert summary["sparsity_unit"] == "vector"
        np.testing.assert_allclose(metrics["l1"].to_numpy(), values.double().sum(dim=2).mean(dim=0).numpy(), rtol=1e-6)
        # the MLSAE's latents are dead when never active at any layer; the suite's L*n when never active at their own
        dead_overall = 1 - active.mean() if arch == "per-layer" else 1 - active.any(axis=0).mean()
    key = [c for c in ("token", "layer", "latent") if c in expected.columns]
    expected = expected.filter(pl.col("activation") > 0).sort(key)
    assert stored.select(key).to_dicts() == expected.select(key).cast({c: stored[c].dtype for c in key}).to_dicts()
    np.testing.assert_allclose(stored["activation"].to_numpy(), expected["activation"].to_numpy(), rtol=1e-5)
    assert dead.min() > 0  # 64 latents, 60 test tokens: some never fire, so the check below can fail
    np.testing.assert_allclose(metrics["dead_fraction"].to_numpy(), dead)
    mean_row = layout.read_table(analysed[arch], layout.METRICS).filter(pl.col("layer") == "mean")
    assert mean_row["dead_every_layer"].item() == pytest.approx(dead_overall)
    assert summary["latents_total"] == (N_LAYERS * n if arch == "per-layer" else n)


def test_crosscoder_layer_profile(analysed):
    """s_j sums to 1 over layers, E[L | J] = sum_l l s_j(l), and the activation-weighted share equals a
    brute-force numpy sum over the test tokens of h_j[t] ||W_dec[j, l]||."""
    sae = load_sae(analysed["root"] / "run-crosscoder")
    table = layout.read_table(analysed["crosscoder"], layout.LATENT_LAYERS).sort("latent")
    shares = table.select(layer_prob_columns(table)).to_numpy()  # [n, L]
    np.testing.assert_allclose(shares.sum(axis=1), 1.0, rtol=1e-12)
    norms = torch.linalg.vector_norm(sae.W_dec.detach().double(), dim=2).numpy()  # [n, L]
    np.testing.assert_allclose(shares, norms**2 / (norms**2).sum(axis=1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(table["mean_layer"].to_numpy(), shares @ np.arange(N_LAYERS), rtol=1e-12)
    with torch.no_grad():
        values, indices = sae.encode(analysed["x"])  # [N, k]
    h = np.zeros((values.shape[0], sae.n_latents))  # [N, n] dense latents
    np.put_along_axis(h, indices.numpy(), values.double().numpy(), axis=1)
    written = np.einsum("tj,jl->jl", h, norms)  # [n, L] sum_t h_j[t] ||W_dec[j, l]||
    active = h.sum(axis=0) > 0
    weighted = table.select([f"{WEIGHTED_PREFIX}{l}" for l in range(N_LAYERS)]).to_numpy()  # [n, L], NaN: never active
    np.testing.assert_allclose(weighted[active], written[active] / written[active].sum(axis=1, keepdims=True), rtol=1e-6)
    assert np.isnan(weighted[~active]).all() and table["n_tokens"].to_numpy()[~active].sum() == 0
    np.testing.assert_array_equal(table["n_tokens"].to_numpy(), (h > 0).sum(axis=0))
    assert (analysed["crosscoder"] / f"{layout.WEIGHTED_HEATMAP_FIGURE}.png").exists()


def test_crosscoder_latent_living_in_one_layer_has_that_expected_layer(analysed, tmp_path):
    sae = load_sae(analysed["root"] / "run-crosscoder")
    with torch.no_grad():
        for latent, layer in ((0, 2), (1, 0), (2, 1)):  # blocks with their whole norm in one layer
            block = torch.zeros(N_LAYERS, D_MODEL)
            block[layer] = sae.W_dec[latent, layer] / torch.linalg.vector_norm(sae.W_dec[latent, layer])
            sae.W_dec[latent] = block
    save_sae(sae, tmp_path / "sae.safetensors")
    out = tmp_path / "analysis"
    assert analyse_main(["--run", str(tmp_path / "sae.safetensors"), "--shards", str(analysed["root"] / "test"), "--out",
                         str(out), "--no-downstream", "--no-progress"]) == 0  # fmt: skip
    table = layout.read_table(out, layout.LATENT_LAYERS).sort("latent")
    assert table["mean_layer"].to_list()[:3] == [2.0, 0.0, 1.0]
    assert table["var_layer"].to_list()[:3] == [0.0, 0.0, 0.0]


def test_per_layer_latents_live_in_their_layer(analysed):
    table = layout.read_table(analysed["per-layer"], layout.LATENT_LAYERS).sort("latent")
    n = layout.read_summary(analysed["per-layer"])["n_latents"]
    assert table["latent"].to_list() == list(range(N_LAYERS * n))
    assert table["mean_layer"].to_list() == [float(j // n) for j in range(N_LAYERS * n)]
    stored = scan_verified_latents(analysed["per-layer"]).collect()
    assert (stored["latent"] // n == stored["layer"]).all()  # every stored latent fires only at its own layer
    neighbours = layout.read_table(analysed["per-layer"], layout.NEIGHBOURS)
    assert (neighbours["latent"] // n == neighbours["neighbour"] // n).all()  # neighbours within each SAE


@pytest.mark.parametrize("arch", ARCHS)
def test_summary_page_and_compare_for_every_family(analysed, arch, tmp_path):
    folder = analysed[arch]
    summary = layout.read_summary(folder)
    test_cache = open_cache(analysed["root"] / "test")
    assert summary["cache_digest"] == test_cache.manifest[sf.MANIFEST_DIGEST]
    train_cache = open_cache(analysed["root"] / "train")
    assert [(e["path"], e["digest"], e["n_tokens"]) for e in summary["train_data"]] == [
        (str((analysed["root"] / "train").resolve()), train_cache.manifest[sf.MANIFEST_DIGEST], 100)]
    assert summary["downstream_sequences"] is None  # --no-downstream
    page = (folder / layout.PAGE).read_text()
    start = page.index('id="latent-data">') + len('id="latent-data">')
    data = json.loads(page[start : page.index("</script>", start)].replace("<\\/", "</"))
    assert data["n_latents"] == summary["latents_total"]
    assert ("ctx_layer" in data) == (arch != "crosscoder")  # a crosscoder context fired at every layer
    assert ("variance_ratios" in summary) == (arch == "mlsae")


def test_compare_runs_through_the_mlsae_analyse_entry_point(analysed, tmp_path, capsys):
    out = tmp_path / "compare"
    assert analyse_main(["compare", *(str(analysed[arch]) for arch in ARCHS), "--out", str(out)]) == 0
    table = pl.read_csv(out / "comparison.csv")
    assert table.filter(pl.col("layer") == "mean")["arch"].to_list() == list(ARCHS)
    assert "crosscoder" in capsys.readouterr().out


def test_crosscoder_splicing_all_layers_at_once(pythia_tokenizer_dir, tmp_path):
    """Every block's reconstruction is made from the clean states, so with every position kept, splicing all
    layers in one pass equals splicing the last one alone; a special position recomputed from the spliced
    earlier layers makes them differ."""
    model_dir = build_tiny_model(tmp_path / "neox", pythia_tokenizer_dir, n_layers=4, d_model=32, context=64)
    model = load_model(str(model_dir))
    layers = [0, 1, 2]
    crosscoder = Crosscoder(32, 64, 4, layers, generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))  # [N, S]
    reconstruct = make_reconstructor(crosscoder, layers, None)
    kept = torch.ones_like(ids, dtype=torch.bool)
    table = downstream_metrics(model, ids, kept, layers, reconstruct, 2, False, splice_all=True)
    per_layer, everything = table.filter(pl.col("layer").is_not_null()), table.filter(pl.col("layer").is_null())
    assert per_layer["layer"].to_list() == layers and everything.height == 1
    assert (per_layer["kl_per_token"].to_numpy() > 1e-4).all()
    for column in ("ce_spliced", "delta_ce", "kl_per_token"):
        assert everything[column].item() == pytest.approx(per_layer[column][-1], rel=1e-6, abs=1e-9)
    kept[:, 5] = False  # a special position: recomputed by blocks 1 and 2 from the spliced blocks before them
    partial = downstream_metrics(model, ids, kept, layers, reconstruct, 2, False, splice_all=True)
    assert partial.filter(pl.col("layer").is_null())["kl_per_token"].item() != pytest.approx(partial["kl_per_token"][2], rel=1e-3)
    # the crosscoder's splice at layer l is its reconstruction of layer l from all the clean layers
    plain = downstream_metrics(model, ids, kept, layers, reconstruct, 2, False, reuse_prefix=False, splice_all=True)
    np.testing.assert_allclose(plain["kl_per_token"].to_numpy(), partial["kl_per_token"].to_numpy(), rtol=1e-5, atol=1e-9)


SEQ_LEN = 32


@pytest.fixture(scope="module")
def lm_runs(pythia_tokenizer_dir, tmp_path_factory) -> dict:
    """A tiny GPT-NeoX, its train and test caches, a per-layer suite and a crosscoder trained on the first and
    analysed on the second with delta CE and KL (2 sequences spliced)."""
    root = tmp_path_factory.mktemp("families-lm")
    model = build_tiny_model(root / "neox", pythia_tokenizer_dir, n_layers=3, d_model=32, context=64)
    text = write_english(root / "text", n_files=2, words_per_file=60)
    for name, n_sequences in (("train", 4), ("test", 3)):
        assert cache_main(["--model", str(model), "--dataset", str(text), "--out", str(root / name), "--seq-len",
                           str(SEQ_LEN), "--tokens", str(SEQ_LEN * n_sequences), "--no-progress"]) == 0  # fmt: skip
    out = {"model": model, "test": root / "test"}
    for arch in ("per-layer", "crosscoder"):
        run = train(TrainConfig(shards=[str(root / "train")], out=str(root / f"run-{arch}"), arch=arch, expansion_factor=2,
                                k=4, batch_tokens=64, epochs=1, progress=False, verify=False))  # fmt: skip
        assert analyse_main(["--run", str(run), "--shards", str(root / "test"), "--out", str(root / arch),
                             "--downstream-sequences", "2", "--no-progress"]) == 0  # fmt: skip
        out[arch] = root / arch
        out[f"run-{arch}"] = run
    return out


def _reference_splice(lm_runs, reconstruct) -> pl.DataFrame:
    cache = open_cache(lm_runs["test"])
    sequences = np.arange(2)
    kept = kept_positions(cache.token_table(), sequences, SEQ_LEN)
    ids = torch.from_numpy(cache.sequence_tokens(sequences))
    return downstream_metrics(load_model(str(lm_runs["model"])), ids, kept, cache.layers, reconstruct, 4, False, reuse_prefix=False)


def test_per_layer_suite_splices_each_layers_own_sae(lm_runs):
    """Delta CE and KL of the suite at layer l are those of SAE l alone (the other layers' inputs are zeros)."""
    sae = load_sae(lm_runs["run-per-layer"])

    def sae_of_layer(hidden: torch.Tensor, index: int) -> torch.Tensor:  # [n, d] -> [n, d], only SAE `index` sees data
        x = torch.zeros(hidden.shape[0], len(sae.layers), hidden.shape[1])
        x[:, index] = hidden.float()
        return sae(x)[:, index].to(hidden.dtype)

    expected = _reference_splice(lm_runs, sae_of_layer)
    metrics = layout.read_table(lm_runs["per-layer"], layout.METRICS).filter(pl.col("layer") != "mean")
    for column in ("delta_ce", "kl_per_token"):
        np.testing.assert_allclose(metrics[column].to_numpy(), expected[column].to_numpy(), rtol=1e-4, atol=1e-7)
    summary = layout.read_summary(lm_runs["per-layer"])
    assert summary["downstream_sequences"] == 2 and summary["splice_all_layers"] is None
    assert not (lm_runs["per-layer"] / layout.SPLICE_ALL_LAYERS).exists()


def test_crosscoder_analysis_splices_every_layer_at_once_too(lm_runs):
    sae = load_sae(lm_runs["run-crosscoder"])
    cache = open_cache(lm_runs["test"])
    sequences = np.arange(2)
    kept = kept_positions(cache.token_table(), sequences, SEQ_LEN)
    ids = torch.from_numpy(cache.sequence_tokens(sequences))
    expected = downstream_metrics(load_model(str(lm_runs["model"])), ids, kept, cache.layers,
                                  make_reconstructor(sae, cache.layers, None), 4, False, reuse_prefix=False, splice_all=True)  # fmt: skip
    metrics = layout.read_table(lm_runs["crosscoder"], layout.METRICS).filter(pl.col("layer") != "mean")
    np.testing.assert_allclose(metrics["delta_ce"].to_numpy(), expected["delta_ce"].to_numpy()[:-1], rtol=1e-4, atol=1e-7)
    every = layout.read_table(lm_runs["crosscoder"], layout.SPLICE_ALL_LAYERS)
    assert every["delta_ce"].item() == pytest.approx(expected["delta_ce"][-1], rel=1e-4, abs=1e-7)
    summary = layout.read_summary(lm_runs["crosscoder"])
    assert summary["downstream_sequences"] == 2
    assert summary["splice_all_layers"]["kl_per_token"] == pytest.approx(every["kl_per_token"].item())
    assert (lm_runs["crosscoder"] / layout.PAGE).exists()


def test_report_gathers_the_mlsae_and_links_the_other_families(analysed, tmp_path, capsys):
    """mlsae-analyse report makes the paper's MLSAE tables: other families are named, left out of them, linked."""
    out = tmp_path / "report"
    assert analyse_main(["report", *(str(analysed[arch]) for arch in ARCHS), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and str(analysed["crosscoder"]) in err and "mlsae-analyse compare" in err
    assert pl.read_csv(out / layout.REPORT_RUNS)["dir"].to_list() == [str(analysed["mlsae"])]
    page = (out / layout.PAGE).read_text()
    assert all(f"{arch}/report.html" in page for arch in ARCHS)
    assert analyse_main(["report", str(analysed["crosscoder"]), "--out", str(tmp_path / "none")]) == 2
    assert_one_line_error(capsys.readouterr().err, "none of the analyses given is of an MLSAE run")
    assert not (tmp_path / "none").exists()

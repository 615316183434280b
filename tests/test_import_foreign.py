"""Other tools' SAEs as a per-layer baseline (issue 14 part 2): folders that sparsify (and SAELens) write
themselves from small random SAEs load through ``load_sae`` and reproduce the tool's own encode and forward; a
hand-built SAELens-style SAE matches a brute-force reference of its formula; ``mlsae-analyse`` and ``mlsae-analyse
compare`` accept them (trained elsewhere, on the layers all runs share); bad folders are refused in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from interop import require
from models import assert_one_line_error

from mlsae_analysis import layout
from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.inputs import _check_imported
from mlsae_analysis.compare import AnalysedRun, check_comparable
from mlsae_analysis.compare import main as compare_main
from mlsae_cache.errors import MlsaeError
from mlsae_cache.writer import write_array_cache
from mlsae_train import load_sae
from mlsae_train.cli import main as train_main
from mlsae_train.formats import ForeignTopK, foreign_sae_dirs
from mlsae_train.imported import ImportedTopKSAEs, load_imported

D, N_LATENTS, K = 8, 32, 3
LAYERS = [0, 1, 2]


def _sparsify_sae(seed: int, k: int = K, dtype: torch.dtype | None = None, **cfg):
    """A sparsify SparseCoder with random weights (a nonzero b_dec), as sparsify itself builds it."""
    sparsify = require("sparsify", "eai-sparsify")
    torch.manual_seed(seed)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=N_LATENTS, k=k, **cfg), dtype=dtype)
    with torch.no_grad():
        for param in coder.parameters():
            param.normal_()
    return coder


def _sparsify_run(folder: Path, layers: list[int], model: str | None = "m", seed: int = 0) -> dict[int, object]:
    """A sparsify training run's folder: layers.N subfolders written by save_to_disk, and its config.json."""
    coders = {layer: _sparsify_sae(seed + layer) for layer in layers}
    for layer, coder in coders.items():
        coder.save_to_disk(folder / f"layers.{layer}")
    if model is not None:
        (folder / "config.json").write_text(json.dumps({"model": model, "sae": {"k": K}, "hookpoints": []}))
    return coders


# ---- sparsify: the tool's own encode and forward, exactly ----


def test_sparsify_run_reproduces_sparsifys_encode_and_forward(tmp_path):
    coders = _sparsify_run(tmp_path / "run", [2, 0])
    sae = load_sae(tmp_path / "run")
    assert isinstance(sae, ImportedTopKSAEs) and sae.arch == "per-layer" and sae.layers == [0, 2]
    assert tuple(sae.W_dec.shape) == (2, N_LATENTS, D) and tuple(sae.b_enc.shape) == (2, N_LATENTS)
    x = torch.randn(64, 2, D) * 3 + 1  # [N, L, d]
    values, indices = sae.encode(x)
    recon = sae.reconstruct(x)
    x_hat = sae(x)
    for position, layer in enumerate(sae.layers):
        coder = coders[layer]
        with torch.no_grad():
            own = coder.encode(x[:, position])
            own_x_hat = coder(x[:, position]).sae_out
            own_decoded = coder.decode(own.top_acts, own.top_indices)
        own_indices, order = own.top_indices.sort(dim=-1)
        mine_indices, mine_order = indices[:, position].sort(dim=-1)
        assert torch.equal(mine_indices, own_indices)
        torch.testing.assert_close(values[:, position].gather(-1, mine_order), own.top_acts.gather(-1, order), rtol=1e-5, atol=0)
        torch.testing.assert_close(x_hat[:, position], own_x_hat, rtol=1e-5, atol=1e-5 * own_x_hat.abs().max().item())
        torch.testing.assert_close(x_hat[:, position], own_decoded, rtol=1e-5, atol=1e-5 * own_x_hat.abs().max().item())
        # the test would catch an encoder that forgot to subtract b_dec: those latents are not sparsify's
        without_b_dec = torch.nn.functional.linear(x[:, position], coder.encoder.weight, coder.encoder.bias).topk(K).indices
        assert not torch.equal(without_b_dec.sort(dim=-1).values, own_indices)
    # reconstruct(): the same codes and x_hat, in raw space (mean 0, scale 1: sparsify does not normalise)
    assert torch.equal(recon.values.view(64, 2, K), values) and torch.equal(recon.indices.view(64, 2, K), indices)
    assert torch.equal(recon.x_hat.view(x.shape), x_hat) and torch.equal(recon.z.view(x.shape), x)
    assert torch.equal(recon.mean, torch.zeros(128, 1)) and torch.equal(recon.scale, torch.ones(128, 1))
    assert recon.aux_values.shape == (128, 0)
    config = sae.config()
    assert json.loads(json.dumps(config)) == config and config["imported"] is True
    assert [source["path"] for source in config["sources"]] == [str((tmp_path / "run" / f"layers.{l}").resolve()) for l in (0, 2)]
    assert all(source["model"] == "m" and source["format"] == "sparsify" for source in sae.sources)
    assert "raw residual vectors" in sae.normalisation and "raw residual vectors" in config["normalisation"]


def test_one_sparsify_folder_in_bfloat16_loads_as_float32(tmp_path):
    coder = _sparsify_sae(3, dtype=torch.bfloat16, multi_topk=True)
    coder.save_to_disk(tmp_path / "gpt_neox.layers.4")
    sae = load_sae(tmp_path / "gpt_neox.layers.4")
    assert sae.layers == [4] and sae.W_enc.dtype == torch.float32 and sae.k == K
    assert torch.equal(sae.W_enc[0], coder.encoder.weight.float()) and torch.equal(sae.b_dec[0], coder.b_dec.float())
    assert "multi-TopK" in sae.sources[0]["note"]  # read with its k, as sparsify infers


def test_a_tuned_lens_cache_is_refused_for_imported_saes():
    sae = ImportedTopKSAEs([ForeignTopK(torch.randn(N_LATENTS, D), torch.zeros(N_LATENTS), torch.randn(N_LATENTS, D), torch.zeros(D),
                                        K, 0, "none", source={"model": "m"})])  # fmt: skip
    lens_cache = SimpleNamespace(manifest={"model": "m", "lens": {"path": "lens/"}})
    with pytest.raises(MlsaeError, match="tuned-lens activations but the imported SAEs"):
        _check_imported(sae, Path("run"), "cache", lens_cache)
    assert _check_imported(sae, Path("run"), "cache", SimpleNamespace(manifest={"model": "/models/M", "lens": None})) == []


# ---- a hand-built SAELens-style SAE against the formula written out ----


def _brute_force(sae: ForeignTopK, x: torch.Tensor) -> tuple[list[set[int]], torch.Tensor, torch.Tensor]:
    """Row by row in float64: the latents, their values (by latent) and x_hat of base.py's forward (SAELens's)."""
    W_enc, b_enc, W_dec, b_dec = (t.double() for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    norms = W_dec.norm(dim=1)
    chosen, acts, x_hats = [], torch.zeros(x.shape[0], W_enc.shape[0], dtype=torch.float64), []
    for row, vector in enumerate(x.double()):
        mean, std = vector.mean(), vector.std()  # torch.std: the sample std, as SAELens's layer_norm
        u = (vector - mean) / (std + sae.eps) if sae.input_norm == "standardize" else vector
        pre = W_enc @ (u - b_dec * sae.apply_b_dec_to_input) + b_enc
        if sae.rescale_acts_by_decoder_norm:
            pre = pre * norms
        top = sorted(range(len(pre)), key=lambda j: -pre[j].item())[: sae.k]
        chosen.append(set(top))
        u_hat = b_dec.clone()
        for j in top:
            h = max(pre[j].item(), 0.0)
            acts[row, j] = h
            u_hat += (h / norms[j] if sae.rescale_acts_by_decoder_norm else h) * W_dec[j]
        x_hats.append(u_hat * std + mean if sae.input_norm == "standardize" else u_hat)
    return chosen, acts, torch.stack(x_hats)


@pytest.mark.parametrize("rescale", [False, True])
def test_hand_built_standardising_sae_follows_the_formula(rescale):
    generator = torch.Generator().manual_seed(5)

    def foreign(layer: int, apply_b_dec: bool) -> ForeignTopK:
        rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
        return ForeignTopK(rand(N_LATENTS, D), rand(N_LATENTS), rand(N_LATENTS, D) * 2, rand(D), K, layer, "standardize",
                           apply_b_dec_to_input=apply_b_dec, rescale_acts_by_decoder_norm=rescale, eps=1e-3,
                           source={"format": "hand", "path": f"hand/{layer}"})  # fmt: skip

    saes = [foreign(3, True), foreign(1, False)]
    sae = ImportedTopKSAEs(saes)
    assert sae.layers == [1, 3] and "layer_norm" in sae.normalisation
    x = torch.randn(20, 2, D, generator=generator) * 5 + 2
    values, indices = sae.encode(x)
    recon = sae.reconstruct(x)
    for position, foreign_sae in enumerate(sorted(saes, key=lambda s: s.layer)):
        chosen, acts, x_hat = _brute_force(foreign_sae, x[:, position])
        assert [set(row.tolist()) for row in indices[:, position]] == chosen
        np.testing.assert_allclose(values[:, position].double(), acts.gather(1, indices[:, position]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(recon.x_hat.view(x.shape)[:, position].double(), x_hat, rtol=1e-5, atol=1e-5)
        centred = x[:, position] - x[:, position].mean(dim=-1, keepdim=True)
        scale = recon.scale.view(20, 2)[:, position]
        torch.testing.assert_close(scale, centred.std(dim=-1) + 1e-3)  # what our Reconstruction calls scale: std + eps


def test_imported_saes_are_for_analysis_only():
    sae = ImportedTopKSAEs([ForeignTopK(torch.randn(N_LATENTS, D), torch.zeros(N_LATENTS), torch.randn(N_LATENTS, D), torch.zeros(D),
                                        K, 0, "none")])  # fmt: skip
    for call in (sae.normalize_decoder_, lambda: sae.init_b_pre_(torch.zeros(4, 1, D)), lambda: sae.k_aux,
                 lambda: sae.reconstruct(torch.zeros(4, 1, D), dead_latents=torch.tensor([1]))):  # fmt: skip
        with pytest.raises(MlsaeError, match="for analysis only"):
            call()
    recon = sae.reconstruct(torch.randn(4, 1, D))
    active = sae.active_latents(recon)  # [L, n]: what a dead-latent count would read
    assert active.shape == sae.dead_shape == (1, N_LATENTS) and int(active.sum()) == len(set(recon.indices.flatten().tolist()))


# ---- refusals, in one line ----


def test_no_sae_and_an_inconsistent_sae_are_refused():
    with pytest.raises(MlsaeError, match="no SAE to import"):
        load_imported([])
    bad = ForeignTopK(torch.randn(N_LATENTS, D), torch.zeros(N_LATENTS), torch.randn(N_LATENTS, D + 1), torch.zeros(D), K, 0, "none")
    with pytest.raises(MlsaeError, match="is inconsistent"):
        ImportedTopKSAEs([bad])


def test_bad_folders_are_refused_in_one_line(tmp_path, capsys):
    cache = write_array_cache(tmp_path / "cache", np.zeros((8, 3, D), np.float32), model="m", seq_len=8)

    def refused(folder: Path, *fragments: str) -> None:
        assert analyse_main(["--run", str(folder), "--shards", str(cache), "--out", str(tmp_path / "out"), "--no-downstream",
                             "--no-progress"]) == 2  # fmt: skip
        assert_one_line_error(capsys.readouterr().err, *fragments)
        assert not (tmp_path / "out").exists()

    _sparsify_sae(0).save_to_disk(tmp_path / "dup" / "layers.1")
    _sparsify_sae(1).save_to_disk(tmp_path / "dup" / "gpt_neox.layers.1")
    refused(tmp_path / "dup", "two SAEs read layer 1")
    _sparsify_sae(0).save_to_disk(tmp_path / "k" / "layers.0")
    _sparsify_sae(1, k=K + 1).save_to_disk(tmp_path / "k" / "layers.1")
    refused(tmp_path / "k", "differ in their k", f"{K} at layer 0", f"{K + 1} at layer 1")
    _sparsify_sae(0).save_to_disk(tmp_path / "mlp" / "layers.3.mlp")
    refused(tmp_path / "mlp" / "layers.3.mlp", "'layers.3.mlp'", "not a block's output")
    _sparsify_sae(0, activation="groupmax").save_to_disk(tmp_path / "groupmax" / "layers.0")
    refused(tmp_path / "groupmax", "'groupmax' activation")
    _sparsify_sae(0, skip_connection=True).save_to_disk(tmp_path / "skip" / "layers.0")
    refused(tmp_path / "skip", "skip connection")
    _sparsify_sae(0).save_to_disk(tmp_path / "torn" / "layers.0")
    weights = tmp_path / "torn" / "layers.0" / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    refused(tmp_path / "torn", "sae.safetensors is not a readable sparsify SAE")


# ---- the analysis and the comparison ----


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict:
    """An MLSAE trained by mlsae-train on layers 0-2 and analysed; sparsify runs at layers 0 and 2 and at 0-2
    analysed on the same test cache."""
    root = tmp_path_factory.mktemp("imported")
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(112, len(LAYERS), D)).astype(np.float32) * 2 + 0.5
    train = write_array_cache(root / "train", acts[:64], layers=LAYERS, model="m", seq_len=8)
    test = write_array_cache(root / "test", acts[64:], layers=LAYERS, model="m", seq_len=8)
    assert train_main(["--shards", str(train), "--out", str(root / "mlsae-run"), "--expansion-factor", "4", "-k", str(K),
                       "--batch-tokens", "16", "--no-progress", "--seed", "1"]) == 0  # fmt: skip
    out = {"root": root, "test": test, "x": torch.from_numpy(acts[64:])}
    _sparsify_run(root / "sparsify-02", [0, 2])
    _sparsify_run(root / "sparsify-all", LAYERS, model="EleutherAI/m")  # the same model's name in another spelling
    for name in ("mlsae-run", "sparsify-02", "sparsify-all"):
        assert analyse_main(["--run", str(root / name), "--shards", str(test), "--out", str(root / f"{name}-analysis"),
                             "--no-downstream", "--no-progress", "--batch-tokens", "16"]) == 0  # fmt: skip
        out[name] = root / f"{name}-analysis"
    return out


def test_analysis_of_a_sparsify_run_records_the_import(analysed):
    summary = layout.read_summary(analysed["sparsify-02"])
    assert summary["arch"] == "per-layer" and summary["layers"] == [0, 2] and summary["k"] == K
    assert summary["train_data"] is None and summary["training"] is None and summary["warnings"] == []
    imported = summary["imported"]
    assert imported["formats"] == ["sparsify"] and "raw residual vectors" in imported["normalisation"]
    assert [source["hook"] for source in imported["sources"]] == ["layers.0", "layers.2"]
    assert layout.read_summary(analysed["mlsae-run"])["imported"] is None
    # the metrics are those of sparsify's own forward (not a standardising one)
    sae = load_sae(analysed["root"] / "sparsify-02")
    x = analysed["x"][:, [0, 2]].double()
    with torch.no_grad():
        x_hat = sae(analysed["x"][:, [0, 2]]).double()
    fvu = (x - x_hat).square().sum(dim=(0, 2)) / (x - x.mean(dim=0)).square().sum(dim=(0, 2))
    metrics = layout.read_table(analysed["sparsify-02"], layout.METRICS).filter(pl.col("layer") != "mean")
    np.testing.assert_allclose(metrics["fvu"].to_numpy(), fvu.numpy(), rtol=1e-5)
    page = next(analysed["sparsify-02"].glob("*.html")).read_text()
    assert "trained elsewhere" in page and "sparsify SAEs" in page


def test_another_models_name_is_a_warning_not_a_refusal(analysed, tmp_path, capsys):
    _sparsify_run(tmp_path / "run", [0], model="EleutherAI/pythia-70m")
    assert analyse_main(["--run", str(tmp_path / "run"), "--shards", str(analysed["test"]), "--out", str(tmp_path / "out"),
                         "--no-downstream", "--no-progress", "--max-tokens", "8"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning: the imported SAEs" in err and "EleutherAI/pythia-70m" in err
    assert any("pythia-70m" in line for line in layout.read_summary(tmp_path / "out")["warnings"])


def test_an_mlsae_run_is_never_taken_for_a_sparsify_folder(analysed):
    run = analysed["root"] / "mlsae-run"
    assert (run / "config.json").is_file() and (run / "sae.safetensors").is_file()
    assert foreign_sae_dirs(run) is None and not isinstance(load_sae(run), ImportedTopKSAEs)
    assert layout.read_summary(analysed["mlsae-run"])["train_data"]  # its own config.json was read as ours


def test_compare_on_the_shared_layers_says_trained_elsewhere(analysed, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_main([str(analysed["mlsae-run"]), str(analysed["sparsify-02"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(sparsify, trained elsewhere)" in printed and "training cache is not checked" in printed
    assert "Compared on the layers all runs share (0, 2); left out: mlsae-run-analysis [1] " in printed
    assert "not matched" not in printed
    assert "match_per_layer: E[L | J] of mlsae-run-analysis vs the best-matching layer of sparsify-02-analysis " \
           "(SAEs at layers [0, 2] only, none at [1]: the best layer among those): " in printed  # fmt: skip
    table = pl.read_csv(out / "comparison.csv", infer_schema_length=None)
    mlsae_rows = table.filter(pl.col("arch") == "mlsae")
    assert mlsae_rows["layer"].cast(pl.String).to_list() == ["0", "2", "mean"]
    written = layout.read_table(analysed["mlsae-run"], layout.METRICS).filter(pl.col("layer").is_in(["0", "2"]))["fvu"]
    assert mlsae_rows["fvu"][-1] == pytest.approx(float(written.cast(pl.Float64).mean()))
    # the matching on the MLSAE's layer axis 0, 1, 2 with layer 1 empty, recomputed by brute force
    mlsae, imported = load_sae(analysed["root"] / "mlsae-run"), load_sae(analysed["root"] / "sparsify-02")
    rows = torch.nn.functional.normalize(mlsae.W_dec.detach().double(), dim=1).numpy()  # [n, d]
    decoders = torch.nn.functional.normalize(imported.W_dec.detach().double(), dim=2).numpy()  # [2, m, d]: layers 0, 2
    brute = np.full((rows.shape[0], len(LAYERS)), np.nan)  # [n, 3]
    brute[:, [0, 2]] = np.stack([(rows @ layer.T).max(axis=1) for layer in decoders], axis=1)
    match = pl.read_parquet(out / "match_per_layer.parquet").sort("latent")
    sims = match.select([f"sim_layer_{l}" for l in LAYERS])
    assert sims["sim_layer_1"].null_count() == match.height and sims["sim_layer_0"].null_count() == 0
    np.testing.assert_allclose(sims.to_numpy(), brute, rtol=1e-5, atol=1e-6)  # NaN where null, on both sides
    best_position = np.where(brute[:, 2] > brute[:, 0], 2, 0)  # [n] on the MLSAE's axis; layer 1 never
    close = np.abs(brute[:, 2] - brute[:, 0]) < 1e-5  # float ties may go either way
    assert (match["best_layer"].to_numpy()[~close] == best_position[~close]).all()
    assert set(match["best_layer"].to_list()) <= {0, 2}
    latent_layers = layout.read_table(analysed["mlsae-run"], layout.LATENT_LAYERS)
    expected = np.full(rows.shape[0], np.nan)
    expected[latent_layers["latent"].to_numpy()] = latent_layers["mean_layer"].to_numpy()
    np.testing.assert_array_equal(match["expected_layer"].fill_null(np.nan).to_numpy(), expected)
    summary = json.loads((out / "match_per_layer.json").read_text())
    assert summary["layers"] == LAYERS and summary["layers_without_sae"] == [1] and summary["best_layer_counts"]["1"] == 0
    active = np.isfinite(expected)
    best = match["best_layer"].to_numpy()[active].astype(float)  # positions = block numbers here (layers 0, 1, 2)
    assert summary["n_active"] == active.sum() and sum(summary["best_layer_counts"].values()) == active.sum()
    assert summary["reason"] is None  # both layers win some latents (14 and 18 of 32 here)

    def ranks(values: np.ndarray) -> np.ndarray:  # 1 + #below + (#equal others) / 2: ties share their mean rank
        return 1 + (values[None, :] < values[:, None]).sum(1) + ((values[None, :] == values[:, None]).sum(1) - 1) / 2

    assert summary["pearson"] == pytest.approx(np.corrcoef(expected[active], best)[0, 1], abs=1e-9)
    assert summary["spearman"] == pytest.approx(np.corrcoef(ranks(expected[active]), ranks(best))[0, 1], abs=1e-9)


def test_compare_matches_the_mlsae_against_a_full_imported_suite(analysed, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare_main([str(analysed["mlsae-run"]), str(analysed["sparsify-all"]), "--out", str(out)]) == 0
    assert "Compared on the layers" not in capsys.readouterr().out
    mlsae, imported = load_sae(analysed["root"] / "mlsae-run"), load_sae(analysed["root"] / "sparsify-all")
    rows = torch.nn.functional.normalize(mlsae.W_dec.detach().double(), dim=1)  # [n, d]
    layers = torch.nn.functional.normalize(imported.W_dec.detach().double(), dim=2)  # [L, m, d]
    brute = torch.stack([(rows @ layer.T).max(dim=1).values for layer in layers], dim=1)  # [n, L]
    table = pl.read_parquet(out / "match_per_layer.parquet")
    np.testing.assert_allclose(table.select([f"sim_layer_{l}" for l in LAYERS]).to_numpy(), brute.numpy(), rtol=1e-5, atol=1e-6)


def _run(folder: str, layers: list[int], imported: bool, train_tokens: int = 64) -> AnalysedRun:
    """A hand-made analysed run: only what check_comparable reads."""
    summary = {"run": f"/runs/{folder}", "layers": layers, "d_model": D, "imported": {"formats": ["sparsify"]} if imported else None}
    test_cache = {"path": "/test", "n_tokens": 8, "model": "m", "lens": None, "digest": "sha256:x"}
    train_data = [] if imported else [{"model": "m", "n_tokens": train_tokens, "path": "/train", "digest": None}]
    per_layer = pl.DataFrame({"layer": layers})
    return AnalysedRun(Path(f"/analyses/{folder}"), summary, "per-layer" if imported else "mlsae", per_layer, train_data, test_cache, {})


def test_comparable_layers_and_training_caches():
    check_comparable([_run("a", [0, 1, 2], False), _run("b", [2, 3], True)])  # share layer 2
    with pytest.raises(MlsaeError, match=r"share no layer") as refused:
        check_comparable([_run("a", [0, 1], False), _run("b", [2, 3], True)])
    assert "\n" not in str(refused.value)
    with pytest.raises(MlsaeError, match="cover different layers"):  # our own runs still on the same layers
        check_comparable([_run("a", [0, 1], False), _run("i", [1], True), _run("b", [0], False)])
    with pytest.raises(MlsaeError, match="trained on different caches"):  # ... and the same training cache
        check_comparable([_run("i", [1], True), _run("a", [0, 1], False), _run("b", [0, 1], False, train_tokens=32)])


# ---- SAELens: folders it writes itself ----


def test_saelens_topk_folders_reproduce_saelens_encode_and_decode(tmp_path):
    sae_lens = require("sae_lens", "sae-lens")
    from sae_lens.saes.sae import SAEMetadata

    saes = {}
    for layer, norm in ((1, "layer_norm"), (3, "none")):
        torch.manual_seed(layer)
        cfg = sae_lens.TopKSAEConfig(d_in=D, d_sae=N_LATENTS, k=K, normalize_activations=norm, rescale_acts_by_decoder_norm=layer == 3,
                                     metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post", model_name="m"))  # fmt: skip
        saes[layer] = sae_lens.TopKSAE(cfg)
        with torch.no_grad():
            for param in saes[layer].parameters():
                param.normal_()
        saes[layer].save_model(tmp_path / "run" / f"layer-{layer}")
    sae = load_sae(tmp_path / "run")
    assert isinstance(sae, ImportedTopKSAEs) and sae.layers == [1, 3]
    assert [source["format"] for source in sae.sources] == ["saelens", "saelens"]
    x = torch.randn(40, 2, D) * 4 + 1
    values, indices = sae.encode(x)
    x_hat = sae(x)
    for position, layer in enumerate(sae.layers):
        with torch.no_grad():
            acts = saes[layer].encode(x[:, position])  # [N, n] dense
            own_x_hat = saes[layer].decode(acts)
        own = acts.topk(K, dim=-1)
        assert torch.equal(indices[:, position].sort(dim=-1).values, own.indices.sort(dim=-1).values)
        torch.testing.assert_close(values[:, position], acts.gather(1, indices[:, position]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_hat[:, position], own_x_hat, rtol=1e-5, atol=1e-5 * math.ceil(own_x_hat.abs().max().item()))


# ---- splicing: delta CE and KL of imported SAEs are those of the tool's own forward ----


def test_splicing_imported_saes_splices_each_tools_own_forward(pythia_tokenizer_dir, tmp_path):
    """The analysis splices ``sae(x)`` of an imported per-layer baseline into the model: the same delta CE and KL
    as splicing sparsify's own forward of each layer's SAE."""
    from models import build_tiny_model

    from mlsae_analysis.downstream import downstream_metrics, make_reconstructor
    from mlsae_cache.lm import load_model

    sparsify = require("sparsify", "eai-sparsify")
    model = load_model(str(build_tiny_model(tmp_path / "neox", pythia_tokenizer_dir, n_layers=3, d_model=32, context=64)))
    layers, coders = [0, 2], {}
    for layer in layers:
        torch.manual_seed(layer)
        coders[layer] = sparsify.SparseCoder(32, sparsify.SparseCoderConfig(num_latents=64, k=4))
        with torch.no_grad():
            for param in coders[layer].parameters():
                param.normal_(std=0.5)
        coders[layer].save_to_disk(tmp_path / "run" / f"layers.{layer}")
    sae = load_sae(tmp_path / "run")
    ids = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))  # [N, S]
    kept = torch.ones_like(ids, dtype=torch.bool)
    kept[:, 0] = False  # a position the cache left out stays clean in both
    ours = downstream_metrics(model, ids, kept, layers, make_reconstructor(sae, layers, None), 2, False)

    def sparsify_forward(hidden: torch.Tensor, index: int) -> torch.Tensor:  # hidden [n, d] of layers[index]
        with torch.no_grad():
            return coders[layers[index]](hidden.float()).sae_out.to(hidden.dtype)

    theirs = downstream_metrics(model, ids, kept, layers, sparsify_forward, 2, False)
    assert ours["layer"].to_list() == layers
    assert (ours["kl_per_token"].to_numpy() > 1e-3).all()  # the splices change the model's predictions
    for column in ("ce_spliced", "delta_ce", "kl_per_token"):
        np.testing.assert_allclose(ours[column].to_numpy(), theirs[column].to_numpy(), rtol=1e-4, atol=1e-6)

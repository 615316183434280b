"""The SAELens format (issue 14): ``mlsae-export saelens`` writes folders that SAELens's own loader reads and
whose encode/decode give our latents and reconstructions; SAELens's own folders read back into a ForeignTopK
holding its tensors and reproducing its forward; everything else is refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from interop import require
from models import assert_one_line_error, tiny_config
from safetensors.torch import load_file, save_file

from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files
from mlsae_cache.writer import write_array_cache
from mlsae_export.cli import main as export_main
from mlsae_train import MultiLayerSAE, PerLayerSAEs, load_sae
from mlsae_train.cli import main as train_main
from mlsae_train.formats.base import ForeignTopK
from mlsae_train.formats.saelens import SAELENS

D, N, K, LAYERS = 32, 96, 5, [0, 2, 3]
HF_BLOCKS = {"gpt_neox": "gpt_neox.layers", "llama": "model.layers"}  # where each architecture keeps its blocks


@pytest.fixture(scope="module")
def sae_lens():
    return require("sae_lens", "sae-lens")


def model_config_dir(root: Path, arch: str) -> Path:
    """A model directory holding only a tiny config.json (the export reads no weights)."""
    tiny_config(arch, n_layers=4, d_model=D).save_pretrained(root / arch)
    return root / arch


def run_info(model: Path, layers=LAYERS) -> dict:
    """A run's config.json as mlsae-train writes it (the parts the export reads)."""
    return {"config": {"shards": [], "seed": 0}, "total_steps": 10,
            "data": [{"model": str(model), "n_tokens": 64, "layers": layers, "d_model": D, "lens": None}]}  # fmt: skip


def random_dictionary(arch: str, seed: int = 0):
    """An MLSAE or per-layer suite with random weights (each layer's own for the suite) and a nonzero b_pre."""
    g = torch.Generator().manual_seed(seed)
    sae = {"mlsae": MultiLayerSAE, "per-layer": PerLayerSAEs}[arch](D, N, K, LAYERS, generator=g)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec, sae.b_pre):
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def activations(n: int = 64, seed: int = 1) -> torch.Tensor:
    """x [n, L, d] with per-vector offsets and scales from 0.5 to 50 (standardisation matters)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(np.log10(0.5), np.log10(50), n * len(LAYERS))[torch.randperm(n * len(LAYERS), generator=g)]
    offset = 5 * torch.randn(n, len(LAYERS), 1, generator=g)
    return torch.randn(n, len(LAYERS), D, generator=g) * scale.view(n, len(LAYERS), 1) + offset


def assert_saelens_computes_as_we_do(sae_lens, folder: Path, sae, x: torch.Tensor, position: int) -> None:
    """SAELens's own loader reads ``folder``; its encode gives our k latents of layer ``position`` (values to 1e-5
    relative) and its decode(encode(x)) our reconstruction to 1e-4 relative."""
    loaded = sae_lens.SAE.load_from_disk(folder)
    assert type(loaded).__name__ == "TopKSAE"
    xl = x[:, position]  # [n, d]
    with torch.no_grad():
        theirs = loaded.encode(xl)  # [n, N] dense
        values, indices = sae.encode(x)  # [n, L, k]
        ours = torch.zeros_like(theirs).scatter(1, indices[:, position], values[:, position])
        assert torch.equal(theirs != 0, ours != 0)  # the same active latents
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))
        recon, ours_recon = loaded.decode(theirs), sae(x)[:, position]
    error = torch.linalg.vector_norm(recon - ours_recon, dim=-1) / torch.linalg.vector_norm(ours_recon, dim=-1)
    assert float(error.max()) < 1e-4, float(error.max())


@pytest.mark.parametrize(("arch", "model_arch"), [("mlsae", "gpt_neox"), ("per-layer", "llama")])
def test_exported_layers_load_in_saelens_and_compute_our_latents(sae_lens, tmp_path, arch, model_arch):
    sae = random_dictionary(arch)
    model = model_config_dir(tmp_path, model_arch)
    folders = SAELENS.export(sae, run_info(model), tmp_path / "out")
    assert [f.name for f in folders] == [f"blocks.{layer}.hook_resid_post" for layer in LAYERS]
    x = activations()
    for position, (layer, folder) in enumerate(zip(LAYERS, folders)):
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        assert_saelens_computes_as_we_do(sae_lens, folder, sae, x, position)
        cfg = json.loads((folder / "cfg.json").read_text())
        # exactly the config SAELens's own save_model writes for what it loaded
        assert cfg == sae_lens.SAE.load_from_disk(folder).cfg.to_dict()
        weights = load_file(folder / "sae_weights.safetensors")
        assert set(weights) == set(sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=N, k=K)).state_dict())
        meta = cfg["metadata"]
        assert (meta["hook_name"], meta["layer"], meta["model_name"]) == (f"blocks.{layer}.hook_resid_post", layer, str(model))
        assert meta["hf_hook_name"] == f"{HF_BLOCKS[model_arch]}.{layer}"
        assert (meta["mlsae"]["arch"], meta["mlsae"]["run_layers"], meta["mlsae"]["k"]) == (arch, LAYERS, K)
        # our own reader gives back the layer's SAE
        foreign = SAELENS.read(folder)
        own = (sae.W_enc, sae.W_dec, sae.b_pre) if arch == "mlsae" else (sae.W_enc[position], sae.W_dec[position], sae.b_pre[position])
        for got, want in zip((foreign.W_enc, foreign.W_dec, foreign.b_dec), own):
            assert torch.equal(got, want.detach())
        assert (foreign.layer, foreign.k, foreign.input_norm, foreign.source["model"]) == (layer, K, "standardize", str(model))


def test_the_hf_path_of_the_blocks_is_a_real_module_path(tmp_path):
    """hf_hook_name names decoder block l of the model itself (checked on the model built from its config)."""
    from transformers import AutoModelForCausalLM

    from mlsae_cache.lm import decoder_blocks

    model = model_config_dir(tmp_path, "gpt_neox")
    folders = SAELENS.export(random_dictionary("mlsae"), run_info(model), tmp_path / "out")
    lm = AutoModelForCausalLM.from_config(tiny_config("gpt_neox", n_layers=4, d_model=D))
    for layer, folder in zip(LAYERS, folders):
        path = json.loads((folder / "cfg.json").read_text())["metadata"]["hf_hook_name"]
        assert lm.get_submodule(path) is decoder_blocks(lm)[layer]


def test_a_model_whose_config_cannot_be_read_exports_with_a_warning_and_no_hf_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folders = SAELENS.export(random_dictionary("mlsae"), run_info(Path("no-such-org/no-such-model")), tmp_path / "out")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no-such-org/no-such-model" in warnings[0] and "hf_hook_name" in warnings[0]
    assert all(json.loads((f / "cfg.json").read_text())["metadata"]["hf_hook_name"] is None for f in folders)


@pytest.mark.parametrize("problem", ["crosscoder", "lens", "inconsistent", "eps"])
def test_what_saelens_cannot_hold_is_refused_in_one_line_before_writing(tmp_path, problem):
    from mlsae_train import Crosscoder

    info = run_info(Path("m"))
    sae = random_dictionary("mlsae")
    expected = {"crosscoder": "crosscoder has no SAELens equivalent", "lens": "tuned-lens space",
                "inconsistent": "inconsistent", "eps": "eps"}[problem]  # fmt: skip
    if problem == "crosscoder":
        sae = Crosscoder(D, N, K, LAYERS)
    elif problem == "lens":
        info["data"][0]["lens"] = "/lenses/pythia"
    elif problem == "inconsistent":
        sae.k = N + 1
    else:
        sae.eps = 1e-3
    with pytest.raises(MlsaeError, match=expected) as error:
        SAELENS.export(sae, info, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# ---- reading SAELens's own folders ----


def foreign_forward(f: ForeignTopK, x: torch.Tensor) -> torch.Tensor:
    """The forward ForeignTopK describes (formats/base.py), written out: dense latents [n_rows, n] after ReLU."""
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    u = (x - mean) / (std + f.eps) if f.input_norm == "standardize" else x
    pre = (u - f.b_dec * f.apply_b_dec_to_input) @ f.W_enc.T + f.b_enc
    if f.rescale_acts_by_decoder_norm:
        pre = pre * torch.linalg.vector_norm(f.W_dec, dim=1)
    top = pre.topk(f.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def saelens_topk(sae_lens, folder: Path, hook: str = "blocks.4.hook_resid_post", seed: int = 0, **cfg):
    """A TopK SAE with random weights saved by SAELens itself into ``folder``."""
    g = torch.Generator().manual_seed(seed)
    metadata = sae_lens.saes.sae.SAEMetadata(hook_name=hook, model_name="pythia-70m")
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=N, k=K, metadata=metadata, **cfg))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1 + torch.rand(p.shape, generator=g)))
    sae.save_model(folder)
    return sae


@pytest.mark.parametrize(
    ("cfg", "hook", "layer"),
    [({"normalize_activations": "none"}, "blocks.4.hook_resid_post", 4),
     ({"normalize_activations": "layer_norm", "rescale_acts_by_decoder_norm": True}, "blocks.4.hook_resid_pre", 3)],
)  # fmt: skip
def test_a_folder_saelens_wrote_reads_back_as_its_tensors_and_forward(sae_lens, tmp_path, cfg, hook, layer):
    theirs = saelens_topk(sae_lens, tmp_path / "sae", hook, **cfg)
    assert SAELENS.recognises(tmp_path / "sae") and not SAELENS.recognises(tmp_path)
    f = SAELENS.read(tmp_path / "sae")
    assert (f.k, f.layer, f.apply_b_dec_to_input) == (K, layer, True)
    assert f.input_norm == {"none": "none", "layer_norm": "standardize"}[cfg["normalize_activations"]]
    assert f.source["format"] == "saelens" and f.source["hook"] == hook and f.source["model"] == "pythia-70m"
    assert ("raw" in f.source["normalisation"]) == (cfg["normalize_activations"] == "none")
    torch.testing.assert_close(f.b_dec, theirs.b_dec.detach())
    if not cfg.get("rescale_acts_by_decoder_norm"):
        assert torch.equal(f.W_enc, theirs.W_enc.detach().T) and torch.equal(f.W_dec, theirs.W_dec.detach())
        assert torch.equal(f.b_enc, theirs.b_enc.detach())
    x = activations().view(-1, D)
    with torch.no_grad():
        expected = theirs.encode(x)
        got = foreign_forward(f, x)
        assert torch.equal(expected != 0, got != 0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
        u_hat = got @ f.W_dec + f.b_dec
        if f.input_norm == "standardize":
            u_hat = u_hat * x.std(-1, keepdim=True) + x.mean(-1, keepdim=True)
        torch.testing.assert_close(u_hat, theirs.decode(expected), rtol=1e-4, atol=1e-4 * float(u_hat.abs().max()))


def test_other_architectures_hooks_and_damaged_folders_are_refused_in_one_line(sae_lens, tmp_path):
    standard = tmp_path / "standard"
    metadata = sae_lens.saes.sae.SAEMetadata(hook_name="blocks.1.hook_resid_post")
    sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=N, metadata=metadata)).save_model(standard)
    saelens_topk(sae_lens, tmp_path / "mlp", hook="blocks.2.hook_mlp_out")
    good = tmp_path / "good"
    saelens_topk(sae_lens, good)

    def damaged(name: str, damage) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        return folder

    weights = good / "sae_weights.safetensors"
    tensors = load_file(weights)
    cases = {
        standard: "architecture 'standard'",
        tmp_path / "mlp": "not the residual stream",
        damaged("truncated", lambda f: (f / "sae_weights.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])): "truncated",
        damaged("json", lambda f: (f / "cfg.json").write_text("{\"d_in\": ")): "not valid JSON",
        damaged("no_b_dec", lambda f: save_file({k: v for k, v in tensors.items() if k != "b_dec"}, f / "sae_weights.safetensors")): "lacks tensor(s) b_dec",
        damaged("nan", lambda f: save_file({**tensors, "W_dec": tensors["W_dec"] * float("nan")}, f / "sae_weights.safetensors")): "non-finite",
        damaged("shape", lambda f: save_file({**tensors, "W_enc": tensors["W_enc"].T.contiguous()}, f / "sae_weights.safetensors")): "has shape",
        damaged("norm", lambda f: _edit_cfg(f, normalize_activations="constant_norm_rescale")): "constant_norm_rescale",
    }  # fmt: skip
    for folder, fragment in cases.items():
        with pytest.raises(MlsaeError) as error:
            SAELENS.read(folder)
        assert fragment in str(error.value) and "\n" not in str(error.value), (folder.name, str(error.value))
    assert "TopK SAEs only" in _error_of(standard)


def _edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **changes}))


def _error_of(folder: Path) -> str:
    with pytest.raises(MlsaeError) as error:
        SAELENS.read(folder)
    return str(error.value)


# ---- the command line, on real tiny runs ----


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny cache of a model with a real config, and an MLSAE and a crosscoder trained on it."""
    root = tmp_path_factory.mktemp("saelens_runs")
    model = model_config_dir(root, "gpt_neox")
    g = np.random.default_rng(0)
    acts = g.normal(size=(64, len(LAYERS), D)) * g.uniform(0.5, 20, size=(64, len(LAYERS), 1)) + g.normal(size=(64, len(LAYERS), 1))
    cache = write_array_cache(root / "cache", acts.astype(np.float32), layers=LAYERS, model=str(model), seq_len=8)
    tiny = ["--shards", str(cache), "--expansion-factor", "3", "-k", "2", "--batch-tokens", "32", "--no-progress", "--device", "cpu"]
    for arch in ("mlsae", "crosscoder"):
        assert train_main([*tiny, "--out", str(root / arch), "--arch", arch]) == 0
    return {"root": root, "model": model, "cache": cache, "acts": torch.from_numpy(acts.astype(np.float32))}


def export(capsys, *argv) -> tuple[int, str, str]:
    code = export_main(["saelens", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_cli_exports_a_run_that_saelens_loads(sae_lens, runs, tmp_path, capsys):
    out = tmp_path / "exported"
    code, stdout, _ = export(capsys, runs["root"] / "mlsae", "--out", out)
    assert code == 0
    assert stdout.splitlines() == [str(out / f"blocks.{layer}.hook_resid_post") for layer in LAYERS]
    sae = load_sae(runs["root"] / "mlsae")
    progress = json.loads((runs["root"] / "mlsae" / "config.json").read_text())
    for position, folder in enumerate(map(Path, stdout.splitlines())):
        assert_saelens_computes_as_we_do(sae_lens, folder, sae, runs["acts"], position)
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        assert (meta["context_size"], meta["model_name"], meta["prepend_bos"]) == (8, str(runs["model"]), False)
        assert meta["hf_hook_name"] == f"gpt_neox.layers.{LAYERS[position]}"
        assert meta["mlsae"]["tokens_trained"] == progress["total_tokens"] > 0
    # --model-name: the id tools that load the model by name need, where the run read a local copy
    code, stdout, _ = export(capsys, runs["root"] / "mlsae", "--out", tmp_path / "named", "--model-name", "EleutherAI/pythia-70m")
    assert code == 0
    named = json.loads((Path(stdout.splitlines()[0]) / "cfg.json").read_text())["metadata"]
    assert (named["model_name"], named["hf_hook_name"]) == ("EleutherAI/pythia-70m", f"gpt_neox.layers.{LAYERS[0]}")
    # the exported folder also loads back here, as a per-layer baseline with the run's latents
    imported = load_sae(out)
    assert imported.layers == LAYERS

    def dense(model):
        values, indices = model.encode(runs["acts"])  # [n, L, k]
        return torch.zeros(*runs["acts"].shape[:2], sae.n_latents).scatter(-1, indices, values)

    torch.testing.assert_close(dense(imported), dense(sae), rtol=1e-5, atol=1e-6)
    # an existing --out is refused and left alone
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, _, err = export(capsys, runs["root"] / "mlsae", "--out", out)
    assert code == 2
    assert_one_line_error(err, "already exists")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_the_cli_refuses_a_crosscoder_a_lens_run_and_a_missing_run(runs, tmp_path, capsys):
    lens_run = tmp_path / "lens-run"
    shutil.copytree(runs["root"] / "mlsae", lens_run)
    info = json.loads((lens_run / "config.json").read_text())
    info["data"][0]["lens"] = "/lenses/pythia"
    (lens_run / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    record_files(lens_run, ["config.json"])  # as a run trained on a lens cache records it
    cases = {runs["root"] / "crosscoder": "crosscoder has no SAELens equivalent", lens_run: "tuned-lens space",
             tmp_path / "no-such-run": "no-such-run"}  # fmt: skip
    for run, fragment in cases.items():
        out = tmp_path / f"out-{run.name}"
        code, stdout, err = export(capsys, run, "--out", out)
        assert code == 2 and stdout == ""
        assert_one_line_error(err, fragment)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_saelens_computes_our_latents_on_a_real_models_cached_residual_stream(sae_lens, pythia_tokenizer_dir, tmp_path, capsys):
    """The whole path a user takes: mlsae-cache of a (tiny, random) GPT-NeoX, mlsae-train, mlsae-export saelens; then
    SAELens's own loader on every layer, fed the residual vectors read back from the cache."""
    from models import build_tiny_model, write_english

    from mlsae_cache import open_cache
    from mlsae_cache.cli import main as cache_main

    model = build_tiny_model(tmp_path / "neox", pythia_tokenizer_dir, n_layers=3, d_model=32, context=64)
    text = write_english(tmp_path / "text", n_files=2, words_per_file=200)
    cache = tmp_path / "cache"
    assert cache_main(["--model", str(model), "--dataset", str(text), "--out", str(cache), "--seq-len", "32",
                       "--tokens", str(32 * 8), "--no-progress"]) == 0  # fmt: skip
    run = tmp_path / "run"
    assert train_main(["--shards", str(cache), "--out", str(run), "--expansion-factor", "2", "-k", "4",
                       "--batch-tokens", "64", "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    code, stdout, _ = export(capsys, run, "--out", tmp_path / "saes")
    assert code == 0
    residual = open_cache(cache)
    x = torch.from_numpy(residual.read(np.arange(len(residual))))  # [N, L, d] as cached (float16 on disk)
    sae = load_sae(run)
    assert sae.layers == residual.layers == [0, 1, 2]
    # this random model's residual vectors have std 0.016-0.034, where SAELens's way back (std, not std + eps) moves
    # x_hat by eps * u_hat, up to 6e-4 of it: more than the 1e-4 that holds from std 0.1 up (real models: 1 to 100)
    std = x.std(dim=-1, keepdim=True)  # [N, L, 1] sample std, as both standardise with
    assert float(std.min()) < 0.1
    with torch.no_grad():
        ours = sae(x)  # [N, L, d]
    mean, eps = x.mean(dim=-1, keepdim=True), sae.eps
    saelens_way_back = ours - eps * (ours - mean) / (std + eps)  # u_hat * std + mean, with u_hat = (x_hat - mean) / (std + eps)
    for position, folder in enumerate(map(Path, stdout.splitlines())):
        assert folder.name == f"blocks.{residual.layers[position]}.hook_resid_post"
        loaded = sae_lens.SAE.load_from_disk(folder)
        with torch.no_grad():
            theirs = loaded.encode(x[:, position])  # [N, n] dense
            values, indices = sae.encode(x)  # [N, L, k]
            expected = torch.zeros_like(theirs).scatter(1, indices[:, position], values[:, position])
            assert torch.equal(theirs != 0, expected != 0)  # the same k latents
            torch.testing.assert_close(theirs, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
            recon = loaded.decode(theirs)  # [N, d]
        torch.testing.assert_close(recon, saelens_way_back[:, position], rtol=1e-5, atol=1e-5 * float(recon.abs().max()))
        relative = torch.linalg.vector_norm(recon - ours[:, position], dim=-1) / torch.linalg.vector_norm(ours[:, position], dim=-1)
        assert float(relative.max()) > 1e-5  # the difference is real here, and it is exactly the one stated

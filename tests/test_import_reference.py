"""The MLSAE paper's reference code's published MLSAEs (issue 14): folders written as its ``MLSAE`` writes them
(huggingface_hub's PyTorchModelHubMixin.save_pretrained on a stand-in with its constructor and tensor names) load
as an ImportedMLSAE that reproduces its forward; ``mlsae-analyse`` analyses it as an MLSAE trained elsewhere, and
``compare`` says so; -tfm checkpoints and damaged folders are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from huggingface_hub import PyTorchModelHubMixin
from models import assert_one_line_error
from safetensors.torch import load_file, save_file
from torch import nn

from mlsae_analysis import layout
from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.compare import main as compare_main
from mlsae_export.cli import main as export_main
from mlsae_cache.errors import MlsaeError
from mlsae_cache.writer import write_array_cache
from mlsae_train import MultiLayerSAE, load_sae
from mlsae_train.cli import main as train_main
from mlsae_train.formats import foreign_sae_dirs
from mlsae_train.formats.reference import REFERENCE
from mlsae_train.imported import ImportedMLSAE, is_imported

D, N_LATENTS, K = 8, 32, 3
LAYERS = [0, 1, 2]
EPS = 1e-5


class StandInMLSAE(nn.Module, PyTorchModelHubMixin):
    """The reference's MLSAE as save_pretrained sees it: its constructor arguments and parameter/buffer names."""

    def __init__(self, n_inputs: int, n_latents: int, k: int, dead_steps_threshold: int, dead_threshold: float = 1e-3,
                 auxk: int | None = 256, standardize: bool = True) -> None:  # fmt: skip
        super().__init__()
        self.encoder = nn.Linear(n_inputs, n_latents, bias=False)
        self.decoder = nn.Linear(n_latents, n_inputs, bias=False)
        self.pre_encoder_bias = nn.Parameter(torch.zeros(n_inputs))
        self.register_buffer("last_nonzero", torch.zeros(n_latents, dtype=torch.long))


def _reference_folder(folder: Path, seed: int = 0, standardize: bool = True) -> StandInMLSAE:
    torch.manual_seed(seed)
    module = StandInMLSAE(D, N_LATENTS, K, 1000, auxk=16, standardize=standardize)
    with torch.no_grad():
        module.encoder.weight.normal_()
        module.decoder.weight.normal_()
        module.decoder.weight /= module.decoder.weight.norm(dim=0)  # unit-norm latent columns, as the reference keeps them
        module.pre_encoder_bias.normal_(0, 0.5)
    module.save_pretrained(folder)
    return module


def _brute_force(module: StandInMLSAE, x: torch.Tensor, standardize: bool = True):
    """The reference's forward in float64, vector by vector: latent sets, {latent: value} and x_hat."""
    W_enc, W_dec = module.encoder.weight.detach().double(), module.decoder.weight.detach().double()  # [n, d], [d, n]
    b = module.pre_encoder_bias.detach().double()
    latents, values, x_hats = [], [], []
    for row in x.double().reshape(-1, D):
        mean, std = (row.mean(), row.std()) if standardize else (torch.tensor(0.0), torch.tensor(1.0))
        z = (row - mean) / (std + EPS) if standardize else row
        pre = W_enc @ (z - b)
        top = [int(j) for j in pre.argsort(descending=True)[:K]]
        h = {j: max(float(pre[j]), 0.0) for j in top}
        z_hat = sum(h[j] * W_dec[:, j] for j in top) + b
        latents.append(set(top))
        values.append(h)
        x_hats.append(z_hat * std + mean if standardize else z_hat)
    return latents, values, torch.stack(x_hats)


def _inputs(seed: int = 1) -> torch.Tensor:
    """x [20, 3, D]: vectors of ordinary scale and some of std ~1e-4, where std and std + eps differ by ~10%."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(20, len(LAYERS), D, generator=gen) * 2 + 0.5
    x[:5] *= 5e-5
    return x


@pytest.mark.parametrize("standardize", [True, False])
def test_reference_folder_reproduces_its_forward(tmp_path, standardize):
    module = _reference_folder(tmp_path / "sae", standardize=standardize)
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["n_inputs"] == D  # as save_pretrained writes it
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae, ImportedMLSAE) and is_imported(sae) and sae.arch == "mlsae" and sae.layers == []
    assert sae.config()["imported"] is True and sae.sources[0]["format"] == "reference" and sae.sources[0]["layer"] is None
    x = _inputs()
    latents, values, x_hat_ref = _brute_force(module, x, standardize)
    with torch.no_grad():
        got_values, got_indices = sae.encode(x)  # [20, 3, K] each
        x_hat = sae(x)
    assert got_values.shape == (20, len(LAYERS), K) and x_hat.shape == x.shape
    flat_values, flat_indices = got_values.reshape(-1, K), got_indices.reshape(-1, K)
    assert [set(row.tolist()) for row in flat_indices] == latents
    want = torch.tensor([[values[r][int(j)] for j in row] for r, row in enumerate(flat_indices)], dtype=torch.float64)
    np.testing.assert_allclose(flat_values.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat.reshape(-1, D).double().numpy(), x_hat_ref.numpy(), rtol=1e-5, atol=1e-5)
    # a [N, L, d] batch as the analysis passes it gives the same rows
    with torch.no_grad():
        torch.testing.assert_close(sae.reconstruct(x).x_hat.view(x.shape), x_hat)


def test_it_differs_from_our_mlsae_only_in_mapping_back_with_std(tmp_path):
    _reference_folder(tmp_path / "sae")
    imported = load_sae(tmp_path / "sae")
    ours = MultiLayerSAE(D, N_LATENTS, K, eps=EPS)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_pre"):
            getattr(ours, name).copy_(getattr(imported, name))
        x = _inputs()
        theirs_out, ours_out = imported.reconstruct(x), ours.reconstruct(x)
    def by_latent(out):  # (values, indices) in ascending latent order (the kernels order the k latents differently)
        indices, order = out.indices.sort(dim=-1)
        return out.values.gather(-1, order), indices

    (their_values, their_indices), (our_values, our_indices) = by_latent(theirs_out), by_latent(ours_out)
    torch.testing.assert_close(their_indices, our_indices, rtol=0, atol=0)
    torch.testing.assert_close(their_values, our_values, rtol=1e-6, atol=1e-6)
    for field in ("z", "mean", "scale", "z_hat"):
        torch.testing.assert_close(getattr(theirs_out, field), getattr(ours_out, field), rtol=1e-6, atol=1e-6)
    std = ours_out.scale - EPS  # [N*L, 1]
    torch.testing.assert_close(ours_out.x_hat, ours_out.z_hat * (std + EPS) + ours_out.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs_out.x_hat, ours_out.z_hat * std + ours_out.mean, rtol=1e-5, atol=1e-6)
    assert (theirs_out.x_hat - ours_out.x_hat).abs().max() > 1e-6  # the tiny-std vectors tell the two apart


# ---- the analysis and the comparison ----


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict:
    """Our MLSAE trained on layers 0-2 and the reference folder, both analysed on one test cache."""
    root = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(112, len(LAYERS), D)).astype(np.float32) * 2 + 0.5
    train = write_array_cache(root / "train", acts[:64], layers=LAYERS, model="m", seq_len=8)
    test = write_array_cache(root / "test", acts[64:], layers=LAYERS, model="m", seq_len=8)
    assert train_main(["--shards", str(train), "--out", str(root / "mlsae-run"), "--expansion-factor", "4", "-k", str(K),
                       "--batch-tokens", "16", "--no-progress", "--seed", "1"]) == 0  # fmt: skip
    _reference_folder(root / "reference")
    for name in ("mlsae-run", "reference"):
        assert analyse_main(["--run", str(root / name), "--shards", str(test), "--out", str(root / f"{name}-analysis"),
                             "--no-downstream", "--no-progress", "--batch-tokens", "16"]) == 0  # fmt: skip
    return {"root": root, "test": test, "x": torch.from_numpy(acts[64:])}


def test_analysis_of_a_reference_folder_is_an_imported_mlsae(analysed):
    analysis = analysed["root"] / "reference-analysis"
    summary = layout.read_summary(analysis)
    assert summary["arch"] == "mlsae" and summary["layers"] == LAYERS and summary["n_latents"] == N_LATENTS
    assert summary["training"] is None and summary["train_data"] is None and summary["weights_digest"] is None
    imported = summary["imported"]
    assert imported["formats"] == ["reference"] and [source["layer"] for source in imported["sources"]] == [None]
    assert "maps back with std, where ours maps back with std + eps" in imported["normalisation"]
    with torch.no_grad():  # the metrics are those of the reference's forward
        x_hat = load_sae(analysed["root"] / "reference")(analysed["x"]).double()
    x = analysed["x"].double()
    fvu = (x - x_hat).square().sum(dim=(0, 2)) / (x - x.mean(dim=0)).square().sum(dim=(0, 2))
    metrics = layout.read_table(analysis, layout.METRICS).filter(pl.col("layer") != "mean")
    np.testing.assert_allclose(metrics["fvu"].to_numpy(), fvu.numpy(), rtol=1e-5)
    page = next(analysis.glob("*.html")).read_text()
    assert "analysed as an MLSAE" in page and "Imported MLSAE (reference) analysis" in page


def test_compare_says_the_reference_mlsae_was_trained_elsewhere(analysed, tmp_path, capsys):
    root = analysed["root"]
    assert compare_main([str(root / "mlsae-run-analysis"), str(root / "reference-analysis"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "mlsae R=4 k=3 (reference, trained elsewhere)" in printed and "training cache is not checked" in printed
    assert "Compared on the layers" not in printed  # the imported MLSAE was analysed on the cache's layers


# ---- refusals ----


def test_our_runs_and_other_formats_are_not_taken_for_reference_folders(analysed, tmp_path):
    run = analysed["root"] / "mlsae-run"
    assert not REFERENCE.recognises(run) and foreign_sae_dirs(run) is None and not is_imported(load_sae(run))
    _reference_folder(tmp_path / "sparsify-like")
    (tmp_path / "sparsify-like" / "cfg.json").write_text("{}")  # a sparsify/SAELens folder's config beside one of ours
    assert REFERENCE.recognises(analysed["root"] / "reference") and not REFERENCE.recognises(tmp_path / "sparsify-like")


def test_bad_reference_folders_are_refused_in_one_line(analysed, tmp_path, capsys):
    def refused(folder: Path, *fragments: str) -> None:
        out = tmp_path / "out"
        assert analyse_main(["--run", str(folder), "--shards", str(analysed["test"]), "--out", str(out), "--no-downstream",
                             "--no-progress"]) == 2  # fmt: skip
        assert_one_line_error(capsys.readouterr().err, *fragments)
        assert not out.exists()

    tfm_config = {"model_name": "EleutherAI/pythia-70m-deduped", "layers": None, "expansion_factor": 4, "k": K, "auxk": 16,
                  "tuned_lens": False}  # fmt: skip
    for folder in (tmp_path / "tfm", tmp_path / "hub" / "models--tim-lawson--mlsae-m-x4-k3-tfm" / "snapshots" / "abc"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(tfm_config))
        save_file({"autoencoder.encoder.weight": torch.zeros(N_LATENTS, D)}, folder / "model.safetensors")
    refused(tmp_path / "tfm", "-tfm", "tim-lawson/mlsae-pythia-70m-deduped-x4-k3)")
    refused(folder, "-tfm", "(tim-lawson/mlsae-m-x4-k3)")

    def damaged(name: str, edit) -> Path:
        _reference_folder(tmp_path / name)
        edit(tmp_path / name)
        return tmp_path / name

    def drop_decoder(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        del tensors["decoder.weight"]
        save_file(tensors, folder / "model.safetensors")

    def edit_config(**changes):
        def edit(folder: Path) -> None:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, **changes}))

        return edit

    refused(damaged("missing", drop_decoder), "lacks decoder.weight")
    refused(damaged("shape", edit_config(n_latents=N_LATENTS + 1)), "encoder.weight of shape (32, 8)", "need [33, 8]")
    refused(damaged("bad-json", lambda folder: (folder / "config.json").write_text("{not json")), "not a readable config")
    with pytest.raises(MlsaeError, match="records no integer k"):  # k missing: refused, not guessed
        load_sae(damaged("no-k", edit_config(k=None)))
    _reference_folder(tmp_path / "two" / "a")
    _reference_folder(tmp_path / "two" / "b", seed=1)
    refused(tmp_path / "two", "one SAE shared by every layer", "beside 1 other SAE folder")


def test_a_hub_snapshot_records_its_repo_and_model_and_lens_repos_are_refused(tmp_path, capsys):
    snapshots = tmp_path / "hub"
    _reference_folder(snapshots / "models--tim-lawson--mlsae-pythia-70m-deduped-x4-k3" / "snapshots" / "rev")
    source = load_sae(snapshots / "models--tim-lawson--mlsae-pythia-70m-deduped-x4-k3" / "snapshots" / "rev").sources[0]
    assert (source["repo"], source["model"]) == ("tim-lawson/mlsae-pythia-70m-deduped-x4-k3", "pythia-70m-deduped")
    lens = snapshots / "models--tim-lawson--mlsae-pythia-70m-deduped-x4-k3-lens" / "snapshots" / "rev"
    _reference_folder(lens)
    with pytest.raises(MlsaeError, match="tuned lens.*import the repo without -lens"):
        load_sae(lens)
    # and mlsae-export still refuses an imported dictionary
    assert export_main(["saelens", str(snapshots / "models--tim-lawson--mlsae-pythia-70m-deduped-x4-k3" / "snapshots" / "rev"),
                        "--out", str(tmp_path / "out")]) == 2  # fmt: skip
    assert_one_line_error(capsys.readouterr().err, "another tool's SAEs")
    assert not (tmp_path / "out").exists()


def test_the_authors_tfm_and_lens_repos_are_refused_by_name_before_any_download(monkeypatch):
    """Offline, so that only a refusal by name can come first: nothing is fetched (a -tfm repo holds the transformer)."""
    from mlsae_train.hub import resolve_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MlsaeError) as caught:
        resolve_run("tim-lawson/mlsae-pythia-70m-deduped-x64-k32-tfm")
    assert "use tim-lawson/mlsae-pythia-70m-deduped-x64-k32 (the same name" in str(caught.value)
    with pytest.raises(MlsaeError) as caught:
        resolve_run("tim-lawson/mlsae-pythia-70m-deduped-x64-k32-lens")
    assert "tuned lens" in str(caught.value)
    for name in ("tim-lawson/mlsae-pythia-70m-deduped-x64-k32", "someone/mlsae-pythia-70m-deduped-x64-k32-tfm"):
        with pytest.raises(MlsaeError) as caught:  # judged by its files, once fetched: here, offline and not cached
            resolve_run(name)
        assert "cannot reach the Hugging Face Hub" in str(caught.value)

"""Loading a tuned lens: local directories and hub names, and the one-line refusal of a lens made for
another model, width or layer count, through ``mlsae-cache --lens`` and ``mlsae-lens eval``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from models import assert_one_line_error, build_tiny_model, tiny_config, write_english

from mlsae_cache import lens as lens_module
from mlsae_cache.cli import main as cache_main
from mlsae_cache.lens import load_lens_for_model
from mlsae_cache.lens_cli import main as lens_main
from mlsae_cache.lm import load_model

SEQ_LEN = 32


def save_random_lens(model, out: Path, seed: int = 0) -> Path:
    """A lens for ``model`` with non-trivial random translators, saved by the tuned-lens package itself."""
    from tuned_lens.nn.lenses import TunedLens

    torch.manual_seed(seed)
    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for translator in lens.layer_translators:
            translator.weight.normal_(0, 0.1)
            translator.bias.normal_(0, 0.1)
    lens.save(out)
    return out


def random_model(seed: int, **shape):
    """An in-memory tiny GPT-NeoX: a lens needs only its config and unembedding."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config("gpt_neox", context=64, **shape))


@pytest.fixture(scope="module")
def models(pythia_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens_models")
    model_dir = build_tiny_model(root / "model", pythia_tokenizer_dir, n_layers=3, d_model=32, context=64)
    built = {"model": model_dir, "text": write_english(root / "text", n_files=2, words_per_file=80)}
    built["lens_model"] = save_random_lens(load_model(str(model_dir)), root / "lens_model")
    others = {"other_model": random_model(1, n_layers=3, d_model=32), "other_width": random_model(0, n_layers=3, d_model=48),
              "other_layers": random_model(0, n_layers=4, d_model=32)}  # fmt: skip
    for name, model in others.items():
        built[f"lens_{name}"] = save_random_lens(model, root / f"lens_{name}")
    return built


MISMATCHES = {
    "other_model": ("was trained for model", "mlsae-lens train"),
    "other_width": ("width 48", "width 32"),
    "other_layers": ("4 layers", "3 layers"),
}


def run_cache_with_lens(models, lens: str, out: Path) -> int:
    return cache_main(["--model", str(models["model"]), "--dataset", str(models["text"]), "--out", str(out), "--seq-len",
                       str(SEQ_LEN), "--tokens", str(SEQ_LEN * 2), "--lens", lens, "--no-progress"])  # fmt: skip


def run_lens_eval(models, lens: str) -> int:
    return lens_main(["eval", "--model", str(models["model"]), "--dataset", str(models["text"]), "--lens", lens,
                      "--seq-len", str(SEQ_LEN), "--tokens", str(SEQ_LEN * 2), "--no-progress"])  # fmt: skip


@pytest.mark.parametrize("kind", MISMATCHES)
def test_cache_refuses_a_lens_of_another_model_width_or_depth(models, kind, tmp_path, capsys):
    out = tmp_path / "cache"
    assert run_cache_with_lens(models, str(models[f"lens_{kind}"]), out) == 2
    assert_one_line_error(capsys.readouterr().err, *MISMATCHES[kind])
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("kind", MISMATCHES)
def test_lens_eval_refuses_a_lens_of_another_model_width_or_depth(models, kind, capsys):
    assert run_lens_eval(models, str(models[f"lens_{kind}"])) == 2
    assert_one_line_error(capsys.readouterr().err, *MISMATCHES[kind])


def test_lens_eval_of_a_matching_lens_prints_the_kl_of_every_translator(models, capsys):
    assert lens_main(["eval", "--model", str(models["model"]), "--dataset", str(models["text"]), "--lens", str(models["lens_model"]),
                      "--seq-len", str(SEQ_LEN), "--tokens", str(SEQ_LEN * 2)]) == 0  # fmt: skip
    table = capsys.readouterr().out
    for row in ("embeddings", "block 0", "block 1", "mean"):
        assert row in table


def test_the_same_model_under_another_path_is_recognised_by_its_unembedding(models, tmp_path):
    copy = Path(shutil.copytree(models["model"], tmp_path / "copy"))
    lens = load_lens_for_model(models["lens_model"], load_model(str(copy)), str(copy))
    assert lens.n_layers == 3 and lens.source == str(models["lens_model"].resolve())


def test_a_name_mismatch_without_an_unembedding_hash_is_refused(models, tmp_path):
    import json

    lens_dir = Path(shutil.copytree(models["lens_model"], tmp_path / "lens"))
    config = json.loads((lens_dir / "config.json").read_text())
    config.update(unembed_hash=None, base_model_name_or_path="EleutherAI/pythia-70m")
    (lens_dir / "config.json").write_text(json.dumps(config))
    model = load_model(str(models["model"]))
    with pytest.raises(lens_module.MlsaeError, match="trained for model EleutherAI/pythia-70m"):
        load_lens_for_model(lens_dir, model, str(models["model"]))
    config.update(base_model_name_or_path=str(models["model"]))  # the name alone suffices
    (lens_dir / "config.json").write_text(json.dumps(config))
    assert load_lens_for_model(lens_dir, model, str(models["model"])).n_layers == 3


def test_missing_lens_directory_and_offline_hub_name_fail_in_one_line(models, monkeypatch, capsys):
    assert run_lens_eval(models, "./no/such/lens") == 2
    assert_one_line_error(capsys.readouterr().err, "does not exist", "mlsae-lens train")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_lens_eval(models, "pythia-70m") == 2
    assert_one_line_error(capsys.readouterr().err, "EleutherAI/pythia-70m", "local lens directory", "mlsae-lens train")


def test_hub_name_is_resolved_through_the_tuned_lens_package(models, monkeypatch, tmp_path):
    """Online, a model name goes to tuned-lens's own resolution (its lens repository, subfolder lens/NAME):
    a fake hub that serves our lens files shows that the files it resolves are the ones loaded."""
    import tuned_lens.load_artifacts as artifacts

    requests = []

    def fake_download(filename, repo_id, repo_type, revision, subfolder, cache_dir):
        requests.append((repo_id, repo_type, subfolder, filename))
        served = tmp_path / "hub" / subfolder
        served.mkdir(parents=True, exist_ok=True)
        shutil.copy(models["lens_model"] / filename, served / filename)
        return str(served / filename)

    monkeypatch.setattr(artifacts, "hf_hub_download", fake_download)
    monkeypatch.setattr(lens_module, "hub_reachable", lambda: True)
    model = load_model(str(models["model"]))
    lens = load_lens_for_model("someone/tiny-neox", model, str(models["model"]))
    assert {r[2] for r in requests} == {"lens/someone/tiny-neox"} and {r[0] for r in requests} == {"AlignmentResearch/tuned-lens"}
    reference = load_lens_for_model(models["lens_model"], model, str(models["model"]))
    assert lens.sha256 == reference.sha256
    h = torch.randn(4, 32)
    torch.testing.assert_close(lens.forward(h, 1), reference.forward(h, 1))


def test_a_trained_lens_is_verified_and_a_damaged_one_is_named(models, tmp_path, capsys):
    """mlsae-lens train records checksums.json for params.pt and config.json; every load checks them; a torn
    training checkpoint on resume is one line naming it."""
    lens = tmp_path / "lens"
    train = ["train", "--model", str(models["model"]), "--dataset", str(models["text"]), "--seq-len", str(SEQ_LEN),
             "--batch-size", "1", "--tokens", str(SEQ_LEN * 2), "--eval-tokens", str(SEQ_LEN), "--steps", "2",
             "--checkpoint-every", "1", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert lens_main([*train, "--out", str(lens)]) == 0
    assert json.loads((lens / "checksums.json").read_text())["files"].keys() == {"config.json", "params.pt"}
    assert run_lens_eval(models, str(lens)) == 0
    capsys.readouterr()

    damaged = tmp_path / "damaged"
    shutil.copytree(lens, damaged)
    state = torch.load(damaged / "params.pt", weights_only=True)
    data = bytearray((damaged / "params.pt").read_bytes())
    data[data.find(state["1.weight"].numpy().tobytes()) + 3] ^= 0x01  # a tensor byte: torch.load would not notice
    (damaged / "params.pt").write_bytes(bytes(data))
    assert run_lens_eval(models, str(damaged)) == 2
    assert_one_line_error(capsys.readouterr().err, str(damaged / "params.pt"), "damaged", "mlsae-lens train")

    truncated = tmp_path / "truncated"
    shutil.copytree(lens, truncated)
    (truncated / "params.pt").write_bytes((lens / "params.pt").read_bytes()[:100])
    assert run_cache_with_lens(models, str(truncated), tmp_path / "cache") == 2
    assert_one_line_error(capsys.readouterr().err, str(truncated / "params.pt"), "mlsae-lens train")

    torn = tmp_path / "torn"  # an unfinished training whose checkpoint was cut short
    torn.mkdir()
    (torn / "checkpoint.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    assert lens_main([*train, "--out", str(torn)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(torn / "checkpoint.pt"), "delete it")
    assert [p.name for p in torn.iterdir()] == ["checkpoint.pt"]

"""``mlsae-lens train`` on a tiny GPT-NeoX with the real Pythia tokenizer: the lens it writes lowers the
held-out KL, the tuned-lens package loads it, an interrupted training resumes to the same lens, and a
lens-space pipeline (cache, train, analyse) runs end to end with an exact inverse."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from models import assert_one_line_error, build_tiny_model, write_english

from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.downstream import downstream_metrics, kept_positions, make_reconstructor
from mlsae_cache import open_cache
from mlsae_cache import lens_train
from mlsae_cache.cli import main as cache_main
from mlsae_cache.lens import load_lens
from mlsae_cache.lens_cli import main as lens_main
from mlsae_cache.lm import load_model, load_tokenizer
from mlsae_train.cli import main as train_main

SEQ_LEN = 32
TRAIN_SEQUENCES, EVAL_SEQUENCES = 16, 8
STEPS = 16


def train_args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--dataset", str(text), "--out", str(out), "--seq-len", str(SEQ_LEN),
            "--batch-size", "2", "--tokens", str(SEQ_LEN * TRAIN_SEQUENCES), "--eval-tokens", str(SEQ_LEN * EVAL_SEQUENCES),
            "--steps", str(STEPS), "--lr", "1e-2", "--checkpoint-every", "4", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(pythia_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lens_train")
    model = build_tiny_model(root / "neox", pythia_tokenizer_dir, n_layers=3, d_model=32, context=64)
    text = write_english(root / "text", n_files=4, words_per_file=250)
    assert lens_main(train_args(model, text, root / "lens")) == 0
    return {"root": root, "model": model, "text": text, "lens": root / "lens"}


def held_out_sequences(tokenizer, text_dir: Path) -> np.ndarray:
    """SPEC 1 by hand (texts joined with EOS, cut into SEQ_LEN sequences); the held-out ones follow the training ones."""
    stream: list[int] = []
    for path in sorted(text_dir.glob("*.txt")):
        stream += tokenizer.encode(path.read_text(), add_special_tokens=False) + [tokenizer.eos_token_id]
    sequences = np.array(stream[: len(stream) // SEQ_LEN * SEQ_LEN]).reshape(-1, SEQ_LEN)
    return sequences[TRAIN_SEQUENCES : TRAIN_SEQUENCES + EVAL_SEQUENCES]


def test_trained_lens_lowers_the_held_out_kl_and_the_package_reads_it_the_same(trained, caplog):
    """Reference: the tuned-lens package's own load path and logits, with a textbook KL on held-out text."""
    from tuned_lens.nn.lenses import TunedLens

    record = json.loads((trained["lens"] / "training.json").read_text())
    identity, ours = np.array(record["kl_identity"]), np.array(record["kl_lens"])
    assert len(ours) == 3 and (ours < identity).all() and ours.mean() < 0.5 * identity.mean()

    model, tokenizer = load_model(str(trained["model"])), load_tokenizer(str(trained["model"]))
    with caplog.at_level(logging.WARNING):
        package_lens = TunedLens.from_model_and_pretrained(model, lens_resource_id=str(trained["lens"]))
    assert "hash" not in caplog.text  # our unembed_hash is the package's
    ids = torch.from_numpy(held_out_sequences(tokenizer, trained["text"]))  # [8, S]
    keep = ids != tokenizer.eos_token_id
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        log_p = F.log_softmax(out.logits[keep], dim=-1)  # [n, V]
        for idx in range(3):
            log_q = F.log_softmax(package_lens.forward(out.hidden_states[idx][keep], idx), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
            assert float(kl) == pytest.approx(ours[idx], rel=1e-3, abs=1e-7)


def test_our_transform_equals_the_package_transform_of_the_trained_lens(trained):
    from tuned_lens.nn.lenses import TunedLens

    model = load_model(str(trained["model"]))
    package_lens = TunedLens.from_model_and_pretrained(model, lens_resource_id=str(trained["lens"]))
    ours = load_lens(trained["lens"], n_layers=3, d_model=32)
    h = torch.randn(6, 32)
    for idx in range(3):
        assert ours.weight[idx].abs().max() > 0 and ours.bias[idx].abs().max() > 0  # really trained
        with torch.no_grad():
            torch.testing.assert_close(ours.apply_translator(h, idx), package_lens.transform_hidden(h, idx))


def test_interrupted_training_resumes_to_the_same_lens(trained, tmp_path, monkeypatch):
    out = tmp_path / "lens"
    real_targets, calls = lens_train.lens_targets, []

    def interrupt_after_ten_steps(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return real_targets(*args, **kwargs)

    monkeypatch.setattr(lens_train, "lens_targets", interrupt_after_ten_steps)
    assert lens_main(train_args(trained["model"], trained["text"], out)) == 130
    assert (out / "checkpoint.pt").exists() and not (out / "params.pt").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8
    monkeypatch.setattr(lens_train, "lens_targets", real_targets)
    assert lens_main(train_args(trained["model"], trained["text"], out)) == 0
    resumed, uninterrupted = (torch.load(d / "params.pt", weights_only=True) for d in (out, trained["lens"]))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert not (out / "checkpoint.pt").exists()


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_rerun_is_a_no_op_and_another_training_is_refused(trained, capsys):
    before = digest(trained["lens"])
    assert lens_main(train_args(trained["model"], trained["text"], trained["lens"])) == 0
    assert digest(trained["lens"]) == before
    capsys.readouterr()
    assert lens_main(train_args(trained["model"], trained["text"], trained["lens"], "--lr", "5e-3")) == 2
    assert_one_line_error(capsys.readouterr().err, "holds another lens", "--overwrite")
    assert digest(trained["lens"]) == before


def test_too_little_text_and_bad_options_fail_in_one_line(trained, tmp_path, capsys):
    assert lens_main(train_args(trained["model"], trained["text"], tmp_path / "a", "--tokens", "1000000")) == 2
    assert_one_line_error(capsys.readouterr().err, "yields only", "--tokens")
    assert lens_main(train_args(trained["model"], trained["text"], tmp_path / "b", "--warmup-steps", str(STEPS))) == 2
    assert_one_line_error(capsys.readouterr().err, "--warmup-steps")
    assert lens_main([]) == 2
    assert_one_line_error(capsys.readouterr().err, "subcommand")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the lens-space pipeline: mlsae-lens train -> mlsae-cache --lens -> mlsae-train -> mlsae-analyse


def test_lens_space_pipeline_end_to_end(trained, tmp_path):
    root, model, text, lens_dir = tmp_path, trained["model"], trained["text"], trained["lens"]
    for name, n_sequences in (("train", 8), ("test", 3)):
        assert cache_main(["--model", str(model), "--dataset", str(text), "--out", str(root / name), "--seq-len", str(SEQ_LEN),
                           "--tokens", str(SEQ_LEN * n_sequences), "--lens", str(lens_dir), "--no-progress"]) == 0  # fmt: skip
    test_cache = open_cache(root / "test")
    lens = load_lens(lens_dir, n_layers=3, d_model=32)
    assert test_cache.manifest["lens"] == {"path": str(lens_dir.resolve()), "params_sha256": lens.sha256}
    assert train_main(["--shards", str(root / "train"), "--out", str(root / "run"), "--expansion-factor", "2", "-k", "4",
                       "--batch-tokens", "64", "--epochs", "2", "--no-progress", "--no-verify"]) == 0  # fmt: skip
    assert analyse_main(["--run", str(root / "run"), "--shards", str(root / "test"), "--out", str(root / "analysis"),
                         "--downstream-sequences", "2", "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((root / "analysis" / "summary.json").read_text())
    assert summary["lens"] == test_cache.manifest["lens"]  # what the report tells lens runs apart by
    metrics = pl.read_csv(root / "analysis" / "metrics.csv")
    assert metrics["fvu"].is_finite().all() and metrics["delta_ce"].is_finite().all() and (metrics["kl_per_token"] > 0).all()

    # delta CE after the exact inverse: an identity SAE in lens space splices back the clean residual
    sequences = np.arange(test_cache.n_sequences)
    ids = torch.from_numpy(test_cache.sequence_tokens(sequences))
    kept = kept_positions(test_cache.token_table(), sequences, SEQ_LEN)
    lm = load_model(str(model))
    exact = downstream_metrics(lm, ids, kept, [0, 1, 2], make_reconstructor(torch.nn.Identity(), [0, 1, 2], lens), 2, False)
    np.testing.assert_allclose(exact["delta_ce"].to_numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(exact["kl_per_token"].to_numpy(), 0.0, atol=1e-7)
    # the control: splicing the lens-space vector without the inverse changes the model's output
    forward_only = downstream_metrics(lm, ids, kept, [0, 1], lambda hidden, index: lens.forward(hidden, index), 2, False)
    assert (forward_only["kl_per_token"].to_numpy() > 1e3 * exact["kl_per_token"].to_numpy()[:2].clip(min=1e-9)).all()

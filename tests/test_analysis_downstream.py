"""Delta CE / KL splicing and mlsae-analyse end to end on a tiny GPT-NeoX with the real Pythia tokenizer."""

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
from mlsae_analysis.downstream import downstream_metrics, kept_positions
from mlsae_cache import open_cache
from mlsae_cache.cli import main as cache_main
from mlsae_cache.lm import load_model
from mlsae_train import TrainConfig, train

SEQ_LEN = 32


def fit_language_model(model_dir: Path, ids: torch.Tensor, steps: int = 40) -> None:
    """Fit the random tiny model to the test text for a few steps, so that its predictions are better
    than uniform and destroying its residual stream (splicing zeros) must raise the loss."""
    model = load_model(str(model_dir))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(model_dir)


@pytest.fixture(scope="module")
def setup(pythia_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysis")
    model = build_tiny_model(root / "neox", pythia_tokenizer_dir, n_layers=3, d_model=32, context=64)
    text = write_english(root / "text", n_files=3, words_per_file=60)
    for name, n_sequences in (("train", 6), ("test", 3)):
        assert cache_main(["--model", str(model), "--dataset", str(text), "--out", str(root / name), "--seq-len",
                           str(SEQ_LEN), "--tokens", str(SEQ_LEN * n_sequences), "--no-progress"]) == 0  # fmt: skip
    fit_language_model(model, torch.from_numpy(open_cache(root / "test").sequence_tokens([0, 1, 2])))
    run = train(TrainConfig(shards=[str(root / "train")], out=str(root / "run"), expansion_factor=2, k=4,
                            batch_tokens=64, epochs=2, progress=False, verify=False))  # fmt: skip
    return {"model": model, "test": root / "test", "run": run}


def _spliced(setup, reconstruct):
    cache = open_cache(setup["test"])
    sequences = np.arange(cache.n_sequences)
    ids = torch.from_numpy(cache.sequence_tokens(sequences))
    kept = kept_positions(cache.token_table(), sequences, SEQ_LEN)
    assert kept.sum() == cache.n_tokens and (~kept).any()  # the EOS between texts is not kept
    return downstream_metrics(load_model(str(setup["model"])), ids, kept, cache.layers, reconstruct, 2, False)


def test_identity_splice_gives_zero_delta_ce_and_kl(setup):
    table = _spliced(setup, lambda hidden, _layer: hidden.clone())
    assert table["delta_ce"].to_list() == [0.0] * 3
    np.testing.assert_allclose(table["kl_per_token"].to_numpy(), 0.0, atol=1e-9)


def test_zero_splice_raises_the_loss(setup):
    table = _spliced(setup, lambda hidden, _layer: torch.zeros_like(hidden))
    assert (table["delta_ce"].to_numpy() > 0).all()
    assert (table["kl_per_token"].to_numpy() > 0).all()
    np.testing.assert_allclose(table["kl_per_sequence"].to_numpy(), table["kl_per_token"].to_numpy() * SEQ_LEN)


def _random_shift(hidden: torch.Tensor, layer: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(layer)
    return hidden + torch.randn(hidden.shape, generator=generator) * hidden.std()


@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "gpt2"])
def test_replaying_the_clean_prefix_equals_running_the_whole_model(arch, pythia_tokenizer_dir, tmp_path):
    """The fast path (blocks before the splice replay the clean pass) gives the plain path's numbers."""
    model_dir = build_tiny_model(tmp_path / arch, pythia_tokenizer_dir, arch=arch, n_layers=4, d_model=32, context=64)
    model = load_model(str(model_dir))
    ids = torch.randint(0, 1000, (3, 16), generator=torch.Generator().manual_seed(0))  # [N, S]
    kept = torch.ones_like(ids, dtype=torch.bool)
    kept[:, 0] = False  # a special position at the start stays as the model computed it
    layers = [0, 2, 3]
    fast = downstream_metrics(model, ids, kept, layers, _random_shift, 2, False)
    plain = downstream_metrics(model, ids, kept, layers, _random_shift, 2, False, reuse_prefix=False)
    assert (fast["kl_per_token"].to_numpy() > 1e-4).all()  # the splice changes the output
    for column in ("ce_clean", "ce_spliced", "delta_ce", "kl_per_token"):
        np.testing.assert_allclose(fast[column].to_numpy(), plain[column].to_numpy(), rtol=1e-5, atol=1e-7)


def run_analyse(setup, out, *extra):
    return analyse_main(["--run", str(setup["run"]), "--shards", str(setup["test"]), "--out", str(out), "--no-progress", *extra])


def test_cli_end_to_end_with_the_language_model(setup, tmp_path, pythia_tokenizer):
    out = tmp_path / "out"
    assert run_analyse(setup, out) == 0
    metrics = pl.read_csv(out / "metrics.csv")
    assert metrics["delta_ce"].is_finite().all() and (metrics["kl_per_token"][:3] > 0).all()
    prompt = pl.read_csv(out / "single_prompt.csv")
    assert prompt.height > 0 and (prompt["max_activation"] >= 1e-3).all()
    assert prompt["mean_layer"].is_sorted()
    examples = pl.read_parquet(out / "examples.parquet")
    assert "context_text" in examples.columns and examples["context_text"].str.len_chars().min() > 0
    # the page's token texts: every token of every context, once, decoded alone by the model's tokenizer
    texts = pl.read_parquet(out / layout.TOKEN_TEXTS)
    assert texts["token_id"].to_list() == examples["context_ids"].explode().unique().sort().to_list()
    assert texts["text"].to_list() == [pythia_tokenizer.decode([i]) for i in texts["token_id"].to_list()]
    for name in ("single_prompt", "heatmap", "metrics"):
        assert (out / f"{name}.png").exists() and (out / f"{name}.pdf").exists()
    assert json.loads((out / "summary.json").read_text())["metrics_mean"]["delta_ce"] == pytest.approx(
        metrics["delta_ce"][:3].mean()
    )


def test_empty_prompt_is_refused_before_any_output(setup, tmp_path, capsys):
    assert run_analyse(setup, tmp_path / "out", "--prompt", "") == 2
    assert_one_line_error(capsys.readouterr().err, "--prompt")
    assert list(tmp_path.iterdir()) == []

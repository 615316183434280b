"""mlsae-analyse on inputs that cannot work: one clear ``error:`` line, exit status 2, no traceback, and
no ``--out`` (nor a half-written sibling of it). Width, layer and model mismatches of a run and its
cache are in test_analysis_metrics.py; the empty prompt is in test_analysis_downstream.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from models import assert_one_line_error, build_tiny_model

from mlsae_analysis.cli import main as analyse_main
from mlsae_cache.writer import write_array_cache
from mlsae_train import MultiLayerSAE, save_sae

N_LAYERS, D_MODEL = 3, 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pythia_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    acts = np.random.default_rng(0).normal(size=(40, N_LAYERS, D_MODEL)).astype(np.float32)
    sae = MultiLayerSAE(D_MODEL, 2 * D_MODEL, 4, layers=list(range(N_LAYERS)), generator=torch.Generator().manual_seed(0))
    save_sae(sae, root / "sae.safetensors")
    paths = {
        "cache": write_array_cache(root / "cache", acts, seq_len=10),
        "empty_cache": write_array_cache(root / "empty_cache", acts[:0], seq_len=10),  # finished, 0 tokens
        "sae": root / "sae.safetensors",
        "wide_model": build_tiny_model(root / "wide_model", pythia_tokenizer_dir, n_layers=N_LAYERS, d_model=32, context=32),
    }
    (root / "not_a_cache").mkdir()
    paths["not_a_cache"] = root / "not_a_cache"
    unfinished = root / "unfinished_cache"
    unfinished.mkdir()
    shutil.copy(paths["cache"] / "config.json", unfinished / "config.json")  # claimed, never finished
    paths["unfinished_cache"] = unfinished
    (root / "truncated.safetensors").write_bytes(paths["sae"].read_bytes()[:100])
    paths["truncated_sae"] = root / "truncated.safetensors"
    unfinished_run = root / "unfinished_run"
    unfinished_run.mkdir()
    (unfinished_run / "config.json").write_text(json.dumps({"data": []}))
    shutil.copy(paths["sae"], unfinished_run / "checkpoint.safetensors")  # a checkpoint, no final sae.safetensors
    paths["unfinished_run"] = unfinished_run
    return paths


CASES = {
    "empty cache": ("sae", "empty_cache", [], "holds no tokens"),
    "directory without a cache": ("sae", "not_a_cache", [], "holds no cache"),
    "unfinished cache": ("sae", "unfinished_cache", [], "unfinished"),
    "truncated checkpoint": ("truncated_sae", "cache", [], "truncated.safetensors is truncated"),
    "run still training": ("unfinished_run", "cache", [], "has not finished training"),
    "language model of another width": ("sae", "cache", ["--model", "{wide_model}"], "width 32", "16"),
    "prompt of special tokens only": ("sae", "cache", ["--model", "{wide_model}", "--prompt", "<|endoftext|>"], "--prompt"),
    "a cache as --run": ("cache", "cache", [], "--run", "activation cache", "not a training run"),
    "a run as --shards": ("sae", "unfinished_run", [], "--shards", "training run", "not a cache"),
    "a file as --shards": ("sae", "sae", [], "--shards", "is a file, not a cache directory"),
    "--device cuda without a GPU": ("sae", "cache", ["--device", "cuda"], "--device cuda", "no CUDA GPU", "--device cpu"),
    "an unknown --device": ("sae", "cache", ["--device", "gpu"], "unknown --device gpu"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_no_out(case, inputs, tmp_path, capsys):
    if case == "--device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    run, cache, extra, *fragments = CASES[case]
    extra = [arg.format(**{k: str(v) for k, v in inputs.items()}) for arg in extra]
    if "--model" not in extra:
        extra.append("--no-downstream")
    out = tmp_path / "out"
    code = analyse_main(["--run", str(inputs[run]), "--shards", str(inputs[cache]), "--out", str(out), "--no-progress", *extra])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert list(tmp_path.iterdir()) == []  # neither --out nor a partial sibling


# ---------------------------------------------------------------------------------------------
# faults during the analysis: one line, the truth about what is kept, nothing left behind


def _analyse(inputs, out: Path) -> int:
    return analyse_main(["--run", str(inputs["sae"]), "--shards", str(inputs["cache"]), "--out", str(out), "--no-progress", "--no-downstream"])


def test_disk_full_names_the_file_under_out(inputs, tmp_path, capsys, monkeypatch):
    """polars reports a full disk as an OSError without errno, its code in the message."""
    import polars as pl

    def write_csv_disk_full(self, file=None, **kwargs):
        raise OSError("No space left on device (os error 28)") if file is None else OSError(28, "No space left on device", str(file))

    monkeypatch.setattr(pl.DataFrame, "write_csv", write_csv_disk_full)
    out = tmp_path / "out"
    assert _analyse(inputs, out) == 28
    line = assert_one_line_error(capsys.readouterr().err, "disk full while writing", str(out / "metrics.csv"), "run the same command again")
    assert "partial" not in line and "what was finished is kept" not in line
    assert list(tmp_path.iterdir()) == []


def test_read_only_parent_of_out(inputs, tmp_path, capsys, read_only_below):
    read_only_below(tmp_path)
    out = tmp_path / "out"
    assert _analyse(inputs, out) == 2
    line = assert_one_line_error(capsys.readouterr().err, "cannot write to", str(out), "permission denied", "writable --out")
    assert "partial" not in line
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_says_nothing_was_kept_and_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
    from mlsae_analysis import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "decoder_neighbours", interrupted)  # after the encode pass has written its latents
    out = tmp_path / "out"
    assert _analyse(inputs, out) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: nothing was kept"), err
    assert list(tmp_path.iterdir()) == []

"""Killed at any moment and run again, ``mlsae-cache`` finishes the same cache; torchrun ranks share one cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from models import build_tiny_model, write_english

from mlsae_cache import open_cache
from mlsae_cache import shard_format as sf

SEQ_LEN = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pythia_tokenizer_dir):
    root = tmp_path_factory.mktemp("resume")
    model_dir = build_tiny_model(root / "model", pythia_tokenizer_dir, n_layers=3, d_model=32, context=128)
    text_dir = write_english(root / "text", n_files=6, words_per_file=300)
    return model_dir, text_dir


def cache_command(model_dir: Path, text_dir: Path, out: Path, n_sequences: int = 16) -> list[str]:
    return ["-m", "mlsae_cache.cli", "--model", str(model_dir), "--dataset", str(text_dir), "--out", str(out),
            "--seq-len", str(SEQ_LEN), "--tokens", str(SEQ_LEN * n_sequences), "--batch-size", "1",
            "--shard-mb", "0.02", "--device", "cpu"]  # fmt: skip


def read_all(out: Path):
    cache = open_cache(out)
    return cache.read(np.arange(cache.n_tokens)), cache.token_table(), json.loads((out / sf.MANIFEST).read_text())


def assert_same_cache(a: Path, b: Path) -> None:
    acts_a, table_a, manifest_a = read_all(a)
    acts_b, table_b, manifest_b = read_all(b)
    np.testing.assert_array_equal(acts_a, acts_b)
    assert table_a.equals(table_b)
    for manifest in (manifest_a, manifest_b):  # the processes that wrote it, and so the manifest's own digest, may differ
        manifest.pop("world_size"), manifest.pop(sf.MANIFEST_DIGEST)
    assert manifest_a == manifest_b  # same shards, checksums and statistics, to the bit


@pytest.mark.slow
def test_killed_run_resumes_to_the_identical_cache(setup, tmp_path):
    model_dir, text_dir = setup
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run([sys.executable, *cache_command(model_dir, text_dir, reference)], check=True, capture_output=True)
    n_shards = open_cache(reference).manifest["n_shards"]
    assert n_shards >= 6

    # kill -9 as soon as a few shards are on disk: a moment chosen by the race, not by the program
    proc = subprocess.Popen([sys.executable, *cache_command(model_dir, text_dir, resumed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (resumed / sf.SHARD_DIR / sf.sidecar_name(2)).exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / sf.MANIFEST).exists()
    done = len(list((resumed / sf.SHARD_DIR).glob("*.json")))
    assert 3 <= done < n_shards, "the kill came too late to test resuming"

    result = subprocess.run([sys.executable, *cache_command(model_dir, text_dir, resumed)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert_same_cache(reference, resumed)
    assert not list((resumed / sf.SHARD_DIR).glob(".*.tmp"))  # no debris of the killed write


@pytest.mark.slow
def test_torchrun_ranks_write_one_cache(setup, tmp_path):
    model_dir, text_dir = setup
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run([sys.executable, *cache_command(model_dir, text_dir, single, n_sequences=8)], check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*torchrun, *cache_command(model_dir, text_dir, multi, n_sequences=8)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((multi / sf.MANIFEST).read_text())
    assert manifest["world_size"] == 2
    assert_same_cache(single, multi)

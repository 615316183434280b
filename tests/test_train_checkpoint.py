"""Checkpoints: --resume after an interruption reaches bit for bit the weights of an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsae_cache import write_array_cache
from mlsae_train import TrainConfig, load_sae, train
from mlsae_train.checkpoint import atomic_write, read_progress

REPO = Path(__file__).resolve().parents[1]


def sparse_acts(n_tokens, n_layers, d, n_features=6, seed=0):
    """Tokens made of a few planted directions: many SAE latents die, so AuxK and the dead counters matter."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n_features, d))
    codes = rng.random((n_tokens, n_layers, n_features)) * (rng.random((n_tokens, n_layers, n_features)) < 0.3)
    return (codes @ features + 0.01 * rng.standard_normal((n_tokens, n_layers, d))).astype(np.float32)


def config(cache, out, **overrides):
    settings = {
        "shards": [str(cache)], "out": str(out), "expansion_factor": 8, "k": 2, "batch_tokens": 32,
        "dead_tokens": 64, "save_every_tokens": 64, "seed": 5, "progress": False, "lr": 3e-3,
    }  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def weights_and_state(run):
    return load_file(str(Path(run) / "checkpoint.safetensors"))


def metrics(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s")
    return rows


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return write_array_cache(root / "c", sparse_acts(320, 2, 8), layers=[3, 7], shard_tokens=100)


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    train(config(cache, run))
    return run


def test_resume_after_an_interruption_is_bit_for_bit(cache, uninterrupted, tmp_path):
    run = tmp_path / "resumed"
    train(config(cache, run), stop_after_steps=5)  # "killed" after step 5; the last checkpoint is from step 4
    assert read_progress(run / "checkpoint.safetensors")["step"] == 4
    train(config(cache, run, resume=True))

    full, resumed = weights_and_state(uninterrupted), weights_and_state(run)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert metrics(run) == metrics(uninterrupted)  # the redone step is logged once
    assert [row["step"] for row in metrics(run)] == list(range(10))
    assert max(row["dead_fraction"] for row in metrics(run)) > 0  # AuxK and the dead counters took part
    sae_full, sae_resumed = load_sae(uninterrupted), load_sae(run)
    assert torch.equal(sae_full.W_dec, sae_resumed.W_dec) and sae_full.layers == [3, 7]


def test_resume_of_a_finished_run_changes_nothing(cache, uninterrupted):
    before = {p.name: p.read_bytes() for p in uninterrupted.iterdir()}
    train(config(cache, uninterrupted, resume=True))
    assert {p.name: p.read_bytes() for p in uninterrupted.iterdir()} == before


def test_resume_of_a_finished_run_rewrites_missing_weights(cache, uninterrupted, tmp_path):
    """A kill between the last checkpoint and the weights file leaves no (or stale) weights: --resume writes them."""
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    (run / "sae.safetensors").unlink()
    train(config(cache, run, resume=True))
    assert (run / "sae.safetensors").read_bytes() == (uninterrupted / "sae.safetensors").read_bytes()


@pytest.mark.slow
def test_resume_after_killing_the_process(tmp_path):
    cache = write_array_cache(tmp_path / "c", sparse_acts(1536, 2, 32, seed=1), layers=[0, 1], shard_tokens=500)
    settings = {"expansion_factor": 16, "k": 4, "batch_tokens": 32, "dead_tokens": 256, "save_every_tokens": 64, "lr": 1e-3}
    killed = tmp_path / "killed"
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]
    cmd = [sys.executable, "-m", "mlsae_train.cli", "--shards", str(cache), "--out", str(killed), "--no-progress", "--seed", "5", *argv]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed / "checkpoint.safetensors"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if checkpoint.exists() and read_progress(checkpoint)["step"] >= 4:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert read_progress(checkpoint)["step"] < 48
    train(config(cache, killed, resume=True, **settings))
    full = tmp_path / "full"
    train(config(cache, full, **settings))
    a, b = weights_and_state(full), weights_and_state(killed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [row["step"] for row in metrics(killed)] == list(range(48))


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_the_bfloat16_screen_trains_as_the_float32_kernel_and_resumes_bit_for_bit(cache, tmp_path):
    """--screen on (exact bfloat16 screen) and off (float32 kernel): the same run up to float32 rounding,
    each resumed bit for bit. The module's other tests run the default, --screen off (the float32 kernel)."""
    finals = {}
    for screen in ("on", "off"):
        full, resumed = tmp_path / f"full-{screen}", tmp_path / f"resumed-{screen}"
        train(config(cache, full, screen=screen))
        train(config(cache, resumed, screen=screen), stop_after_steps=5)
        train(config(cache, resumed, screen=screen, resume=True))
        finals[screen] = weights_and_state(full)
        for name, tensor in weights_and_state(resumed).items():
            assert torch.equal(finals[screen][name], tensor), (screen, name)
    assert max(row["dead_fraction"] for row in metrics(tmp_path / "full-on")) > 0  # AuxK took part
    for name, on in finals["on"].items():
        off = finals["off"][name]
        if on.is_floating_point():
            torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(on, off), name

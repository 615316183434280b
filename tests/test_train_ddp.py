"""Data parallel: 2 CPU processes (gloo, under torchrun) reach the weights of 1 process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae_cache import write_array_cache
from mlsae_train import TrainConfig, load_sae, train
from mlsae_train.checkpoint import read_progress

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mlsae", "per-layer", "crosscoder"])
def test_two_gloo_processes_match_one(tmp_path, arch):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((6, 16))
    codes = rng.random((512, 3, 6)) * (rng.random((512, 3, 6)) < 0.3)
    cache = write_array_cache(tmp_path / "c", (codes @ features).astype(np.float32), layers=[0, 1, 2], shard_tokens=100)
    settings = {"arch": arch, "expansion_factor": 4, "k": 3, "batch_tokens": 64, "dead_tokens": 128, "lr": 3e-3, "seed": 1}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mlsae_train.cli", "--shards", str(cache), "--out", str(tmp_path / "ddp"), "--device", "cpu", "--no-progress", *flags,
    ]  # fmt: skip
    result = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_progress(tmp_path / "ddp" / "checkpoint.safetensors")["world_size"] == 2

    train(TrainConfig(shards=[str(cache)], out=str(tmp_path / "one"), device="cpu", progress=False, **settings))

    two, one = load_sae(tmp_path / "ddp"), load_sae(tmp_path / "one")
    assert two.arch == one.arch == arch
    for name in ("W_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(getattr(two, name), getattr(one, name), rtol=1e-4, atol=1e-5, msg=name)
    rows = {
        run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("ddp", "one")
    }
    assert len(rows["ddp"]) == len(rows["one"]) == 8
    assert max(r["dead_fraction"] for r in rows["one"]) > 0  # the AuxK path ran across processes too
    for a, b in zip(rows["ddp"], rows["one"]):
        assert abs(a["fvu"] - b["fvu"]) < 1e-5 and abs(a["auxk"] - b["auxk"]) < 1e-5 and a["dead_fraction"] == b["dead_fraction"]

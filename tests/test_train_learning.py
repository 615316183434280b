"""Evidence of learning: an MLSAE trained on a planted sparse dictionary spread over layers recovers it."""

import numpy as np
import torch

from mlsae_cache import write_array_cache
from mlsae_train import TrainConfig, load_sae, train


def planted_dictionary_data(n_tokens=8192, n_layers=3, d=32, n_features=48, seed=0):
    """x[t, l] = sum_f a[t, f] * w[f, l] * D_f + noise: ~3 of 48 unit directions active per token, each
    strongest at a home layer and fading over the others (so one feature lives at several layers)."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_features, d))
    directions -= directions.mean(1, keepdims=True)  # per-vector standardization removes the mean component
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    home = rng.integers(0, n_layers, n_features)
    layer_weight = np.exp(-((np.arange(n_layers)[None] - home[:, None]) ** 2))  # [F, L]
    magnitude = rng.uniform(1, 3, (n_tokens, n_features)) * (rng.random((n_tokens, n_features)) < 3 / n_features)
    x = np.einsum("tf,fl,fd->tld", magnitude, layer_weight, directions) + 0.02 * rng.standard_normal((n_tokens, n_layers, d))
    return x.astype(np.float32), directions


def test_mlsae_recovers_planted_directions(tmp_path):
    x, truth = planted_dictionary_data()
    cache = write_array_cache(tmp_path / "cache", x, layers=[0, 1, 2], shard_tokens=2048)
    train(TrainConfig(
        shards=[str(cache)], out=str(tmp_path / "run"), expansion_factor=4, k=4, batch_tokens=64,
        lr=1e-2, dead_tokens=2048, progress=False,
    ))  # fmt: skip
    sae = load_sae(tmp_path / "run")

    decoder = sae.W_dec.detach().numpy()  # unit rows
    max_cos = (truth @ decoder.T).max(axis=1)  # best-matching latent for each planted direction
    assert max_cos.mean() >= 0.9, max_cos

    with torch.no_grad():
        xt = torch.from_numpy(x)
        x_hat = sae(xt)
    fvu = ((xt - x_hat) ** 2).sum((0, 2)) / ((xt - xt.mean(0)) ** 2).sum((0, 2))  # per layer; the mean predictor scores 1
    assert (fvu < 0.2).all(), fvu

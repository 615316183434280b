"""The shard format: round trips, size on disk, statistics, WebDataset compatibility, integrity."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from models import assert_one_line_error

from mlsae_cache import CacheError, open_cache, write_array_cache
from mlsae_cache import shard_format as sf
from mlsae_cache.cli import main as cache_main


def reference_cast(acts: np.ndarray, dtype: str) -> np.ndarray:
    """What a float32 array becomes after storage, computed by torch (an independent reference)."""
    return torch.from_numpy(acts).to(getattr(torch, dtype)).float().numpy()


@pytest.mark.parametrize("fmt", sf.FORMATS)
@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_round_trip_by_global_index(fmt, dtype, tmp_path):
    rng = np.random.default_rng(0)
    acts = (rng.normal(size=(700, 3, 8)) * 10).astype(np.float32)
    token_ids = rng.integers(0, 50000, 700)
    write_array_cache(tmp_path, acts, token_ids=token_ids, format=fmt, dtype=dtype, shard_tokens=256)
    cache = open_cache(tmp_path)
    expected = reference_cast(acts, dtype)
    assert (cache.n_tokens, cache.layers, cache.d_model) == (700, [0, 1, 2], 8)
    assert len(cache.manifest["shards"]) == 3
    idx = np.concatenate([rng.integers(0, 700, 300), [699, 0, 0, 255, 256]])  # any order, repeats, shard edges
    np.testing.assert_array_equal(cache.read(idx), expected[idx])
    # a subset of layers, in any order, gathered without reading the others
    np.testing.assert_array_equal(cache.read(idx, layer_positions=[2, 0]), expected[idx][:, [2, 0]])
    np.testing.assert_array_equal(cache.read(idx, layer_positions=[1]), expected[idx][:, [1]])
    with pytest.raises(IndexError, match="layer positions"):
        cache.read(idx, layer_positions=[3])
    np.testing.assert_array_equal(cache.read_range(200, 600), expected[200:600])
    np.testing.assert_array_equal(cache.token_table()["token_id"].to_numpy(), token_ids)
    assert cache.locate(256) == (sf.shard_name(1, fmt), 0)


@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_manifest_statistics_equal_brute_force(dtype, tmp_path):
    rng = np.random.default_rng(1)
    acts = (rng.normal(size=(500, 2, 16)) + np.arange(2)[None, :, None] * 3).astype(np.float32)
    write_array_cache(tmp_path, acts, dtype=dtype, shard_tokens=128, layers=[4, 7])
    cache = open_cache(tmp_path)
    stored = reference_cast(acts, dtype).astype(np.float64)
    # 16-bit values are reduced in float32 within a shard (shard_format.LayerStatSums): each sum may be off by
    # the worst-case rounding of a float32 sum of its terms (u = 2**-24 each), 128 tokens or 16 products
    u = 2.0**-24 if dtype != "float32" else 0.0
    for pos, layer in enumerate([4, 7]):
        s = cache.stats[str(layer)]
        assert s["count"] == 500
        mean_bound = 127 * u * np.abs(stored[:, pos]).mean(0) + 1e-12
        assert np.all(np.abs(np.asarray(s["mean"]) - stored[:, pos].mean(0)) <= mean_bound)
        np.testing.assert_allclose(s["mean_sq_norm"], (stored[:, pos] ** 2).sum(-1).mean(), rtol=15 * u + 1e-12)
        np.testing.assert_allclose(s["mean_norm"], np.linalg.norm(stored[:, pos], axis=-1).mean(), rtol=15 * u / 2 + 1e-12)


@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_bytes_on_disk_per_token_within_two_percent(fmt, tmp_path):
    n_layers, d_model, n_tokens = 6, 512, 4096  # pythia-70m shaped, float16
    acts = np.random.default_rng(2).normal(size=(n_tokens, n_layers, d_model)).astype(np.float32)
    write_array_cache(tmp_path, acts, dtype="float16", format=fmt, shard_tokens=n_tokens, seq_len=2048)
    cache = open_cache(tmp_path)
    assert cache.token_table()["position"].to_list() == list(range(2048)) * 2
    shard_bytes = sum((tmp_path / sf.SHARD_DIR / s["file"]).stat().st_size for s in cache.manifest["shards"])
    ideal = n_layers * d_model * 2 + sf.IDENTITY_BYTES
    assert abs(shard_bytes / n_tokens / ideal - 1) <= 0.02, (shard_bytes / n_tokens, ideal)


def test_webdataset_shards_stream_with_the_webdataset_library(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(3)
    acts = rng.normal(size=(50, 2, 4)).astype(np.float32)
    write_array_cache(tmp_path, acts, format="webdataset", shard_tokens=20)
    shards = sorted(str(p) for p in (tmp_path / sf.SHARD_DIR).glob("*.tar"))
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 50  # one sample per sequence; here every token is its own sequence
    for i, sample in enumerate(samples):
        assert sample["__key__"] == f"{i:09d}"
        np.testing.assert_array_equal(np.load(io.BytesIO(sample["acts.npy"])), acts[i : i + 1])
        np.testing.assert_array_equal(np.load(io.BytesIO(sample["tokens.npy"])), [[i, 0, 0]])


@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_verify_names_a_damaged_shard(fmt, tmp_path, capsys):
    acts = np.random.default_rng(4).normal(size=(300, 2, 8)).astype(np.float32)
    write_array_cache(tmp_path, acts, format=fmt, shard_tokens=100)
    assert open_cache(tmp_path).verify() == []
    assert cache_main(["verify", str(tmp_path)]) == 0
    victim = tmp_path / sf.SHARD_DIR / sf.shard_name(1, fmt)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the activations
    victim.write_bytes(bytes(data))
    assert open_cache(tmp_path).verify() == [victim.name]
    capsys.readouterr()
    assert cache_main(["verify", str(tmp_path)]) != 0
    assert_one_line_error(capsys.readouterr().err, victim.name, "damaged")


def test_truncated_shard_is_refused_on_read(tmp_path):
    acts = np.random.default_rng(5).normal(size=(200, 2, 8)).astype(np.float32)
    write_array_cache(tmp_path, acts, shard_tokens=100)
    victim = tmp_path / sf.SHARD_DIR / sf.shard_name(0, "hdf5")
    victim.write_bytes(victim.read_bytes()[:1000])
    with pytest.raises(CacheError, match="cannot be read"):
        open_cache(tmp_path).read([5])


def test_open_cache_errors_are_one_line(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        open_cache(tmp_path / "missing")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / sf.CONFIG).write_text(json.dumps({"model": "x"}))
    with pytest.raises(CacheError, match="unfinished"):
        open_cache(tmp_path / "unfinished")
    with pytest.raises(CacheError, match="holds no cache"):
        open_cache(tmp_path)


def test_bfloat16_storage_rounds_like_torch():
    x = np.random.default_rng(6).normal(size=10000).astype(np.float32) * 100
    x[:4] = [1.00390625, 1.01171875, -3.0e-39, 65504.0]  # ties to even, a subnormal, a large value
    np.testing.assert_array_equal(sf.from_storage(sf.to_storage(x, "bfloat16"), "bfloat16"), reference_cast(x, "bfloat16"))


@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_sequence_tokens_are_the_model_input(fmt, tmp_path):
    token_ids = np.arange(1000, 1000 + 250)
    acts = np.zeros((250, 1, 4), np.float32)
    write_array_cache(tmp_path, acts, token_ids=token_ids, format=fmt, shard_tokens=100, seq_len=50)
    cache = open_cache(tmp_path)
    assert cache.n_sequences == 5 and len(cache.manifest["shards"]) == 3
    np.testing.assert_array_equal(cache.sequence_tokens([4, 0, 2]), token_ids.reshape(5, 50)[[4, 0, 2]])


@pytest.mark.parametrize("fmt", sf.FORMATS)
@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_storage_reads_return_the_stored_bits_into_a_given_buffer(fmt, dtype, tmp_path):
    rng = np.random.default_rng(7)
    acts = (rng.normal(size=(300, 3, 8)) * 10).astype(np.float32)
    write_array_cache(tmp_path, acts, format=fmt, dtype=dtype, shard_tokens=128)
    cache = open_cache(tmp_path)
    stored = sf.to_storage(acts, dtype)  # [300, 3, 8] what the shards hold
    assert cache.storage_numpy == stored.dtype
    ascending = np.sort(rng.integers(0, 300, 200))  # repeats and shard edges: the trainer's batches
    shuffled = np.concatenate([rng.integers(0, 300, 100), [299, 0, 128, 127]])
    for idx in (ascending, shuffled, np.array([], np.int64)):
        np.testing.assert_array_equal(cache.read(idx, out_dtype="storage"), stored[idx])
        np.testing.assert_array_equal(cache.read(idx, [2, 0], out_dtype="storage"), stored[idx][:, [2, 0]])
    buffer = np.full((len(ascending), 3, 8), 7, cache.storage_numpy)
    assert cache.read(ascending, out_dtype="storage", out=buffer) is buffer
    np.testing.assert_array_equal(buffer, stored[ascending])
    as_float = np.zeros((len(ascending), 1, 8), np.float32)
    cache.read(ascending, [1], out=as_float)
    np.testing.assert_array_equal(as_float, reference_cast(acts, dtype)[ascending][:, [1]])
    np.testing.assert_array_equal(cache.read_range(100, 290, out_dtype="storage"), stored[100:290])
    window = np.zeros((190, 3, 8), np.float32)
    np.testing.assert_array_equal(cache.read_range(100, 290, out=window), reference_cast(acts, dtype)[100:290])
    with pytest.raises(ValueError, match="out must be"):
        cache.read(ascending, out=np.empty((len(ascending), 3, 8), np.float64))
    with pytest.raises(ValueError, match="out must be"):
        cache.read_range(0, 10, out_dtype="storage", out=np.empty((9, 3, 8), cache.storage_numpy))
    with pytest.raises(ValueError, match="out_dtype"):
        cache.read(ascending, out_dtype="float16")


@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_all_finite_on_stored_bits_finds_every_nan_and_inf(dtype):
    largest = {"float16": 65504.0, "bfloat16": 3.3895314e38, "float32": np.finfo(np.float32).max}[dtype]
    finite = np.array([0.0, -0.0, 1.5, -largest, largest, 1e-40 if dtype != "float16" else 6e-8], np.float32)
    stored = sf.to_storage(finite, dtype)
    assert sf.all_finite(stored, dtype) and sf.all_finite(stored[:0], dtype)
    for bad in (np.nan, -np.nan, np.inf, -np.inf):
        for at in (0, 3, 5):
            with_bad = finite.copy()
            with_bad[at] = bad
            assert not sf.all_finite(sf.to_storage(with_bad, dtype), dtype), (bad, at)
    # every non-finite bit pattern of the 16-bit dtypes (all exponent bits set, either sign, any mantissa)
    if dtype != "float32":
        every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(sf.STORAGE_NUMPY[dtype])  # [65536]
        reference = ~np.isfinite(sf.from_storage(every, dtype))
        flagged = np.array([not sf.all_finite(every[i : i + 1], dtype) for i in range(1 << 16)])
        np.testing.assert_array_equal(flagged, reference)


@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_from_storage_into_a_buffer_equals_a_new_array(dtype):
    x = np.random.default_rng(8).normal(size=(50, 2, 4)).astype(np.float32) * 1000
    stored = sf.to_storage(x, dtype)
    out = np.full(x.shape, np.nan, np.float32)
    assert sf.from_storage(stored, dtype, out=out) is out
    np.testing.assert_array_equal(out, sf.from_storage(stored, dtype))

"""Batches: random tokens across all shards and caches, all selected layers, order a function of the seed."""

import numpy as np
import pytest
import torch

from mlsae_cache import write_array_cache
from mlsae_cache.errors import MlsaeError
from mlsae_train.data import ActivationDataset, BatchOrder, Prefetcher


def acts(n, n_layers=3, d=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, n_layers, d)).astype(np.float32)


@pytest.fixture
def two_caches(tmp_path):
    a, b = acts(50, seed=1), acts(30, seed=2)
    write_array_cache(tmp_path / "a", a, layers=[2, 4, 6], model="m", shard_tokens=16)
    write_array_cache(tmp_path / "b", b, layers=[2, 4, 6], model="m", shard_tokens=16)
    return [tmp_path / "a", tmp_path / "b"], np.concatenate([a, b])


def test_caches_read_as_one_dataset_with_layer_selection(two_caches):
    paths, expected = two_caches
    dataset = ActivationDataset(paths)
    assert dataset.n_tokens == 80 and dataset.layers == [2, 4, 6] and dataset.d_model == 4
    idx = np.array([0, 17, 49, 50, 79, 3])
    np.testing.assert_array_equal(dataset.read(idx), expected[idx])
    picked = ActivationDataset(paths, layers=[6, 2])
    assert picked.layers == [6, 2]
    np.testing.assert_array_equal(picked.read(idx), expected[idx][:, [2, 0]])
    assert "shard-000001" in dataset.describe_token(17) and "row 1" in dataset.describe_token(17)
    assert str(paths[1]) in dataset.describe_token(55)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(n_tokens=100, batch_tokens=20, seed=3)
    epoch0 = np.concatenate([order.global_batch(s) for s in range(5)])
    epoch1 = np.concatenate([order.global_batch(s) for s in range(5, 10)])
    assert sorted(epoch0.tolist()) == list(range(100)) == sorted(epoch1.tolist())
    assert not np.array_equal(epoch0, epoch1)  # a fresh order every epoch
    assert np.array_equal(BatchOrder(100, 20, seed=3).global_batch(7), order.global_batch(7))  # a function of (seed, step)
    assert not np.array_equal(BatchOrder(100, 20, seed=4).global_batch(0), order.global_batch(0))
    # batches are random across the whole dataset, not one shard at a time
    assert order.global_batch(0).max() - order.global_batch(0).min() > 50
    # a batch straddling two epochs takes the end of one and the start of the next
    straddle = BatchOrder(n_tokens=30, batch_tokens=20, seed=0)
    assert len(straddle.global_batch(1)) == 20
    # the shares of the processes make up the global batch
    shares = [order.local_batch(4, rank, 4) for rank in range(4)]
    assert np.array_equal(np.concatenate(shares), order.global_batch(4))


def test_prefetcher_yields_each_step_in_order(two_caches):
    paths, expected = two_caches
    dataset = ActivationDataset(paths)
    order = BatchOrder(dataset.n_tokens, 16, seed=0)
    with Prefetcher(dataset, order, range(2, 5), depth=1) as batches:
        got = list(batches)
    assert [step for step, _ in got] == [2, 3, 4]
    for step, x in got:
        assert x.dtype == torch.float32 and x.shape == (16, 3, 4)  # float32 caches: stored as float32
        np.testing.assert_array_equal(x.numpy(), expected[order.global_batch(step)])


def stored_as(data, dtype):
    """What a float32 array reads back as after storage in ``dtype`` (torch's rounding)."""
    return torch.from_numpy(data).to(getattr(torch, dtype)).float().numpy()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("workers", [1, 3])
def test_prefetcher_yields_the_storage_dtype_that_converts_to_the_float32_read(tmp_path, dtype, workers, monkeypatch):
    import mlsae_cache.parallel_read as pr

    monkeypatch.setattr(pr, "CHUNK_BYTES", 5 * 3 * 4 * 2)  # 5-row chunks: several per thread, across shard edges
    data = acts(100, seed=3) * 50
    write_array_cache(tmp_path / "c", data, layers=[0, 1, 2], dtype=dtype, shard_tokens=16)
    dataset = ActivationDataset([tmp_path / "c"])
    order = BatchOrder(dataset.n_tokens, 40, seed=1)
    assert dataset.storage_dtype == dtype
    with Prefetcher(dataset, order, range(4), rank=1, world_size=2, workers=workers) as batches:
        got = list(batches)
    assert [step for step, _ in got] == [0, 1, 2, 3]
    for step, x in got:
        assert x.dtype == getattr(torch, dtype) and x.shape == (20, 3, 4)
        indices = order.local_batch(step, 1, 2)  # rank 1's half of the sorted global batch
        assert np.array_equal(indices, order.global_batch(step)[20:])
        np.testing.assert_array_equal(x.float().numpy(), dataset.read(indices))  # bit for bit the float32 read
        np.testing.assert_array_equal(x.float().numpy(), stored_as(data, dtype)[indices])


def test_caches_of_different_dtypes_are_read_as_float32(tmp_path):
    a, b = acts(40, seed=4), acts(30, seed=5)
    write_array_cache(tmp_path / "a", a, layers=[0, 1, 2], dtype="float16", shard_tokens=16)
    write_array_cache(tmp_path / "b", b, layers=[0, 1, 2], dtype="bfloat16", shard_tokens=16)
    dataset = ActivationDataset([tmp_path / "a", tmp_path / "b"], layers=[2, 0])
    expected = np.concatenate([stored_as(a, "float16"), stored_as(b, "bfloat16")])[:, [2, 0]]
    assert dataset.storage_dtype == "float32"
    idx = np.array([3, 39, 40, 69, 5])  # unsorted, across both caches
    np.testing.assert_array_equal(dataset.read(idx, out_dtype="storage"), expected[idx])
    order = BatchOrder(dataset.n_tokens, 35, seed=0)
    with Prefetcher(dataset, order, range(2), workers=2) as batches:
        for step, x in batches:
            assert x.dtype == torch.float32
            np.testing.assert_array_equal(x.numpy(), expected[order.global_batch(step)])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_prefetcher_names_the_token_with_nan(tmp_path, dtype, bad):
    data = acts(40)
    data[23, 1, 2] = bad
    data[31, 0, 0] = bad  # a later token of the same batch: the first one is named
    write_array_cache(tmp_path / "c", data, layers=[0, 1, 2], dtype=dtype, shard_tokens=16)
    dataset = ActivationDataset([tmp_path / "c"])
    order = BatchOrder(40, 40, seed=0)
    with pytest.raises(MlsaeError) as info, Prefetcher(dataset, order, range(1), workers=2) as batches:
        list(batches)
    message = str(info.value)
    assert "token 23" in message and "shard-000001" in message and "row 7" in message and "layer 1" in message
    assert "\n" not in message


def test_a_data_error_surfaces_at_the_step_it_belongs_to(tmp_path):
    data = acts(40)
    data[5, 0, 1] = np.inf
    write_array_cache(tmp_path / "c", data, layers=[0, 1, 2], dtype="float16", shard_tokens=16)
    dataset = ActivationDataset([tmp_path / "c"])
    order = BatchOrder(40, 10, seed=0)
    bad_step = next(s for s in range(4) if 5 in order.global_batch(s))
    seen = []
    with pytest.raises(MlsaeError, match="token 5 "), Prefetcher(dataset, order, range(4), workers=2) as batches:
        for step, _ in batches:
            seen.append(step)
    assert seen == list(range(bad_step))  # every earlier batch was trained on, none after


@pytest.mark.parametrize(
    "kwargs, expected",
    [({"model": "other"}, "model"), ({"layers": [2, 4, 7]}, "layers"), ("width", "d_model")],
)
def test_mixing_caches_of_different_models_or_widths_is_refused(tmp_path, kwargs, expected):
    write_array_cache(tmp_path / "a", acts(10), layers=[2, 4, 6], model="m")
    if kwargs == "width":
        write_array_cache(tmp_path / "b", acts(10, d=8), layers=[2, 4, 6], model="m")
    else:
        write_array_cache(tmp_path / "b", acts(10), **{"layers": [2, 4, 6], "model": "m", **kwargs})
    with pytest.raises(MlsaeError, match=expected):
        ActivationDataset([tmp_path / "a", tmp_path / "b"])


def test_unknown_layer_and_repeated_cache_are_refused(two_caches):
    paths, _ = two_caches
    with pytest.raises(MlsaeError, match="--layers 3"):
        ActivationDataset(paths, layers=[2, 3])
    with pytest.raises(MlsaeError, match="twice"):
        ActivationDataset([paths[0], paths[0]])


def test_b_pre_starts_at_the_geometric_median_of_the_first_standardized_batch(two_caches):
    from mlsae_train import MultiLayerSAE
    from mlsae_train.geometric_median import geometric_median
    from mlsae_train.model import standardize
    from mlsae_train.trainer import _init_b_pre

    paths, expected = two_caches
    dataset = ActivationDataset(paths)
    order = BatchOrder(dataset.n_tokens, 32, seed=0)
    sae = MultiLayerSAE(4, 8, 2)
    _init_b_pre(sae, dataset, order)
    first = torch.from_numpy(expected[order.global_batch(0)]).reshape(-1, 4)  # all layers of the first batch
    z, _, _ = standardize(first)
    torch.testing.assert_close(sae.b_pre.detach(), geometric_median(z))
    assert not torch.allclose(sae.b_pre.detach(), geometric_median(first), atol=1e-2)  # not on raw inputs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_pinned_batches_convert_on_the_gpu_to_the_float32_read(tmp_path, dtype):
    data = acts(100, seed=6) * 50
    write_array_cache(tmp_path / "c", data, layers=[0, 1, 2], dtype=dtype, shard_tokens=16)
    dataset = ActivationDataset([tmp_path / "c"])
    order = BatchOrder(dataset.n_tokens, 40, seed=2)
    with Prefetcher(dataset, order, range(5), pin_memory=True, workers=2) as batches:
        for step, x in batches:
            assert x.is_pinned() and x.dtype == getattr(torch, dtype)
            on_gpu = x.to("cuda", non_blocking=True).float()  # as the trainer does
            np.testing.assert_array_equal(on_gpu.cpu().numpy(), dataset.read(order.global_batch(step)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_training_on_a_16_bit_cache_equals_training_on_its_float32_values(tmp_path, dtype):
    """The trainer converts the stored batches on its device: the same weights, bit for bit, as a float32
    cache holding the same (already rounded) values, read and converted on the host."""
    from safetensors.torch import load_file

    from mlsae_train import TrainConfig, train

    data = stored_as(acts(192, seed=7) * 3, dtype)  # values a 16-bit cache holds exactly
    write_array_cache(tmp_path / "c16", data, layers=[0, 1, 2], dtype=dtype, shard_tokens=64)
    write_array_cache(tmp_path / "c32", data, layers=[0, 1, 2], dtype="float32", shard_tokens=64)
    weights = {}
    for name in ("c16", "c32"):
        train(TrainConfig(shards=[str(tmp_path / name)], out=str(tmp_path / f"run-{name}"), expansion_factor=4, k=2,
                          batch_tokens=32, dead_tokens=64, seed=1, progress=False, lr=3e-3))  # fmt: skip
        weights[name] = load_file(str(tmp_path / f"run-{name}" / "checkpoint.safetensors"))
    assert weights["c16"].keys() == weights["c32"].keys()
    for key, value in weights["c32"].items():
        assert torch.equal(weights["c16"][key], value), key

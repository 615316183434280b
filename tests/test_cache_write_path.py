"""The cache's write path: checksums, the writer's threads, statistics on the device, staging, tokenizing ahead."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import blake3
import numpy as np
import pytest
import torch

from mlsae_cache import open_cache, write_array_cache
from mlsae_cache import shard_format as sf
from mlsae_cache.staging import ShardStager, kept_runs
from mlsae_cache.text import ReadAhead, iter_token_sequences, read_ahead
from mlsae_cache.writer import CacheWriter, check_or_claim_directory, finalize_cache


def shard_contents(n_shards: int = 5, n: int = 300, n_layers: int = 3, d: int = 16, dtype: str = "float16") -> list[sf.ShardContent]:
    rng = np.random.default_rng(0)
    contents = []
    for i in range(n_shards):
        acts = sf.to_storage(rng.normal(size=(n, n_layers, d)).astype(np.float32), dtype)
        seq = np.arange(i * n, (i + 1) * n, dtype=np.int64)
        contents.append(sf.ShardContent(acts, seq, np.zeros(n, np.int32), rng.integers(0, 100, n).astype(np.int32), seq, np.zeros((n, 1), np.int32)))
    return contents


def config_for(fmt: str, dtype: str = "float16") -> dict:
    return {"format_version": sf.FORMAT_VERSION, "model": "m", "layers": [0, 1, 2], "d_model": 16, "dtype": dtype, "format": fmt, "seq_len": 1}


@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_writer_threads_write_the_files_of_a_serial_writer(fmt, tmp_path):
    files = {}
    for threads in (1, 4):
        root = tmp_path / f"threads{threads}"
        config = config_for(fmt)
        check_or_claim_directory(root, config, overwrite=False)
        writer = CacheWriter(root, config, threads=threads)
        for index, content in enumerate(shard_contents()):
            writer.submit(index, content)
        writer.close()
        finalize_cache(root, config, 5, {})
        files[threads] = {p.name: p.read_bytes() for p in sorted((root / sf.SHARD_DIR).iterdir())}
        files[threads][sf.MANIFEST] = (root / sf.MANIFEST).read_bytes()
    assert len(files[1]) == 11 and files[1] == files[4]


def test_a_failing_shard_is_reported_and_every_sidecar_written_is_a_whole_shard(tmp_path, monkeypatch):
    config = config_for("hdf5")
    check_or_claim_directory(tmp_path, config, overwrite=False)
    real_write = sf.write_shard

    def fail_on_shard_2(path, content, fmt, dtype):
        if path.name == sf.shard_name(2, fmt):
            raise OSError("disk on fire")
        return real_write(path, content, fmt, dtype)

    monkeypatch.setattr(sf, "write_shard", fail_on_shard_2)
    writer = CacheWriter(tmp_path, config, threads=2)
    with pytest.raises(OSError, match="disk on fire"):
        for index, content in enumerate(shard_contents()):
            writer.submit(index, content)
        writer.close()
    done = sorted(p.name for p in (tmp_path / sf.SHARD_DIR).glob("*.json"))
    assert sf.sidecar_name(2) not in done and sf.sidecar_name(0) in done
    for name in done:  # every sidecar written belongs to a whole shard
        assert writer.is_done(int(name[6:12]))


@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_checksums_are_blake3_of_the_file_and_sha256_caches_still_verify(fmt, tmp_path):
    acts = np.random.default_rng(1).normal(size=(250, 2, 8)).astype(np.float32)
    write_array_cache(tmp_path, acts, format=fmt, dtype="bfloat16", shard_tokens=100)
    manifest = json.loads((tmp_path / sf.MANIFEST).read_text())
    for entry in manifest["shards"]:
        data = (tmp_path / sf.SHARD_DIR / entry["file"]).read_bytes()
        assert entry["blake3"] == blake3.blake3(data).hexdigest() and "sha256" not in entry
        assert json.loads((tmp_path / sf.SHARD_DIR / entry["file"].replace(sf.SHARD_SUFFIX[fmt], ".json")).read_text())["blake3"] == entry["blake3"]
    assert open_cache(tmp_path).verify() == []

    # a cache written before BLAKE3: its entries carry "sha256", and its manifest no digests of its own
    del manifest[sf.MANIFEST_DIGEST], manifest[sf.MANIFEST_FILES]
    for entry in manifest["shards"]:
        del entry["blake3"]
        entry["sha256"] = hashlib.sha256((tmp_path / sf.SHARD_DIR / entry["file"]).read_bytes()).hexdigest()
    (tmp_path / sf.MANIFEST).write_text(json.dumps(manifest))
    assert open_cache(tmp_path).verify() == []
    victim = tmp_path / sf.SHARD_DIR / manifest["shards"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    assert open_cache(tmp_path).verify() == [victim.name]
    del manifest["shards"][0]["sha256"]  # an entry with no checksum cannot be vouched for
    (tmp_path / sf.MANIFEST).write_text(json.dumps(manifest))
    assert open_cache(tmp_path).verify() == [manifest["shards"][0]["file"], victim.name]


def brute_force_stats(stored: np.ndarray, dtype: str) -> dict:
    x = sf.from_storage(stored, dtype).astype(np.float64)  # [n, L, d]
    sq = (x**2).sum(-1)
    return {"count": len(x), "sum": x.sum(0), "sum_sq_norm": sq.sum(0), "sum_norm": np.sqrt(sq).sum(0), "sum_abs": np.abs(x).sum(0)}


def assert_stats_close(got: dict, want: dict, float32_terms: tuple[int, int] | None = None) -> None:
    """``float32_terms`` = (tokens per chunk, d_model) where the sums were reduced in float32 (16-bit storage
    on the CPU): then each is allowed the worst-case rounding of a float32 sum of that many terms, u = 2**-24
    per term (on top of float64's), and no more; float64 throughout is held to 1e-12."""
    assert got["count"] == want["count"]
    if float32_terms is None:
        for key in ("sum", "sum_sq_norm", "sum_norm"):
            np.testing.assert_allclose(np.asarray(got[key]), want[key], rtol=1e-12, atol=1e-10)
        return
    u, (chunk_tokens, d_model) = 2.0**-24, float32_terms
    assert np.all(np.abs(np.asarray(got["sum"]) - want["sum"]) <= (chunk_tokens - 1) * u * want["sum_abs"] + 1e-10)
    np.testing.assert_allclose(np.asarray(got["sum_sq_norm"]), want["sum_sq_norm"], rtol=(d_model - 1) * u + 1e-12)
    np.testing.assert_allclose(np.asarray(got["sum_norm"]), want["sum_norm"], rtol=(d_model - 1) * u / 2 + 1e-12)  # sqrt halves it


@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_statistics_on_both_paths_equal_brute_force_whatever_the_thread_count(dtype):
    rng = np.random.default_rng(2)
    acts = (rng.normal(size=(1000, 3, 40)) * np.array([1.0, 30.0, 1e-3])[None, :, None] + 5).astype(np.float32)
    stored = sf.to_storage(acts, dtype)
    want = brute_force_stats(stored, dtype)
    results = []
    threads_before = torch.get_num_threads()
    for use_numpy in (True, False):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sums = sf.LayerStatSums(3, 40, "cpu", use_numpy=use_numpy)
            sums.chunk_tokens = 96  # several chunks, the last one partial
            for start in (0, 1, 500):  # uneven calls
                stop = {0: 1, 1: 500, 500: 1000}[start]
                sums.add(sf.storage_tensor(stored[start:stop], dtype))
            results.append(sums.to_json())
            assert_stats_close(results[-1], want, (96, 40) if use_numpy and dtype != "float32" else None)
    torch.set_num_threads(threads_before)
    assert results[0] == results[1] and results[2] == results[3]  # bit for bit: one path, any number of threads
    assert sf.stored_stat_sums(stored[:0], dtype) == {"count": 0, "sum": [], "sum_sq_norm": [0.0] * 3, "sum_norm": [0.0] * 3}


def test_kept_runs():
    keep = np.array([1, 1, 0, 1, 0, 0, 1, 1, 1], bool)
    assert kept_runs(keep).tolist() == [[0, 2], [3, 4], [6, 9]]
    assert kept_runs(np.zeros(3, bool)).shape == (0, 2)


@pytest.mark.parametrize("dtype", sf.DTYPES)
@pytest.mark.parametrize("pattern", ["all", "few_runs", "many_runs", "none"])
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16])
def test_stager_stores_what_to_storage_stores(dtype, pattern, model_dtype):
    batch, seq_len, n_layers, d = 3, 200, 2, 8
    rng = np.random.default_rng(3)
    acts32 = (rng.normal(size=(batch, seq_len, n_layers, d)) * 50).astype(np.float32)
    acts32.reshape(-1)[:4] = [1.00390625, 1.01171875, -3.0e-39, 65504.0]  # bfloat16 ties to even, a subnormal, a large value
    acts = torch.from_numpy(acts32).to(model_dtype)
    keep = np.ones((batch, seq_len), bool)
    if pattern == "few_runs":
        keep[:, 0] = keep[1, 77] = False
    elif pattern == "many_runs":
        keep[:, ::3] = False
    elif pattern == "none":
        keep[:] = False
    input_ids = rng.integers(0, 1000, (batch, seq_len))
    stager = ShardStager(2 * batch * seq_len, n_layers, d, dtype, "cpu")
    stager.add(acts, torch.from_numpy(keep), 10, input_ids)
    stager.add(acts.flip(0), torch.from_numpy(keep[::-1].copy()), 13, input_ids[::-1])
    content, stats = stager.finish()

    as_float32 = acts.float().numpy()  # what the model's dtype holds, widened exactly
    b_idx, pos = np.nonzero(keep)
    expected = np.concatenate([sf.to_storage(as_float32[b_idx, pos], dtype), sf.to_storage(as_float32[::-1][b_idx, pos], dtype)])
    assert content.acts.dtype == sf.STORAGE_NUMPY[dtype]
    np.testing.assert_array_equal(content.acts.view(np.uint8), expected.view(np.uint8))  # the very bits
    np.testing.assert_array_equal(content.sequence, np.r_[10 + b_idx, 13 + b_idx])
    np.testing.assert_array_equal(content.position, np.r_[pos, pos])
    np.testing.assert_array_equal(content.token_id, np.r_[input_ids[b_idx, pos], input_ids[::-1][b_idx, pos]])
    np.testing.assert_array_equal(content.input_sequence, np.arange(10, 16))
    np.testing.assert_array_equal(content.input_ids, np.r_[input_ids, input_ids[::-1]])
    if pattern == "none":
        assert stats["count"] == 0 and len(content.acts) == 0
    else:
        float32_terms = (min(stager.stats.chunk_tokens, batch * seq_len), d) if dtype != "float32" else None  # a chunk is at most one add
        assert_stats_close(stats, brute_force_stats(expected, dtype), float32_terms)


class CountingTokenizer:
    """A tokenizer that remembers how many characters it was asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars = tokenizer, 0
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, texts, **kwargs):
        self.chars += sum(len(t) for t in texts)
        return self.tokenizer(texts, **kwargs)


def test_a_limited_stream_tokenizes_only_what_it_needs_and_is_the_same_stream(pythia_tokenizer):
    texts = [f"Text number {i} says something about rivers and kings, number {i}." for i in range(3000)]
    unlimited = list(iter_token_sequences(texts, pythia_tokenizer, 64))
    for limit in (1, 5, 40):
        counting = CountingTokenizer(pythia_tokenizer)
        got = list(iter_token_sequences(texts, counting, 64, limit=limit))
        assert len(got) == limit
        np.testing.assert_array_equal(np.stack(got), np.stack(unlimited[:limit]))
        needed_chars = limit * 64 * 4  # these texts hold under 4 characters a token
        assert counting.chars <= 1.5 * needed_chars + 100, (limit, counting.chars)
    # a limit beyond the data gives all there is
    assert len(list(iter_token_sequences(texts, pythia_tokenizer, 64, limit=10**6))) == len(unlimited)


def test_read_ahead_keeps_order_raises_where_the_error_was_and_stops_with_its_consumer():
    assert list(read_ahead(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad text")

    got = []
    with pytest.raises(ValueError, match="bad text"):
        for item in read_ahead(failing(), depth=8):
            got.append(item)
    assert got == [1, 2]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    ahead = read_ahead(endless(), depth=4)
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()
    deadline = time.time() + 5
    while any(t.name == "mlsae-tokenize-ahead" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "mlsae-tokenize-ahead" for t in threading.enumerate())
    assert len(produced) <= 3 + 4 + 2  # never more than the queue's depth ahead


def test_a_read_ahead_starts_at_once_runs_deeper_when_told_and_stops_when_closed():
    produced = []
    reached = {n: threading.Event() for n in (2, 6)}

    def counting():
        for i in range(20):
            produced.append(i)
            if len(produced) in reached:
                reached[len(produced)].set()
            yield i

    ahead = ReadAhead(counting(), depth=2)
    assert reached[2].wait(10)  # tokenizing before anything is asked for (while the model loads)
    ahead.deepen(6)
    assert reached[6].wait(10)  # 2 deep would have stopped at 3
    assert [next(ahead) for _ in range(4)] == [0, 1, 2, 3]
    ahead.close()
    ahead._thread.join(10)
    assert not ahead._thread.is_alive() and len(produced) < 20
    rest = list(ahead)  # what was already made, in order, then the end (no wait on a stopped thread)
    assert rest == list(range(4, 4 + len(rest)))

    dropped = ReadAhead(counting(), depth=1)  # never read nor closed (a run that failed while its model loaded)
    thread = dropped._thread
    del dropped
    thread.join(10)
    assert not thread.is_alive()


def test_host_buffers_are_handed_round_again_once_given_back():
    from mlsae_cache.staging import HostBuffers

    buffers = HostBuffers()
    first = buffers.take((10, 2, 4), torch.float16, pin_memory=False)
    second = buffers.take((10, 2, 4), torch.float16, pin_memory=False)
    assert first.data_ptr() != second.data_ptr()  # both in use: two buffers
    buffers.give_back(first)
    smaller = buffers.take((7, 2, 4), torch.float16, pin_memory=False)  # a last, shorter shard fits in it
    assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (7, 2, 4)
    assert buffers.take((10, 2, 4), torch.float16, pin_memory=False).data_ptr() not in (first.data_ptr(), second.data_ptr())
    buffers.give_back(second)
    assert buffers.take((10, 2, 4), torch.float32, pin_memory=False).data_ptr() != second.data_ptr()  # another dtype: not reused


def test_the_writer_calls_done_for_every_shard_written_or_not(tmp_path, monkeypatch):
    config = config_for("hdf5")
    check_or_claim_directory(tmp_path, config, overwrite=False)
    real_write = sf.write_shard
    monkeypatch.setattr(sf, "write_shard", lambda path, *a: (_ for _ in ()).throw(OSError("full")) if "000001" in path.name else real_write(path, *a))
    called = []
    writer = CacheWriter(tmp_path, config, threads=1, queue_depth=8)
    for index, content in enumerate(shard_contents(n_shards=4)):
        writer.submit(index, content, done=lambda index=index: called.append(index))
    with pytest.raises(OSError, match="full"):
        writer.close()
    assert sorted(called) == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", sf.DTYPES)
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_device_cast_rounds_like_to_storage(dtype, model_dtype):
    """What a GPU runs (stored_rows), run here on the CPU: the bits of to_storage of the widened values."""
    from mlsae_cache.staging import stored_rows

    rows32 = (np.random.default_rng(4).normal(size=(300, 2, 8)) * 100).astype(np.float32)
    rows32.reshape(-1)[:4] = [1.00390625, 1.01171875, -3.0e-39, 65504.0]
    rows = torch.from_numpy(rows32).to(model_dtype)
    keep = torch.from_numpy(np.arange(300) % 7 != 3)
    with np.errstate(over="ignore"):  # 65504 as a bfloat16 is 65536: infinite as a float16, in both
        expected = sf.to_storage(rows.float().numpy()[keep.numpy()], dtype)
        everything = sf.to_storage(rows.float().numpy(), dtype)
    for all_kept, mask, want in ((False, keep, expected), (True, torch.ones(300, dtype=torch.bool), everything)):
        got = sf.storage_numpy(stored_rows(rows, mask, sf.STORAGE_TORCH[dtype], all_kept=all_kept))
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))

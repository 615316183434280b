"""The cache's write path: checksums, the writer's threads, statistics on the device, staging, tokenizing ahead."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import blake3
import h5py
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
    real_commit = sf.ShardFile.commit

    def fail_on_shard_2(shard, content):
        if shard.path.name == sf.shard_name(2, "hdf5"):
            deadline = time.time() + 10  # shards are written at once: fail once shard 0 is on disk
            while not (tmp_path / sf.SHARD_DIR / sf.sidecar_name(0)).exists() and time.time() < deadline:
                time.sleep(0.01)
            raise OSError("disk on fire")
        return real_commit(shard, content)

    monkeypatch.setattr(sf.ShardFile, "commit", fail_on_shard_2)
    writer = CacheWriter(tmp_path, config, threads=2)
    with pytest.raises(OSError, match="disk on fire"):
        for index, content in enumerate(shard_contents()):
            writer.submit(index, content)
        writer.close()
    writer.abort()  # as the runner does after an error: every thread has stopped once it returns
    done = sorted(p.name for p in (tmp_path / sf.SHARD_DIR).glob("*.json"))
    assert sf.sidecar_name(2) not in done and sf.sidecar_name(0) in done  # a failure keeps the shards already written
    for name in done:  # every sidecar written belongs to a whole shard
        assert writer.is_done(int(name[6:12]))
    assert sorted(p.name for p in (tmp_path / sf.SHARD_DIR).iterdir()) == sorted(done + [n.replace(".json", ".h5") for n in done])  # no temporary file left


def serial_hdf5_shard(path, c: sf.ShardContent, dtype: str) -> None:
    """The HDF5 shard as written before shards were streamed: h5py, then one raw write of all activations."""
    acts = np.ascontiguousarray(c.acts)
    with h5py.File(path, "w", libver="latest") as f:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.CONTIGUOUS)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)
        space = h5py.h5s.create_simple(acts.shape)
        offset = h5py.h5d.create(f.id, b"activations", h5py.h5t.py_create(acts.dtype), space, dcpl=dcpl).get_offset()
        for name, column, dt in (("sequence", c.sequence, "<i8"), ("position", c.position, "<i4"), ("token_id", c.token_id, "<i4"),
                                 ("input_sequence", c.input_sequence, "<i8"), ("input_ids", c.input_ids, "<i4")):  # fmt: skip
            f.create_dataset(name, data=column.astype(dt))
        f.attrs["dtype"] = dtype
        f.attrs["format_version"] = sf.FORMAT_VERSION
    if acts.size:
        with open(path, "r+b") as raw:
            raw.seek(offset)
            raw.write(acts.tobytes())


def filtered_shard(n_seq: int, seq_len: int, n_layers: int, d: int, dtype: str, seed: int) -> sf.ShardContent:
    """A shard of ``n_seq`` sequences from 20 on, some tokens left out (none kept in sequence 21)."""
    rng = np.random.default_rng(seed)
    keep = rng.random((n_seq, seq_len)) < 0.8
    if n_seq > 1:
        keep[1] = False
    b_idx, pos = np.nonzero(keep)
    acts = sf.to_storage(rng.normal(size=(len(b_idx), n_layers, d)).astype(np.float32) * 10, dtype)
    input_ids = rng.integers(0, 1000, (n_seq, seq_len)).astype(np.int32)
    return sf.ShardContent(acts, (20 + b_idx).astype(np.int64), pos.astype(np.int32), input_ids[b_idx, pos], np.arange(20, 20 + n_seq, dtype=np.int64), input_ids)


def sequence_parts(c: sf.ShardContent, sequences_per_part: list[int]) -> list[sf.ShardContent]:
    """``c`` cut into parts of whole sequences (as the stager hands over its batches)."""
    parts, first = [], 0
    for count in sequences_per_part:
        seqs = c.input_sequence[first : first + count]
        rows = np.isin(c.sequence, seqs)
        parts.append(sf.ShardContent(c.acts[rows], c.sequence[rows], c.position[rows], c.token_id[rows], seqs, c.input_ids[first : first + count]))
        first += count
    assert first == len(c.input_sequence)
    return parts


@pytest.mark.parametrize("dtype", sf.DTYPES)
@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_a_shard_streamed_in_parts_is_the_file_of_a_serial_write(fmt, dtype, tmp_path):
    """Parts of whole sequences (some with no stored token, as a filter can leave them) appended one by one
    make the file a serial write makes (for HDF5: h5py plus one raw write, as shards were written before
    they were streamed), its digest is BLAKE3 of its bytes, and no temporary file is left."""
    for n_seq, cuts in ((5, [2, 1, 2]), (1, [1]), (4, [1, 1, 1, 1])):
        content = filtered_shard(n_seq, 7, 3, 8, dtype, seed=n_seq)
        whole, streamed = tmp_path / f"whole-{n_seq}", tmp_path / f"streamed-{n_seq}"
        if fmt == "hdf5":
            serial_hdf5_shard(whole, content, dtype)
        else:
            sf.write_shard(whole, content, fmt, dtype)
        shard = sf.open_shard_file(streamed, fmt, dtype)
        for part in sequence_parts(content, cuts):
            shard.append(part)
        digest = shard.commit(content)
        assert streamed.read_bytes() == whole.read_bytes()
        assert digest == blake3.blake3(streamed.read_bytes()).hexdigest()
        np.testing.assert_array_equal(sf.open_shard(streamed, fmt, dtype, 3, 8).acts[:], content.acts)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{kind}-{n}" for kind in ("whole", "streamed") for n in (5, 1, 4))


@pytest.mark.parametrize("dtype", sf.DTYPES)
def test_the_activations_offset_does_not_depend_on_the_number_of_rows(dtype, tmp_path):
    """What streaming rests on: the activations of any number of rows start where the probe says."""
    for n_layers, d, rows in ((3, 8, (1, 2, 999, 70000)), (30, 576, (1, 2, 99))):
        for n in rows:
            path = tmp_path / f"{n_layers}-{n}.h5"
            serial_hdf5_shard(path, sf.ShardContent(np.zeros((n, n_layers, d), sf.STORAGE_NUMPY[dtype]), np.zeros(n, np.int64), np.zeros(n, np.int32),
                                                    np.zeros(n, np.int32), np.zeros(1, np.int64), np.zeros((1, n), np.int32)), dtype)  # fmt: skip
            with h5py.File(path, "r") as f:
                assert f["activations"].id.get_offset() == sf.hdf5_activations_offset(dtype, n_layers, d)


def test_a_wrong_offset_guess_still_gives_the_serial_file(tmp_path, monkeypatch):
    """The offset is checked for every shard: appended at the wrong place, the activations are written again
    where they belong and nothing else of the file is left wrong."""
    content = filtered_shard(5, 7, 3, 8, "float16", seed=3)
    serial_hdf5_shard(tmp_path / "whole", content, "float16")
    monkeypatch.setattr(sf, "hdf5_activations_offset", lambda *args: 4096 + 3)
    shard = sf.open_shard_file(tmp_path / "streamed", "hdf5", "float16")
    for part in sequence_parts(content, [2, 3]):
        shard.append(part)
    shard.commit(content)
    assert (tmp_path / "streamed").read_bytes() == (tmp_path / "whole").read_bytes()


def test_what_a_killed_shard_write_leaves_is_dropped_by_the_next_run(tmp_path):
    """The temporary files of a shard being streamed (the shard's own and, while its layout is made, h5py's
    scratch file beside it) are the cache's own: the next run over the directory removes them."""
    config = config_for("hdf5")
    check_or_claim_directory(tmp_path, config, overwrite=False)
    shard = sf.open_shard_file(tmp_path / sf.SHARD_DIR / sf.shard_name(0, "hdf5"), "hdf5", "float16")
    shard.append(shard_contents(n_shards=1)[0])
    os.close(shard.fd)  # as a SIGKILL leaves it
    sf.hdf5_layout_scratch(shard.tmp).write_bytes(b"half an HDF5 layout")
    check_or_claim_directory(tmp_path, config, overwrite=False)
    assert list((tmp_path / sf.SHARD_DIR).iterdir()) == []


def test_a_shard_stopped_half_way_leaves_nothing(tmp_path):
    """A run stopped while a shard is being streamed (abort) removes the shard's temporary file; the shard
    finished before it is kept whole, and no writing thread is left."""
    config = config_for("hdf5")
    check_or_claim_directory(tmp_path, config, overwrite=False)
    writer = CacheWriter(tmp_path, config, threads=1)
    first, second = shard_contents(n_shards=2)
    writer.submit(0, first)
    shard = writer.open_shard(1)
    shard.append(sf.ShardContent(second.acts[:100], second.sequence[:100], second.position[:100], second.token_id[:100],
                                 second.input_sequence[:100], second.input_ids[:100]))  # fmt: skip
    being_written = lambda: list((tmp_path / sf.SHARD_DIR).glob(".shard-000001.h5.*.tmp"))  # noqa: E731
    deadline = time.time() + 10
    while not (being_written() and writer.sidecar_path(0).exists()) and time.time() < deadline:
        time.sleep(0.01)
    assert being_written() and writer.sidecar_path(0).exists()
    writer.abort()
    assert sorted(p.name for p in (tmp_path / sf.SHARD_DIR).iterdir()) == ["shard-000000.h5", "shard-000000.json"]
    assert writer.is_done(0) and not [t for t in threading.enumerate() if t.name.startswith("mlsae-shard-writer")]


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
    parts = []  # what the shard's writing thread is handed, batch by batch
    stager = ShardStager(2 * batch * seq_len, n_layers, d, dtype, "cpu", sink=lambda part, ready: parts.append((part, ready)))
    stager.add(acts, torch.from_numpy(keep), 10, input_ids)
    stager.add(acts.flip(0), torch.from_numpy(keep[::-1].copy()), 13, input_ids[::-1])
    content, stats = stager.finish()
    assert len(parts) == 2 and all(ready is None for _, ready in parts)  # on a CPU the rows are there at once
    for field in ("acts", "sequence", "position", "token_id", "input_sequence", "input_ids"):
        np.testing.assert_array_equal(np.concatenate([getattr(part, field) for part, _ in parts]), getattr(content, field))

    # the same batches given block by block (as ResidualReader.read_each makes them, slots in any order): the same shard
    by_block = ShardStager(2 * batch * seq_len, n_layers, d, dtype, "cpu")
    for batch_acts, batch_keep, first, ids in ((acts, keep, 10, input_ids), (acts.flip(0), keep[::-1].copy(), 13, input_ids[::-1])):
        with by_block.adding_layers(torch.from_numpy(batch_keep), first, ids) as stage:
            for slot in reversed(range(n_layers)):
                stage(slot, batch_acts[:, :, slot])
    content_by_block, stats_by_block = by_block.finish()
    for field in ("acts", "sequence", "position", "token_id", "input_sequence", "input_ids"):
        np.testing.assert_array_equal(getattr(content_by_block, field).view(np.uint8), getattr(content, field).view(np.uint8))
    assert stats_by_block == stats

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
    real_append = sf.HDF5ShardFile.append
    all_handed_over = threading.Event()

    def fail_on_shard_1(shard, part):
        if "000001" in shard.path.name:
            all_handed_over.wait(10)
            raise OSError("full")
        real_append(shard, part)

    monkeypatch.setattr(sf.HDF5ShardFile, "append", fail_on_shard_1)
    called = []
    writer = CacheWriter(tmp_path, config, threads=1, queue_depth=8)
    for index, content in enumerate(shard_contents(n_shards=4)):
        writer.submit(index, content, done=lambda index=index: called.append(index))
    all_handed_over.set()
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


def test_a_reused_block_output_equals_a_fresh_one_and_read_each_gives_each_block(pythia_tokenizer_dir, tmp_path):
    """``read(reuse_output=True)`` (the shard loop's with a lens or a norm filter) gives what a fresh read
    gives, in the memory of the previous read of that shape, and the right values for another shape (a
    shard's shorter last batch); ``read_each`` hands over each block's output, in its slot, once."""
    from models import build_tiny_model

    from mlsae_cache.lm import ResidualReader, load_model

    model = load_model(str(build_tiny_model(tmp_path / "model", pythia_tokenizer_dir, n_layers=4)))
    reader = ResidualReader(model, [0, 2, 3])
    batches = [torch.randint(0, 1000, shape) for shape in ((2, 16), (2, 16), (1, 16))]
    fresh = [reader.read(ids) for ids in batches]  # [B, S, 3, d] each
    reused = []
    for ids, want in zip(batches, fresh):
        got = reader.read(ids, reuse_output=True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        reused.append(got.data_ptr())
    assert reused[0] == reused[1]
    assert fresh[0].data_ptr() != fresh[1].data_ptr()  # without reuse_output, each read is its own
    seen = []
    reader.read_each(batches[0], lambda slot, hidden: seen.append((slot, hidden.clone())))
    assert [slot for slot, _ in seen] == [0, 1, 2]
    for slot, hidden in seen:
        torch.testing.assert_close(hidden, fresh[0][:, :, slot], rtol=0, atol=0)

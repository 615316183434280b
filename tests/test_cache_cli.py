"""``mlsae-cache`` end to end on a tiny GPT-NeoX with the real Pythia tokenizer: exactness and bad input."""

from __future__ import annotations

import errno
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from models import assert_one_line_error, build_tiny_model, write_english

from mlsae_cache import open_cache
from mlsae_cache import shard_format as sf
from mlsae_cache import writer as writer_module
from mlsae_cache.cli import main as cache_main
from mlsae_cache.lm import ResidualReader, load_model, load_tokenizer

SEQ_LEN = 64


@pytest.fixture(scope="module")
def model_dir(pythia_tokenizer_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("neox"), pythia_tokenizer_dir, n_layers=3, d_model=32, context=128)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    return write_english(tmp_path_factory.mktemp("text"), n_files=4, words_per_file=120)


def run_cache(model_dir, text_dir, out, *extra):
    args = ["--model", str(model_dir), "--dataset", str(text_dir), "--out", str(out), "--seq-len", str(SEQ_LEN),
            "--tokens", str(SEQ_LEN * 6), "--batch-size", "2", "--shard-mb", "0.04", "--no-progress", *extra]  # fmt: skip
    return cache_main(args)


def brute_force_tokens(tokenizer, text_dir: Path) -> np.ndarray:
    """SPEC 1 by hand: texts joined with EOS, cut into SEQ_LEN sequences, last incomplete one dropped."""
    stream: list[int] = []
    for path in sorted(text_dir.glob("*.txt")):
        stream += tokenizer.encode(path.read_text(), add_special_tokens=False) + [tokenizer.eos_token_id]
    n = len(stream) // SEQ_LEN
    return np.array(stream[: n * SEQ_LEN]).reshape(n, SEQ_LEN)


def files_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_cache_holds_exactly_the_block_outputs_of_kept_tokens(fmt, model_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    assert run_cache(model_dir, text_dir, out, "--format", fmt, "--dtype", "float32") == 0
    cache = open_cache(out)
    tokenizer, model = load_tokenizer(str(model_dir)), load_model(str(model_dir))
    sequences = brute_force_tokens(tokenizer, text_dir)[:6]  # [6, S]
    assert len(sequences) == 6
    keep = sequences != tokenizer.eos_token_id  # the only special token in this stream
    seq_idx, pos = np.nonzero(keep)
    table = cache.token_table()
    np.testing.assert_array_equal(table["sequence"].to_numpy(), seq_idx)
    np.testing.assert_array_equal(table["position"].to_numpy(), pos)
    np.testing.assert_array_equal(table["token_id"].to_numpy(), sequences[seq_idx, pos])
    assert (sequences == tokenizer.eos_token_id).sum() > 0  # the test really exercises removal
    expected = ResidualReader(model, [0, 1, 2]).read(torch.as_tensor(sequences)).numpy()[seq_idx, pos]  # [n, 3, d]
    np.testing.assert_allclose(cache.read(np.arange(cache.n_tokens)), expected, rtol=1e-5, atol=1e-5)
    m = cache.manifest
    assert m["model"] == str(model_dir) and m["seq_len"] == SEQ_LEN and m["layers"] == [0, 1, 2] and m["d_model"] == 32
    assert m["n_tokens"] == len(seq_idx) and m["n_sequences"] == 6 and m["n_shards"] > 1
    assert all(len(s["blake3"]) == 64 and s["n_tokens"] > 0 for s in m["shards"])  # BLAKE3: 32 bytes in hex
    np.testing.assert_allclose(cache.stats["1"]["mean"], expected[:, 1].mean(0), rtol=1e-5, atol=1e-6)
    assert cache.verify() == []


def test_layer_selection_and_float16(model_dir, text_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run_cache(model_dir, text_dir, full, "--dtype", "float32") == 0
    assert run_cache(model_dir, text_dir, part, "--layers", "0,2") == 0
    a, b = open_cache(full), open_cache(part)
    assert b.layers == [0, 2] and b.dtype == "float16"
    idx = np.arange(a.n_tokens)
    np.testing.assert_array_equal(b.read(idx), a.read(idx)[:, [0, 2]].astype(np.float16).astype(np.float32))


def test_lens_space_cache_and_package_agreement(model_dir, text_dir, tmp_path):
    from tuned_lens.nn.lenses import TunedLens

    from mlsae_cache.lens import load_lens

    model = load_model(str(model_dir))
    torch.manual_seed(0)
    lens = TunedLens.from_model(model)
    with torch.no_grad():
        for translator in lens.layer_translators:
            translator.weight.normal_(0, 0.2)
            translator.bias.normal_(0, 0.5)
    lens.save(tmp_path / "lens")
    ours = load_lens(tmp_path / "lens", n_layers=3, d_model=32)
    h = torch.randn(5, 7, 32)
    for layer in range(2):  # block l uses translator l + 1 (idx 0 is the embeddings)
        torch.testing.assert_close(ours.forward(h, layer), lens.transform_hidden(h, layer + 1))
        torch.testing.assert_close(ours.inverse(ours.forward(h, layer), layer), h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.forward(h, 2), h)  # the last block has no translator

    plain, lensed = tmp_path / "plain", tmp_path / "lensed"
    assert run_cache(model_dir, text_dir, plain, "--dtype", "float32") == 0
    assert run_cache(model_dir, text_dir, lensed, "--dtype", "float32", "--lens", str(tmp_path / "lens")) == 0
    x, x_lens = open_cache(plain).read_range(0, 50), open_cache(lensed).read_range(0, 50)
    expected = ours.forward_stack(torch.from_numpy(x), [0, 1, 2]).numpy()
    np.testing.assert_allclose(x_lens, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(x_lens[:, 2], x[:, 2])
    assert open_cache(lensed).manifest["lens"]["params_sha256"] == ours.sha256


def test_rerun_of_a_finished_cache_changes_nothing(model_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    assert run_cache(model_dir, text_dir, out) == 0
    before = files_digest(out)
    assert run_cache(model_dir, text_dir, out) == 0
    assert files_digest(out) == before


# ---------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, no traceback, nothing written is lost


def test_foreign_cache_is_refused_and_left_intact(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    assert run_cache(model_dir, text_dir, out) == 0
    before = files_digest(out)
    capsys.readouterr()
    assert run_cache(model_dir, text_dir, out, "--layers", "1") != 0
    assert_one_line_error(capsys.readouterr().err, "another configuration", "--overwrite")
    assert files_digest(out) == before
    assert run_cache(model_dir, text_dir, out, "--layers", "1", "--overwrite") == 0
    assert open_cache(out).layers == [1]


def test_non_cache_directory_is_refused(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert run_cache(model_dir, text_dir, out) != 0
    assert_one_line_error(capsys.readouterr().err, "not empty")
    assert (out / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--layers", "0,3"], ["layer 3 is out of range", "0..2"]),
        (["--layers", "one"], ["--layers"]),
        (["--seq-len", "512"], ["--seq-len 512", "context of 128"]),
        (["--format", "zip"], ["--format", "invalid choice"]),
        (["--dtype", "int8"], ["--dtype"]),
    ],
)
def test_bad_options(args, fragments, model_dir, text_dir, tmp_path, capsys):
    code = run_cache(model_dir, text_dir, tmp_path / "out", *args) if "--seq-len" not in args else cache_main(
        ["--model", str(model_dir), "--dataset", str(text_dir), "--out", str(tmp_path / "out"), *args, "--no-progress"])
    assert code != 0
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_missing_and_empty_data(model_dir, tmp_path, capsys):
    assert run_cache(model_dir, tmp_path / "nowhere", tmp_path / "a") != 0
    assert_one_line_error(capsys.readouterr().err, "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    assert run_cache(model_dir, empty, tmp_path / "b") != 0
    assert_one_line_error(capsys.readouterr().err)


def test_unknown_model_directory(text_dir, tmp_path, capsys):
    assert run_cache(tmp_path / "no-such-model", text_dir, tmp_path / "out") != 0
    assert_one_line_error(capsys.readouterr().err, "does not exist")


def test_unreachable_hub_fails_fast_in_a_subprocess(text_dir, tmp_path):
    """A hub id with the hub out of reach: one line naming the fix, well before the libraries' retries."""
    import os
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mlsae_cache.cli", "--model", "pythia-70m", "--dataset", str(text_dir),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert_one_line_error(result.stderr, "EleutherAI/pythia-70m", "--model DIR")
    assert time.perf_counter() - started < 30


def test_disk_full_keeps_finished_shards_and_resumes(model_dir, text_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cache"
    real_write = sf._write_hdf5
    calls = []

    def write_until_disk_full(path, content, dtype):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial shard")  # the device filled up half-way through this shard
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, content, dtype)

    monkeypatch.setattr(sf, "_write_hdf5", write_until_disk_full)
    assert run_cache(model_dir, text_dir, out) != 0
    assert_one_line_error(capsys.readouterr().err, "no space left")
    shard_dir = out / sf.SHARD_DIR
    assert sorted(p.name for p in shard_dir.iterdir()) == ["shard-000000.h5", "shard-000000.json"]  # no partial shard
    assert run_cache(model_dir, text_dir, out) == 0  # the wrapper fails only its second call
    assert len(calls) == 3  # only the missing shard was written again
    reference = tmp_path / "reference"
    assert run_cache(model_dir, text_dir, reference) == 0
    a, b = open_cache(out), open_cache(reference)
    np.testing.assert_array_equal(a.read(np.arange(a.n_tokens)), b.read(np.arange(b.n_tokens)))
    assert json.loads((out / sf.MANIFEST).read_text()) == json.loads((reference / sf.MANIFEST).read_text())


@pytest.mark.parametrize("fmt", sf.FORMATS)
def test_sequence_tokens_include_special_positions(fmt, model_dir, text_dir, pythia_tokenizer_dir, tmp_path):
    out = tmp_path / "cache"
    assert run_cache(model_dir, text_dir, out, "--format", fmt) == 0
    cache = open_cache(out)
    sequences = brute_force_tokens(load_tokenizer(str(model_dir)), text_dir)[:6]
    np.testing.assert_array_equal(cache.sequence_tokens(np.arange(6)), sequences)
    assert cache.n_sequences == 6


# ---------------------------------------------------------------------------------------------
# --overwrite removes only what mlsae-cache wrote; inputs are checked before anything is lost


def test_overwrite_never_empties_a_folder_that_holds_no_cache(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("precious")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = files_digest(out)
    assert run_cache(model_dir, text_dir, out, "--overwrite") == 2
    line = assert_one_line_error(capsys.readouterr().err, str(out), "notes.txt", "not written by mlsae-cache")
    assert "pass --overwrite" not in line  # the old message sent the user straight into the data loss
    assert files_digest(out) == before


@pytest.mark.parametrize("name", ["config.json", "manifest.json"])
def test_a_json_of_a_cache_name_written_by_someone_else_is_not_taken_for_a_cache(name, model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / name).write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))  # e.g. a model's own config
    before = files_digest(out)
    assert run_cache(model_dir, text_dir, out, "--overwrite") == 2
    assert_one_line_error(capsys.readouterr().err, name, "not written by mlsae-cache")
    assert files_digest(out) == before


def test_overwrite_of_a_cache_refuses_files_it_did_not_write(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    assert run_cache(model_dir, text_dir, out) == 0
    (out / "shards" / "my-notes.txt").write_text("mine")
    before = files_digest(out)
    capsys.readouterr()
    assert run_cache(model_dir, text_dir, out, "--layers", "1", "--overwrite") == 2
    assert_one_line_error(capsys.readouterr().err, "my-notes.txt")
    assert files_digest(out) == before
    (out / "shards" / "my-notes.txt").unlink()
    assert run_cache(model_dir, text_dir, out, "--layers", "1", "--overwrite") == 0  # only its own files: replaced
    assert open_cache(out).layers == [1]


def test_a_command_that_fails_on_its_inputs_leaves_out_as_it_found_it(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "new" / "cache"
    assert run_cache(model_dir, tmp_path / "typo", out) != 0  # a missing dataset, found once the folder was claimed
    assert_one_line_error(capsys.readouterr().err, "typo")
    assert list(tmp_path.iterdir()) == []  # neither config.json nor the folders it made
    existing = tmp_path / "existing"
    existing.mkdir()
    assert run_cache(model_dir, tmp_path / "typo", existing) != 0
    assert list(existing.iterdir()) == []  # the user's (empty) folder is kept, empty
    assert run_cache(model_dir, text_dir, out) == 0


def test_a_claim_without_any_shard_is_replaced_without_overwrite(model_dir, text_dir, tmp_path, capsys):
    """A command killed (kill -9) after claiming --out but before its first shard: the next one, of other
    options, takes the folder over, as nothing of that cache was computed."""
    other = tmp_path / "other"
    assert run_cache(model_dir, text_dir, other, "--layers", "1") == 0
    out = tmp_path / "cache"
    (out / "shards").mkdir(parents=True)
    (out / "config.json").write_bytes((other / "config.json").read_bytes())
    assert run_cache(model_dir, text_dir, out) == 0
    assert open_cache(out).layers == [0, 1, 2]


def test_tokens_beyond_the_dataset_are_said_and_recorded(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "cache"
    assert run_cache(model_dir, text_dir, out, "--tokens", str(10**9)) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    manifest = open_cache(out).manifest
    assert len(warnings) == 1 and "ran out" in warnings[0] and f"{manifest['n_model_tokens']:,}" in warnings[0], err
    assert manifest["tokens_short"] == 10**9 - manifest["n_model_tokens"] > 0
    capsys.readouterr()
    assert run_cache(model_dir, text_dir, tmp_path / "enough") == 0  # --tokens within the dataset: no warning
    assert "warning" not in capsys.readouterr().err
    assert open_cache(tmp_path / "enough").manifest["tokens_short"] == 0


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--shard-mb", "0"], ["--shard-mb must be positive"]),
        (["--shard-mb", "-1"], ["--shard-mb must be positive"]),
        (["--layers", "2-0"], ["--layers", "2-0", "backwards", "0-2"]),
    ],
)
def test_bad_sizes_and_ranges_write_nothing(args, fragments, model_dir, text_dir, tmp_path, capsys):
    assert run_cache(model_dir, text_dir, tmp_path / "out", *args) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_refused(model_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("keep me")
    assert run_cache(model_dir, text_dir, out) == 2
    assert_one_line_error(capsys.readouterr().err, "is a file")
    assert out.read_text() == "keep me"


def test_read_only_out_is_one_line(model_dir, text_dir, tmp_path, capsys, read_only_below):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only_below(locked)
    assert run_cache(model_dir, text_dir, locked / "cache") == 2
    assert_one_line_error(capsys.readouterr().err, "cannot write to", str(locked / "cache"), "permission denied", "writable --out")
    assert list(locked.iterdir()) == []


def test_verify_names_a_file_and_a_run_for_what_they_are(tmp_path, capsys):
    a_file = tmp_path / "shard.h5"
    a_file.write_bytes(b"x")
    assert cache_main(["verify", str(a_file)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(a_file), "is a file, not a cache directory")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {}, "sae": {}, "data": []}))  # what mlsae-train writes first
    assert cache_main(["verify", str(run)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(run), "training run")


def test_a_rerun_drops_only_its_own_temporary_files(model_dir, text_dir, tmp_path):
    out = tmp_path / "cache"
    assert run_cache(model_dir, text_dir, out) == 0
    before = files_digest(out)
    own = [out / ".manifest.json.k3j4l5.tmp", out / "shards" / ".shard-000001.h5.a1b2c3.tmp"]  # writes killed half-way
    for path in own:
        path.write_bytes(b"torn")
    (out / ".notes.tmp").write_text("mine")  # not a name the cache writes
    assert run_cache(model_dir, text_dir, out) == 0
    assert not any(path.exists() for path in own)
    assert (out / ".notes.tmp").read_text() == "mine"
    (out / ".notes.tmp").unlink()
    assert files_digest(out) == before


def test_a_failed_run_returns_only_once_no_shard_is_being_written(model_dir, text_dir, tmp_path, capsys, monkeypatch):
    """Shard 1 fails at once while shard 0 is still being written: the command's clean-up (which removes
    config.json when no shard landed) must not run before shard 0 has landed, or a rerun finds shards
    without a config (seen once in CI, with the writer's threads racing the clean-up)."""
    out = tmp_path / "cache"
    real_write = sf._write_hdf5
    shard_0_landed = threading.Event()

    def slow_first_shard_then_disk_full(path, content, dtype):
        if "shard-000000" in path.name:  # the temporary name of shard 0
            time.sleep(0.5)  # long after shard 1's error has reached the main thread
            real_write(path, content, dtype)
            shard_0_landed.set()
            return
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sf, "_write_hdf5", slow_first_shard_then_disk_full)
    monkeypatch.setattr(writer_module, "io_threads", lambda: 2)
    assert run_cache(model_dir, text_dir, out, "--shard-mb", "0.02") != 0  # 4 shards: shard 2 is handed over after shard 1 failed
    assert_one_line_error(capsys.readouterr().err, "no space left")
    assert shard_0_landed.is_set()  # the command waited for the write in flight
    assert not [t for t in threading.enumerate() if t.name.startswith("mlsae-shard-writer")]
    # shard 0 is whole, so the claim (config.json) stays and the same command finishes the cache
    assert (out / sf.CONFIG).exists() and (out / sf.SHARD_DIR / sf.shard_name(0, "hdf5")).exists()
    monkeypatch.setattr(sf, "_write_hdf5", real_write)
    assert run_cache(model_dir, text_dir, out, "--shard-mb", "0.02") == 0
    finished = open_cache(out)
    assert finished.verify() == [] and finished.n_tokens > 0

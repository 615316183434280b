"""mlsae-train end to end, and every bad input: one line, non-zero exit, no traceback, no damage."""

import json
from pathlib import Path

import numpy as np
import pytest

from mlsae_cache import write_array_cache
from mlsae_train import load_sae
from mlsae_train.cli import main

TINY = ["--expansion-factor", "4", "-k", "2", "--batch-tokens", "16", "--no-progress"]


def acts(n=64, n_layers=2, d=8, seed=0):
    return np.random.default_rng(seed).standard_normal((n, n_layers, d)).astype(np.float32) * 3 + 1


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def run_cli(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line_error(code, err, *words):
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_array_cache(tmp_path_factory.mktemp("c") / "cache", acts(), layers=[1, 5], model="m", shard_tokens=32)


@pytest.fixture(scope="module")
def finished_run(cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("r") / "run"
    assert main(["--shards", str(cache), "--out", str(run), *TINY]) == 0
    return run


def test_trains_and_writes_a_run(finished_run):
    assert {p.name for p in finished_run.iterdir()} >= {"config.json", "sae.safetensors", "checkpoint.safetensors", "metrics.jsonl"}
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert {"loss", "fvu", "fvu_layer_1", "fvu_layer_5", "auxk", "dead_fraction", "tokens_per_s"} <= set(rows[0])
    sae = load_sae(finished_run)
    assert sae.W_dec.shape == (32, 8) and sae.k == 2 and sae.layers == [1, 5]
    info = json.loads((finished_run / "config.json").read_text())
    assert info["config"]["k"] == 2 and info["total_steps"] == 4


def test_single_layer_baseline(cache, tmp_path):
    assert main(["--shards", str(cache), "--out", str(tmp_path / "r"), "--layers", "5", "--micro-batch-tokens", "5", *TINY]) == 0
    assert load_sae(tmp_path / "r").layers == [5]


def test_help_lists_the_options(capsys):
    try:
        code = main(["--help"])
    except SystemExit as exc:
        code = exc.code
    assert code == 0
    out = capsys.readouterr().out
    for flag in ("--shards", "--expansion-factor", "-k", "--batch-tokens", "--resume", "--layers", "--device"):
        assert flag in out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["-k", "40"], ["-k 40", "32 latents"]),
        (["--expansion-factor", "0"], ["--expansion-factor"]),
        (["--expansion-factor", "-2"], ["--expansion-factor"]),
        (["--batch-tokens", "1000"], ["--batch-tokens"]),
        (["--layers", "2"], ["--layers 2"]),
    ],
)
def test_bad_settings(cache, tmp_path, capsys, extra, words):
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(tmp_path / "r"), *TINY, *extra])
    assert_one_line_error(code, err, *words)
    assert not (tmp_path / "r").exists()


def test_no_shards(tmp_path, capsys):
    code, err = run_cli(capsys, ["--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(code, err, "--shards")
    code, err = run_cli(capsys, ["--shards", str(tmp_path / "nothing"), "--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(code, err, "nothing")


def test_damaged_shard(tmp_path, capsys):
    root = write_array_cache(tmp_path / "c", acts(), shard_tokens=32)
    shard = sorted((root / "shards").glob("shard-*.h5"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: only the checksum can tell
    shard.write_bytes(bytes(data))
    code, err = run_cli(capsys, ["--shards", str(root), "--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(code, err, "damaged", shard.name)
    shard.write_bytes(bytes(data[: len(data) // 3]))  # truncated: the reader itself refuses it
    code, err = run_cli(capsys, ["--shards", str(root), "--out", str(tmp_path / "r"), "--no-verify", *TINY])
    assert_one_line_error(code, err, shard.name)


def test_mixed_models_and_widths(cache, tmp_path, capsys):
    other_model = write_array_cache(tmp_path / "m", acts(), layers=[1, 5], model="other")
    other_width = write_array_cache(tmp_path / "w", acts(d=16), layers=[1, 5], model="m")
    for other, word in ((other_model, "model"), (other_width, "d_model")):
        code, err = run_cli(capsys, ["--shards", str(cache), str(other), "--out", str(tmp_path / "r"), *TINY])
        assert_one_line_error(code, err, word)


def test_nan_activation_names_shard_and_token(tmp_path, capsys):
    data = acts()
    data[45, 0, 3] = np.inf
    root = write_array_cache(tmp_path / "c", data, layers=[1, 5], shard_tokens=32)
    code, err = run_cli(capsys, ["--shards", str(root), "--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(code, err, "token 45", "shard-000001", "row 13")


def test_existing_run_is_never_overwritten_or_resumed_differently(cache, finished_run, tmp_path, capsys):
    before = snapshot(finished_run)
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(finished_run), *TINY])
    assert_one_line_error(code, err, "--resume")
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(finished_run), *TINY, "-k", "3", "--resume"])
    assert_one_line_error(code, err, "-k is 3", "started with 2")
    other = write_array_cache(tmp_path / "o", acts(n=80), layers=[1, 5], model="m")
    code, err = run_cli(capsys, ["--shards", str(other), "--out", str(finished_run), *TINY, "--resume"])
    assert_one_line_error(code, err, "caches")
    assert snapshot(finished_run) == before


def test_resume_without_a_run(cache, tmp_path, capsys):
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(tmp_path / "none"), *TINY, "--resume"])
    assert_one_line_error(code, err, "no run to resume")


def test_missing_optional_logger(cache, tmp_path, capsys):
    try:
        import torch.utils.tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(tmp_path / "r"), *TINY, "--tensorboard"])
    assert_one_line_error(code, err, "--tensorboard", "pip install tensorboard")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# paths of the wrong kind, read-only and full disks: one line, and nothing written before is lost


def test_shards_that_are_a_file_or_a_run_are_named_as_such(finished_run, tmp_path, capsys):
    a_file = tmp_path / "cache.h5"
    a_file.write_bytes(b"x")
    code, err = run_cli(capsys, ["--shards", str(a_file), "--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(code, err, str(a_file), "is a file, not a cache directory")
    code, err = run_cli(capsys, ["--shards", str(finished_run), "--out", str(tmp_path / "r"), *TINY])
    assert_one_line_error(code, err, str(finished_run), "training run", "not a cache")
    assert not (tmp_path / "r").exists()


def test_out_that_is_a_cache_or_someone_elses_folder_is_refused(cache, tmp_path, capsys):
    before = snapshot(cache)
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(cache), *TINY])
    assert_one_line_error(code, err, "activation cache", "not a run directory")
    assert snapshot(cache) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"architectures": []}')  # a name the trainer writes: it would be replaced
    for resume in ([], ["--resume"]):
        code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(mine), *TINY, *resume])
        assert_one_line_error(code, err, *(["holds no run to resume"] if resume else ["not empty", "holds no run", "config.json"]))
    assert (mine / "config.json").read_text() == '{"architectures": []}'


def test_read_only_out_is_one_line(cache, tmp_path, capsys, read_only_below):
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only_below(locked)
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(locked / "run"), *TINY])
    assert_one_line_error(code, err, "cannot write to", str(locked / "run"), "permission denied")
    assert list(locked.iterdir()) == []


def test_disk_full_while_saving_keeps_the_last_checkpoint(cache, tmp_path, capsys, monkeypatch):
    import errno

    from mlsae_train import checkpoint

    run = tmp_path / "run"
    real_save = checkpoint.save_safetensors
    saves = []

    def save_until_disk_full(path, tensors, metadata):
        saves.append(path)
        if len(saves) > 2:  # the weights and the checkpoint of step 2 are written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path.parent / f".{path.name}.x1y2z3.tmp"))
        real_save(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_safetensors", save_until_disk_full)
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(run), *TINY, "--save-every-tokens", "32"])
    assert_one_line_error(code, err, "disk full while writing", str(run / "sae.safetensors"), "--resume")
    assert code == 28
    kept = snapshot(run)
    assert checkpoint.read_progress(run / "checkpoint.safetensors")["step"] == 2
    monkeypatch.setattr(checkpoint, "save_safetensors", real_save)
    assert main(["--shards", str(cache), "--out", str(run), *TINY, "--save-every-tokens", "32", "--resume"]) == 0
    assert kept["config.json"] == snapshot(run)["config.json"]
    assert checkpoint.read_progress(run / "checkpoint.safetensors")["step"] == 4


def test_resume_drops_the_torn_writes_of_a_killed_run(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["--shards", str(cache), "--out", str(run), *TINY]) == 0
    torn = [run / ".metrics.jsonl.j3jml4h6.tmp", run / ".checkpoint.safetensors.a1b2c3d4.tmp"]  # what kill -9 leaves
    for path in torn:
        path.write_bytes(b"torn")
    (run / ".my-notes.tmp").write_text("mine")  # not a name the trainer writes
    assert main(["--shards", str(cache), "--out", str(run), *TINY, "--resume"]) == 0
    assert not any(path.exists() for path in torn)
    assert (run / ".my-notes.tmp").read_text() == "mine"

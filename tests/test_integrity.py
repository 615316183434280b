"""Every file the pipeline writes is verified by its readers: one flipped byte or a truncated file is one
``error:`` line naming the file (exit 2, no traceback); training stops at the first non-finite or diverged
step keeping its last good checkpoint; an unfinished run is analysed only when asked for explicitly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from models import assert_one_line_error

from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.encode import scan_verified_latents
from mlsae_analysis.html_report import main as html_main
from mlsae_cache import integrity, write_array_cache
from mlsae_cache.errors import MlsaeError
from mlsae_cache.lens import LENS_PARAMS, LENS_TRAINING, load_lens
from mlsae_train import MultiLayerSAE, load_sae, save_sae
from mlsae_train.checkpoint import read_progress, run_is_finished
from mlsae_train.cli import main as train_main

D_MODEL = 8


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Flip one bit of the byte at ``offset`` (default: the middle of the file)."""
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def train_argv(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["--shards", str(cache), "--out", str(out), "--expansion-factor", "4", "-k", "2", "--batch-tokens", "32",
            "--save-every-tokens", "64", "--lr", "3e-3", "--no-progress", *extra]  # fmt: skip


def analyse_argv(run: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return ["--run", str(run), "--shards", str(cache), "--out", str(out), "--no-downstream", "--no-progress",
            "--screen", "off", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A cache of 3 shards, a finished run on it, a run stopped after 2 of 8 steps, and an analysis."""
    root = tmp_path_factory.mktemp("integrity")
    acts = np.random.default_rng(0).normal(size=(256, 2, D_MODEL)).astype(np.float32)
    cache = write_array_cache(root / "cache", acts, layers=[1, 2], shard_tokens=100, seq_len=4)
    assert train_main(train_argv(cache, root / "run")) == 0
    assert train_main(train_argv(cache, root / "stopped", "--max-tokens", "256")) == 0
    # what a kill after the checkpoint of step 2 leaves: weights and checkpoint of step 2 (from a second run)
    from mlsae_train import TrainConfig, train

    settings = {"shards": [str(cache)], "expansion_factor": 4, "k": 2, "batch_tokens": 32, "save_every_tokens": 64,
                "lr": 3e-3, "progress": False}  # fmt: skip
    train(TrainConfig(out=str(root / "unfinished"), **settings), stop_after_steps=3)
    assert analyse_main(analyse_argv(root / "run", cache, root / "analysis")) == 0
    return {"root": root, "cache": cache, "run": root / "run", "unfinished": root / "unfinished", "analysis": root / "analysis"}


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------- the helpers


def test_safetensors_digest_catches_a_flipped_byte_and_a_truncation(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"a": torch.randn(16, 8), "b": torch.arange(5)}
    integrity.save_safetensors(path, tensors, {"note": "x"})
    first = path.read_bytes()
    integrity.save_safetensors(path, tensors, {"note": "x"})
    assert path.read_bytes() == first  # the same content gives the same bytes (resumed runs are compared bytewise)
    loaded, metadata = integrity.load_safetensors(path, "fix it")
    assert torch.equal(loaded["a"], tensors["a"]) and metadata["note"] == "x"
    flip_byte(path, len(first) - 20)  # inside the tensor bytes
    with pytest.raises(integrity.IntegrityError, match=r"x\.safetensors is damaged.*fix it"):
        integrity.load_safetensors(path, "fix it")
    path.write_bytes(first[: len(first) // 2])
    with pytest.raises(integrity.IntegrityError, match=r"x\.safetensors is truncated"):
        integrity.load_safetensors(path, "fix it")


def test_folder_record_names_the_damaged_missing_or_resized_file(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    for name in ("a.csv", "sub/b.parquet"):
        (tmp_path / name).write_bytes(b"0123456789" * 10)
    integrity.record_files(tmp_path)
    assert integrity.recorded_files(tmp_path) == ["a.csv", "sub/b.parquet"]
    integrity.verify_files(tmp_path, None, "redo")
    flip_byte(tmp_path / "sub/b.parquet")
    with pytest.raises(integrity.IntegrityError, match=r"sub/b\.parquet is damaged: its checksum"):
        integrity.verify_files(tmp_path, None, "redo")
    truncate(tmp_path / "a.csv")
    with pytest.raises(integrity.IntegrityError, match=r"a\.csv is damaged: 50 bytes where 100"):
        integrity.verified(tmp_path / "a.csv", "redo")
    (tmp_path / "a.csv").unlink()
    with pytest.raises(integrity.IntegrityError, match=r"a\.csv is missing"):
        integrity.verify_files(tmp_path, ["a.csv"], "redo")
    old = tmp_path / "old"
    old.mkdir()
    (old / "c.csv").write_text("x\n")
    integrity.verified(old / "c.csv", "redo")  # written before checksums: read, with one warning
    assert capsys.readouterr().err.count("warning:") == 1


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("damage", [flip_byte, truncate, lambda p: p.write_bytes(b"garbage" * 9)], ids=["flipped", "truncated", "garbage"])
def test_resume_from_a_damaged_checkpoint_is_one_line_and_changes_nothing(built, damage, tmp_path, capsys):
    run = copy(built["unfinished"], tmp_path / "run")
    checkpoint = run / "checkpoint.safetensors"
    damage(checkpoint)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert train_main(train_argv(built["cache"], run, "--resume")) == 2
    assert_one_line_error(capsys.readouterr().err, str(checkpoint), "--resume")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    checkpoint.unlink()  # the fix the line gives: the run restarts from step 0
    assert train_main(train_argv(built["cache"], run, "--resume")) == 0
    assert run_is_finished(run)


def test_lr_inf_is_refused_before_anything_is_written(built, tmp_path, capsys):
    assert train_main(train_argv(built["cache"], tmp_path / "r", "--lr", "inf")) == 2
    assert_one_line_error(capsys.readouterr().err, "--lr", "finite")
    assert not (tmp_path / "r").exists()


def test_a_diverging_run_stops_at_the_first_bad_step_keeping_the_last_good_checkpoint(built, tmp_path, capsys):
    """--lr 1e6: the FVU reaches ~1e25 at step 2 and would stay finite for ever (the divergence bound stops it)."""
    run = tmp_path / "r"
    assert train_main(train_argv(built["cache"], run, "--lr", "1e6", "--save-every-tokens", "32")) == 2
    assert_one_line_error(capsys.readouterr().err, "diverged at step 2 of 8", "the FVU is", "--lr", "checkpoint (step 1) is kept")
    assert read_progress(run / "checkpoint.safetensors")["step"] == 1
    assert read_progress(run / "sae.safetensors")["step"] == 1
    sae = load_sae(run)  # the weights of step 1, finite (load_sae refuses non-finite ones)
    assert torch.isfinite(sae.W_enc).all()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]


def test_non_finite_weights_stop_training_before_they_are_saved(built, tmp_path, capsys):
    """--lr 1e38: the first Adam step overflows the weights to inf / NaN."""
    run = tmp_path / "r"
    assert train_main(train_argv(built["cache"], run, "--lr", "1e38", "--save-every-tokens", "32")) == 2
    assert_one_line_error(capsys.readouterr().err, "diverged at step 1 of 8", "NaN or infinite", "W_enc", "no checkpoint")
    assert not (run / "sae.safetensors").exists() and not (run / "checkpoint.safetensors").exists()


def test_load_sae_refuses_non_finite_weights(tmp_path):
    sae = MultiLayerSAE(D_MODEL, 16, 2, layers=[0])
    with torch.no_grad():
        sae.W_enc[3, 1] = float("nan")
    save_sae(sae, tmp_path / "sae.safetensors")
    with pytest.raises(MlsaeError, match=r"sae\.safetensors holds non-finite weights \(W_enc\)"):
        load_sae(tmp_path)


def test_weights_record_their_progress(built):
    assert run_is_finished(built["run"]) and not run_is_finished(built["unfinished"])
    assert read_progress(built["unfinished"] / "sae.safetensors")["step"] == 2


# ---------------------------------------------------------------------------------------------- analysis inputs


def test_analyse_refuses_a_flipped_shard_naming_it(built, tmp_path, capsys):
    cache = copy(built["cache"], tmp_path / "cache")
    shard = sorted((cache / "shards").glob("shard-*.h5"))[1]
    flip_byte(shard)
    assert analyse_main(analyse_argv(built["run"], cache, tmp_path / "out")) == 2
    assert_one_line_error(capsys.readouterr().err, str(shard), "damaged")
    assert not (tmp_path / "out").exists()
    # only the shards holding the analysed tokens are read, and checked
    assert analyse_main(analyse_argv(built["run"], cache, tmp_path / "out", "--max-tokens", "50")) == 0
    assert analyse_main(analyse_argv(built["run"], cache, tmp_path / "unverified", "--no-verify")) == 0  # as asked


def test_analyse_refuses_a_flipped_sae_naming_it(built, tmp_path, capsys):
    run = copy(built["run"], tmp_path / "run")
    flip_byte(run / "sae.safetensors", (run / "sae.safetensors").stat().st_size - 7)
    assert analyse_main(analyse_argv(run, built["cache"], tmp_path / "out")) == 2
    assert_one_line_error(capsys.readouterr().err, str(run / "sae.safetensors"), "damaged")


def test_resume_rewrites_damaged_final_weights_from_the_checkpoint(built, tmp_path, capsys):
    """What the error line for a damaged sae.safetensors advises works."""
    run = copy(built["run"], tmp_path / "run")
    flip_byte(run / "sae.safetensors", (run / "sae.safetensors").stat().st_size - 7)
    with pytest.raises(MlsaeError, match="--resume to rewrite it"):
        load_sae(run)
    assert train_main(train_argv(built["cache"], run, "--resume")) == 0
    assert (run / "sae.safetensors").read_bytes() == (built["run"] / "sae.safetensors").read_bytes()


def test_an_unfinished_run_is_analysed_only_when_asked_and_says_how_far_it_got(built, tmp_path, capsys):
    out = tmp_path / "out"
    assert analyse_main(analyse_argv(built["unfinished"], built["cache"], out)) == 2
    assert_one_line_error(capsys.readouterr().err, "after step 2 of 8", "--allow-unfinished")
    assert not out.exists()
    assert analyse_main(analyse_argv(built["unfinished"], built["cache"], out, "--allow-unfinished")) == 0
    training = json.loads((out / "summary.json").read_text())["training"]
    assert training == {"steps": 2, "total_steps": 8, "tokens": 64, "total_tokens": 256, "finished": False}
    assert "2 of 8 steps (64 tokens), UNFINISHED" in (out / "report.html").read_text()
    finished = json.loads((built["analysis"] / "summary.json").read_text())["training"]
    assert finished["finished"] and finished["steps"] == finished["total_steps"] == 8


# ---------------------------------------------------------------------------------------------- analysis outputs


def test_an_analysis_records_every_file_it_wrote(built):
    recorded = set(integrity.recorded_files(built["analysis"]))
    on_disk = {p.relative_to(built["analysis"]).as_posix() for p in built["analysis"].rglob("*") if p.is_file()}
    assert recorded == on_disk - {integrity.RECORD_FILE}
    assert {"summary.json", "metrics.csv", "report.html", "latents/tokens.parquet", "latents/part-00000.parquet"} <= recorded
    integrity.verify_files(built["analysis"], None, "")


@pytest.mark.parametrize("victim", ["summary.json", "metrics.csv", "latent_layers.parquet"])
def test_report_refuses_a_damaged_analysis_file_naming_it(built, victim, tmp_path, capsys):
    analysis = copy(built["analysis"], tmp_path / "analysis")
    flip_byte(analysis / victim)
    assert analyse_main(["report", str(analysis), "--out", str(tmp_path / "report")]) == 2
    assert_one_line_error(capsys.readouterr().err, str(analysis / victim))
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("victim", ["examples.parquet", "neighbours.parquet", "residual.csv", "heatmap.png"])
def test_rebuilding_the_page_refuses_a_damaged_file_naming_it(built, victim, tmp_path, capsys):
    analysis = copy(built["analysis"], tmp_path / "analysis")
    flip_byte(analysis / victim)
    assert html_main([str(analysis), "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr().err, str(analysis / victim), "damaged")


def test_latents_of_a_finished_analysis_are_verified(built, tmp_path):
    analysis = copy(built["analysis"], tmp_path / "analysis")
    assert scan_verified_latents(analysis).collect().height > 0
    truncate(analysis / "latents" / "part-00000.parquet")
    with pytest.raises(integrity.IntegrityError, match=r"part-00000\.parquet is damaged"):
        scan_verified_latents(analysis)


def test_a_report_directory_is_recorded_and_its_page_rebuilt_verified(built, tmp_path, capsys):
    report = tmp_path / "report"
    assert analyse_main(["report", str(built["analysis"]), "--out", str(report)]) == 0
    assert {"tables.csv", "report.html"} <= set(integrity.recorded_files(report))
    flip_byte(report / "tables.csv")
    assert html_main([str(report), "--runs", str(built["analysis"]), "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr().err, str(report / "tables.csv"))


# ---------------------------------------------------------------------------------------------- lens files


def save_identity_lens(root: Path, n_layers: int = 2, d: int = D_MODEL) -> Path:
    root.mkdir()
    state = {}
    for idx in range(n_layers):
        state[f"{idx}.weight"] = torch.randn(d, d) * 0.1
        state[f"{idx}.bias"] = torch.randn(d) * 0.1
    torch.save(state, root / LENS_PARAMS)
    (root / "config.json").write_text(json.dumps({"d_model": d, "num_hidden_layers": n_layers}))
    return root


def test_a_truncated_lens_params_is_one_line_naming_it(tmp_path):
    lens = save_identity_lens(tmp_path / "lens")
    truncate(lens / LENS_PARAMS)
    with pytest.raises(MlsaeError, match=r"params\.pt cannot be read .* truncated .*mlsae-lens train"):
        load_lens(lens, 2, D_MODEL)


def test_a_recorded_lens_is_verified(tmp_path, capsys):
    lens = save_identity_lens(tmp_path / "lens")
    integrity.record_files(lens, [LENS_PARAMS, "config.json"])  # as mlsae-lens train does
    assert load_lens(lens, 2, D_MODEL).d_model == D_MODEL
    weight = torch.load(lens / LENS_PARAMS)["1.weight"]
    flip_byte(lens / LENS_PARAMS, (lens / LENS_PARAMS).read_bytes().find(weight.numpy().tobytes()) + 5)  # torch.load would not notice
    with pytest.raises(MlsaeError, match=r"params\.pt is damaged"):
        load_lens(lens, 2, D_MODEL)
    unrecorded = save_identity_lens(tmp_path / "old")
    (unrecorded / LENS_TRAINING).write_text("{}")  # trained by an older mlsae-lens: loads with one warning
    load_lens(unrecorded, 2, D_MODEL)
    assert "has no checksums.json" in capsys.readouterr().err


def test_a_damaged_lens_training_checkpoint_is_one_line(tmp_path):
    from mlsae_cache.lens_train import _read_checkpoint

    weight = torch.randn(4, 4)
    state = {"identity": {"a": 1}, "step": 3, "translators": {"0.weight": weight}, "optimizer": {"state": {}}}
    state["digest"] = integrity.object_digest(state)
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)
    assert _read_checkpoint(path)["step"] == 3
    flip_byte(path, path.read_bytes().find(weight.numpy().tobytes()) + 5)  # in the tensor: torch.load would not notice
    with pytest.raises(MlsaeError, match=r"checkpoint\.pt .*(damaged|cannot be read).*restart this lens training"):
        _read_checkpoint(path)
    truncate(path)
    with pytest.raises(MlsaeError, match=r"checkpoint\.pt cannot be read"):
        _read_checkpoint(path)


def test_a_damaged_run_config_is_named(built, tmp_path, capsys):
    run = copy(built["run"], tmp_path / "run")
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text.replace('"k": 2', '"k": 3', 1))  # still valid JSON, silently wrong
    assert analyse_main(analyse_argv(run, built["cache"], tmp_path / "out")) == 2
    assert_one_line_error(capsys.readouterr().err, str(run / "config.json"), "damaged")


def test_weights_written_before_checksums_load_with_one_warning(tmp_path, capsys):
    from safetensors.torch import save_file

    sae = MultiLayerSAE(D_MODEL, 16, 2, layers=[0])
    tensors = {name: getattr(sae, name).detach() for name in ("W_enc", "W_dec", "b_pre")}
    save_file(tensors, str(tmp_path / "sae.safetensors"), metadata={"mlsae": json.dumps(sae.config())})  # the old format
    assert torch.equal(load_sae(tmp_path).W_dec, sae.W_dec)
    load_sae(tmp_path)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "carries no checksum" in err


def test_a_digest_is_checked_in_the_algorithm_it_names(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n1,2\n")
    integrity.record_files(tmp_path)
    record = json.loads((tmp_path / integrity.RECORD_FILE).read_text())
    assert record["files"]["a.csv"]["digest"].startswith(f"{integrity.ALGORITHM}:")
    record["files"]["a.csv"]["digest"] = integrity.file_digest(tmp_path / "a.csv", "sha256")  # an older record
    (tmp_path / integrity.RECORD_FILE).write_text(json.dumps(record))
    integrity.verify_files(tmp_path, None, "redo")
    record["files"]["a.csv"]["digest"] = "md5:" + "0" * 32  # an algorithm this mlsae does not know: not a match
    (tmp_path / integrity.RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(integrity.IntegrityError, match="a.csv is damaged"):
        integrity.verify_files(tmp_path, None, "redo")


def test_rebuilding_the_page_keeps_the_record_true(built, tmp_path):
    """The page is rewritten into a recorded directory: the record follows it, so the next reader does not
    take it for a damaged file."""
    analysis = copy(built["analysis"], tmp_path / "analysis")
    before = json.loads((analysis / integrity.RECORD_FILE).read_text())["files"]
    (analysis / "report.html").unlink()
    assert html_main([str(analysis), "--no-progress", "--max-contexts", "2"]) == 0
    after = json.loads((analysis / integrity.RECORD_FILE).read_text())["files"]
    assert after.keys() == before.keys() and after["report.html"] != before["report.html"]
    integrity.verify_files(analysis, None, "")

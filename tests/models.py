"""Tiny language models of real architectures, built from configs with random weights, for fast CPU tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

ENGLISH = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches and "
    "kings of old spoke of rivers mountains ships stars gold bread honest friends in summer and winter"
).split()


def tiny_config(arch: str, n_layers: int = 3, d_model: int = 32, context: int = 256, vocab: int = 50304):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=4,
                             intermediate_size=2 * d_model, max_position_embeddings=context, rotary_pct=0.25,
                             bos_token_id=0, eos_token_id=0)  # fmt: skip
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=2 * d_model, max_position_embeddings=context,
                           bos_token_id=0, eos_token_id=0)  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=context,
                          bos_token_id=0, eos_token_id=0)  # fmt: skip
    raise ValueError(arch)


def build_tiny_model(out: Path, tokenizer_dir: Path, arch: str = "gpt_neox", seed: int = 0, **kwargs) -> Path:
    """Save a randomly initialised model of ``arch`` with the given tokenizer as a plain HF directory."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))
    # random init of a fresh model makes tiny activations; scale so that layers differ visibly
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in Path(tokenizer_dir).iterdir():
        if name.is_file() and name.name != "asset.json":
            shutil.copy(name, out / name.name)
    return out


def write_english(folder: Path, n_files: int = 3, words_per_file: int = 400, seed: int = 0) -> Path:
    """A folder of .txt files of pseudo-English (real words, random order)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        words = [rng.choice(ENGLISH) for _ in range(words_per_file)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words).capitalize() + ".\n")
    return folder


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    """The command failed with exactly one ``error:`` line containing ``fragments``, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]

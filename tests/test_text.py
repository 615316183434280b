"""Texts -> one EOS-joined token stream -> fixed-length sequences (SPEC section 1), with the real Pythia tokenizer."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from mlsae_cache.errors import MlsaeError
from mlsae_cache.text import (
    iter_dataset_sequences,
    iter_texts,
    iter_token_sequences,
    local_text_files,
    special_token_ids,
)

EOS = 0  # <|endoftext|> in GPT-NeoX


def reference_sequences(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    """Brute force: tokenize each text alone, join with EOS after each, cut, drop the incomplete tail."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


@pytest.fixture(scope="module")
def varied_texts(shakespeare_dir: Path) -> list[str]:
    """Texts of many lengths: empty ones, single characters, whitespace runs, unicode, whole scenes."""
    hamlet = (shakespeare_dir / "hamlet_gut.txt").read_text()
    rng = random.Random(0)
    texts = ["", "a", " ", "\n\n", "", "Hello world", "    indented   spaces", "naïve café — ✓ 東京", "<|endoftext|>"]
    for _ in range(60):
        start = rng.randrange(len(hamlet) - 20000)
        texts.append(hamlet[start : start + rng.choice([0, 1, 5, 50, 400, 3000, 15000])])
    rng.shuffle(texts)
    return texts


# ----------------------------------------------------------------------------------------------
# The token stream


@pytest.mark.parametrize("seq_len", [1, 7, 128, 2048])
@pytest.mark.parametrize("batch_texts", [1, 5, 64])
def test_stream_equals_brute_force(pythia_tokenizer, varied_texts: list[str], seq_len: int, batch_texts: int) -> None:
    expected = reference_sequences(varied_texts, pythia_tokenizer, seq_len)
    got = list(iter_token_sequences(varied_texts, pythia_tokenizer, seq_len, batch_texts=batch_texts))
    assert len(got) == len(expected) > 0
    assert all(s.dtype == np.int64 and s.shape == (seq_len,) for s in got)
    assert [s.tolist() for s in got] == expected


def test_texts_are_joined_by_eos_and_tail_dropped(pythia_tokenizer) -> None:
    # "Hello world" = [12092, 1533]; each text is followed by EOS; "" contributes a lone EOS.
    texts = ["Hello world", "", "Hello world"]
    stream = [12092, 1533, EOS, EOS, 12092, 1533, EOS]  # 7 tokens
    got = [s.tolist() for s in iter_token_sequences(texts, pythia_tokenizer, 3, batch_texts=2)]
    assert got == [stream[0:3], stream[3:6]]  # the 7th token is an incomplete sequence: dropped
    exact = [s.tolist() for s in iter_token_sequences(texts, pythia_tokenizer, 7)]
    assert exact == [stream]  # an exact multiple drops nothing


def test_text_longer_than_a_sequence_spans_sequences(pythia_tokenizer, shakespeare_dir: Path) -> None:
    scene = (shakespeare_dir / "macbeth_gut.txt").read_text()[:30000]
    ids = pythia_tokenizer.encode(scene, add_special_tokens=False)
    got = np.concatenate(list(iter_token_sequences([scene], pythia_tokenizer, 1000)))
    assert got.tolist() == (ids + [EOS])[: len(got)]
    assert len(got) == (len(ids) + 1) // 1000 * 1000


def test_sequences_own_their_memory(pythia_tokenizer) -> None:
    # A kept sequence must not be a view that pins the whole batch's token buffer in memory.
    sequences = list(iter_token_sequences(["Hello world"] * 4, pythia_tokenizer, 6))
    assert [s.tolist() for s in sequences] == [[12092, 1533, EOS] * 2] * 2
    assert all(s.flags.owndata and s.base is None for s in sequences)


def test_too_little_text_is_a_one_line_error(pythia_tokenizer, tmp_path: Path) -> None:
    with pytest.raises(MlsaeError, match=r"yields only 3 tokens, fewer than one sequence of 4; add text or lower --seq-len"):
        list(iter_token_sequences(["Hello world"], pythia_tokenizer, 4))
    with pytest.raises(MlsaeError, match=r"yields only 0 tokens"):
        list(iter_token_sequences([], pythia_tokenizer, 4))
    (tmp_path / "tiny.txt").write_text("Hello world")
    with pytest.raises(MlsaeError) as caught:
        list(iter_dataset_sequences(str(tmp_path / "tiny.txt"), pythia_tokenizer, 2048))
    assert str(caught.value) == (
        f"dataset {tmp_path / 'tiny.txt'} yields only 3 tokens, fewer than one sequence of 2048; add text or lower --seq-len"
    )
    with pytest.raises(MlsaeError, match="must be at least 1"):
        list(iter_token_sequences(["x"], pythia_tokenizer, 0))


def test_whole_shakespeare_stream(pythia_tokenizer, shakespeare_dir: Path) -> None:
    sequences = list(iter_dataset_sequences(str(shakespeare_dir), pythia_tokenizer, 2048))
    stream = np.concatenate(sequences)
    texts = list(iter_texts(str(shakespeare_dir)))
    assert len(texts) == 77
    # One EOS per text, except those in the dropped tail.
    assert 76 <= int((stream == EOS).sum()) <= 77
    assert pythia_tokenizer.decode(sequences[0][:6].tolist()) == texts[0][: len(pythia_tokenizer.decode(sequences[0][:6].tolist()))]


def test_special_token_ids(pythia_tokenizer, smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    # <|endoftext|> (bos = eos = unk) and <|padding|>; the added whitespace-run tokens 50254.. are text.
    assert special_token_ids(pythia_tokenizer).tolist() == [0, 1]
    assert special_token_ids(pythia_tokenizer).dtype == np.int64
    smol = AutoTokenizer.from_pretrained(smollm2_dir)
    # <|endoftext|>, <|im_start|>, <|im_end|> and SmolLM2's 14 other special tokens (<repo_name>, ...).
    assert special_token_ids(smol).tolist() == list(range(17))


# ----------------------------------------------------------------------------------------------
# Local files


def write_jsonl(path: Path, records: list[object]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_txt_file_is_one_document(tmp_path: Path) -> None:
    (tmp_path / "play.txt").write_text("Line one.\n\nLine two, ünïcode.\n", encoding="utf-8")
    assert list(iter_texts(str(tmp_path / "play.txt"))) == ["Line one.\n\nLine two, ünïcode.\n"]


def test_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "second\nline"}) + "\n" + json.dumps({"text": None}) + "\n"
    )
    assert list(iter_texts(str(path))) == ["first", "second\nline"]
    write_jsonl(tmp_path / "body.jsonl", [{"body": "a"}, {"body": "b"}])
    assert list(iter_texts(str(tmp_path / "body.jsonl"), text_column="body")) == ["a", "b"]


def test_parquet_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlsae_cache.text as text_module

    monkeypatch.setattr(text_module, "_PARQUET_ROWS_PER_READ", 3)  # read across several slices
    texts = [f"document {i}" for i in range(10)]
    pl.DataFrame({"n": list(range(10)), "content": texts}).write_parquet(tmp_path / "docs.parquet")
    assert list(iter_texts(str(tmp_path / "docs.parquet"), text_column="content")) == texts


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("from b.txt")
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "z.jsonl", [{"text": "z1"}, {"text": "z2"}])
    pl.DataFrame({"text": ["p1", "p2"]}).write_parquet(tmp_path / "a" / "b.parquet")
    (tmp_path / "a" / "notes.md").write_text("not a dataset file")
    (tmp_path / ".hidden.txt").write_text("skipped")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("skipped")
    assert [p.relative_to(tmp_path).as_posix() for p in local_text_files(tmp_path)] == ["a/b.parquet", "a/z.jsonl", "b.txt"]
    assert list(iter_texts(str(tmp_path))) == ["p1", "p2", "z1", "z2", "from b.txt"]
    assert list(iter_texts(str(tmp_path))) == list(iter_texts(str(tmp_path)))  # deterministic


# ----------------------------------------------------------------------------------------------
# Errors: one line naming the problem and the fix


def one_line_error(call) -> str:
    with pytest.raises(MlsaeError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_path(tmp_path: Path) -> None:
    for missing in (str(tmp_path / "nope.txt"), str(tmp_path / "nope"), "./data/train.jsonl", "data/a/b"):
        assert "does not exist" in one_line_error(lambda: iter_texts(missing))


def test_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "readme.md").write_text("hello")
    assert "holds no .txt/.jsonl/.parquet files" in one_line_error(lambda: iter_texts(str(tmp_path)))


def test_unsupported_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text\nhello\n")
    assert "is not .txt, .jsonl or .parquet" in one_line_error(lambda: iter_texts(str(tmp_path / "data.csv")))


def test_missing_column(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "docs.jsonl", [{"text": "ok"}, {"body": "no text field"}])
    message = one_line_error(lambda: list(iter_texts(str(tmp_path / "docs.jsonl"))))
    assert "line 2 has no field 'text'" in message and "--text-column" in message
    pl.DataFrame({"body": ["x"]}).write_parquet(tmp_path / "docs.parquet")
    # Parquet schemas are checked when the dataset is opened, before any text is read.
    message = one_line_error(lambda: iter_texts(str(tmp_path / "docs.parquet")))
    assert "has no column 'text' (columns: body)" in message and "--text-column" in message
    pl.DataFrame({"text": [1, 2]}).write_parquet(tmp_path / "numbers.parquet")
    assert "not text" in one_line_error(lambda: iter_texts(str(tmp_path / "numbers.parquet")))


def test_bad_file_contents(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    assert "line 2 is not valid JSON" in one_line_error(lambda: list(iter_texts(str(tmp_path / "broken.jsonl"))))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert "is not UTF-8 text" in one_line_error(lambda: list(iter_texts(str(tmp_path / "latin1.txt"))))


def test_hub_offline_is_quick_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = one_line_error(lambda: iter_texts("NeelNanda/pile-10k"))
    assert time.perf_counter() - start < 1.0
    assert message.startswith("cannot reach the Hugging Face hub to stream dataset NeelNanda/pile-10k")
    assert message.endswith("pass local .txt/.jsonl/.parquet files or a folder with --dataset")


def test_hub_unreachable_is_quick_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    start = time.perf_counter()
    message = one_line_error(lambda: iter_texts("monology/pile-uncopyrighted", split="validation"))
    assert time.perf_counter() - start < 10.0
    assert "cannot reach the Hugging Face hub to stream dataset monology/pile-uncopyrighted" in message

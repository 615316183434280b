"""Texts in, fixed-length token sequences out (SPEC section 1).

The whole dataset is one continuous token stream: each text is tokenized without special tokens and
followed by the EOS id, the results are concatenated, and the stream is cut into sequences of
``seq_len`` tokens; the last incomplete sequence is dropped.

Texts come from a Hugging Face hub dataset (streamed) or from local files: ``.txt`` (the whole file
is one document), ``.jsonl`` (one JSON object per line), ``.parquet``, or a folder holding such files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np

from .errors import MlsaeError
from .hub import hub_reachable

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
T = TypeVar("T")
# How long the hub reachability probe may take before we call the hub unreachable (seconds).
_PARQUET_ROWS_PER_READ = 8192


# ----------------------------------------------------------------------------------------------
# Texts


def iter_texts(dataset: str, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """The documents of ``dataset`` in a deterministic order.

    ``dataset`` is a local ``.txt``/``.jsonl``/``.parquet`` file, a folder (every such file below it,
    recursively, in sorted path order; hidden files and folders are skipped), or a hub dataset name.
    ``split`` only applies to hub datasets; ``text_column`` to ``.jsonl``, ``.parquet`` and the hub.
    """
    path = Path(dataset).expanduser()
    if path.exists():
        return _iter_local(path, text_column)
    if _looks_like_path(dataset):
        raise MlsaeError(f"dataset path {dataset} does not exist; pass an existing .txt/.jsonl/.parquet file or folder with --dataset")
    return _iter_hub(dataset, split, text_column)


def local_text_files(folder: Path) -> list[Path]:
    """The ``.txt``/``.jsonl``/``.parquet`` files below ``folder``, in sorted relative-path order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files if not f.startswith(".") and f.lower().endswith(LOCAL_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _looks_like_path(dataset: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything else that names no file is a missing path."""
    return (
        dataset.lower().endswith(LOCAL_SUFFIXES)
        or dataset.startswith((".", "/", "~"))
        or dataset.count("/") > 1
        or (os.sep != "/" and os.sep in dataset)
    )


def _iter_local(path: Path, text_column: str) -> Iterator[str]:
    if path.is_dir():
        files = local_text_files(path)
        if not files:
            raise MlsaeError(f"folder {path} holds no .txt/.jsonl/.parquet files; put text files in it or pass another --dataset")
    elif path.suffix.lower() in LOCAL_SUFFIXES:
        files = [path]
    else:
        raise MlsaeError(f"dataset file {path} is not .txt, .jsonl or .parquet; convert it to one of these")
    for file in files:  # schemas are cheap to read: fail now rather than hours into a run
        if file.suffix.lower() == ".parquet":
            _check_parquet_column(file, text_column)
    return itertools.chain.from_iterable(_iter_file(file, text_column) for file in files)


def _iter_file(path: Path, text_column: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield _read_utf8(path)
    elif suffix == ".jsonl":
        yield from _iter_jsonl(path, text_column)
    else:
        yield from _iter_parquet(path, text_column)


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MlsaeError(f"{path} is not UTF-8 text (byte {exc.start}); convert it to UTF-8") from exc


def _iter_jsonl(path: Path, text_column: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MlsaeError(f"{path} line {number} is not valid JSON ({exc.msg}); fix the line or remove it") from exc
                if not isinstance(record, dict) or text_column not in record:
                    raise MlsaeError(
                        f"{path} line {number} has no field {text_column!r}; pass --text-column with the field that holds the text"
                    )
                text = record[text_column]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise MlsaeError(f"{path} line {number}: field {text_column!r} is not a string; pass --text-column with a text field")
                yield text
        except UnicodeDecodeError as exc:
            raise MlsaeError(f"{path} is not UTF-8 text; convert it to UTF-8") from exc


def _check_parquet_column(path: Path, text_column: str) -> None:
    import polars as pl

    try:
        schema = pl.scan_parquet(path).collect_schema()
    except Exception as exc:  # polars raises its own error types for unreadable files
        raise MlsaeError(f"{path} is not a readable parquet file ({type(exc).__name__}); check the file") from exc
    if text_column not in schema:
        raise MlsaeError(
            f"{path} has no column {text_column!r} (columns: {', '.join(schema.names())}); pass --text-column with the column that holds the text"
        )
    if schema[text_column] != pl.String:
        raise MlsaeError(f"{path}: column {text_column!r} is {schema[text_column]}, not text; pass --text-column with a text column")


def _iter_parquet(path: Path, text_column: str) -> Iterator[str]:
    import polars as pl

    column = pl.scan_parquet(path).select(pl.col(text_column))
    rows = column.select(pl.len()).collect().item()
    # Read a slice at a time so that memory does not grow with the file.
    for offset in range(0, rows, _PARQUET_ROWS_PER_READ):
        chunk = column.slice(offset, _PARQUET_ROWS_PER_READ).collect().to_series()
        yield from (text for text in chunk if text is not None)


# ----------------------------------------------------------------------------------------------
# Hub


def _iter_hub(name: str, split: str, text_column: str) -> Iterator[str]:
    """Open the stream now (so that errors surface at the call), read it lazily."""
    if not hub_reachable():
        raise MlsaeError(_hub_unreachable(name))
    import datasets

    with _hub_errors(name, split):
        rows = datasets.load_dataset(name, split=split, streaming=True)
    return _iter_hub_rows(rows, name, split, text_column)


def _iter_hub_rows(rows: Iterable[dict[str, Any]], name: str, split: str, text_column: str) -> Iterator[str]:
    with _hub_errors(name, split):
        for row in rows:
            if text_column not in row:
                raise MlsaeError(
                    f"hub dataset {name} has no column {text_column!r} (columns: {', '.join(row)}); pass --text-column with the column that holds the text"
                )
            text = row[text_column]
            if text is not None:
                yield text


@contextlib.contextmanager
def _hub_errors(name: str, split: str) -> Iterator[None]:
    """Turn the datasets library's network and lookup failures into one-line errors."""
    import datasets

    try:
        yield
    except MlsaeError:
        raise
    except (ConnectionError, TimeoutError) as exc:
        raise MlsaeError(_hub_unreachable(name)) from exc
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise MlsaeError(f"hub dataset {name} does not exist or is private; check the name, or pass local files with --dataset") from exc
    except ValueError as exc:
        if "split" not in str(exc).lower():
            raise
        raise MlsaeError(f"hub dataset {name} has no split {split!r}; pass --split with one of its splits") from exc


def _hub_unreachable(name: str) -> str:
    return (
        f"cannot reach the Hugging Face hub to stream dataset {name} (and no local file or folder of that name exists); "
        "pass local .txt/.jsonl/.parquet files or a folder with --dataset"
    )


# ----------------------------------------------------------------------------------------------
# Tokens


# Texts are tokenized a batch at a time (the tokenizer spreads a batch over the cores). With a
# ``limit`` a batch holds only about the characters the sequences still wanted need, at the
# characters per token seen so far (a low guess before the first batch: a second small batch is
# cheaper than tokenizing far too much); a text is never split, so one long text may overshoot.
_CHARS_PER_TOKEN_GUESS = 3.0
_BATCH_CHARS_MARGIN = 1.1
_MAX_BATCH_CHARS = 1 << 23


def _next_text_batch(iterator: Iterator[str], max_texts: int, want_chars: float) -> list[str]:
    """Up to ``max_texts`` texts, stopping once they hold ``want_chars`` characters (at least one text)."""
    batch: list[str] = []
    chars = 0
    for text in iterator:
        batch.append(text)
        chars += len(text)
        if len(batch) >= max_texts or chars >= want_chars:
            break
    return batch


def iter_token_sequences(
    texts: Iterable[str],
    tokenizer: Any,
    seq_len: int,
    batch_texts: int = 64,
    *,
    source_name: str = "the text",
    limit: int | None = None,
) -> Iterator[np.ndarray]:
    """Sequences of ``seq_len`` token ids (int64 arrays of shape [seq_len]) cut from one stream.

    ``limit``: the most sequences wanted; texts are then tokenized only as far as they are needed.
    ``source_name`` names the data in the error raised when not one full sequence can be made.
    """
    if seq_len < 1 or batch_texts < 1:
        raise MlsaeError(f"seq_len ({seq_len}) and batch_texts ({batch_texts}) must be at least 1; pass positive values")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MlsaeError("the tokenizer has no EOS token, which joins the texts; use a tokenizer that defines eos_token")
    carry = np.empty(0, dtype=np.int64)  # [< seq_len] tokens not yet in a full sequence
    total_tokens = total_chars = 0
    produced = 0
    iterator = iter(texts)
    while limit is None or produced < limit:
        want_chars: float = _MAX_BATCH_CHARS
        if limit is not None:
            chars_per_token = total_chars / total_tokens if total_tokens else _CHARS_PER_TOKEN_GUESS
            want_tokens = (limit - produced) * seq_len - len(carry)
            want_chars = min(want_chars, want_tokens * chars_per_token * _BATCH_CHARS_MARGIN)
        batch = _next_text_batch(iterator, batch_texts, want_chars)
        if not batch:
            break
        total_chars += sum(len(text) for text in batch)
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(ids, (eos,)) for ids in encoded),
            dtype=np.int64,
            count=int(lengths.sum()),
        )  # [sum(lengths)]: each text's ids followed by EOS
        total_tokens += flat.size
        stream = np.concatenate([carry, flat])  # [len(carry) + len(flat)]
        full = stream.size // seq_len
        if limit is not None:
            full = min(full, limit - produced)
        for index in range(full):
            # A copy, so that a kept sequence does not pin the whole batch buffer in memory.
            yield stream[index * seq_len : (index + 1) * seq_len].copy()  # [seq_len]
        produced += full
        carry = stream[full * seq_len :]
    if produced == 0:
        raise MlsaeError(
            f"{source_name} yields only {total_tokens} tokens, fewer than one sequence of {seq_len}; add text or lower --seq-len"
        )


def iter_dataset_sequences(
    dataset: str,
    tokenizer: Any,
    seq_len: int,
    *,
    split: str = "train",
    text_column: str = "text",
    batch_texts: int = 64,
    limit: int | None = None,
) -> Iterator[np.ndarray]:
    """``iter_token_sequences`` over ``iter_texts(dataset, ...)``, with errors that name the dataset."""
    texts = iter_texts(dataset, split=split, text_column=text_column)
    return iter_token_sequences(texts, tokenizer, seq_len, batch_texts, source_name=f"dataset {dataset}", limit=limit)


_DONE = object()


class ReadAhead(Iterator[T]):
    """``items``, produced in a background thread started at once, up to ``depth`` items ahead of the consumer.

    For the token stream: tokenizing (the tokenizer releases the GIL) overlaps the model's loading and
    forward. ``items`` is advanced only in the thread. An error there is raised in the consumer at the
    item where it happened. ``close()`` (or leaving a ``with`` block, or dropping the last reference)
    stops the thread; ``deepen`` lets it run further ahead once the consumer knows how far it needs (a
    shard's sequences, known once the model is loaded).
    """

    def __init__(self, items: Iterator[T], depth: int) -> None:
        # the thread holds only the shared state, never ``self``: a ReadAhead dropped unclosed (a run that
        # failed before reading it) is collected, and its ``__del__`` stops the thread
        self._shared = _AheadState(max(1, depth))
        self._finished = False
        self._thread = threading.Thread(target=_produce_ahead, args=(items, self._shared), name="mlsae-tokenize-ahead", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._shared.depth

    def deepen(self, depth: int) -> None:
        with self._shared.room:
            self._shared.depth = max(self._shared.depth, depth)
            self._shared.room.notify_all()

    def close(self) -> None:
        self._shared.stop.set()
        with self._shared.room:
            self._shared.room.notify_all()

    def __del__(self) -> None:
        if hasattr(self, "_shared"):  # not if __init__ failed before it
            self.close()

    def __enter__(self) -> "ReadAhead[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __next__(self) -> T:
        state = self._shared
        if self._finished or (state.stop.is_set() and state.buffer.empty()):  # done, or closed with nothing left
            raise StopIteration
        item = state.buffer.get()
        with state.room:
            state.room.notify_all()
        if item is _DONE or isinstance(item, BaseException):
            self._finished = True
            self.close()
            if item is _DONE:
                raise StopIteration
            raise item
        return item


class _AheadState:
    """What a ReadAhead and its thread share."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.buffer: queue.Queue = queue.Queue()  # unbounded: the room is ``depth``, checked under ``room``
        self.room = threading.Condition()
        self.stop = threading.Event()

    def put(self, item: object) -> bool:
        """Wait for room (False once the consumer has stopped)."""
        with self.room:
            while not self.stop.is_set():
                if self.buffer.qsize() < self.depth:
                    self.buffer.put(item)
                    return True
                self.room.wait(timeout=0.1)
        return False


def _produce_ahead(items: Iterator, state: _AheadState) -> None:
    try:
        for item in items:
            if not state.put(item):
                return
        state.put(_DONE)
    except BaseException as exc:  # noqa: BLE001 - raised again in the consumer
        state.put(exc)


def read_ahead(items: Iterator[T], depth: int) -> Iterator[T]:
    """``ReadAhead(items, depth)`` started on the first item asked for, stopped when the consumer stops (or fails)."""
    with ReadAhead(items, depth) as ahead:
        yield from ahead


def special_token_ids(tokenizer: Any) -> np.ndarray:
    """Sorted unique int64 ids of BOS/EOS/PAD/UNK and every other special token of ``tokenizer``.

    These positions stay in the model input but their activations are not stored (SPEC section 1).
    Added tokens that are not special (e.g. Pythia's runs of spaces) are ordinary text and not listed.
    """
    ids = {
        getattr(tokenizer, f"{role}_token_id", None) for role in ("bos", "eos", "pad", "unk")
    }
    ids.update(getattr(tokenizer, "all_special_ids", []))
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(token, "special", False))
    return np.array(sorted(i for i in ids if i is not None), dtype=np.int64)

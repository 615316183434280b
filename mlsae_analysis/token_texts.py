"""The text of each token the page shows, written by the analysis so that the page loads no tokenizer.

``token_texts.parquet`` (layout.TOKEN_TEXTS): token_id (Int64), text (String), one row per distinct
token of examples.parquet's contexts, each token decoded on its own (as the latent browser shows it).
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import polars as pl

from mlsae_cache.errors import MlsaeError

TokenStrings = Callable[[Sequence[int]], list[str]]
"""Token ids -> the text of each token decoded alone."""


def id_strings(ids: Sequence[int]) -> list[str]:
    """Tokens shown as their ids, "<id>": when no tokenizer is at hand."""
    return [f"<{i}>" for i in ids]


def decoded_strings(tokenizer) -> TokenStrings:
    """Each token decoded alone by a loaded tokenizer."""
    return lambda ids: tokenizer.batch_decode([[i] for i in ids])


def tokenizer_strings(name: str | None, required: bool = False, fix: str | None = "pass --tokenizer DIR") -> TokenStrings:
    """Token id -> text with the tokenizer ``name`` (directory or hub id).

    Without one (or, unless ``required``, when it cannot be loaded: a warning, ending with ``fix`` if
    given) ids show as "<id>".
    """
    if name:
        from mlsae_cache.lm import load_tokenizer

        try:
            return decoded_strings(load_tokenizer(str(name)))
        except MlsaeError as exc:
            if required:
                raise
            warnings.warn(f"contexts are shown as token ids: {exc}" + (f" ({fix})" if fix else ""), stacklevel=2)
    return id_strings


def context_token_ids(examples: pl.DataFrame) -> np.ndarray:
    """The distinct token ids of examples.parquet's contexts, ascending: [V]."""
    return np.unique(examples["context_ids"].explode().drop_nulls().to_numpy()).astype(np.int64)


def token_text_table(token_ids: np.ndarray, strings: TokenStrings) -> pl.DataFrame:
    """token_id, text for each of ``token_ids`` [V]."""
    ids = np.asarray(token_ids, dtype=np.int64)
    return pl.DataFrame({"token_id": ids, "text": strings(ids.tolist()) if ids.size else []},
                        schema={"token_id": pl.Int64, "text": pl.String})  # fmt: skip


def stored_strings(table: pl.DataFrame) -> TokenStrings:
    """Token id -> text from a token_texts table; an id it lacks shows as "<id>"."""
    text_of = dict(zip(table["token_id"].to_list(), table["text"].to_list()))
    return lambda ids: [text_of[i] if i in text_of else f"<{i}>" for i in ids]

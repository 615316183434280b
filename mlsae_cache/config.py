"""Options of ``mlsae-cache``; each field's docstring is its ``--help``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class CacheConfig:
    model: str
    """Model: pythia-70m ... pythia-12b (and -deduped), any Hugging Face hub id, or a local directory."""

    out: str
    """Cache directory to write (resumed if it holds an unfinished cache of the same configuration)."""

    dataset: str = "monology/pile-uncopyrighted"
    """Text: a hub dataset (streamed), or local .txt/.jsonl/.parquet files or a folder of them."""

    tokens: int = 1_000_000
    """Tokens to run through the model (rounded up to whole sequences); special tokens are not stored. A dataset
    with fewer tokens is cached whole, with a warning, and the manifest records tokens_short."""

    seq_len: int = 2048
    """Tokens per sequence: texts are joined with EOS and cut into sequences of this length."""

    layers: str | None = None
    """Decoder blocks to store, e.g. 0,1,2 or 0-5 (default: all)."""

    format: Literal["hdf5", "webdataset"] = "hdf5"
    """Shard format: hdf5 (random access) or webdataset (tar shards for streaming)."""

    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Storage dtype of the activations."""

    lens: str | None = None
    """Tuned-lens directory (config.json + params.pt): store lens-space activations."""

    batch_size: int = 8
    """Sequences per forward pass."""

    device: str = "auto"
    """cpu, cuda or auto (cuda when a GPU is visible); under torchrun each rank takes cuda:LOCAL_RANK."""

    split: str = "train"
    """Dataset split (hub datasets)."""

    text_column: str = "text"
    """Column holding the text (hub datasets, .jsonl and .parquet files)."""

    revision: str | None = None
    """Model revision on the hub (branch, tag or commit)."""

    tokenizer: str | None = None
    """Tokenizer to use instead of the model's own (hub id or local directory)."""

    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the model runs in."""

    shard_mb: float = 256.0
    """Approximate size of one shard in MiB (whole sequences per shard)."""

    skip_positions: int = 0
    """Leave out the first N positions of every sequence (e.g. 1: sequence-start tokens, whose residual norm can be 100x the median); counted in the manifest."""

    max_norm_ratio: float | None = None
    """Leave out tokens whose norm at any cached layer exceeds M x that layer's median norm (median over the run's first batch); counted in the manifest. Off by default."""

    norm_thresholds: str | None = None
    """Per-layer norm thresholds instead of --max-norm-ratio: comma-separated values (one per cached layer, or one for all) or a FILE of them (JSON list, JSON {"layer": value}, or text)."""

    overwrite: bool = False
    """Replace a cache of another configuration found in --out: only the cache's own files are removed, and a
    folder holding anything else is refused. (A cache with no shard yet is replaced without it.)"""

    progress: bool = True
    """Show a progress bar and a summary."""

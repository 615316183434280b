"""Run a language model over a token stream and write its residual activations as a cache.

The stream of sequences is cut into shards of ``shard_sequences`` whole sequences. A shard is a pure
function of (config, data), so:
- resuming skips every shard that already has its sidecar and recomputes only the rest, giving
  exactly the activations of an uninterrupted run (batches never straddle shards);
- under ``torchrun``, rank r computes the shards with ``index % world_size == r`` into the same
  directory, and rank 0 merges every sidecar into one manifest once all ranks are done.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import shard_format as sf
from .config import CacheConfig
from .errors import MlsaeError
from .lens import Lens, load_lens_for_model
from .lm import ResidualReader, context_length_of, d_model_of, load_model, load_tokenizer, n_layers_of, resolve_model_name
from .text import iter_dataset_sequences, special_token_ids
from .writer import CacheWriter, check_or_claim_directory, finalize_cache


@dataclass
class Dist:
    """This process's place among torchrun ranks (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: str) -> None:
        if self.world_size > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def resolve_device(device: str, dist: Dist) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MlsaeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return f"cuda:{dist.local_rank}" if device == "cuda" else device
    if device != "cpu":
        raise MlsaeError(f"unknown --device {device}; use cpu, cuda or auto")
    return device


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``"0,2,5"`` or ``"0-5"`` or None (all) -> sorted unique block indices, each checked."""
    if spec in (None, "", "all"):
        return list(range(n_layers))
    layers: set[int] = set()
    try:
        for part in str(spec).split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-")
                layers.update(range(int(lo), int(hi) + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise MlsaeError(f"--layers {spec!r} is not a comma-separated list of layer numbers (e.g. 0,1,2 or 0-5)") from None
    bad = sorted(x for x in layers if not 0 <= x < n_layers)
    if bad:
        raise MlsaeError(f"layer {bad[0]} is out of range: the model has layers 0..{n_layers - 1}; fix --layers")
    return sorted(layers)


def shard_sequences_for(config: CacheConfig, n_layers: int, d_model: int) -> int:
    """Whole sequences per shard so that a shard holds about ``shard_mb`` MiB of activations."""
    itemsize = sf.STORAGE_NUMPY[config.dtype].itemsize
    per_sequence = config.seq_len * n_layers * d_model * itemsize
    return max(1, int(config.shard_mb * 2**20 // per_sequence))


def _batched(iterable: Iterator, n: int) -> Iterator[list]:
    it = iter(iterable)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def build_cache(config: CacheConfig) -> dict | None:
    """Write (or finish) the cache described by ``config``. Returns the manifest on rank 0."""
    dist = Dist.from_env()
    device = resolve_device(config.device, dist)
    if config.format not in sf.FORMATS:
        raise MlsaeError(f"unknown --format {config.format}; use one of {', '.join(sf.FORMATS)}")
    if config.dtype not in sf.DTYPES:
        raise MlsaeError(f"unknown --dtype {config.dtype}; use one of {', '.join(sf.DTYPES)}")
    if config.seq_len < 1 or config.tokens < 1 or config.batch_size < 1:
        raise MlsaeError("--seq-len, --tokens and --batch-size must be positive")
    out = Path(config.out)
    _refuse_foreign_early(out, config)

    model_name = resolve_model_name(config.model)
    tokenizer = load_tokenizer(config.tokenizer or model_name, config.revision)
    model = load_model(model_name, config.revision, device, getattr(torch, config.model_dtype))
    n_layers, d_model = n_layers_of(model), d_model_of(model)
    context = context_length_of(model)
    if context is not None and config.seq_len > context:
        raise MlsaeError(f"--seq-len {config.seq_len} is beyond the model's context of {context} tokens; use --seq-len {context} or less")
    layers = parse_layers(config.layers, n_layers)
    lens: Lens | None = load_lens_for_model(config.lens, model, model_name) if config.lens else None

    identity = {
        "format_version": sf.FORMAT_VERSION,
        "model": model_name,
        "revision": config.revision,
        "tokenizer": config.tokenizer or model_name,
        "dataset": config.dataset,
        "split": config.split,
        "text_column": config.text_column,
        "seq_len": config.seq_len,
        "tokens": config.tokens,
        "layers": layers,
        "n_model_layers": n_layers,
        "d_model": d_model,
        "dtype": config.dtype,
        "format": config.format,
        "lens": lens.manifest_entry() if lens else None,
        "shard_sequences": shard_sequences_for(config, len(layers), d_model),
        "model_dtype": config.model_dtype,
    }
    dist.init(device)
    try:
        if dist.rank == 0:
            check_or_claim_directory(out, identity, config.overwrite)
        dist.barrier()
        if dist.rank != 0:
            check_or_claim_directory(out, identity, overwrite=False)
        n_shards, n_sequences = _write_shards(config, identity, tokenizer, model, layers, lens, dist)
        dist.barrier()
        if dist.rank != 0:
            return None
        extra = {"n_sequences": n_sequences, "n_model_tokens": n_sequences * config.seq_len, "world_size": dist.world_size}
        return finalize_cache(out, identity, n_shards, extra)
    finally:
        dist.close()


def _refuse_foreign_early(out: Path, config: CacheConfig) -> None:
    """Refuse a directory holding another model's cache before spending time loading anything."""
    if config.overwrite or not (out / sf.CONFIG).exists():
        return
    stored = sf.read_json(out / sf.CONFIG)
    for key, wanted in (("model", resolve_model_name(config.model)), ("dataset", config.dataset), ("seq_len", config.seq_len), ("dtype", config.dtype), ("format", config.format)):
        if stored.get(key) != wanted:
            raise MlsaeError(f"{out} holds a cache of another configuration (differs in: {key}); choose another --out or pass --overwrite to replace it")


def _write_shards(config: CacheConfig, identity: dict, tokenizer, model, layers: list[int], lens: Lens | None, dist: Dist) -> tuple[int, int]:
    """Compute and write this rank's missing shards. Returns (number of shards, number of sequences)."""
    out = Path(config.out)
    writer = CacheWriter(out, identity)
    reader = ResidualReader(model, layers)
    special = torch.as_tensor(special_token_ids(tokenizer), dtype=torch.long)
    per_shard = identity["shard_sequences"]
    n_sequences_wanted = math.ceil(config.tokens / config.seq_len)
    sequences = itertools.islice(
        iter_dataset_sequences(config.dataset, tokenizer, config.seq_len, split=config.split, text_column=config.text_column), n_sequences_wanted
    )
    device = next(model.parameters()).device
    bar = tqdm(total=n_sequences_wanted * config.seq_len, unit="tok", unit_scale=True, desc=f"cache[{dist.rank}]" if dist.world_size > 1 else "cache", disable=not config.progress)
    n_shards = n_sequences = 0
    started = time.perf_counter()
    try:
        for shard_index, shard_seqs in enumerate(_batched(sequences, per_shard)):
            first_sequence = n_sequences
            n_shards, n_sequences = shard_index + 1, n_sequences + len(shard_seqs)
            if shard_index % dist.world_size != dist.rank or writer.is_done(shard_index):
                bar.update(len(shard_seqs) * config.seq_len)
                continue
            parts: list[tuple[np.ndarray, ...]] = []
            for offset in range(0, len(shard_seqs), config.batch_size):
                batch = shard_seqs[offset : offset + config.batch_size]
                batch_ids = np.stack(batch).astype(np.int64)  # [B, S]
                ids = torch.as_tensor(batch_ids, device=device)
                acts = reader.read(ids).float()  # [B, S, L, d]
                if lens is not None:
                    acts = lens.forward_stack(acts, layers)
                keep = ~torch.isin(ids, special.to(device))  # [B, S]
                b_idx, pos = keep.nonzero(as_tuple=True)
                kept = acts[b_idx, pos].cpu().numpy()  # [n_kept, L, d]
                parts.append(
                    (
                        sf.to_storage(kept, config.dtype),
                        (first_sequence + offset + b_idx).cpu().numpy().astype(np.int64),
                        pos.cpu().numpy().astype(np.int32),
                        ids[b_idx, pos].cpu().numpy().astype(np.int32),
                        np.arange(first_sequence + offset, first_sequence + offset + len(batch), dtype=np.int64),
                        batch_ids.astype(np.int32),
                    )
                )
                bar.update(len(batch) * config.seq_len)
            writer.submit(shard_index, sf.ShardContent(*(np.concatenate(column) for column in zip(*parts))))
        writer.close()
    finally:
        bar.close()
    if config.progress and dist.rank == 0:
        elapsed = time.perf_counter() - started
        print(f"wrote {n_sequences * config.seq_len:,} tokens in {elapsed:.1f}s to {out}")
    return n_shards, n_sequences

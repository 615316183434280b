"""Run a language model over a token stream and write its residual activations as a cache.

The stream of sequences is cut into shards of ``shard_sequences`` whole sequences. A shard is a pure
function of (config, data), so:
- resuming skips every shard that already has its sidecar and recomputes only the rest, giving
  exactly the activations of an uninterrupted run (batches never straddle shards);
- under ``torchrun``, rank r computes the shards with ``index % world_size == r`` into the same
  directory, and rank 0 merges every sidecar into one manifest once all ranks are done.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from . import shard_format as sf
from . import token_filter as tf
from .config import CacheConfig
from .distributed import Distributed
from .errors import MlsaeError, require_positive
from .lens import Lens, load_lens_for_model
from .lm import ResidualReader, context_length_of, d_model_of, load_model, load_tokenizer, n_layers_of, resolve_model_name
from .staging import HostBuffers, ShardStager
from .text import ReadAhead, iter_dataset_sequences, special_token_ids
from .writer import CacheWriter, check_or_claim_directory, finalize_cache, holds_shards, read_stored_config, refuse_foreign_files


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    """``"0,2,5"`` or ``"0-5"`` or None (all) -> sorted unique block indices, each checked."""
    if spec in (None, "", "all"):
        return list(range(n_layers))
    layers: set[int] = set()
    try:
        for part in str(spec).split(","):
            if "-" in part.strip()[1:]:
                lo, hi = (int(x) for x in part.split("-"))
                if lo > hi:
                    raise MlsaeError(f"--layers {spec!r}: the range {part.strip()} is empty (it runs backwards); write it low-high, e.g. {hi}-{lo}")
                layers.update(range(lo, hi + 1))
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
    dist = Distributed.from_env(config.device, join=False)  # joined below, once the options are checked and the model is loaded
    device = dist.device
    if config.format not in sf.FORMATS:
        raise MlsaeError(f"unknown --format {config.format}; use one of {', '.join(sf.FORMATS)}")
    if config.dtype not in sf.DTYPES:
        raise MlsaeError(f"unknown --dtype {config.dtype}; use one of {', '.join(sf.DTYPES)}")
    require_positive({"--seq-len": config.seq_len, "--tokens": config.tokens, "--batch-size": config.batch_size, "--shard-mb": config.shard_mb})
    if not math.isfinite(config.shard_mb):
        raise MlsaeError(f"--shard-mb must be a finite number of MiB, got {config.shard_mb}")
    tf.check_settings(config.skip_positions, config.max_norm_ratio, config.norm_thresholds, config.seq_len)
    out = Path(config.out)
    _refuse_foreign_early(out, config)

    model_name = resolve_model_name(config.model)
    tokenizer = load_tokenizer(config.tokenizer or model_name, config.revision)
    sequences = open_sequences(config, tokenizer)  # tokenizing from now on, while the model loads
    model = load_model(model_name, config.revision, device, getattr(torch, config.model_dtype))
    n_layers, d_model = n_layers_of(model), d_model_of(model)
    context = context_length_of(model)
    if context is not None and config.seq_len > context:
        raise MlsaeError(f"--seq-len {config.seq_len} is beyond the model's context of {context} tokens; use --seq-len {context} or less")
    layers = parse_layers(config.layers, n_layers)
    lens: Lens | None = load_lens_for_model(config.lens, model, model_name) if config.lens else None
    user_thresholds = tf.parse_norm_thresholds(config.norm_thresholds, layers) if config.norm_thresholds else None

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
        "token_filter": tf.identity_entry(config.skip_positions, config.max_norm_ratio, user_thresholds),
    }
    dist.join()
    found = _FoundOut.look(out)
    try:
        if dist.rank == 0:
            check_or_claim_directory(out, identity, config.overwrite)
        dist.barrier()
        if dist.rank != 0:
            check_or_claim_directory(out, identity, overwrite=False)
        try:
            n_shards, n_sequences = _write_shards(config, identity, tokenizer, model, layers, lens, dist, sequences)
        except BaseException:  # bad text (missing, empty, binary, an unreachable hub), a Ctrl-C, a full disk...
            if dist.world_size == 1:
                found.restore_if_unused(out)
            raise
        dist.barrier()
        if dist.rank != 0:
            return None
        n_model_tokens = n_sequences * config.seq_len
        # a dataset shorter than --tokens: recorded, and said by the CLI, never silent
        extra = {"n_sequences": n_sequences, "n_model_tokens": n_model_tokens, "tokens_short": max(0, config.tokens - n_model_tokens),
                 "world_size": dist.world_size}  # fmt: skip
        if identity["token_filter"] is not None:  # what the filter left out: counted, never silent
            extra["tokens_left_out"] = tf.manifest_entry(out, n_shards, layers)
        manifest = finalize_cache(out, identity, n_shards, extra)
        if identity["token_filter"] is not None and config.progress:
            print(tf.describe(manifest["tokens_left_out"], manifest["n_tokens"]))
        return manifest
    finally:
        dist.close()


@dataclass
class _FoundOut:
    """How --out was before this command claimed it, so that a command that fails before its first shard
    leaves it so: a corrected rerun then starts afresh, and a refused one leaves nothing behind."""

    had_config: bool
    had_shard_dir: bool
    first_created: Path | None
    """The topmost folder of --out that did not exist (None: --out existed)."""

    @classmethod
    def look(cls, out: Path) -> "_FoundOut":
        missing = [folder for folder in (out, *out.parents) if not folder.exists()]
        return cls((out / sf.CONFIG).exists(), (out / sf.SHARD_DIR).exists(), missing[-1] if missing else None)

    def restore_if_unused(self, out: Path) -> None:
        """Remove what the claim made (config.json, the empty shard folder, the folders of --out it created),
        if no shard was written; a folder that is not empty is kept, with everything above it."""
        if self.had_config or holds_shards(out):
            return
        (out / sf.CONFIG).unlink(missing_ok=True)
        folders = [] if self.had_shard_dir else [out / sf.SHARD_DIR]
        if self.first_created is not None:
            folders += [out, *[p for p in out.parents if self.first_created in (p, *p.parents)]]
        for folder in folders:
            try:
                folder.rmdir()
            except OSError:  # not empty: someone else's now, or a shard's temporary file
                return


def _refuse_foreign_early(out: Path, config: CacheConfig) -> None:
    """Refuse a directory holding another model's cache before spending time loading anything.

    A cache with no shard yet (its first command failed on its inputs) is not refused: the corrected
    command replaces it (``check_or_claim_directory``)."""
    if out.exists() and not out.is_dir():
        raise MlsaeError(f"--out {out} is a file, not a directory; choose a directory path")
    if out.is_dir() and not (out / sf.CONFIG).exists():
        refuse_foreign_files(out, "is not empty and holds no cache")
    if config.overwrite or not (out / sf.CONFIG).is_file() or not holds_shards(out):
        return
    stored = read_stored_config(out / sf.CONFIG)
    for key, wanted in (("model", resolve_model_name(config.model)), ("dataset", config.dataset), ("seq_len", config.seq_len), ("dtype", config.dtype), ("format", config.format)):
        if stored.get(key) != wanted:
            raise MlsaeError(f"{out} holds a cache of another configuration (its {sf.CONFIG} differs in: {key}); choose another --out or pass --overwrite to replace it")


def open_sequences(config: CacheConfig, tokenizer) -> ReadAhead:
    """The run's token sequences, tokenized in a background thread from now on, never more than the run needs.

    ``build_cache`` opens them before it loads the model, so that the first batch is ready when the model
    is; 4 batches ahead until ``_write_shards`` knows the shard size. Opening the dataset happens in the
    thread too: its errors are raised where the first sequence is taken, as they always were."""

    def stream() -> Iterator[np.ndarray]:
        yield from iter_dataset_sequences(config.dataset, tokenizer, config.seq_len, split=config.split, text_column=config.text_column,
                                          limit=math.ceil(config.tokens / config.seq_len))  # fmt: skip

    return ReadAhead(stream(), depth=4 * config.batch_size)


def _write_shards(
    config: CacheConfig, identity: dict, tokenizer, model, layers: list[int], lens: Lens | None, dist: Distributed, stream: ReadAhead | None = None
) -> tuple[int, int]:
    """Compute and write this rank's missing shards. Returns (number of shards, number of sequences).

    ``stream``: the run's sequences, if already opened (``open_sequences``; opened here otherwise), closed here."""
    # every rank has claimed the directory (which drops the temporary files of killed writes) before any
    # rank starts a shard of its own: otherwise a slow rank's claim could delete a fast rank's write
    dist.barrier()
    out = Path(config.out)
    writer = CacheWriter(out, identity)
    reader = ResidualReader(model, layers)
    device = next(model.parameters()).device
    buffers = HostBuffers()  # the shards' host buffers, used again once written
    on_cpu = device.type == "cpu"  # the block outputs' memory is reused there (on a GPU the side-stream copy may still read it)
    special = torch.as_tensor(special_token_ids(tokenizer), dtype=torch.long, device=device)
    per_shard = identity["shard_sequences"]
    n_sequences_wanted = math.ceil(config.tokens / config.seq_len)
    # tokenized in a background thread, never more than the run needs, two shards ahead of the model
    stream = stream if stream is not None else open_sequences(config, tokenizer)
    stream.deepen(max(2 * per_shard, 4 * config.batch_size))
    sequences: Iterator[np.ndarray] = stream
    first = list(itertools.islice(sequences, config.batch_size))  # the norm thresholds' batch, also the first written
    sequences = itertools.chain(first, sequences)

    def first_batch() -> tuple[torch.Tensor, torch.Tensor]:
        if not first:
            raise MlsaeError(f"{config.dataset} gives no sequence of {config.seq_len} tokens to estimate the norm thresholds on")
        ids = torch.as_tensor(np.stack(first).astype(np.int64), device=device)  # [B, S]
        acts = reader.read(ids).float()  # [B, S, L, d]
        return (acts if lens is None else lens.forward_stack(acts, layers)), ~torch.isin(ids, special)

    token_filter, thresholds = tf.run_filter(identity["token_filter"], out, first_batch)
    # on a CPU, with nothing to compute from all layers at once (lens, norm filter), each block's output is cast
    # straight into the shard's buffer as the forward makes it: the batch is never held as [B, S, L, d] float32
    block_by_block = on_cpu and lens is None and token_filter is None
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
            # cast, statistics and the copy to the host happen on the device (staging.py); the shard's writing thread
            # writes each batch while the next one is computed, then completes, checksums and fsyncs the file
            shard_counts = tf.FilterCounts(0, 0, [0] * len(layers))
            shard = writer.open_shard(shard_index)  # each batch's rows are written while the next is computed
            stager = ShardStager(len(shard_seqs) * config.seq_len, len(layers), identity["d_model"], config.dtype, device, buffers, sink=shard.append)
            for offset in range(0, len(shard_seqs), config.batch_size):
                batch = shard_seqs[offset : offset + config.batch_size]
                batch_ids = np.stack(batch).astype(np.int64)  # [B, S]
                ids = torch.as_tensor(batch_ids, device=device)
                keep = ~torch.isin(ids, special)  # [B, S] tokens to store: special tokens never are
                if block_by_block:
                    with stager.adding_layers(keep, first_sequence + offset, batch_ids) as stage:
                        reader.read_each(ids, stage)
                    bar.update(len(batch) * config.seq_len)
                    continue
                acts = reader.read(ids, reuse_output=on_cpu)  # [B, S, L, d] in the model's dtype (on a CPU: valid until the next read)
                if lens is not None:
                    acts = lens.forward_stack(acts.float(), layers)
                if token_filter is not None:  # and, if asked, neither the first positions nor tokens of outlying norm
                    keep, counts = token_filter.keep(keep, acts)
                    shard_counts = shard_counts.add(counts)
                stager.add(acts, keep, first_sequence + offset, batch_ids)
                bar.update(len(batch) * config.seq_len)
            content, stats = stager.finish()
            if token_filter is not None:  # this shard's counts travel in its sidecar, so a resume keeps them
                content.sidecar_extra = {tf.SIDECAR_KEY: tf.sidecar_entry(shard_counts, thresholds)}
            shard.finish(content, stats, done=functools.partial(buffers.give_back, stager.host))
        acts = None
        reader.release()  # its kept output is freed (10-30 ms for 100 MB here) while the last shard is written
        writer.close()
    except BaseException:
        writer.abort()  # a shard still being written must land (or not) before the caller cleans up
        raise
    finally:
        bar.close()
        stream.close()
    if config.progress and dist.rank == 0:
        elapsed = time.perf_counter() - started
        print(f"wrote {n_sequences * config.seq_len:,} tokens in {elapsed:.1f}s to {out}")
    return n_shards, n_sequences

"""One pass over the test cache: encode every token with the dictionary and write its sparse latents.

The latents go to ``latents/part-NNNNN.parquet`` (columns token, layer, latent, activation; only
active rows, in ascending order of token, then layer, then latent; per family as families.py says: a
crosscoder's rows have no layer) with ``latents/tokens.parquet`` beside them (token, sequence, position,
token_id); layout.py names them. Each batch's inputs and reconstructions are also handed to the
consumers (reconstruction metrics, residual statistics), so the cache is read once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import recorded_files, verify_files
from mlsae_cache.shard_format import first_non_finite
from mlsae_cache.parallel_read import HostBuffers, RowReader, default_workers

from . import layout
from .families import family_of
from .files import write_parquet
from .inputs import RunAndCache


class BatchConsumer(Protocol):
    """What the encode pass hands every batch to (reconstruction metrics, residual statistics, outliers)."""

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        """x, x_hat [B, L, d]; values, indices: the family's codes (families.py), [B, L, k] or per token [B, k]."""


@torch.no_grad()
def encode_cache(
    data: RunAndCache,
    out: Path,
    n_tokens: int,
    consumers: list[BatchConsumer],
    batch_tokens: int = 4096,
    device: str = "cpu",
    progress: bool = True,
    screen: bool = False,
    workers: int | None = None,
) -> Path:
    """Encode the first ``n_tokens`` tokens of the cache; returns the latents directory.

    ``screen``: pick the top-k latents with the exact bfloat16 screen (:mod:`mlsae_train.screened_topk`)
    instead of the trainer's float32 kernel.

    The next batch is read from the cache (by ``workers`` threads, None: sized to the cores) and the
    previous batch's latents are written to parquet in helper threads while the SAE encodes the current
    batch (both release the GIL for their I/O and conversions), so the pass runs at the speed of the
    encoder. Batches cross to the device in the cache's storage dtype and become float32 there.
    """
    out = Path(out)
    latents_dir = out / layout.LATENTS_DIR
    latents_dir.mkdir(parents=True, exist_ok=True)
    sae = data.sae.to(device)
    family = family_of(sae)
    cache = data.cache
    columns = data.layer_columns
    all_columns = columns == list(range(cache.n_layers))
    buffers = HostBuffers(cache.dtype, pin_memory=torch.device(device).type == "cuda")
    rows = RowReader(default_workers() if workers is None else workers)  # closed with the helper threads below

    def read(start: int) -> torch.Tensor:
        """Tokens [start, start + batch_tokens): [B, nL, d] the SAE's layers, storage dtype, on the host."""
        stop = min(start + batch_tokens, n_tokens)
        x, stored = buffers.take((stop - start, len(columns), cache.d_model))

        def fill(a: int, b: int) -> None:
            if all_columns:
                cache.read_range(start + a, start + b, out_dtype="storage", out=stored[a:b])
            else:  # only the SAE's layers are gathered
                cache.read(np.arange(start + a, start + b), columns, out_dtype="storage", out=stored[a:b])

        rows.run(stop - start, stored[:1].nbytes, fill)
        bad = first_non_finite(stored, cache.dtype)
        if bad is not None:  # as the trainer: a NaN in a shard whose checksum holds would poison every sum
            shard, row = cache.locate(start + bad[0])
            raise MlsaeError(
                f"the activations of token {start + bad[0]} (shard {shard}, row {row} of cache {cache.root}) at layer "
                f"{data.layers[bad[1]]} are NaN or infinite; rebuild that cache"
            )
        return x

    def write(part: int, start: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        write_parquet(family.sparse_rows(start, values, indices, sae.n_latents), out / layout.latent_part(part))

    starts = list(range(0, n_tokens, batch_tokens))
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="encode", disable=not progress)
    with bar, rows, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        next_acts = reader.submit(read, starts[0]) if starts else None
        written: Future | None = None
        for part, start in enumerate(starts):
            acts = next_acts.result()  # type: ignore[union-attr]
            if part + 1 < len(starts):
                next_acts = reader.submit(read, starts[part + 1])
            x = acts.to(device, non_blocking=True).float()  # [B, nL, d] float32 made on the device
            recon = sae.reconstruct(x, screen=screen)
            x_hat = recon.x_hat.view(x.shape)  # [B, nL, d]
            values, indices = family.codes(recon, *x.shape[:2])  # [B, nL, k] each, or per token [B, k]
            for consumer in consumers:
                consumer.update(x, x_hat, values, indices)
            if written is not None:
                written.result()  # at most one part in flight; raises the writer's error here
            written = writer.submit(write, part, start, values.cpu(), indices.cpu())
            bar.update(x.shape[0])
        if written is not None:
            written.result()
    tokens = cache.token_table().head(n_tokens).with_row_index("token").with_columns(pl.col("token").cast(pl.Int64))
    write_parquet(tokens, out / layout.TOKENS)
    return latents_dir


def scan_latents(latents_dir: Path) -> pl.LazyFrame:
    """The stored sparse latents, lazily, in token order (parts are named in token order)."""
    return pl.scan_parquet(str(Path(latents_dir) / layout.LATENT_PART_GLOB))


def scan_verified_latents(analysis_dir: Path, fix: str = layout.FIX) -> pl.LazyFrame:
    """The latents of a finished analysis (as :func:`scan_latents`), every part and the token table first
    checked against the directory's checksums.json: the entry point for readers of finished analyses."""
    analysis_dir = Path(analysis_dir)
    recorded = recorded_files(analysis_dir)
    names = None if recorded is None else [name for name in recorded if name.startswith(f"{layout.LATENTS_DIR}/")]
    verify_files(analysis_dir, names, fix)  # a part listed but missing is named too
    return scan_latents(analysis_dir / layout.LATENTS_DIR)

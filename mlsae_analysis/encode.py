"""One pass over the test cache: encode every token with the SAE and write its sparse latents.

The latents go to ``latents/part-NNNNN.parquet`` (columns token, layer, latent, activation; only
active rows, in ascending order of token, then layer, then latent) with ``latents/tokens.parquet``
beside them (token, sequence, position, token_id). Each batch's inputs and reconstructions are also handed to
the consumers (reconstruction metrics, residual statistics), so the cache is read once.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from .files import write_parquet
from .inputs import RunAndCache

LATENTS_DIR = "latents"
TOKENS_FILE = "tokens.parquet"
PART_GLOB = "part-*.parquet"


class BatchConsumer(Protocol):
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None: ...


def sparse_rows(token_start: int, values: torch.Tensor, indices: torch.Tensor) -> pl.DataFrame:
    """The active latents of a batch as rows. values, indices: [B, nL, k] for tokens token_start.."""
    batch, n_layers, k = values.shape
    indices, order = indices.sort(dim=2)  # latents ascending within each (token, layer), whichever kernel picked them
    values = values.gather(2, order)
    values_np = values.reshape(-1).cpu().numpy()  # [B * nL * k]
    keep = values_np > 0
    token = np.repeat(np.arange(token_start, token_start + batch, dtype=np.int64), n_layers * k)
    layer = np.tile(np.repeat(np.arange(n_layers, dtype=np.int16), k), batch)
    return pl.DataFrame(
        {
            "token": token[keep],
            "layer": layer[keep],
            "latent": indices.reshape(-1).cpu().numpy().astype(np.int32)[keep],
            "activation": values_np.astype(np.float32)[keep],
        }
    )


@torch.no_grad()
def encode_cache(
    data: RunAndCache,
    out: Path,
    n_tokens: int,
    consumers: list,
    batch_tokens: int = 4096,
    device: str = "cpu",
    progress: bool = True,
    screen: bool = False,
) -> Path:
    """Encode the first ``n_tokens`` tokens of the cache; returns the latents directory.

    ``screen``: pick the top-k latents with the exact bfloat16 screen (:mod:`mlsae_train.screened_topk`)
    instead of the trainer's float32 kernel.

    The next batch is read from the cache and the previous batch's latents are written to parquet in
    two helper threads while the SAE encodes the current batch (both release the GIL for their I/O and
    conversions), so the pass runs at the speed of the encoder.
    """
    latents_dir = Path(out) / LATENTS_DIR
    latents_dir.mkdir(parents=True, exist_ok=True)
    sae = data.sae.to(device)
    columns = data.layer_columns
    all_columns = columns == list(range(data.cache.n_layers))

    def read(start: int) -> np.ndarray:
        acts = data.cache.read_range(start, min(start + batch_tokens, n_tokens))  # [B, nC, d] all cached layers
        return acts if all_columns else np.ascontiguousarray(acts[:, columns])  # [B, nL, d] the SAE's layers

    def write(part: int, start: int, values: torch.Tensor, indices: torch.Tensor) -> None:
        write_parquet(sparse_rows(start, values, indices), latents_dir / f"part-{part:05d}.parquet")

    starts = list(range(0, n_tokens, batch_tokens))
    bar = tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="encode", disable=not progress)
    with bar, ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        next_acts = reader.submit(read, starts[0]) if starts else None
        written: Future | None = None
        for part, start in enumerate(starts):
            acts = next_acts.result()  # type: ignore[union-attr]
            if part + 1 < len(starts):
                next_acts = reader.submit(read, starts[part + 1])
            x = torch.from_numpy(acts).to(device)  # [B, nL, d]
            recon = sae.reconstruct(x, screen=screen)
            shape = x.shape[:2]
            x_hat = recon.x_hat.view(x.shape)  # [B, nL, d]
            values = recon.values.view(*shape, -1)  # [B, nL, k]
            indices = recon.indices.view(*shape, -1)  # [B, nL, k]
            for consumer in consumers:
                consumer.update(x, x_hat, values, indices)
            if written is not None:
                written.result()  # at most one part in flight; raises the writer's error here
            written = writer.submit(write, part, start, values.cpu(), indices.cpu())
            bar.update(x.shape[0])
        if written is not None:
            written.result()
    tokens = data.cache.token_table().head(n_tokens).with_row_index("token").with_columns(pl.col("token").cast(pl.Int64))
    write_parquet(tokens, latents_dir / TOKENS_FILE)
    return latents_dir


def scan_latents(latents_dir: Path) -> pl.LazyFrame:
    """The stored sparse latents, lazily, in token order (parts are named in token order)."""
    return pl.scan_parquet(str(Path(latents_dir) / PART_GLOB))

"""Mean max cosine similarity of decoder rows (paper appendix B.3, eq. 13 with k = 1; SPEC section 4).

For every decoder row, the largest cosine similarity with any OTHER row: each row is compared with
all n - 1 others, lower- and higher-indexed alike (the reference code compares only with
lower-indexed rows, which SPEC section 7 lists as a fault). The n x n similarity matrix is never
built: rows are processed in chunks of `chunk_size`, each against all rows, so the extra memory is one
unit-norm copy of W_dec plus one reused [chunk_size, n] block (131,072 x 1,024 float32 with
chunk_size 4096: 0.5 GiB + 2 GiB, about 3 GiB at peak counting W_dec itself).

The chunked kernel, :func:`max_cosine_to`, compares any rows with any others (queries [n, d] against
keys [m, d]); MMCS is its case keys = queries without the diagonal, and cross-dictionary matching
(matching.py) its case of one dictionary's rows against another's.

A zero row has no direction; normalizing maps it to the zero vector, so its cosine similarity with
every row is 0 (decoder rows are unit norm after training, so this does not arise in practice).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlsae_cache.errors import MlsaeError
from mlsae_train.screened_topk import EncoderScreen, bf16_matmul_is_fast, screened_topk


def _check_decoder(W_dec: torch.Tensor) -> None:
    if W_dec.ndim != 2:
        raise MlsaeError(f"W_dec must be a matrix [n_latents, d], got shape {tuple(W_dec.shape)}")
    if W_dec.shape[0] < 2:
        raise MlsaeError(f"W_dec has {W_dec.shape[0]} row(s); cosine similarity with another row needs at least 2")


def _unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    """W_dec [n, d] with rows scaled to unit norm, in at least float32."""
    _check_decoder(W_dec)
    dtype = torch.promote_types(W_dec.dtype, torch.float32)
    return F.normalize(W_dec.detach().to(dtype), dim=1)  # [n, d]


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise MlsaeError(f"chunk_size must be a positive number of rows, got {chunk_size}")


@torch.no_grad()
def max_cosine_similarity(W_dec: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """For every row of W_dec [n, d], the max cosine similarity with any other row: [n]."""
    _check_decoder(W_dec)
    return max_cosine_to(W_dec, W_dec, chunk_size, exclude_same_index=True)


@torch.no_grad()
def max_cosine_to(
    queries: torch.Tensor,
    keys: torch.Tensor,
    chunk_size: int = 4096,
    exclude_same_index: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """For every row of queries [n, d], the max cosine similarity with any row of keys [m, d]: [n].

    Runs on the queries' device in at least float32; keys elsewhere (a decoder left on the CPU) are
    copied there. ``exclude_same_index``: query j is not compared with key j (queries and keys are the
    same rows, as in MMCS). ``out``: a [n] tensor (a column view of a matrix will do) to fill and return.
    A zero row has no direction: its cosine with every row is 0, never NaN.

    Memory beyond the inputs and the result does not grow with n: a unit-norm copy of the keys [m, d],
    one query chunk [chunk_size, d] normalised at a time (none when ``queries is keys``: the keys' copy
    serves) and one reused [chunk_size, m] block.
    """
    _check_chunk_size(chunk_size)
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise MlsaeError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be matrices [rows, d] of the same width d"
        )
    n, m = queries.shape[0], keys.shape[0]
    needed = 2 if exclude_same_index else 1
    if m < needed:
        raise MlsaeError(f"there are {m} key row(s) to compare with; a max cosine similarity needs at least {needed}")
    if out is not None and tuple(out.shape) != (n,):
        raise MlsaeError(f"out has shape {tuple(out.shape)}; it must be [{n}], one value per query row")
    device = queries.device
    dtype = torch.promote_types(torch.promote_types(queries.dtype, keys.dtype), torch.float32)
    key_unit = F.normalize(keys.detach().to(device=device, dtype=dtype), dim=1)  # [m, d]
    same_rows = queries is keys  # MMCS: the keys' unit copy is the queries' too
    best = torch.empty(n, dtype=dtype, device=device) if out is None else out  # [n]
    # One block buffer, reused: a fresh block per chunk would briefly hold two blocks at once.
    block = torch.empty((min(chunk_size, n), m), dtype=dtype, device=device)  # [chunk, m]
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        if same_rows:
            query_unit = key_unit[start:stop]  # [chunk, d]
        else:
            query_unit = F.normalize(queries[start:stop].detach().to(dtype), dim=1)  # [chunk, d]
        similarity = torch.mm(query_unit, key_unit.T, out=block[: stop - start])  # [chunk, m]
        if exclude_same_index:
            rows = torch.arange(start, min(stop, m), device=device)
            similarity[rows - start, rows] = -torch.inf  # a row is not its own neighbour
        best[start:stop] = similarity.max(dim=1).values
    return best


def mmcs(W_dec: torch.Tensor, chunk_size: int = 4096) -> tuple[float, float]:
    """Mean and (population) standard deviation over rows of the max cosine similarity with another row."""
    return mean_and_std(max_cosine_similarity(W_dec, chunk_size))


def mean_and_std(best: torch.Tensor) -> tuple[float, float]:
    """MMCS from the per-row max cosine similarities [n] (also the rank-0 column of neighbours.parquet)."""
    best = best.double()
    return float(best.mean()), float(best.std(correction=0))


@torch.no_grad()
def nearest_neighbours(
    W_dec: torch.Tensor,
    latents: Sequence[int] | torch.Tensor,
    k: int,
    chunk_size: int = 4096,
    progress: bool = False,
    screen: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k decoder rows most cosine-similar to each given latent's row, itself excluded.

    Returns (indices [m, k] int64, similarities [m, k]), most similar first, for m = len(latents).
    ``screen``: search with the exact bfloat16 screen of ``mlsae_train.screened_topk`` (the same
    neighbours and float32 cosines, faster where bfloat16 matmuls are); None: where they are fast.
    """
    _check_chunk_size(chunk_size)
    unit = _unit_rows(W_dec)  # [n, d]
    n = unit.shape[0]
    if not 1 <= k <= n - 1:
        raise MlsaeError(f"k={k} neighbours asked of {n} latents; k must be between 1 and {n - 1}")
    query = torch.as_tensor(latents, dtype=torch.long, device=unit.device).reshape(-1)  # [m]
    if query.numel() and (query.min() < 0 or query.max() >= n):
        raise MlsaeError(f"latent indices must lie in 0..{n - 1}; got {query.min().item()}..{query.max().item()}")
    if screen is None:
        screen = bf16_matmul_is_fast(unit.device)
    search = _screened_search(unit, k) if screen and unit.dtype == torch.float32 else _dense_search(unit, k, chunk_size)
    indices = torch.empty((query.numel(), k), dtype=torch.long, device=unit.device)  # [m, k]
    similarities = torch.empty((query.numel(), k), dtype=unit.dtype, device=unit.device)  # [m, k]
    starts = range(0, query.numel(), chunk_size)
    for start in tqdm(starts, desc="decoder neighbours", unit="chunk", disable=not progress):
        chunk = query[start : start + chunk_size]  # [c]
        indices[start : start + chunk.numel()], similarities[start : start + chunk.numel()] = search(chunk)
    return indices, similarities


def _dense_search(unit: torch.Tensor, k: int, chunk_size: int):
    """chunk [c] -> its k nearest other rows (indices [c, k], cosines [c, k]) from a full [c, n] block."""
    block = torch.empty((chunk_size, unit.shape[0]), dtype=unit.dtype, device=unit.device)  # [chunk, n], reused

    def search(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        similarity = torch.mm(unit[chunk], unit.T, out=block[: chunk.numel()])  # [c, n]
        similarity[torch.arange(chunk.numel(), device=unit.device), chunk] = -torch.inf
        top = similarity.topk(k, dim=1)
        return top.indices, top.values

    return search


def _screened_search(unit: torch.Tensor, k: int):
    """As :func:`_dense_search`, by the bfloat16 screen: the top k + 1 rows, then the row itself dropped
    (if k + 1 others tie with it at cosine 1 it is not among them, and the first k are the answer)."""
    screen = EncoderScreen(unit)

    def search(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = screened_topk(unit[chunk], screen, k + 1)  # [c, k + 1] each, unsorted
        values = values.masked_fill(indices == chunk[:, None], -torch.inf)
        top = values.topk(k, dim=1)  # most similar first
        return indices.gather(1, top.indices), top.values

    return search

"""Three sparse primitives that the encoder and decoder are built from.

A batch of sparse codes is a pair ``indices [R, K]`` (which latents) and ``weights [R, K]`` (how much of
each), K << n. Multiplying such a code matrix by a dense ``[n, d]`` table (or its transpose by a dense
``[R, d]`` matrix) costs R*K*d instead of R*n*d. Every function here computes exactly what the dense
product computes, only skipping the zeros; tests/test_train_sparse.py checks each against it.

No function materializes the ``[R, K, d]`` gathered rows: at the paper's sizes that tensor is gigabytes.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


def weighted_row_sum(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_j weights[r, j] * table[indices[r, j]]``: the dense ``codes @ table``.

    indices, weights: [R, K]; table: [n, d] -> [R, d]. embedding_bag fuses the gather with the sum.
    """
    return F.embedding_bag(indices, table, mode="sum", per_sample_weights=weights.to(table.dtype))


def row_dots(indices: torch.Tensor, table: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``out[r, j] = table[indices[r, j]] . vectors[r]``: the entries of ``vectors @ table.T`` at the code's support.

    indices: [R, K]; table: [n, d]; vectors: [R, d] -> [R, K].
    """
    n_rows, k = indices.shape
    if k == 0:
        return vectors.new_empty(n_rows, 0)
    row_starts = torch.arange(0, n_rows * k + 1, k, device=indices.device)  # [R + 1]
    return ragged_row_dots(row_starts, indices.reshape(-1), table, vectors).view(n_rows, k)


def ragged_row_dots(row_starts: torch.Tensor, columns: torch.Tensor, table: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """``out[e] = table[columns[e]] . vectors[r]`` for the entries e of row r, ``row_starts[r] <= e < row_starts[r + 1]``.

    row_starts: [R + 1] (CSR row pointers); columns: [E]; table: [n, d]; vectors: [R, d] -> [E]. Rows may
    have any number of entries. On CPU a sampled dense-dense matmul over the CSR pattern; elsewhere
    :func:`row_dots_via_embedding_bag`.
    """
    n_rows = row_starts.numel() - 1
    if columns.device.type != "cpu" or table.dtype != vectors.dtype or columns.numel() == 0:
        return row_dots_via_embedding_bag(columns, table, vectors, row_starts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta": we only use a stable core of it
        pattern = torch.sparse_csr_tensor(row_starts, columns, vectors.new_zeros(columns.numel()), size=(n_rows, table.shape[0]))
        dots = torch.sparse.sampled_addmm(pattern, vectors, table.t(), beta=0.0)
    return dots.values()


def row_dots_via_embedding_bag(
    indices: torch.Tensor, table: torch.Tensor, vectors: torch.Tensor, row_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`row_dots` (indices [R, K] -> [R, K]), or :func:`ragged_row_dots` when ``row_starts`` is given
    (indices [E] -> [E]), as the gradient of a weighted embedding_bag with respect to its weights: exactly
    ``table[index] . vectors[row]``, computed by a fused kernel on every device without the [E, d] gather."""
    weights = torch.ones(indices.shape, dtype=table.dtype, device=table.device, requires_grad=True)
    offsets = None if row_starts is None else row_starts[:-1]
    with torch.enable_grad():
        bags = F.embedding_bag(indices, table.detach(), offsets, mode="sum", per_sample_weights=weights)
        (dots,) = torch.autograd.grad(bags, weights, grad_outputs=vectors.to(table.dtype))
    return dots.to(vectors.dtype)


def scatter_weighted_rows(indices: torch.Tensor, weights: torch.Tensor, vectors: torch.Tensor, n: int) -> torch.Tensor:
    """``out[i] = sum over (r, j) with indices[r, j] == i of weights[r, j] * vectors[r]``: the dense ``codes.T @ vectors``.

    indices, weights: [R, K]; vectors: [R, d] -> [n, d]. The code entries are sorted by latent once, then
    each latent's rows are summed in one embedding_bag pass (a latent used by no row gets zeros).
    The sort is stable, so the summation order, and hence the result, is deterministic.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = stable_argsort(flat, n)  # entries grouped by latent, in row order within a latent
    counts = torch.bincount(flat, minlength=n)  # [n]
    offsets = torch.cumsum(counts, 0) - counts  # [n]: where each latent's bag starts in `order`
    source_rows = torch.div(order, k, rounding_mode="floor")  # [R*K]: the vector each entry scales
    return F.embedding_bag(
        source_rows, vectors, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order].to(vectors.dtype)
    )


def stable_argsort(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Stable argsort of 1-D int64 ``keys`` in [0, n).

    On CPU, numpy's single-threaded radix sort (keys below 2**16) or timsort: torch's parallel radix
    sort is as fast on an idle machine but ~50x slower when another process holds a core, because
    each of its passes waits for every thread.
    """
    if keys.device.type != "cpu":
        return torch.sort(keys, stable=True).indices
    narrow = np.uint16 if n <= 1 << 16 else np.uint32
    return torch.from_numpy(np.argsort(keys.numpy().astype(narrow), kind="stable"))


def latent_sums(indices: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """``out[i] = sum of weights[r, j] over the entries with indices[r, j] == i``: the column sums of the codes. -> [n]"""
    return torch.zeros(n, dtype=weights.dtype, device=weights.device).index_add_(0, indices.reshape(-1), weights.reshape(-1))

"""The encoder's matmul and top-k, fused over row chunks, with a backward that touches only the kept latents.

Forward: ``pre = (z - b_pre) @ W_enc.T`` is computed a chunk of rows at a time into one reused buffer,
and only each row's top-k (and, when some latents are dead, the top-k_aux among the dead ones) is kept.
The full ``[N, n]`` pre-activation matrix never exists: at the paper's sizes it would not fit, and on
CPU allocating it anew every step costs as much as a tenth of the matmul in page faults.

Backward: the gradient reaches the pre-activations only at the kept entries, so
``dL/dW_enc = G.T @ (z - b_pre)`` with G sparse (K entries a row) and ``dL/db_pre = -colsum(G) @ W_enc``:
R*K*d work instead of R*n*d.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .screened_topk import EncoderScreen, screened_topk
from .sparse_ops import latent_sums, scatter_weighted_rows, weighted_row_sum
from .workspace import workspace

# Pre-activations per chunk: enough rows for the matmul to run at full speed (on CPU 2048 rows at
# n = 32768, 256 MiB in float32; on a GPU 4x that, 512 MiB in bfloat16); the buffer is reused by every
# chunk and every step.
CHUNK_ELEMENTS_CPU = 1 << 26
CHUNK_ELEMENTS_GPU = 1 << 28


class TopKCodes(NamedTuple):
    """The kept pre-activations (before ReLU) and their latent indices."""

    values: torch.Tensor
    """[N, k] pre-activations of the k largest latents of each row (unsorted)."""
    indices: torch.Tensor
    """[N, k] their latent indices (int64)."""
    aux_values: torch.Tensor
    """[N, k_aux] pre-activations of the k_aux largest DEAD latents ([N, 0] when none is asked for)."""
    aux_indices: torch.Tensor
    """[N, k_aux] their latent indices."""


class _TopKEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, b_pre, W_enc, k, dead_latents, k_aux, chunk_rows, matmul_dtype, screen):
        # z: [N, d], b_pre: [d], W_enc: [n, d], dead_latents: [n_dead] int64 or None
        n_rows = z.shape[0]
        n_latents = W_enc.shape[0]
        centred = z - b_pre  # [N, d]
        if screen:  # the same top-k (float32 values) from the bfloat16 screen; the backward is unchanged
            values, indices, aux_values, aux_indices = _screened_codes(centred, W_enc, k, dead_latents, k_aux)
            ctx.save_for_backward(centred, W_enc, indices, aux_indices)
            ctx.mark_non_differentiable(indices, aux_indices)
            return values, indices, aux_values, aux_indices
        weight = W_enc.to(matmul_dtype)  # a no-op in float32
        centred_mm = centred.to(matmul_dtype)
        k_aux = 0 if dead_latents is None else min(k_aux, dead_latents.numel())
        same_dtype = matmul_dtype == z.dtype

        values = z.new_empty(n_rows, k)
        indices = torch.empty(n_rows, k, dtype=torch.long, device=z.device)
        aux_values = z.new_empty(n_rows, k_aux)
        aux_indices = torch.empty(n_rows, k_aux, dtype=torch.long, device=z.device)
        chunk_rows = max(1, min(chunk_rows, n_rows))
        buffer = workspace(chunk_rows, n_latents, matmul_dtype, z.device)
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            pre = torch.mm(centred_mm[start:stop], weight.t(), out=buffer[: stop - start])  # [rows, n]
            if same_dtype:  # write straight into the outputs
                torch.topk(pre, k, dim=1, sorted=False, out=(values[start:stop], indices[start:stop]))
            else:
                top = torch.topk(pre, k, dim=1, sorted=False)
                values[start:stop], indices[start:stop] = top.values, top.indices
            if k_aux:
                dead_pre = pre.index_select(1, dead_latents)  # [rows, n_dead]
                aux = torch.topk(dead_pre, k_aux, dim=1, sorted=False)
                aux_values[start:stop] = aux.values
                aux_indices[start:stop] = dead_latents[aux.indices]
        ctx.save_for_backward(centred, W_enc, indices, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
        centred, W_enc, indices, aux_indices = ctx.saved_tensors
        n_latents = W_enc.shape[0]
        if aux_indices.shape[1]:
            indices = torch.cat([indices, aux_indices], dim=1)  # [N, k + k_aux]
            grad_values = torch.cat([grad_values, grad_aux_values], dim=1)
        grad_values = grad_values.to(centred.dtype)
        grad_z = grad_b_pre = grad_W_enc = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = scatter_weighted_rows(indices, grad_values, centred, n_latents)  # [n, d]
        if ctx.needs_input_grad[0]:
            grad_z = weighted_row_sum(indices, grad_values, W_enc)  # [N, d]
        if ctx.needs_input_grad[1]:
            if grad_z is not None:
                grad_b_pre = -grad_z.sum(0)
            else:  # sum over rows first: an [n] vector times W_enc instead of an [N, d] gather
                grad_b_pre = -(latent_sums(indices, grad_values, n_latents) @ W_enc)  # [d]
        return grad_z, grad_b_pre, grad_W_enc, None, None, None, None, None, None


def _screened_codes(centred: torch.Tensor, W_enc: torch.Tensor, k: int, dead_latents: torch.Tensor | None, k_aux: int):
    """:class:`TopKCodes` of centred [N, d] by the bfloat16 screen: the top-k over all latents, and the
    top-k_aux over the dead ones (a screen of their rows alone)."""
    values, indices = screened_topk(centred, EncoderScreen(W_enc), k)  # [N, k] each
    k_aux = 0 if dead_latents is None else min(k_aux, dead_latents.numel())
    if not k_aux:
        return values, indices, values.new_empty(values.shape[0], 0), indices.new_empty(values.shape[0], 0)
    aux_values, aux_positions = screened_topk(centred, EncoderScreen(W_enc[dead_latents]), k_aux)  # [N, k_aux]
    return values, indices, aux_values, dead_latents[aux_positions]


def topk_encode(
    z: torch.Tensor,
    b_pre: torch.Tensor,
    W_enc: torch.Tensor,
    k: int,
    dead_latents: torch.Tensor | None = None,
    k_aux: int = 0,
    chunk_rows: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    screen: bool = False,
) -> TopKCodes:
    """Top-k of ``(z - b_pre) @ W_enc.T`` per row, and top-k_aux of it among ``dead_latents``.

    z: [N, d]; b_pre: [d]; W_enc: [n, d]; dead_latents: 1-D int64 latent indices or None.
    Values are pre-activations (apply ReLU after). Differentiable in z, b_pre and W_enc.
    ``matmul_dtype`` (e.g. bfloat16 on CUDA) is used for the matmul only; values come back in z's dtype.
    ``screen``: pick the latents with the exact bfloat16 screen of :mod:`.screened_topk` (the same
    latents as float32 but for float32 ties, float32 values; ignores ``matmul_dtype`` and ``chunk_rows``).
    """
    if chunk_rows is None:
        elements = CHUNK_ELEMENTS_CPU if z.device.type == "cpu" else CHUNK_ELEMENTS_GPU
        chunk_rows = max(1, elements // W_enc.shape[0])
    if dead_latents is not None and dead_latents.numel() == 0:
        dead_latents = None
    values, indices, aux_values, aux_indices = _TopKEncode.apply(
        z, b_pre, W_enc, k, dead_latents, k_aux, chunk_rows, matmul_dtype or z.dtype, screen
    )
    return TopKCodes(values, indices, aux_values, aux_indices)

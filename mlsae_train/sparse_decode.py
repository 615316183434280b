"""The decoder ``W_dec.T h`` for k-sparse latents h, forward and backward on the active latents only.

With h given as ``(values [N, K], indices [N, K])``:
- forward  ``out[r] = sum_j values[r, j] * W_dec[indices[r, j]]``               R*K*d
- backward ``dL/dvalues[r, j] = W_dec[indices[r, j]] . g[r]``                    R*K*d
           ``dL/dW_dec[i] = sum over entries using latent i of values * g[r]``     R*K*d
where the dense decoder costs R*n*d for each. The weight gradient is returned dense ([n, d]) because
Adam updates every row anyway.
"""

from __future__ import annotations

import torch

from .sparse_ops import row_dots, scatter_weighted_rows, weighted_row_sum


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec):
        # values: [N, K], indices: [N, K] int64, W_dec: [n, d] -> [N, d]
        ctx.save_for_backward(values, indices, W_dec)
        return weighted_row_sum(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            grad_values = row_dots(indices, W_dec, grad_out).to(values.dtype)  # [N, K]
        if ctx.needs_input_grad[2]:
            grad_W_dec = scatter_weighted_rows(indices, values, grad_out, W_dec.shape[0]).to(W_dec.dtype)  # [n, d]
        return grad_values, None, grad_W_dec


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j values[..., j] * W_dec[indices[..., j]]`` -> [..., d]; differentiable in values and W_dec."""
    lead = values.shape[:-1]
    flat_values = values.reshape(-1, values.shape[-1])
    flat_indices = indices.reshape(-1, indices.shape[-1])
    if flat_values.shape[1] == 0:  # no active latent (e.g. AuxK with nothing dead)
        return W_dec.new_zeros(*lead, W_dec.shape[1])
    return _SparseDecode.apply(flat_values, flat_indices, W_dec).view(*lead, W_dec.shape[1])

"""The decoder ``W_dec.T h`` for k-sparse latents h, forward and backward on the active latents only.

With h given as ``(values [N, K], indices [N, K])``:
- forward  ``out[r] = sum_j values[r, j] * W_dec[indices[r, j]]``               R*K*d
- backward ``dL/dvalues[r, j] = W_dec[indices[r, j]] . g[r]``                    R*K*d
           ``dL/dW_dec[i] = sum over entries using latent i of values * g[r]``     R*K*d
where the dense decoder costs R*n*d for each. The weight gradient is returned dense ([n, d]) because
Adam updates every row anyway.

With ``project_grad`` the weight gradient comes back with each row's component along that (unit)
row removed, as SPEC 3 asks before every step. Its coefficient is free here:
``dL/dW_dec[i] . W_dec[i] = sum over entries using latent i of values * dL/dvalues``, an [R*K]
reduction instead of a pass over the [n, d] matrices. Projecting each decoder call's contribution
projects their sum, so every path to W_dec (reconstruction, AuxK, micro-batches) can use it.
"""

from __future__ import annotations

import torch

from .sparse_ops import latent_sums, row_dots, scatter_weighted_rows, weighted_row_sum


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec, project_grad):
        # values: [N, K], indices: [N, K] int64, W_dec: [n, d] -> [N, d]
        ctx.save_for_backward(values, indices, W_dec)
        ctx.project_grad = project_grad
        return weighted_row_sum(indices, values, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W_dec = None
        dots = None
        if ctx.needs_input_grad[0] or (ctx.needs_input_grad[2] and ctx.project_grad):
            dots = row_dots(indices, W_dec, grad_out)  # [N, K] = dL/dvalues
            grad_values = dots.to(values.dtype) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[2]:
            n_latents = W_dec.shape[0]
            grad_W_dec = scatter_weighted_rows(indices, values, grad_out, n_latents).to(W_dec.dtype)  # [n, d]
            if ctx.project_grad:
                along = latent_sums(indices, values.to(dots.dtype) * dots, n_latents)  # [n] = grad_W_dec[i] . W_dec[i]
                grad_W_dec.addcmul_(W_dec, along[:, None].to(W_dec.dtype), value=-1.0)
        return grad_values, None, grad_W_dec, None


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, project_grad: bool = False
) -> torch.Tensor:
    """``sum_j values[..., j] * W_dec[indices[..., j]]`` -> [..., d]; differentiable in values and W_dec.

    ``project_grad``: give W_dec the gradient minus each row's component along that row (the rows
    must have unit norm).
    """
    lead = values.shape[:-1]
    flat_values = values.reshape(-1, values.shape[-1])
    flat_indices = indices.reshape(-1, indices.shape[-1])
    if flat_values.shape[1] == 0:  # no active latent (e.g. AuxK with nothing dead)
        return W_dec.new_zeros(*lead, W_dec.shape[1])
    return _SparseDecode.apply(flat_values, flat_indices, W_dec, project_grad).view(*lead, W_dec.shape[1])

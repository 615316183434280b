"""One optimizer step of SPEC section 3 (and 9), on this process's share x [b, L, d] of a global batch,
for any dictionary family (dictionary.py: the step sees only that interface):

  1. dead latents = not active in the last ``dead_tokens`` tokens (counted before this batch)
  2. per micro-batch: standardize, top-k encode (+ top-k_aux among the dead), sparse decode,
     unstandardize (``model.reconstruct``); backpropagate this micro-batch's share of the loss
  3. loss = ``model.fvu_loss`` of the per-layer FVUs (the mean; the per-layer suite's sum) + alpha *
     AuxK of each of the family's groups, all normalized over the GLOBAL batch
  4. sum gradients over processes (W_dec's arrives without each row's parallel component: the
     sparse decoder projects it, see sparse_decode.py)
  5. Adam step; renormalize decoder rows; mark the latents active in this batch

The FVU denominators depend on the data only, so they are computed from x before any backward pass.
AuxK's denominator depends on the residuals of every micro-batch, so AuxK's gradient is accumulated
unnormalized beside the FVU gradient and scaled once all micro-batches are seen. Any micro-batch
size therefore gives the same step (up to float rounding) as the whole batch at once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from .dead_latents import DeadLatentTracker
from .dictionary import Dictionary
from .distributed import Distributed
from .loss import ResidualMoments, SumFn, fvu_per_layer, total_variance_per_layer

ADAM_EPS = 6.25e-10


def make_optimizer(model: Dictionary, lr: float) -> torch.optim.Optimizer:
    """Adam, default betas, eps 6.25e-10; the fused kernel (one pass over each matrix) where torch has it."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, eps=ADAM_EPS, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(model.parameters(), lr=lr, eps=ADAM_EPS)


class StepTerms(NamedTuple):
    fvu_per_layer: torch.Tensor
    """[L] each layer's FVU over the global batch (before the step)."""
    auxk: float
    """AuxK over the global batch (the mean over groups: the per-layer suite's layers); exactly 0.0 when no latent is dead."""
    active: torch.Tensor
    """[*dead_shape] bool, the latents active (after ReLU, among the top k) in this process's tokens."""


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def accumulate_gradients(
    model: Dictionary,
    x: torch.Tensor,
    dead_latents: torch.Tensor | None,
    auxk_alpha: float,
    sum_: SumFn = _identity,
    matmul_dtype: torch.dtype | None = None,
    micro_batch_tokens: int | None = None,
    screen: bool = False,
) -> StepTerms:
    """Set each parameter's ``.grad`` to this process's share of the gradient of the family's loss
    (``model.fvu_loss`` of the per-layer FVUs + alpha * AuxK of each group) over the global batch, going
    through x [b, L, d] in micro-batches. W_dec's gradient has each latent's component along its decoder
    row (or block) removed (SPEC 3).

    ``dead_latents``: indices into the flattened dead tracker (``model.dead_shape``). ``sum_`` sums a
    tensor over processes (in place); summed over processes, the gradients are the one-process gradient
    of the whole global batch. ``screen``: the encoder picks its latents with the exact bfloat16 screen
    (``topk_encode(..., screen=True)``).
    """
    b, n_layers, d = x.shape
    params = tuple(model.parameters())  # W_enc, W_dec, b_pre
    for param in params:
        param.grad = None
    total_variance = total_variance_per_layer(x, sum_)  # [L], data only
    fvu_layers = x.new_zeros(n_layers)
    active = torch.zeros(model.dead_shape, dtype=torch.bool, device=x.device)
    aux_grads: list[torch.Tensor | None] | None = None
    aux_squared: torch.Tensor | None = None  # [G] float64
    moments: ResidualMoments | None = None
    has_dead: list[bool] = []
    for part in x.split(micro_batch_tokens or b):
        out = model.reconstruct(
            part, dead_latents=dead_latents, matmul_dtype=matmul_dtype, project_decoder_grad=True, screen=screen
        )
        part_fvu = fvu_per_layer(part, out.x_hat.view(part.shape), total_variance)  # [L]
        aux = model.auxk_residuals(out, dead_latents)
        if aux is not None:  # some latents are dead: AuxK explains the residual with them
            pairs = zip(aux.error.unbind(1), aux.error_hat.unbind(1))  # [M, d] each: one group's vectors
            squared = torch.stack([(error - error_hat).pow(2).sum() for error, error_hat in pairs])  # [G]
            grads = torch.autograd.grad(squared.sum(), params, retain_graph=True, allow_unused=True)
            aux_grads = list(grads) if aux_grads is None else [_add(a, g) for a, g in zip(aux_grads, grads)]
            if moments is None:
                moments = ResidualMoments(d, x.device, groups=squared.numel())
                aux_squared = torch.zeros(squared.numel(), dtype=torch.float64, device=x.device)
                has_dead = aux.has_dead.tolist()
            aux_squared += squared.detach()
            moments.add(aux.error)
        model.fvu_loss(part_fvu).backward()
        fvu_layers += part_fvu.detach()
        active |= model.active_latents(out)
    auxk = 0.0
    if aux_grads is not None:
        variances = moments.total_variance(sum_).tolist()  # [G]
        squared_sums = sum_(aux_squared).tolist()
        auxk_groups = []
        for group, (variance, squared_sum, dead_here) in enumerate(zip(variances, squared_sums, has_dead)):
            # a group without dead latents has no AuxK; a batch whose residuals are all equal leaves nothing to explain
            if not dead_here or variance <= 0:
                auxk_groups.append(0.0)
                continue
            for param, grad in zip(params, aux_grads):
                if grad is not None:
                    model.per_group(param.grad)[group].add_(model.per_group(grad)[group], alpha=auxk_alpha / variance)
            auxk_groups.append(squared_sum / variance)
        auxk = float(np.mean(auxk_groups))
    return StepTerms(sum_(fvu_layers), auxk, active)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None or b is None:
        return a if b is None else b
    return a.add_(b)


def train_step(
    model: Dictionary,
    optimizer: torch.optim.Optimizer,
    tracker: DeadLatentTracker,
    x: torch.Tensor,
    global_batch_tokens: int,
    auxk_alpha: float,
    dist: Distributed | None = None,
    matmul_dtype: torch.dtype | None = None,
    micro_batch_tokens: int | None = None,
    screen: bool = False,
) -> dict[str, Any]:
    """One optimizer step on x [b, L, d] (this process's share of the global batch). Returns its metrics."""
    sum_ = dist.all_reduce_sum_ if dist is not None else _identity
    dead = tracker.dead_latents() if auxk_alpha > 0 else None  # [n_dead], counted before this batch
    terms = accumulate_gradients(model, x, dead, auxk_alpha, sum_, matmul_dtype, micro_batch_tokens, screen)
    for param in model.parameters():
        sum_(param.grad)
    optimizer.step()
    model.normalize_decoder_()

    active = terms.active.to(torch.int32)
    if dist is not None:
        dist.all_reduce_max_(active)
    tracker.update(active.bool(), global_batch_tokens)

    fvus = terms.fvu_per_layer.float().tolist()
    n_dead = 0 if dead is None else dead.numel()
    metrics = {"loss": float(np.mean(fvus)) + auxk_alpha * terms.auxk, "fvu": float(np.mean(fvus))}
    metrics.update({f"fvu_layer_{layer}": value for layer, value in zip(model.layers, fvus)})
    metrics.update({"auxk": terms.auxk, "dead_fraction": n_dead / tracker.tokens_since_active.numel()})
    return metrics

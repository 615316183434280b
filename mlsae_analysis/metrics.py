"""Reconstruction metrics of SPEC section 4, accumulated exactly over the whole test set.

Per layer l (sums over every test token t, never averages of batch averages):
  FVU  = sum_t ||x[t,l] - x_hat[t,l]||^2 / sum_t ||x[t,l] - mean_t x[t,l]||^2
  MSE  = sum_t ||x[t,l] - x_hat[t,l]||^2 / (n_tokens * d)
  L0   = mean over tokens of the number of active latents (activation > 0; k unless ReLU zeroed some)
  L1   = mean over tokens of the sum of latent activations
  dead = fraction of latents never active at that layer on the test set
The denominator of FVU is accumulated batch by batch as a centred sum of squares merged with Chan's
formula, so that it is exact without a second pass and without the cancellation of
sum ||x||^2 - n ||mean||^2. The "mean" row averages the per-layer values over layers, except the dead
fraction, which there counts latents never active at ANY layer.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class Scratch:
    """A buffer reused batch after batch for [B, nL, d] temporaries: on CPU every fresh tensor of tens
    of MB is mapped anew and page-faulted in, which cost as much as the arithmetic done in it."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def like(self, tensor: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (default: tensor's) with tensor's dtype and device."""
        shape = tuple(tensor.shape if shape is None else shape)
        numel = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != tensor.dtype or buffer.device != tensor.device:
            buffer = self._buffer = torch.empty(numel, dtype=tensor.dtype, device=tensor.device)
        return buffer[:numel].view(shape)


class ReconstructionMetrics:
    """Accumulates the sums behind FVU, MSE, L0, L1 and the dead fraction, batch by batch."""

    def __init__(self, n_layers: int, d_model: int, n_latents: int) -> None:
        self.d_model = d_model
        self.n_latents = n_latents
        self.n_tokens = 0
        self.sum_sq_error = np.zeros(n_layers)  # [nL] sum_t ||x - x_hat||^2
        self.mean = np.zeros((n_layers, d_model))  # [nL, d] running mean of x
        self.centred_sq = np.zeros(n_layers)  # [nL] sum_t ||x - running mean||^2 (Chan-merged)
        self.sum_l0 = np.zeros(n_layers)  # [nL]
        self.sum_l1 = np.zeros(n_layers)  # [nL]
        self._active_slots = torch.zeros(n_layers * n_latents + 1, dtype=torch.bool)  # [nL * n + 1], last: spare
        self.active = self._active_slots[:-1].view(n_layers, n_latents)  # [nL, n] ever active at layer
        self._scratch = Scratch()

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        """x, x_hat: [B, nL, d]; values, indices: [B, nL, k] (activations after ReLU and their latents).

        Each token's sum over its d components is taken in x's precision (float32: d terms, relative
        error ~1e-7) and every sum over tokens in float64, so that the totals stay exact over millions
        of tokens without converting whole batches to float64 (that cost a third of the encoder's time).
        """
        batch, n_layers, _ = x.shape
        if batch == 0:
            return
        scratch = self._scratch.like(x)  # [B, nL, d]
        self.sum_sq_error += _token_sum(torch.sub(x, x_hat, out=scratch).square_().sum(dim=2))  # [nL]
        # A mean off by float32 rounding (~1e-7 relative) changes the centred sum only in second order.
        batch_mean = x.sum(dim=0).double() / batch  # [nL, d]
        batch_centred = _token_sum(torch.sub(x, batch_mean.to(x.dtype), out=scratch).square_().sum(dim=2))  # [nL]
        batch_mean_np = batch_mean.cpu().numpy()
        n_before, n_after = self.n_tokens, self.n_tokens + batch
        delta = batch_mean_np - self.mean  # [nL, d]
        self.centred_sq += batch_centred + (delta**2).sum(axis=1) * (n_before * batch / n_after)
        self.mean += delta * (batch / n_after)
        self.n_tokens = n_after
        is_active = values > 0  # [B, nL, k]
        self.sum_l0 += is_active.sum(dim=(0, 2)).cpu().numpy()
        self.sum_l1 += _token_sum(values.sum(dim=2))
        # Mark (layer, latent) pairs active: entry -> flat index layer * n_latents + latent, or the
        # spare last slot when ReLU zeroed it (one scatter, no boolean gather).
        flat = indices + torch.arange(n_layers, device=indices.device)[:, None] * self.n_latents  # [B, nL, k]
        flat = torch.where(is_active, flat, n_layers * self.n_latents).view(-1).cpu()
        self._active_slots.scatter_(0, flat, True)

    def per_layer(self) -> dict[str, np.ndarray]:
        """Each metric per layer: arrays [nL]."""
        n = max(self.n_tokens, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            fvu = np.where(self.centred_sq > 0, self.sum_sq_error / self.centred_sq, np.nan)
        return {
            "fvu": fvu,
            "mse": self.sum_sq_error / (n * self.d_model),
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "dead_fraction": 1.0 - self.active.double().mean(dim=1).numpy(),
        }

    def dead_fraction_any_layer(self) -> float:
        """Fraction of latents never active at any layer of any test token."""
        return float(1.0 - self.active.any(dim=0).double().mean())


def _token_sum(per_token: torch.Tensor) -> np.ndarray:
    """[B, nL] per-token values summed over tokens in float64: [nL]."""
    return per_token.sum(dim=0, dtype=torch.float64).cpu().numpy()

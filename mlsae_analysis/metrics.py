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

import numpy as np
import torch


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
        self.active = torch.zeros((n_layers, n_latents), dtype=torch.bool)  # [nL, n] ever active at layer

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        """x, x_hat: [B, nL, d]; values, indices: [B, nL, k] (activations after ReLU and their latents)."""
        batch = x.shape[0]
        if batch == 0:
            return
        x64 = x.double()
        self.sum_sq_error += ((x64 - x_hat.double()) ** 2).sum(dim=(0, 2)).cpu().numpy()
        batch_mean = x64.mean(dim=0)  # [nL, d]
        batch_centred = ((x64 - batch_mean) ** 2).sum(dim=(0, 2)).cpu().numpy()  # [nL]
        batch_mean_np = batch_mean.cpu().numpy()
        n_before, n_after = self.n_tokens, self.n_tokens + batch
        delta = batch_mean_np - self.mean  # [nL, d]
        self.centred_sq += batch_centred + (delta**2).sum(axis=1) * (n_before * batch / n_after)
        self.mean += delta * (batch / n_after)
        self.n_tokens = n_after
        is_active = values > 0  # [B, nL, k]
        self.sum_l0 += is_active.sum(dim=(0, 2)).double().cpu().numpy()
        self.sum_l1 += values.double().sum(dim=(0, 2)).cpu().numpy()
        n_layers = x.shape[1]
        for layer in range(n_layers):
            self.active[layer, indices[:, layer][is_active[:, layer]].cpu()] = True

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

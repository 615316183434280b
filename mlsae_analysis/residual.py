"""Residual-stream statistics of figs. 1 and 4 (SPEC section 4), accumulated over the test cache.

- cos_next[l]: mean over tokens of cos(x[t,l] - mu_l, x[t,l+1] - mu_{l+1}), mu_l being layer l's mean
  over the dataset (the cache's recorded mean); the last layer has no next layer (NaN).
- mean_norm[l]: mean over tokens of ||x[t,l]||, not centred.
Vectors of norm zero after centring contribute a cosine of 0.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from .metrics import Scratch


class ResidualStatistics:
    """Sums of adjacent-layer cosine similarities and of norms, batch by batch."""

    def __init__(self, layers: list[int], layer_means: np.ndarray) -> None:
        self.layers = list(layers)
        self.layer_means = torch.as_tensor(layer_means, dtype=torch.float64)  # [nL, d]
        self.n_tokens = 0
        self.sum_cos_next = np.zeros(max(len(layers) - 1, 0))  # [nL - 1]
        self.sum_norm = np.zeros(len(layers))  # [nL]
        self._centred, self._products = Scratch(), Scratch()  # reused [B, nL, d] and [B, nL - 1, d]

    @torch.no_grad()
    def update(self, x: torch.Tensor, *_unused: torch.Tensor) -> None:
        """x: [B, nL, d] activations of the analysed layers (reconstructions, if given, are not used).

        Per-token norms and cosines are computed in x's precision (float32 over d components), their
        sums over tokens in float64 (a float64 copy of every batch cost a tenth of the encoder's time).
        """
        means = self.layer_means.to(device=x.device, dtype=x.dtype)  # [nL, d]
        self.sum_norm += torch.linalg.vector_norm(x, dim=2).sum(dim=0, dtype=torch.float64).cpu().numpy()
        centred = torch.sub(x, means, out=self._centred.like(x))  # [B, nL, d]
        norms = torch.linalg.vector_norm(centred, dim=2).clamp_min_(1e-12)  # [B, nL] (a zero vector's cosine is 0)
        batch, n_layers, d = x.shape
        products = torch.mul(centred[:, :-1], centred[:, 1:], out=self._products.like(x, (batch, n_layers - 1, d)))
        cos_next = products.sum(dim=2) / (norms[:, :-1] * norms[:, 1:])  # [B, nL - 1]
        self.sum_cos_next += cos_next.sum(dim=0, dtype=torch.float64).cpu().numpy()
        self.n_tokens += x.shape[0]

    def table(self) -> pl.DataFrame:
        """One row per layer: layer (model block), layer_index, n_layers, cos_next, mean_norm."""
        n = max(self.n_tokens, 1)
        cos_next = np.append(self.sum_cos_next / n, np.nan)[: len(self.layers)]
        return pl.DataFrame(
            {
                "layer": self.layers,
                "layer_index": list(range(len(self.layers))),
                "n_layers": [len(self.layers)] * len(self.layers),
                "cos_next": cos_next,
                "mean_norm": self.sum_norm / n,
            }
        )

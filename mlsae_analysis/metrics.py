"""Reconstruction metrics of SPEC section 4, accumulated exactly over the whole test set.

Per layer l (sums over every test token t, never averages of batch averages):
  FVU  = sum_t ||x[t,l] - x_hat[t,l]||^2 / sum_t ||x[t,l] - mean_t x[t,l]||^2
  MSE  = sum_t ||x[t,l] - x_hat[t,l]||^2 / (n_tokens * d)
  L0   = mean over tokens of the number of active latents (activation > 0; k unless ReLU zeroed some)
  L1   = mean over tokens of the sum of latent activations
  dead = fraction of latents never active at that layer on the test set
(L0, L1 and dead count the latents of the vector x[t,l]; for a crosscoder, whose k latents belong to the
token, they are the token's and the same at every layer: see families.py.)
The denominator of FVU is accumulated batch by batch as a centred sum of squares merged with Chan's
formula, so that it is exact without a second pass and without the cancellation of
sum ||x||^2 - n ||mean||^2. The "mean" row averages the per-layer values over layers (its dead_fraction
is the mean of the per-layer dead fractions); ``dead_every_layer`` is the fraction of latents never
active at ANY layer of any test token (SPEC's "dead" for an MLSAE), given on the mean row only.

Outliers (:class:`NormOutliers`, SPEC section 4 says nothing of them; these are diagnostics). With n test
tokens, m_l = mean_t x[t,l], SS_l = sum_t ||x[t,l] - m_l||^2 (FVU's denominator) and T_l(f) the
max(1, ceil(f n)) tokens with the largest ||x[t,l]|| (ties: the first tokens win):
  var_share_top_0.1pct = sum_{t in T_l(0.001)} ||x[t,l] - m_l||^2 / SS_l
  var_share_top_1pct   = the same for T_l(0.01)
  fvu_without_top_0.1pct = FVU computed as above over the tokens NOT in T_l(0.001), about their own mean
A layer is flagged (:func:`concentration_warnings`) when var_share_top_1pct > 0.5: 1% of its tokens carry
more than half of its variance, so its FVU mostly measures how well those few tokens are reconstructed.
"""

from __future__ import annotations

import math
from typing import Callable

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
        """x, x_hat: [B, nL, d]; values, indices: [B, nL, k] (activations after ReLU and their latents), or
        [B, k] for a dictionary with one latent vector per token (the crosscoder), whose k latents then count
        at every layer: L0 and L1 per token, and a latent active for a token is active at each layer.

        Each token's sum over its d components is taken in x's precision (float32: d terms, relative
        error ~1e-7) and every sum over tokens in float64, so that the totals stay exact over millions
        of tokens without converting whole batches to float64 (that cost a third of the encoder's time).
        """
        batch, n_layers, _ = x.shape
        if batch == 0:
            return
        if values.ndim == 2:  # per token: the same codes for each of the token's layers
            values, indices = values[:, None].expand(batch, n_layers, -1), indices[:, None].expand(batch, n_layers, -1)
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


TOP_FRACTION = 0.001  # the "top 0.1%" of var_share_top_0.1pct and fvu_without_top_0.1pct
CONCENTRATION_FRACTION = 0.01  # the warning: this fraction of tokens ...
CONCENTRATION_SHARE = 0.5  # ... carrying more than this share of a layer's variance
OUTLIER_COLUMNS = ("var_share_top_0.1pct", "var_share_top_1pct", "fvu_without_top_0.1pct")


def top_count(n_tokens: int, fraction: float) -> int:
    """How many tokens "the top ``fraction``" of n_tokens is: ceil(fraction * n), at least 1 (0 of none)."""
    return 0 if n_tokens <= 0 else max(1, math.ceil(fraction * n_tokens - 1e-9))


class NormOutliers:
    """Per layer, the tokens of largest norm ||x[t,l]||, kept as a running top-K of scalars (norm, token
    index, squared error) merged batch by batch, so memory stays at K = 1% of the tokens whatever their
    number. Their vectors are read back from the cache at the end (:meth:`per_layer`), which gives the
    exact variance they carry and the FVU without them (module docstring) in one pass over the test set.

    Tokens are numbered in the order they are fed (batch after batch from token 0, as encode_cache does).
    """

    def __init__(self, n_layers: int, n_tokens: int) -> None:
        self.n_layers = n_layers
        self.k_wide = top_count(n_tokens, CONCENTRATION_FRACTION)
        self.n_tokens = 0
        self.norms = torch.empty(n_layers, 0, dtype=torch.float64)  # [nL, <=K] descending
        self.tokens = torch.empty(n_layers, 0, dtype=torch.int64)  # [nL, <=K]
        self.sq_error = torch.empty(n_layers, 0, dtype=torch.float64)  # [nL, <=K] ||x - x_hat||^2

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> None:
        """x, x_hat: [B, nL, d] (values, indices unused: the consumer interface of encode_cache)."""
        batch = x.shape[0]
        if batch == 0:
            return
        norms = torch.linalg.vector_norm(x, dim=2).T.double().cpu()  # [nL, B]
        sq_error = (x - x_hat).square().sum(dim=2).T.double().cpu()  # [nL, B]
        tokens = torch.arange(self.n_tokens, self.n_tokens + batch).expand(self.n_layers, batch)  # [nL, B]
        self.n_tokens += batch
        norms = torch.cat([self.norms, norms], dim=1)  # [nL, K + B]; earlier tokens first, so ties keep them
        keep = torch.topk(norms, min(self.k_wide, norms.shape[1]), dim=1, sorted=True).indices  # [nL, K]
        keep = _stable_ties(norms, keep)
        self.norms = norms.gather(1, keep)
        self.tokens = torch.cat([self.tokens, tokens], dim=1).gather(1, keep)
        self.sq_error = torch.cat([self.sq_error, sq_error], dim=1).gather(1, keep)

    def per_layer(self, recon: ReconstructionMetrics, read_tokens: Callable[[np.ndarray], np.ndarray], chunk: int = 4096) -> dict[str, np.ndarray]:
        """The OUTLIER_COLUMNS per layer, arrays [nL]. ``recon`` saw the same batches (its mean, FVU
        denominator and error sums are used); ``read_tokens(indices)`` returns those tokens' vectors
        float32 [len(indices), nL, d], as they were fed."""
        n = self.n_tokens
        nan = np.full(self.n_layers, np.nan)
        if n == 0 or recon.n_tokens != n:
            return {name: nan.copy() for name in OUTLIER_COLUMNS}
        k_top, k_wide = top_count(n, TOP_FRACTION), min(self.k_wide, n)
        tokens = self.tokens.numpy()  # [nL, K]
        centred_top = np.zeros(self.n_layers)  # [nL] sum over T(0.1%) of ||x - m||^2
        centred_wide = np.zeros(self.n_layers)  # [nL] sum over T(1%) of ||x - m||^2
        offset_top = np.zeros((self.n_layers, recon.d_model))  # [nL, d] sum over T(0.1%) of (x - m)
        wanted = np.unique(tokens[:, :k_wide])
        for start in range(0, len(wanted), chunk):
            ids = wanted[start : start + chunk]
            x = read_tokens(ids).astype(np.float64)  # [c, nL, d]
            for layer in range(self.n_layers):
                centred = x[:, layer] - recon.mean[layer]  # [c, d]
                sq = (centred**2).sum(axis=1)  # [c]
                in_wide = np.isin(ids, tokens[layer, :k_wide])
                in_top = np.isin(ids, tokens[layer, :k_top])
                centred_wide[layer] += sq[in_wide].sum()
                centred_top[layer] += sq[in_top].sum()
                offset_top[layer] += centred[in_top].sum(axis=0)
        n_rest = n - k_top
        # The rest's own centred sum: moving the mean from m to the rest's mean m_R = m - offset / n_R
        # removes n_R ||m_R - m||^2 = ||offset||^2 / n_R.
        rest_centred = recon.centred_sq - centred_top - (offset_top**2).sum(axis=1) / max(n_rest, 1)
        rest_error = recon.sum_sq_error - self.sq_error[:, :k_top].sum(dim=1).numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            share_top = np.where(recon.centred_sq > 0, centred_top / recon.centred_sq, np.nan)
            share_wide = np.where(recon.centred_sq > 0, centred_wide / recon.centred_sq, np.nan)
            fvu_rest = np.where((rest_centred > 0) & (n_rest > 0), rest_error / rest_centred, np.nan)
        return dict(zip(OUTLIER_COLUMNS, (share_top, share_wide, fvu_rest)))


def _stable_ties(norms: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """topk's picks [nL, K] with ties at the boundary resolved towards the earliest column (token)."""
    if keep.shape[1] == 0:
        return keep
    threshold = norms.gather(1, keep[:, -1:])  # [nL, 1] the smallest norm kept
    above = (norms > threshold).sum(dim=1)  # [nL]
    if bool(((norms == threshold).sum(dim=1) + above <= keep.shape[1]).all()):
        return keep  # no tie crosses the boundary
    # rank by (norm descending, column ascending): a stable sort of the negated norms
    order = torch.sort(-norms, dim=1, stable=True).indices  # [nL, K + B]
    return order[:, : keep.shape[1]]


def concentration_warnings(layers: list, var_share_top_1pct: np.ndarray, n_tokens: int) -> list[str]:
    """One line per analysis (empty list if none) naming the layers where the top 1% of tokens by norm
    carry more than half of the variance: their FVU is mostly those few tokens'."""
    flagged = [(layer, share) for layer, share in zip(layers, var_share_top_1pct) if np.isfinite(share) and share > CONCENTRATION_SHARE]
    if not flagged:
        return []
    k = top_count(n_tokens, CONCENTRATION_FRACTION)
    worst = max(flagged, key=lambda pair: pair[1])
    names = _layer_ranges([int(layer) for layer, _ in flagged])
    return [
        f"warning: at layer(s) {names} the top 1% of tokens by norm ({k:,} of {n_tokens:,}) carry over half of the "
        f"variance (up to {worst[1]:.0%} at layer {worst[0]}), so FVU there mostly measures those tokens; see "
        "var_share_top_* and fvu_without_top_0.1pct in metrics.csv, or cache with --skip-positions / --max-norm-ratio"
    ]


def _layer_ranges(layers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)

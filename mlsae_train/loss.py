"""The training loss: per-layer FVU (paper eq. 3) plus alpha * AuxK (SPEC section 3).

Both terms are ratios whose denominators depend on the data only (AuxK's target is detached), so
they are computed over the GLOBAL batch first (summed over processes) and each process divides its
own numerator by them: the sum over processes of the local losses, and of their gradients, is then
exactly the one-process loss and gradient. ``sum_`` is that cross-process sum (identity alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SumFn = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# Rows per chunk when summing squares in float64: the sums of squares of a residual stream lose digits
# in float32, and a float64 copy of the paper's whole batch would take gigabytes.
_CHUNK_ROWS = 8192


@torch.no_grad()
def _total_variance(rows: torch.Tensor, sum_: SumFn, reduce_dims: tuple[int, ...]) -> torch.Tensor:
    """``sum over rows (and reduce_dims) of (row - global mean row)^2``, in float64, summed over processes."""
    count = sum_(torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device))
    total = sum(part.sum(dim=0, dtype=torch.float64) for part in rows.split(_CHUNK_ROWS))
    mean = sum_(total) / count
    squares = sum((part.double() - mean).pow(2).sum(dim=reduce_dims) for part in rows.split(_CHUNK_ROWS))
    return sum_(squares).to(rows.dtype)


def total_variance_per_layer(x: torch.Tensor, sum_: SumFn = _identity) -> torch.Tensor:
    """FVU denominators: ``sum_t ||x[t, l] - mean_t x[t, l]||^2`` over the global batch.

    x: [B, L, d] (this process's tokens) -> [L]. The mean is the global-batch mean of each layer.
    """
    return _total_variance(x, sum_, reduce_dims=(0, 2))


def fvu_per_layer(x: torch.Tensor, x_hat: torch.Tensor, total_variance: torch.Tensor) -> torch.Tensor:
    """This process's share of each layer's FVU: ``sum_t ||x - x_hat||^2 / total_variance``.

    x, x_hat: [B, L, d]; total_variance: [L] from :func:`total_variance_per_layer` -> [L].
    Summed over processes it is the global batch's FVU of each layer.
    """
    return (x - x_hat).pow(2).sum(dim=(0, 2)) / total_variance


class ResidualMoments:
    """Running sums over micro-batches that give AuxK's denominator ``||e - mean(e)||^2`` over the
    global batch: ``sum_i ||e_i||^2 - ||sum_i e_i||^2 / N``, in float64, for each of ``groups`` groups
    of error vectors normalised apart (the per-layer suite's layers). The batch is every (token, layer)
    vector of a group: the same vectors its SAE reconstructs."""

    def __init__(self, d: int, device: torch.device | str, groups: int | None = None) -> None:
        """``groups``: None for one group whose errors come as [N, d] (its variance a scalar), G for errors
        [M, G, d] (variances [G])."""
        self.grouped = groups is not None
        groups = groups or 1
        self.count = torch.zeros(groups, dtype=torch.float64, device=device)  # [G]
        self.total = torch.zeros(groups, d, dtype=torch.float64, device=device)  # [G, d]
        self.squares = torch.zeros(groups, dtype=torch.float64, device=device)  # [G]

    @torch.no_grad()
    def add(self, error: torch.Tensor) -> None:
        """error: the detached residuals of one micro-batch, [N, d] (one group) or [M, G, d]."""
        grouped = error if self.grouped else error.unsqueeze(1)  # [M, G, d]
        self.count += grouped.shape[0]
        self.total += grouped.sum(dim=0, dtype=torch.float64)
        for group, part in enumerate(grouped.unbind(1)):  # [M, d] each: the sum of squares as for one group
            self.squares[group] += (part * part).sum(dtype=torch.float64)

    def total_variance(self, sum_: SumFn = _identity) -> torch.Tensor:
        """The global-batch ``||e - mean(e)||^2`` (float64: a scalar, or [G] when grouped), summed over processes."""
        groups = self.count.numel()
        stats = sum_(torch.cat([self.count, self.squares, self.total.flatten()]))
        count, squares, total = stats[:groups], stats[groups : 2 * groups], stats[2 * groups :].view(groups, -1)
        variance = torch.stack([squares[g] - total[g].dot(total[g]) / count[g] for g in range(groups)])  # [G]
        return variance if self.grouped else variance[0]

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
    global batch: ``sum_i ||e_i||^2 - ||sum_i e_i||^2 / N``, in float64. The batch is every
    (token, layer) vector: the same vectors the SAE encodes."""

    def __init__(self, d: int, device: torch.device | str) -> None:
        self.count = torch.zeros(1, dtype=torch.float64, device=device)
        self.total = torch.zeros(d, dtype=torch.float64, device=device)  # [d]
        self.squares = torch.zeros(1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, error: torch.Tensor) -> None:
        """error: [N, d], the detached residuals of one micro-batch."""
        self.count += error.shape[0]
        self.total += error.sum(dim=0, dtype=torch.float64)
        self.squares += (error * error).sum(dtype=torch.float64)

    def total_variance(self, sum_: SumFn = _identity) -> torch.Tensor:
        """The global-batch ``||e - mean(e)||^2`` (float64 scalar), summed over processes."""
        stats = sum_(torch.cat([self.count, self.squares, self.total]))
        count, squares, total = stats[0], stats[1], stats[2:]
        return squares - total.dot(total) / count

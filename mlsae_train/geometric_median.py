"""The geometric median (Weiszfeld's algorithm), used to initialize b_pre.

The geometric median minimizes ``sum_i ||x_i - y||``. Weiszfeld's iteration is the fixed point of the
objective's gradient: ``y <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / ||x_i - y||``.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-5, eps: float = 1e-8) -> torch.Tensor:
    """The geometric median of ``points [N, d]`` -> [d], computed in float32 or wider.

    Starts from the mean; stops when a step moves y by less than ``tol * (1 + ||y||)``.
    ``eps`` floors the distances so that landing exactly on a data point cannot divide by zero.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [N, d] tensor, got shape {tuple(points.shape)}")
    # A float64 copy of the paper's first batch (786k vectors) would take 3 GiB; float32 is enough
    # for an initialization.
    x = points if points.dtype in (torch.float32, torch.float64) else points.float()
    y = x.mean(0)  # [d]
    for _ in range(max_iter):
        distances = torch.linalg.vector_norm(x - y, dim=1).clamp_min(eps)  # [N]
        weights = 1.0 / distances
        y_next = (weights @ x) / weights.sum()
        step = torch.linalg.vector_norm(y_next - y)
        y = y_next
        if step <= tol * (1.0 + torch.linalg.vector_norm(y)):
            break
    return y.to(points.dtype)

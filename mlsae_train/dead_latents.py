"""Which latents are dead: not active (after ReLU, among the top k) for any layer of any token in the
last ``dead_tokens`` training TOKENS (SPEC section 3; the reference code counts micro-batches instead).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DeadLatentTracker:
    """Counts, for every latent, the training tokens seen since it was last active."""

    def __init__(self, n_latents: int | Sequence[int], dead_tokens: int, device: torch.device | str = "cpu") -> None:
        """``n_latents``: the number of latents, or the tracker's shape (a family's ``dead_shape``: [L, n] for
        the per-layer suite, one counter per latent of each layer's SAE)."""
        self.dead_tokens = dead_tokens
        shape = (n_latents,) if isinstance(n_latents, int) else tuple(n_latents)
        self.tokens_since_active = torch.zeros(shape, dtype=torch.int64, device=device)  # [n] or [L, n]

    def dead_latents(self) -> torch.Tensor:
        """Indices of the dead latents into the flattened counters, int64 [n_dead], ascending (empty while all are alive)."""
        return torch.nonzero(self.tokens_since_active.flatten() >= self.dead_tokens).flatten()

    def dead_fraction(self) -> float:
        return (self.tokens_since_active >= self.dead_tokens).float().mean().item()

    @torch.no_grad()
    def update(self, active: torch.Tensor, n_tokens: int) -> None:
        """After a batch of ``n_tokens`` tokens in which the latents flagged in ``active`` ([n] bool,
        already combined over processes; [L, n] for an [L, n] tracker) fired at least once."""
        self.tokens_since_active += n_tokens
        self.tokens_since_active.masked_fill_(active.view(self.tokens_since_active.shape), 0)

    @staticmethod
    def active_mask(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
        """[n] bool: the latents among ``indices`` whose activation in ``values`` (after ReLU) is > 0."""
        # Entries whose activation is 0 are sent to a spare slot n, dropped at the end: no data-dependent shapes.
        slots = torch.where(values > 0, indices, n_latents).flatten()
        mask = torch.zeros(n_latents + 1, dtype=torch.bool, device=indices.device)
        return mask.index_fill_(0, slots, True)[:n_latents]

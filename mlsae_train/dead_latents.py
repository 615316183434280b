"""Which latents are dead: not active (after ReLU, among the top k) for any layer of any token in the
last ``dead_tokens`` training TOKENS (SPEC section 3; the reference code counts micro-batches instead).
"""

from __future__ import annotations

import torch


class DeadLatentTracker:
    """Counts, for every latent, the training tokens seen since it was last active."""

    def __init__(self, n_latents: int, dead_tokens: int, device: torch.device | str = "cpu") -> None:
        self.dead_tokens = dead_tokens
        self.tokens_since_active = torch.zeros(n_latents, dtype=torch.int64, device=device)  # [n]

    def dead_latents(self) -> torch.Tensor:
        """Indices of the dead latents, int64 [n_dead] (empty while all are alive)."""
        return torch.nonzero(self.tokens_since_active >= self.dead_tokens).flatten()

    def dead_fraction(self) -> float:
        return (self.tokens_since_active >= self.dead_tokens).float().mean().item()

    @torch.no_grad()
    def update(self, active: torch.Tensor, n_tokens: int) -> None:
        """After a batch of ``n_tokens`` tokens in which the latents flagged in ``active`` ([n] bool,
        already combined over processes) fired at least once."""
        self.tokens_since_active += n_tokens
        self.tokens_since_active.masked_fill_(active, 0)

    @staticmethod
    def active_mask(values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> torch.Tensor:
        """[n] bool: the latents among ``indices`` whose activation in ``values`` (after ReLU) is > 0."""
        # Entries whose activation is 0 are sent to a spare slot n, dropped at the end: no data-dependent shapes.
        slots = torch.where(values > 0, indices, n_latents).flatten()
        mask = torch.zeros(n_latents + 1, dtype=torch.bool, device=indices.device)
        return mask.index_fill_(0, slots, True)[:n_latents]

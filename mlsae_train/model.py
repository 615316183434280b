"""The multi-layer TopK sparse autoencoder of SPEC section 3.

Every input vector (one token at one layer) is encoded on its own, with one shared dictionary:

    z     = (x - mean(x)) / (std(x) + eps)          per vector, over its d components
    h     = ReLU(TopK(W_enc (z - b_pre)))           n = R * d latents, k of them active
    z_hat = W_dec^T h + b_pre                       (b_pre is tied: the only bias)
    x_hat = z_hat * (std(x) + eps) + mean(x)

Storage: ``W_enc`` and ``W_dec`` are both ``[n_latents, d_model]``; row i of each belongs to latent i.
So the paper's "W_dec = W_enc^T at init" is ``W_dec == W_enc`` here, and a decoder "row" is a
latent's direction in the residual stream.
"""

from __future__ import annotations

import torch

from .dictionary import STANDARDIZE_EPS, AuxKResiduals, Dictionary, Reconstruction, aux_k_for, standardize, unit_directions
from .geometric_median import geometric_median
from .sparse_decode import sparse_decode
from .topk_encoder import topk_encode

__all__ = ["STANDARDIZE_EPS", "MultiLayerSAE", "Reconstruction", "aux_k_for", "standardize"]


class MultiLayerSAE(Dictionary):
    """One TopK SAE shared by the residual stream vectors of all layers.

    ``sae(x)`` reconstructs x [..., d] in input space; ``sae.encode(x)`` gives the k active latents
    ``(values, indices)`` after ReLU, each [..., k].
    """

    arch = "mlsae"

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        layers: list[int] | None = None,
        eps: float = STANDARDIZE_EPS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(d_model, n_latents, k, layers, eps)
        directions = unit_directions(n_latents, d_model, generator)
        self.W_enc = torch.nn.Parameter(directions.clone())  # [n, d]
        self.W_dec = torch.nn.Parameter(directions)  # [n, d], unit-norm rows
        self.b_pre = torch.nn.Parameter(torch.zeros(d_model))  # [d], set to a geometric median before training

    @property
    def k_aux(self) -> int:
        return aux_k_for(self.d_model, self.n_latents)

    @property
    def dead_shape(self) -> tuple[int, ...]:
        return (self.n_latents,)

    def reconstruct(
        self,
        x: torch.Tensor,
        dead_latents: torch.Tensor | None = None,
        chunk_rows: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        project_decoder_grad: bool = False,
        screen: bool = False,
    ) -> Reconstruction:
        """Encode and decode x [..., d] (every vector on its own); see :meth:`Dictionary.reconstruct`."""
        rows = x.reshape(-1, self.d_model)  # [N, d]
        z, mean, scale = standardize(rows, self.eps)
        codes = topk_encode(
            z, self.b_pre, self.W_enc, self.k, dead_latents, self.k_aux, chunk_rows=chunk_rows, matmul_dtype=matmul_dtype,
            screen=screen,
        )  # fmt: skip
        values = torch.relu(codes.values)  # [N, k]
        z_hat = sparse_decode(values, codes.indices, self.W_dec, project_decoder_grad) + self.b_pre  # [N, d]
        x_hat = z_hat * scale + mean
        return Reconstruction(
            z, mean, scale, z_hat, x_hat, values, codes.indices, torch.relu(codes.aux_values), codes.aux_indices
        )

    def encode(self, x: torch.Tensor, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The k active latents of each vector of x [..., d]: ``(values, indices)``, each [..., k], values >= 0.

        ``screen``: as in :meth:`reconstruct`.
        """
        z, _, _ = standardize(x.reshape(-1, self.d_model), self.eps)
        codes = topk_encode(z, self.b_pre, self.W_enc, self.k, screen=screen)
        lead = x.shape[:-1]
        return torch.relu(codes.values).view(*lead, self.k), codes.indices.view(*lead, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x [..., d] in input space."""
        return self.reconstruct(x).x_hat.view(x.shape)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every decoder row to unit norm (after each optimizer step)."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True))

    @torch.no_grad()
    def init_b_pre_(self, first_batch: torch.Tensor) -> None:
        """b_pre = the geometric median of every standardised (token, layer) vector of first_batch [N, L, d]."""
        z, _, _ = standardize(first_batch.reshape(-1, self.d_model), self.eps)
        self.b_pre.copy_(geometric_median(z))

    def auxk_residuals(self, out: Reconstruction, dead_latents: torch.Tensor | None) -> AuxKResiduals | None:
        """One group: every (token, layer) vector of the batch (SPEC 3)."""
        if out.aux_indices.shape[1] == 0:
            return None
        error = (out.z - out.z_hat).detach()  # [N, d], standardized space: the target carries no gradient
        error_hat = sparse_decode(out.aux_values, out.aux_indices, self.W_dec, project_grad=True)  # [N, d], no bias
        has_dead = torch.ones(1, dtype=torch.bool, device=error.device)
        return AuxKResiduals(error.unsqueeze(1), error_hat.unsqueeze(1), has_dead)

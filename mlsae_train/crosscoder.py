"""The acausal TopK crosscoder of SPEC section 9: one latent vector per token, read from and written to
every layer at once.

    z[t, l]     = standardize(x[t, l])                            per (token, layer) vector, as SPEC 3
    pre[t]      = sum_l W_enc[:, l, :] (z[t, l] - b_pre[l])        W_enc [n, L, d], b_pre [L, d]
    h[t]        = ReLU(TopK_k(pre[t]))                             k active latents per TOKEN
    z_hat[t, l] = W_dec[:, l, :]^T h[t] + b_pre[l]                 W_dec [n, L, d]
    x_hat[t, l] = z_hat[t, l] * scale[t, l] + mean[t, l]

After the per-vector standardisation this is exactly SPEC 3's SAE on the flattened vector z[t] of length
L*d, with b_pre, W_enc and W_dec viewed [L*d] and [n, L*d]: the section-3 encoder and sparse decoder run
on those views unchanged, and the decoder's row projection is the spec's projection onto each latent's
unit-norm block W_dec[j]. So a crosscoder on one layer is the single-layer SAE of that layer.
AuxK: the k_aux (nearest power of two to L*d/2) largest dead pre-activations of each token reconstruct
the detached errors of all its layers, normalised over the batch's (token, layer) error vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .dictionary import STANDARDIZE_EPS, AuxKResiduals, Dictionary, Reconstruction, aux_k_for, standardize, unit_directions
from .geometric_median import geometric_median
from .sparse_decode import sparse_decode
from .topk_encoder import topk_encode


class Crosscoder(Dictionary):
    """``cc(x)`` reconstructs x [N, L, d]; ``cc.encode(x)`` gives each token's k latents, [N, k] each."""

    arch = "crosscoder"

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        layers: Sequence[int],
        eps: float = STANDARDIZE_EPS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(d_model, n_latents, k, layers, eps)
        if not self.layers:
            raise ValueError("the crosscoder needs the layers it reads and writes")
        n_layers = len(self.layers)
        blocks = unit_directions(n_latents, n_layers * d_model, generator).view(n_latents, n_layers, d_model)
        self.W_enc = nn.Parameter(blocks.clone())  # [n, L, d]
        self.W_dec = nn.Parameter(blocks)  # [n, L, d], unit-norm blocks W_dec[j]
        self.b_pre = nn.Parameter(torch.zeros(n_layers, d_model))  # [L, d], geometric medians before training

    @property
    def k_aux(self) -> int:
        return aux_k_for(len(self.layers) * self.d_model, self.n_latents)

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
        """See :meth:`Dictionary.reconstruct`; rows are tokens: z, z_hat [N, L*d], values, indices [N, k]."""
        self._check_layers(x)
        n_tokens, n_layers, d = x.shape
        z, mean, scale = standardize(x, self.eps)  # [N, L, d], [N, L, 1], [N, L, 1]
        z = z.view(n_tokens, n_layers * d)  # [N, L*d]
        codes = topk_encode(
            z, self.b_pre.view(-1), self._flat(self.W_enc), self.k, dead_latents, self.k_aux, chunk_rows=chunk_rows,
            matmul_dtype=matmul_dtype, screen=screen,
        )  # fmt: skip
        values = torch.relu(codes.values)  # [N, k]
        z_hat = sparse_decode(values, codes.indices, self._flat(self.W_dec), project_decoder_grad) + self.b_pre.view(-1)
        rows = n_tokens * n_layers
        x_hat = z_hat.view(rows, d) * scale.view(rows, 1) + mean.view(rows, 1)  # [N*L, d]
        return Reconstruction(
            z, mean.view(rows, 1), scale.view(rows, 1), z_hat, x_hat, values, codes.indices, torch.relu(codes.aux_values),
            codes.aux_indices,
        )  # fmt: skip

    def encode(self, x: torch.Tensor, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` [N, k] each: the k active latents of each token, values >= 0."""
        self._check_layers(x)
        z, _, _ = standardize(x, self.eps)
        codes = topk_encode(z.view(x.shape[0], -1), self.b_pre.view(-1), self._flat(self.W_enc), self.k, screen=screen)
        return torch.relu(codes.values), codes.indices

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every latent's decoder block W_dec[j] (L x d values) to unit norm."""
        flat = self._flat(self.W_dec)
        flat.div_(torch.linalg.vector_norm(flat, dim=1, keepdim=True))

    @torch.no_grad()
    def init_b_pre_(self, first_batch: torch.Tensor) -> None:
        """b_pre[l] = the geometric median of layer l's standardised vectors in first_batch [N, L, d]."""
        z, _, _ = standardize(first_batch, self.eps)
        for layer in range(len(self.layers)):
            self.b_pre[layer].copy_(geometric_median(z[:, layer].contiguous()))

    def auxk_residuals(self, out: Reconstruction, dead_latents: torch.Tensor | None) -> AuxKResiduals | None:
        """One group: the batch's (token, layer) error vectors, each token's from its own dead latents."""
        if out.aux_indices.shape[1] == 0:
            return None
        error = (out.z - out.z_hat).detach()  # [N, L*d], standardized space: the target carries no gradient
        error_hat = sparse_decode(out.aux_values, out.aux_indices, self._flat(self.W_dec), project_grad=True)  # no bias
        has_dead = torch.ones(1, dtype=torch.bool, device=error.device)
        return AuxKResiduals(error.view(-1, 1, self.d_model), error_hat.view(-1, 1, self.d_model), has_dead)

    def _flat(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.view(self.n_latents, -1)  # [n, L, d] -> [n, L*d]: latent j's block as one row

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

import math
from typing import NamedTuple

import torch
from torch import nn

from .sparse_decode import sparse_decode
from .topk_encoder import topk_encode

STANDARDIZE_EPS = 1e-5


def aux_k_for(d_model: int, n_latents: int) -> int:
    """k_aux: the power of two nearest to d/2 (256 for d = 512 or 576), at most the number of latents."""
    return min(n_latents, 2 ** max(0, round(math.log2(d_model / 2))))


def standardize(x: torch.Tensor, eps: float = STANDARDIZE_EPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z, mean, scale)`` with ``z = (x - mean) / scale``, scale = std + eps, over the last dim.

    std is the sample standard deviation (divisor d - 1), as torch.std and the reference code.
    x: [..., d] -> z [..., d], mean [..., 1], scale [..., 1].
    """
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    # the two-pass sample std from the centred vectors we need anyway: 3x faster than x.std on CPU
    scale = torch.linalg.vector_norm(centred, dim=-1, keepdim=True) / math.sqrt(x.shape[-1] - 1) + eps
    return centred / scale, mean, scale


class Reconstruction(NamedTuple):
    """Everything a training step needs from one forward pass, flattened to rows: N = prod(x.shape[:-1])."""

    z: torch.Tensor
    """[N, d] standardized inputs."""
    mean: torch.Tensor
    """[N, 1] per-vector means."""
    scale: torch.Tensor
    """[N, 1] per-vector std + eps."""
    z_hat: torch.Tensor
    """[N, d] reconstruction in standardized space."""
    x_hat: torch.Tensor
    """[N, d] reconstruction in input space."""
    values: torch.Tensor
    """[N, k] latent activations after ReLU."""
    indices: torch.Tensor
    """[N, k] their latent indices."""
    aux_values: torch.Tensor
    """[N, k_aux] ReLU of the k_aux largest dead pre-activations ([N, 0] when no dead latents were given)."""
    aux_indices: torch.Tensor
    """[N, k_aux] their latent indices."""


class MultiLayerSAE(nn.Module):
    """One TopK SAE shared by the residual stream vectors of all layers.

    ``sae(x)`` reconstructs x [..., d] in input space; ``sae.encode(x)`` gives the k active latents
    ``(values, indices)`` after ReLU, each [..., k].
    """

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        k: int,
        layers: list[int] | None = None,
        eps: float = STANDARDIZE_EPS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k must be in 1..n_latents={n_latents}, got {k}")
        self.d_model = d_model
        self.n_latents = n_latents
        self.k = k
        self.k_aux = aux_k_for(d_model, n_latents)
        # the model's block indices the SAE was trained on, in the order of the input's layer axis
        self.layers = list(layers) if layers is not None else []
        self.eps = eps
        directions = torch.randn(n_latents, d_model, generator=generator)
        directions /= torch.linalg.vector_norm(directions, dim=1, keepdim=True)
        self.W_enc = nn.Parameter(directions.clone())  # [n, d]
        self.W_dec = nn.Parameter(directions)  # [n, d], unit-norm rows
        self.b_pre = nn.Parameter(torch.zeros(d_model))  # [d], set to a geometric median before training

    def config(self) -> dict:
        """The constructor arguments, for saving next to the weights."""
        return {"d_model": self.d_model, "n_latents": self.n_latents, "k": self.k, "layers": self.layers, "eps": self.eps}

    def reconstruct(
        self,
        x: torch.Tensor,
        dead_latents: torch.Tensor | None = None,
        chunk_rows: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        project_decoder_grad: bool = False,
        screen: bool = False,
    ) -> Reconstruction:
        """Encode and decode x [..., d]; with ``dead_latents`` also pick the top k_aux among them (AuxK).

        ``project_decoder_grad``: W_dec's gradient comes back without each row's component along the
        row (SPEC 3's projection before every step; the rows must have unit norm).
        ``screen``: pick the top-k (and AuxK's top-k_aux) with the exact bfloat16 screen of
        :mod:`.screened_topk` instead of the float32 kernel: the same latents, faster where bfloat16
        matmuls are fast; gradients as with the float32 kernel.
        """
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

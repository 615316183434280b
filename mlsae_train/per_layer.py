"""The per-layer suite of SPEC section 9: L independent TopK SAEs, SAE l exactly SPEC 3's fed layer l only.

Storage: ``W_enc``, ``W_dec`` [L, n, d] and ``b_pre`` [L, d]; ``W_dec[l, j]`` is latent j of layer l's SAE.
All L are trained in one pass over the cache: each batch feeds every SAE its own layer, and the loss
backpropagated is the SUM over layers of ``FVU_l + alpha * AuxK_l`` (each AuxK normalised over its own
layer's vectors), so that SAE l gets exactly the gradient of its own run's loss: L separate
``--layers l`` runs with the same seed take the same steps (Adam is elementwise and every SAE starts from
the directions such a run draws). The metrics report means over layers, as for the MLSAE.

Encoding loops over layers with the section-3 kernel; decoding is ONE sparse decode over W_dec viewed
[L*n, d] with latent j of layer l at row l*n + j (each row has unit norm, so the decoder's row projection
is each SAE's own). The dead-latent tracker is [L, n]; dead latents are numbered l*n + j.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .dead_latents import DeadLatentTracker
from .dictionary import STANDARDIZE_EPS, AuxKResiduals, Dictionary, Reconstruction, aux_k_for, standardize, unit_directions
from .geometric_median import geometric_median
from .sparse_decode import sparse_decode
from .topk_encoder import topk_encode


class PerLayerSAEs(Dictionary):
    """One TopK SAE per layer; ``sae(x)`` reconstructs x [N, L, d], ``sae.encode(x)`` gives [N, L, k]."""

    arch = "per-layer"

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
            raise ValueError("the per-layer suite needs the layers it is trained on (one SAE each)")
        n_layers = len(self.layers)
        # every SAE starts from the directions a single-layer run with this seed draws: the suite then
        # equals L such runs, and the layers still diverge through their data
        directions = unit_directions(n_latents, d_model, generator).expand(n_layers, n_latents, d_model)
        self.W_enc = nn.Parameter(directions.clone())  # [L, n, d]
        self.W_dec = nn.Parameter(directions.clone())  # [L, n, d], unit-norm rows
        self.b_pre = nn.Parameter(torch.zeros(n_layers, d_model))  # [L, d], geometric medians before training

    @property
    def k_aux(self) -> int:
        return aux_k_for(self.d_model, self.n_latents)

    @property
    def dead_shape(self) -> tuple[int, ...]:
        return (len(self.layers), self.n_latents)

    def reconstruct(
        self,
        x: torch.Tensor,
        dead_latents: torch.Tensor | None = None,
        chunk_rows: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        project_decoder_grad: bool = False,
        screen: bool = False,
    ) -> Reconstruction:
        """See :meth:`Dictionary.reconstruct`; rows are (token, layer) vectors, indices per layer in [0, n)."""
        self._check_layers(x)
        n_tokens, n_layers, d = x.shape
        z, mean, scale = standardize(x, self.eps)  # [N, L, d], [N, L, 1], [N, L, 1]
        dead_by_layer = self._dead_by_layer(dead_latents)
        values, indices, aux_values, aux_indices = [], [], [], []
        # unbind (not indexing) so that the backward stacks the L gradients once
        for layer, (W_enc, b_pre, dead) in enumerate(zip(self.W_enc.unbind(0), self.b_pre.unbind(0), dead_by_layer)):
            codes = topk_encode(
                z[:, layer], b_pre, W_enc, self.k, dead, self.k_aux, chunk_rows=chunk_rows, matmul_dtype=matmul_dtype,
                screen=screen,
            )  # fmt: skip
            values.append(torch.relu(codes.values))  # [N, k]
            indices.append(codes.indices)
            aux_values.append(torch.relu(codes.aux_values))  # [N, k_aux_l], k_aux_l = min(k_aux, dead of layer l)
            aux_indices.append(codes.aux_indices)
        values_ = torch.stack(values, 1).view(-1, self.k)  # [N*L, k]
        indices_ = torch.stack(indices, 1).view(-1, self.k)  # [N*L, k], latent of the row's layer
        z_hat = sparse_decode(values_, self._flat(indices_), self._flat_decoder(), project_decoder_grad)  # [N*L, d]
        z_hat = (z_hat.view(n_tokens, n_layers, d) + self.b_pre).view(-1, d)
        rows = n_tokens * n_layers
        x_hat = z_hat * scale.view(rows, 1) + mean.view(rows, 1)
        aux_values_, aux_indices_ = _pad_and_stack(aux_values, aux_indices)  # [N*L, w] each
        return Reconstruction(
            z.view(rows, d), mean.view(rows, 1), scale.view(rows, 1), z_hat, x_hat, values_, indices_, aux_values_, aux_indices_
        )

    def encode(self, x: torch.Tensor, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` [N, L, k] each: the k active latents of each layer's SAE, values >= 0."""
        self._check_layers(x)
        z, _, _ = standardize(x, self.eps)
        codes = [topk_encode(z[:, l], self.b_pre[l], self.W_enc[l], self.k, screen=screen) for l in range(len(self.layers))]
        return torch.stack([torch.relu(c.values) for c in codes], 1), torch.stack([c.indices for c in codes], 1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale every decoder row of every SAE to unit norm."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=2, keepdim=True))

    @torch.no_grad()
    def init_b_pre_(self, first_batch: torch.Tensor) -> None:
        """b_pre[l] = the geometric median of layer l's standardised vectors in first_batch [N, L, d]."""
        z, _, _ = standardize(first_batch, self.eps)
        for layer in range(len(self.layers)):
            self.b_pre[layer].copy_(geometric_median(z[:, layer].contiguous()))  # as a single-layer run computes it

    def auxk_residuals(self, out: Reconstruction, dead_latents: torch.Tensor | None) -> AuxKResiduals | None:
        """One group per layer: SAE l's AuxK explains layer l's errors with layer l's dead latents."""
        if out.aux_indices.shape[1] == 0:
            return None
        n_layers, d = len(self.layers), self.d_model
        error = (out.z - out.z_hat).detach().view(-1, n_layers, d)  # [N, L, d]
        error_hat = sparse_decode(out.aux_values, self._flat(out.aux_indices), self._flat_decoder(), project_grad=True)
        # a layer without dead latents has only zero-padded entries: its AuxK is 0, as in its own run
        has_dead = torch.tensor([dead is not None and dead.numel() > 0 for dead in self._dead_by_layer(dead_latents)])
        return AuxKResiduals(error, error_hat.view(-1, n_layers, d), has_dead)

    def fvu_loss(self, fvu_per_layer: torch.Tensor) -> torch.Tensor:
        """The SUM over layers: SAE l's gradient is that of its own run's FVU_l (the MLSAE takes the mean)."""
        return fvu_per_layer.sum()

    def per_group(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        """Layer l's slice of a parameter [L, ...] (or its gradient): what SAE l's AuxK trains."""
        return tensor.unbind(0)

    def active_latents(self, out: Reconstruction) -> torch.Tensor:
        """[L, n] bool: the latents of each layer's SAE active in this reconstruction."""
        n_layers, n = len(self.layers), self.n_latents
        return DeadLatentTracker.active_mask(out.values, self._flat(out.indices), n_layers * n).view(n_layers, n)

    def _flat(self, indices: torch.Tensor) -> torch.Tensor:
        """Per-layer latent indices [N*L, K] -> rows of the decoder viewed [L*n, d] (latent j of layer l: l*n + j)."""
        n_layers = len(self.layers)
        offsets = torch.arange(0, n_layers * self.n_latents, self.n_latents, device=indices.device)  # [L]
        return (indices.view(-1, n_layers, indices.shape[1]) + offsets[:, None]).view(indices.shape)

    def _flat_decoder(self) -> torch.Tensor:
        return self.W_dec.view(-1, self.d_model)  # [L*n, d]

    def _dead_by_layer(self, dead_latents: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Flattened tracker indices (l*n + j) -> for each layer its dead latents j (ascending, as its own run's)."""
        n_layers = len(self.layers)
        if dead_latents is None or dead_latents.numel() == 0:
            return [None] * n_layers
        layer_of = torch.div(dead_latents, self.n_latents, rounding_mode="floor")
        return [dead_latents[layer_of == layer] - layer * self.n_latents for layer in range(n_layers)]


def _pad_and_stack(values: list[torch.Tensor], indices: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer [N, w_l] codes -> [N*L, max w_l], each layer's padded with zero values (which decode to
    nothing and get no gradient) at latent 0 of its own SAE."""
    width = max(v.shape[1] for v in values)
    n_rows = values[0].shape[0]
    padded_values = [torch.cat([v, v.new_zeros(n_rows, width - v.shape[1])], 1) for v in values]
    padded_indices = [torch.cat([i, i.new_zeros(n_rows, width - i.shape[1])], 1) for i in indices]
    rows = n_rows * len(values)
    return torch.stack(padded_values, 1).view(rows, width), torch.stack(padded_indices, 1).view(rows, width)

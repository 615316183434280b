"""The interface every dictionary family implements (SPEC sections 3 and 9), and what they share.

A family turns the activations of N tokens at the run's L layers, ``x [N, L, d]``, into sparse latents and
back. The trainer, the step, checkpoints and ``load_sae`` see only this interface; the families are

    "mlsae"       MultiLayerSAE (model.py): one SAE shared by every (token, layer) vector   W_dec [n, d]
    "per-layer"   PerLayerSAEs (per_layer.py): L independent SAEs, SAE l fed layer l        W_dec [L, n, d]
    "crosscoder"  Crosscoder (crosscoder.py): one latent vector per token for all layers    W_dec [n, L, d]

and families.py maps the names to the classes. Every family standardises each (token, layer) vector on
its own, encodes with ``ReLU(TopK(.))`` through :func:`.topk_encoder.topk_encode`, decodes with
:func:`.sparse_decode.sparse_decode` (whose row projection is SPEC 3's gradient projection), and owns
three parameters registered in the order ``W_enc, W_dec, b_pre`` (the optimizer and the checkpoints
number them in that order).

The loss of a step (step.py) is built from pieces each family gives:
- per-layer FVU of ``reconstruct(x).x_hat`` (the step computes it), reduced by :meth:`Dictionary.fvu_loss`;
- AuxK: :meth:`Dictionary.auxk_residuals` gives the detached error and its reconstruction by the dead
  latents, in G groups each normalised on its own (SPEC 3: one group for the MLSAE and the crosscoder;
  one per layer for the per-layer suite, whose SAE l is a section-3 SAE with its own AuxK), and
  :meth:`Dictionary.per_group` cuts a parameter (or gradient) into the parts each group trains;
- the dead-latent tracker has the family's :attr:`Dictionary.dead_shape`, and
  :meth:`Dictionary.active_latents` says which of its latents fired.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from .dead_latents import DeadLatentTracker

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
    """Everything a training step needs from one forward pass, flattened to the rows the encoder sees.

    MLSAE and per-layer suite: one row per (token, layer) vector, R = N * L rows of d. Crosscoder: one
    row per token, R = N rows of L * d (its mean, scale and x_hat still have one row per (token, layer)).
    In every family ``x_hat.view(x.shape)`` is the reconstruction of x [N, L, d].
    """

    z: torch.Tensor
    """[R, d] (crosscoder [N, L*d]) standardized inputs."""
    mean: torch.Tensor
    """[N*L, 1] per-vector means."""
    scale: torch.Tensor
    """[N*L, 1] per-vector std + eps."""
    z_hat: torch.Tensor
    """[R, d] (crosscoder [N, L*d]) reconstruction in standardized space."""
    x_hat: torch.Tensor
    """[N*L, d] reconstruction in input space."""
    values: torch.Tensor
    """[R, k] latent activations after ReLU."""
    indices: torch.Tensor
    """[R, k] their latent indices (per-layer suite: latent j of the row's own layer, in [0, n))."""
    aux_values: torch.Tensor
    """[R, k_aux] ReLU of the k_aux largest dead pre-activations ([R, 0] when no dead latents were given;
    per-layer suite: padded with zeros to the widest layer)."""
    aux_indices: torch.Tensor
    """[R, k_aux] their latent indices (numbered as ``indices``)."""


class AuxKResiduals(NamedTuple):
    """AuxK's pieces of one micro-batch, grouped as they are normalised: for each group g, AuxK_g =
    ``sum ||error - error_hat||^2 / sum ||error - mean(error)||^2`` over the group's M vectors of the
    global batch (the mean over those vectors too)."""

    error: torch.Tensor
    """[M, G, d] the detached residuals ``z - z_hat`` (standardized space)."""
    error_hat: torch.Tensor
    """[M, G, d] their reconstruction by the dead latents' top k_aux (no bias)."""
    has_dead: torch.Tensor
    """[G] bool: the groups with dead latents (AuxK of the others is exactly 0)."""


class Dictionary(nn.Module, ABC):
    """A sparse dictionary over the residual stream of the run's layers (see the module docstring).

    ``d(x)`` reconstructs x [N, L, d] in input space; ``d.encode(x)`` gives its active latents.
    """

    arch: ClassVar[str]
    """The family's name (``--arch``), saved with the weights."""

    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_pre: nn.Parameter

    def __init__(self, d_model: int, n_latents: int, k: int, layers: Sequence[int] | None, eps: float) -> None:
        super().__init__()
        if not 0 < k <= n_latents:
            raise ValueError(f"k must be in 1..n_latents={n_latents}, got {k}")
        self.d_model = d_model
        self.n_latents = n_latents
        self.k = k
        # the model's block indices the dictionary was trained on, in the order of the input's layer axis
        self.layers = list(layers) if layers is not None else []
        self.eps = eps

    def config(self) -> dict:
        """The family and its constructor arguments, saved next to the weights (:func:`build_dictionary`
        in families.py rebuilds the dictionary from them)."""
        return {"d_model": self.d_model, "n_latents": self.n_latents, "k": self.k, "layers": self.layers, "eps": self.eps,
                "arch": self.arch}  # fmt: skip

    @property
    @abstractmethod
    def k_aux(self) -> int:
        """Dead latents AuxK uses per encoded row."""

    @property
    @abstractmethod
    def dead_shape(self) -> tuple[int, ...]:
        """The shape of the dead-latent tracker: ``(n,)``, or ``(L, n)`` for the per-layer suite. The
        ``dead_latents`` given to :meth:`reconstruct` index it flattened."""

    @abstractmethod
    def reconstruct(
        self,
        x: torch.Tensor,
        dead_latents: torch.Tensor | None = None,
        chunk_rows: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        project_decoder_grad: bool = False,
        screen: bool = False,
    ) -> Reconstruction:
        """Encode and decode x [N, L, d]; with ``dead_latents`` (int64 indices into the flattened dead
        tracker) also pick the top k_aux among them for AuxK.

        ``project_decoder_grad``: W_dec's gradient comes back without each latent's component along its
        (unit-norm) decoder row or block (SPEC 3's projection before every step).
        ``matmul_dtype``: the encoder matmul's dtype (bfloat16 on CUDA); ``screen``: pick the top-k with
        the exact bfloat16 screen of :mod:`.screened_topk` (the float32 kernel's latents and gradients).
        """

    @abstractmethod
    def encode(self, x: torch.Tensor, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The active latents of x [N, L, d]: ``(values, indices)`` after ReLU; [N, L, k] each for the
        MLSAE and the per-layer suite (indices of the layer's own SAE), [N, k] for the crosscoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x [N, L, d] in input space, [N, L, d]."""
        return self.reconstruct(x).x_hat.view(x.shape)

    @abstractmethod
    def normalize_decoder_(self) -> None:
        """Scale every decoder row (crosscoder: every latent's block) to unit norm, after each optimizer step."""

    @abstractmethod
    def init_b_pre_(self, first_batch: torch.Tensor) -> None:
        """Set b_pre to the geometric median of the standardised vectors of first_batch [N, L, d]."""

    @abstractmethod
    def auxk_residuals(self, out: Reconstruction, dead_latents: torch.Tensor | None) -> AuxKResiduals | None:
        """AuxK's pieces of ``out``, made by :meth:`reconstruct` with these ``dead_latents``; None when none was dead."""

    def fvu_loss(self, fvu_per_layer: torch.Tensor) -> torch.Tensor:
        """The FVU part of the loss to backpropagate, from fvu_per_layer [L]: the mean over layers (SPEC 3)."""
        return fvu_per_layer.mean()

    def per_group(self, tensor: torch.Tensor) -> Sequence[torch.Tensor]:
        """The parts of a parameter (or of its gradient) that each AuxK group trains: the whole tensor for
        the one group of the MLSAE and the crosscoder."""
        return (tensor,)

    def active_latents(self, out: Reconstruction) -> torch.Tensor:
        """[*dead_shape] bool: the latents active (after ReLU, among the top k) in this reconstruction."""
        return DeadLatentTracker.active_mask(out.values, out.indices, self.n_latents)

    def _check_layers(self, x: torch.Tensor) -> None:
        """x must be [N, L, d] with the run's L layers (the MLSAE takes any [..., d] instead)."""
        expected = (len(self.layers), self.d_model)
        if x.ndim != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"the {self.arch} dictionary takes x [N, {expected[0]}, {expected[1]}], got {tuple(x.shape)}")


def unit_directions(rows: int, width: int, generator: torch.Generator | None) -> torch.Tensor:
    """[rows, width] random directions of unit norm: the tied init ``W_dec = W_enc`` of SPEC 3."""
    directions = torch.randn(rows, width, generator=generator)
    directions /= torch.linalg.vector_norm(directions, dim=1, keepdim=True)
    return directions

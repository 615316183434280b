"""Other tools' TopK SAEs as baselines for the analysis (issue 14 part 2): one per layer, or one shared by all.

``load_sae`` on a SAELens or sparsify SAE folder (or a folder of them, one per layer) returns an
:class:`ImportedTopKSAEs`: to the analysis it is a per-layer suite (``arch = "per-layer"``: W_enc, W_dec
[L, n, d], latent j of layer l's SAE, codes [N, L, k]), but each layer runs its own tool's forward exactly
(formats/base.py), not ours:

    u     = x  (input_norm "none")   or   (x - mean) / (std + eps)  ("standardize", SAELens's layer_norm)
    pre   = (u - b_dec * apply_b_dec_to_input) @ W_enc.T + b_enc                [N, n]
    pre  *= ||W_dec[j]||                                only with rescale_acts_by_decoder_norm
    h     = ReLU(TopK_k(pre))                           the values and indices reported
    u_hat = (h / ||W_dec[j]|| if rescaled else h) @ W_dec + b_dec
    x_hat = u_hat * std + mean ("standardize")  or  u_hat ("none")

(with rescale_acts_by_decoder_norm SAELens's decode divides the activations by the decoder norms again, so
that only the choice of latents and the reported values carry the rescaling). Everything runs in float32.
Ours standardise every vector with std + eps both ways; how each SAE's normalisation differs is stated in
:attr:`ImportedTopKSAEs.normalisation` and its ``config()``, never silently ignored. The weights are for
analysis only: the training methods refuse in one line.

``load_sae`` on a folder of the MLSAE paper's reference code (formats/reference.py: ONE SAE for every layer)
returns an :class:`ImportedMLSAE`: to the analysis an MLSAE (``arch = "mlsae"``: W_enc, W_dec [n, d], codes
[N, L, k] of the one dictionary), each vector run through the same one-SAE forward (:class:`ToolSAE`, which both
classes call). Both are :class:`ImportedDictionary`; :func:`is_imported` tells them from ours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from mlsae_cache.errors import MlsaeError
from torch import nn

from .dead_latents import DeadLatentTracker
from .dictionary import AuxKResiduals, Dictionary, Reconstruction
from .formats import ForeignTopK, SAEFormat
from .sparse_decode import sparse_decode

ANALYSIS_ONLY = "imported SAEs are for analysis only; train a dictionary with mlsae-train"
PRE_ACTIVATION_BUDGET = 1 << 26
"""Pre-activations [rows, n] computed at once per layer (256 MiB of float32), whatever the batch."""
NORMALISATION_BY_INPUT_NORM = {
    "none": "reads raw residual vectors (no per-vector standardisation; ours standardise each vector)",
    "standardize": "standardises each vector as SAELens's layer_norm, (x - mean) / (std + eps), and maps back with std, "
    "where ours maps back with std + eps",
}


class ToolSAE(NamedTuple):
    """ONE TopK SAE as its tool computes it (module docstring): the forward both imported dictionaries run, on
    rows x [N, d]; built on the fly from their parameters (a per-layer suite: those of one layer)."""

    W_enc: torch.Tensor
    """[n, d]"""
    b_enc: torch.Tensor
    """[n]"""
    W_dec: torch.Tensor
    """[n, d], rows of any norm"""
    b_dec: torch.Tensor
    """[d]"""
    k: int
    input_norm: str
    eps: float
    apply_b_dec_to_input: bool
    rescale_acts_by_decoder_norm: bool

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [N, d] -> (u, mean, std, values, indices): u [N, d] the tool's normalised input, mean and std [N, 1]
        (0 and 1 for "none"), values and indices [N, k]."""
        x = x.to(torch.float32)
        if self.input_norm == "standardize":
            mean = x.mean(dim=-1, keepdim=True)
            centred = x - mean
            std = torch.linalg.vector_norm(centred, dim=-1, keepdim=True) / math.sqrt(x.shape[-1] - 1)  # sample std
            u = centred / (std + self.eps)
        else:
            mean, std, u = x.new_zeros(x.shape[0], 1), x.new_ones(x.shape[0], 1), x
        sae_in = u - self.b_dec if self.apply_b_dec_to_input else u
        decoder_norms = torch.linalg.vector_norm(self.W_dec, dim=-1) if self.rescale_acts_by_decoder_norm else None
        values, indices = [], []
        rows = max(1, PRE_ACTIVATION_BUDGET // self.W_enc.shape[0])
        for start in range(0, sae_in.shape[0], rows):
            pre = F.linear(sae_in[start : start + rows], self.W_enc, self.b_enc)  # [rows, n]
            if decoder_norms is not None:
                pre = pre * decoder_norms
            top = pre.topk(self.k, dim=-1)
            values.append(torch.relu(top.values))
            indices.append(top.indices)
        return u, mean, std, torch.cat(values), torch.cat(indices)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """values, indices [N, k] -> u_hat [N, d] in the tool's normalised space."""
        if self.rescale_acts_by_decoder_norm:
            values = values / torch.linalg.vector_norm(self.W_dec, dim=-1)[indices]
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [N, d] -> (u, mean, scale, u_hat, x_hat, values, indices), the first fields of a Reconstruction: u and
        u_hat in the tool's normalised space, scale what u divides by (std + eps; 1 for raw inputs), x_hat
        mapped back as the tool does (u_hat * std + mean: std, not std + eps)."""
        u, mean, std, values, indices = self.encode(x)
        u_hat = self.decode(values, indices)
        scale = std + self.eps if self.input_norm == "standardize" else std
        return u, mean, scale, u_hat, u_hat * std + mean, values, indices


def _no_aux(values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty AuxK fields ([R, 0]) of an imported dictionary's Reconstruction."""
    return values.new_zeros(values.shape[0], 0), indices.new_zeros(values.shape[0], 0)


class ImportedDictionary(Dictionary):
    """What every imported dictionary shares: where it came from (:attr:`sources`), how its normalisation differs
    from ours (:attr:`normalisation`), a ``config()`` saying ``imported``, and training refused in one line.
    :func:`is_imported` is the one test for "trained elsewhere"."""

    sources: list[dict]
    """Each SAE's ForeignTopK.source (format, path, model, hook, normalisation) and its ``layer`` (None: shared by all)."""
    normalisation: str
    """One sentence: how the SAEs' input normalisation differs from ours."""

    def config(self) -> dict:
        """JSON: the shape, ``imported``, the sources and the normalisation sentence (not rebuildable by
        build_dictionary: the weights stay in the tools' folders)."""
        return {**super().config(), "imported": True, "sources": self.sources, "normalisation": self.normalisation}

    @property
    def k_aux(self) -> int:
        raise MlsaeError(ANALYSIS_ONLY)

    def normalize_decoder_(self) -> None:
        raise MlsaeError(ANALYSIS_ONLY)

    def init_b_pre_(self, first_batch: torch.Tensor) -> None:
        raise MlsaeError(ANALYSIS_ONLY)

    def auxk_residuals(self, out: Reconstruction, dead_latents: torch.Tensor | None) -> AuxKResiduals | None:
        raise MlsaeError(ANALYSIS_ONLY)


def is_imported(sae: object) -> bool:
    """Whether ``sae`` is another tool's (trained elsewhere: analysis only, no training cache of ours)."""
    return isinstance(sae, ImportedDictionary)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().to(torch.float32).contiguous(), requires_grad=False)


class ImportedTopKSAEs(ImportedDictionary):
    """One other tool's TopK SAE per layer (module docstring); ``sae(x)`` reconstructs x [N, L, d] and
    ``sae.encode(x)`` gives [N, L, k] latents of each layer's own SAE, both as the tools compute them."""

    arch = "per-layer"

    def __init__(self, saes: list[ForeignTopK]) -> None:
        _check_alike(saes)
        saes = sorted(saes, key=lambda sae: sae.layer)
        first = saes[0]
        n_latents, d_model = first.W_enc.shape
        super().__init__(d_model, n_latents, first.k, [sae.layer for sae in saes], first.eps)

        def stacked(name: str) -> nn.Parameter:
            return _frozen(torch.stack([getattr(sae, name).detach().to(torch.float32) for sae in saes]))

        self.W_enc = stacked("W_enc")  # [L, n, d]
        self.W_dec = stacked("W_dec")  # [L, n, d], rows of any norm
        self.b_enc = stacked("b_enc")  # [L, n]
        self.b_dec = stacked("b_dec")  # [L, d]
        self.input_norms = [sae.input_norm for sae in saes]
        self.apply_b_dec_to_input = [bool(sae.apply_b_dec_to_input) for sae in saes]
        self.rescale_acts_by_decoder_norm = [bool(sae.rescale_acts_by_decoder_norm) for sae in saes]
        self.eps_per_layer = [float(sae.eps) for sae in saes]
        self.sources = [json.loads(json.dumps({**sae.source, "layer": sae.layer}, default=str)) for sae in saes]
        self.normalisation = _normalisation_sentence(saes)

    @property
    def b_pre(self) -> nn.Parameter:  # type: ignore[override]
        """[L, d] the decoder bias b_dec: what plays b_pre's part (subtracted on the way in, where the tool
        does, and added back on the way out)."""
        return self.b_dec

    # ------------------------------------------------------------------ the tools' forward

    def _layer_sae(self, layer: int) -> ToolSAE:
        """The SAE at position ``layer`` of the layer axis."""
        return ToolSAE(self.W_enc[layer], self.b_enc[layer], self.W_dec[layer], self.b_dec[layer], self.k,
                       self.input_norms[layer], self.eps_per_layer[layer], self.apply_b_dec_to_input[layer],
                       self.rescale_acts_by_decoder_norm[layer])  # fmt: skip

    def reconstruct(
        self,
        x: torch.Tensor,
        dead_latents: torch.Tensor | None = None,
        chunk_rows: int | None = None,
        matmul_dtype: torch.dtype | None = None,
        project_decoder_grad: bool = False,
        screen: bool = False,
    ) -> Reconstruction:
        """See :meth:`Dictionary.reconstruct`: rows are (token, layer) vectors as in the per-layer suite; z and
        z_hat are in each tool's normalised space, mean and scale its own (0 and 1 for raw inputs; std + eps for
        SAELens's layer_norm). ``screen`` and ``matmul_dtype`` are ignored (float32 throughout)."""
        if dead_latents is not None and dead_latents.numel() > 0:
            raise MlsaeError(ANALYSIS_ONLY)
        self._check_layers(x)
        n_tokens, n_layers, d = x.shape
        parts = [self._layer_sae(layer).reconstruct(x[:, layer]) for layer in range(n_layers)]
        z, mean, scale, z_hat, x_hat, values, indices = (torch.stack(column, 1).view(n_tokens * n_layers, -1) for column in zip(*parts))
        return Reconstruction(z, mean, scale, z_hat, x_hat, values, indices, *_no_aux(values, indices))

    def encode(self, x: torch.Tensor, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` [N, L, k] each: each layer's SAE's k latents as its tool picks them, values >= 0."""
        self._check_layers(x)
        codes = [self._layer_sae(layer).encode(x[:, layer])[3:] for layer in range(len(self.layers))]
        return torch.stack([c[0] for c in codes], 1), torch.stack([c[1] for c in codes], 1)

    # ------------------------------------------------------------------ what the analysis also reads

    @property
    def dead_shape(self) -> tuple[int, ...]:
        return (len(self.layers), self.n_latents)

    def active_latents(self, out: Reconstruction) -> torch.Tensor:
        """[L, n] bool: the latents of each layer's SAE active in this reconstruction."""
        n_layers, n = len(self.layers), self.n_latents
        offsets = torch.arange(0, n_layers * n, n, device=out.indices.device)  # latent j of layer l: l*n + j
        flat = (out.indices.view(-1, n_layers, out.indices.shape[1]) + offsets[:, None]).view(out.indices.shape)
        return DeadLatentTracker.active_mask(out.values, flat, n_layers * n).view(n_layers, n)


class ImportedMLSAE(ImportedDictionary):
    """Another tool's ONE TopK SAE shared by every layer (the MLSAE paper's reference code: formats/reference.py),
    analysed as an MLSAE (``arch = "mlsae"``: latent j of the one dictionary, whichever layer it fires at).
    ``sae(x)`` reconstructs x [..., d] and ``sae.encode(x)`` gives [..., k] latents, as the tool computes them
    (:class:`ToolSAE`; every vector on its own). It records no layers: the analysis takes the cache's."""

    arch = "mlsae"

    def __init__(self, sae: ForeignTopK) -> None:
        _check_alike([sae], shared=True)
        n_latents, d_model = sae.W_enc.shape
        super().__init__(d_model, n_latents, sae.k, None, float(sae.eps))
        self.W_enc = _frozen(sae.W_enc)  # [n, d]
        self.W_dec = _frozen(sae.W_dec)  # [n, d], rows of any norm
        self.b_pre = _frozen(sae.b_dec)  # [d] the tool's decoder bias, subtracted on the way in where the tool does
        self.b_enc = _frozen(sae.b_enc)  # [n]
        self.input_norm = sae.input_norm
        self.apply_b_dec_to_input = bool(sae.apply_b_dec_to_input)
        self.rescale_acts_by_decoder_norm = bool(sae.rescale_acts_by_decoder_norm)
        self.sources = [json.loads(json.dumps({**sae.source, "layer": None}, default=str))]
        self.normalisation = _normalisation_sentence([sae])

    def _sae(self) -> ToolSAE:
        return ToolSAE(self.W_enc, self.b_enc, self.W_dec, self.b_pre, self.k, self.input_norm, self.eps,
                       self.apply_b_dec_to_input, self.rescale_acts_by_decoder_norm)  # fmt: skip

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
        """See :meth:`Dictionary.reconstruct`: x [..., d], one row per vector as in the MLSAE; z and z_hat in the
        tool's normalised space, mean and scale its own. ``screen`` and ``matmul_dtype`` are ignored (float32)."""
        if dead_latents is not None and dead_latents.numel() > 0:
            raise MlsaeError(ANALYSIS_ONLY)
        z, mean, scale, z_hat, x_hat, values, indices = self._sae().reconstruct(x.reshape(-1, self.d_model))
        return Reconstruction(z, mean, scale, z_hat, x_hat, values, indices, *_no_aux(values, indices))

    def encode(self, x: torch.Tensor, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` [..., k] each: the k latents of each vector of x [..., d] as the tool picks them."""
        values, indices = self._sae().encode(x.reshape(-1, self.d_model))[3:]
        lead = x.shape[:-1]
        return values.view(*lead, self.k), indices.view(*lead, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x [..., d] in input space."""
        return self.reconstruct(x).x_hat.view(x.shape)


def _where(sae: ForeignTopK) -> str:
    return str(sae.source.get("path") or ("the shared SAE" if sae.layer is None else f"the SAE of layer {sae.layer}"))


def _check_alike(saes: list[ForeignTopK], shared: bool = False) -> None:
    """One SAE per layer, all of one width d, one latent count n and one k (one line naming the first
    difference); at least one. ``shared``: the one SAE of an ImportedMLSAE (``layer`` None) instead."""
    if not saes:
        raise MlsaeError("no SAE to import; point at a SAELens or sparsify SAE folder, or a folder of them (one per layer), "
                         "or at a folder of the MLSAE paper's reference code")  # fmt: skip
    by_layer: dict[int, ForeignTopK] = {}
    for sae in saes:
        if (sae.layer is None) != shared:
            said = ("one layer's SAE, not one shared by every layer" if shared
                    else "one SAE shared by every layer (an MLSAE), not one layer's")  # fmt: skip
            raise MlsaeError(f"{_where(sae)} is {said}; import it on its own")
        n, d = sae.W_enc.shape
        shapes = [tuple(sae.W_dec.shape), tuple(sae.b_enc.shape), tuple(sae.b_dec.shape)]
        if sae.input_norm not in NORMALISATION_BY_INPUT_NORM:
            raise MlsaeError(f"{_where(sae)} normalises its inputs as {sae.input_norm!r}, which mlsae cannot reproduce "
                             f"(it reproduces {', '.join(NORMALISATION_BY_INPUT_NORM)}); import another SAE")  # fmt: skip
        if shapes != [(n, d), (n,), (d,)] or not 0 < sae.k <= n:
            raise MlsaeError(f"{_where(sae)} is inconsistent: W_enc [{n}, {d}] but W_dec, b_enc, b_dec {shapes} and k {sae.k}; "
                             "restore the SAE as its tool wrote it")  # fmt: skip
        if sae.layer is not None and sae.layer in by_layer:
            raise MlsaeError(f"two SAEs read layer {sae.layer} ({_where(by_layer[sae.layer])} and {_where(sae)}); "
                             "import one SAE per layer (move the other out of the folder)")  # fmt: skip
        if sae.layer is not None:
            by_layer[sae.layer] = sae
    first = saes[0]
    for sae in saes[1:]:
        for what, mine, theirs in (("width d", first.W_enc.shape[1], sae.W_enc.shape[1]),
                                   ("number of latents n", first.W_enc.shape[0], sae.W_enc.shape[0]), ("k", first.k, sae.k)):  # fmt: skip
            if mine != theirs:
                raise MlsaeError(
                    f"the SAEs differ in their {what} ({mine} at layer {first.layer}, {_where(first)}; {theirs} at layer "
                    f"{sae.layer}, {_where(sae)}); a per-layer baseline needs SAEs of one shape: import those alike"
                )


def _normalisation_sentence(saes: list[ForeignTopK]) -> str:
    """How the SAEs' input normalisation differs from ours, one sentence (per group of layers that differ)."""
    groups: dict[str, list[int]] = {}
    for sae in saes:
        said = sae.source.get("normalisation") or NORMALISATION_BY_INPUT_NORM[sae.input_norm]
        groups.setdefault(str(said).rstrip("."), []).append(sae.layer)
    if len(groups) == 1:
        return f"Imported SAEs: {next(iter(groups))}."
    return "Imported SAEs: " + "; ".join(f"layer(s) {', '.join(map(str, layers))}: {said}" for said, layers in groups.items()) + "."


def load_imported(dirs: list[tuple[SAEFormat, Path]]) -> ImportedDictionary:
    """The per-layer baseline of the one-SAE folders ``dirs`` (formats/__init__.py's ``foreign_sae_dirs``),
    each read by its format; or, for ONE folder of an SAE shared by every layer (``layer`` None: the reference
    code's MLSAE), an :class:`ImportedMLSAE`. Bad folders, two SAEs of one layer, SAEs of different shapes and a
    shared SAE among others are refused in one line."""
    saes = [fmt.read(Path(folder)) for fmt, folder in dirs]
    shared = [sae for sae in saes if sae.layer is None]
    if shared and len(saes) > 1:
        raise MlsaeError(
            f"{_where(shared[0])} is one SAE shared by every layer (an MLSAE) but it lies beside {len(saes) - 1} other SAE "
            "folder(s); import it on its own (point at its folder, or move the others out)"
        )
    return ImportedMLSAE(shared[0]) if shared else ImportedTopKSAEs(saes)

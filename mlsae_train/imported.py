"""Other tools' TopK SAEs, one per layer, as a per-layer baseline for the analysis (issue 14 part 2).

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
"""

from __future__ import annotations

import json
import math
from pathlib import Path

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


class ImportedTopKSAEs(Dictionary):
    """One other tool's TopK SAE per layer (module docstring); ``sae(x)`` reconstructs x [N, L, d] and
    ``sae.encode(x)`` gives [N, L, k] latents of each layer's own SAE, both as the tools compute them."""

    arch = "per-layer"

    def __init__(self, saes: list[ForeignTopK]) -> None:
        saes = sorted(saes, key=lambda sae: sae.layer)
        _check_alike(saes)
        first = saes[0]
        n_latents, d_model = first.W_enc.shape
        super().__init__(d_model, n_latents, first.k, [sae.layer for sae in saes], first.eps)

        def stacked(name: str) -> nn.Parameter:
            tensor = torch.stack([getattr(sae, name).detach().to(torch.float32) for sae in saes])
            return nn.Parameter(tensor.contiguous(), requires_grad=False)

        self.W_enc = stacked("W_enc")  # [L, n, d]
        self.W_dec = stacked("W_dec")  # [L, n, d], rows of any norm
        self.b_enc = stacked("b_enc")  # [L, n]
        self.b_dec = stacked("b_dec")  # [L, d]
        self.input_norms = [sae.input_norm for sae in saes]
        self.apply_b_dec_to_input = [bool(sae.apply_b_dec_to_input) for sae in saes]
        self.rescale_acts_by_decoder_norm = [bool(sae.rescale_acts_by_decoder_norm) for sae in saes]
        self.eps_per_layer = [float(sae.eps) for sae in saes]
        self.sources: list[dict] = [json.loads(json.dumps({**sae.source, "layer": sae.layer}, default=str)) for sae in saes]
        """Each layer's ForeignTopK.source (format, path, model, hook, normalisation), in layer order."""
        self.normalisation = _normalisation_sentence(saes)
        """One sentence: how the SAEs' input normalisation differs from ours."""

    @property
    def b_pre(self) -> nn.Parameter:  # type: ignore[override]
        """[L, d] the decoder bias b_dec: what plays b_pre's part (subtracted on the way in, where the tool
        does, and added back on the way out)."""
        return self.b_dec

    def config(self) -> dict:
        """JSON: the shape, ``imported``, the sources and the normalisation sentence (not rebuildable by
        build_dictionary: the weights stay in the tools' folders)."""
        return {**super().config(), "imported": True, "sources": self.sources, "normalisation": self.normalisation}

    # ------------------------------------------------------------------ the tools' forward

    def _encode_layer(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, ...]:
        """x [N, d] of the layer at position ``layer`` -> (u, mean, std, values, indices): u [N, d] the tool's
        normalised input, mean and std [N, 1] (0 and 1 for "none"), values and indices [N, k]."""
        x = x.to(torch.float32)
        if self.input_norms[layer] == "standardize":
            mean = x.mean(dim=-1, keepdim=True)
            centred = x - mean
            std = torch.linalg.vector_norm(centred, dim=-1, keepdim=True) / math.sqrt(x.shape[-1] - 1)  # sample std
            u = centred / (std + self.eps_per_layer[layer])
        else:
            mean, std, u = x.new_zeros(x.shape[0], 1), x.new_ones(x.shape[0], 1), x
        sae_in = u - self.b_dec[layer] if self.apply_b_dec_to_input[layer] else u
        W_enc, b_enc = self.W_enc[layer], self.b_enc[layer]
        decoder_norms = torch.linalg.vector_norm(self.W_dec[layer], dim=-1) if self.rescale_acts_by_decoder_norm[layer] else None
        values, indices = [], []
        rows = max(1, PRE_ACTIVATION_BUDGET // self.n_latents)
        for start in range(0, sae_in.shape[0], rows):
            pre = F.linear(sae_in[start : start + rows], W_enc, b_enc)  # [rows, n]
            if decoder_norms is not None:
                pre = pre * decoder_norms
            top = pre.topk(self.k, dim=-1)
            values.append(torch.relu(top.values))
            indices.append(top.indices)
        return u, mean, std, torch.cat(values), torch.cat(indices)

    def _decode_layer(self, values: torch.Tensor, indices: torch.Tensor, layer: int) -> torch.Tensor:
        """values, indices [N, k] -> u_hat [N, d] in the tool's normalised space."""
        W_dec = self.W_dec[layer]  # [n, d]
        if self.rescale_acts_by_decoder_norm[layer]:
            values = values / torch.linalg.vector_norm(W_dec, dim=-1)[indices]
        return sparse_decode(values, indices, W_dec) + self.b_dec[layer]

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
        parts = []
        for layer in range(n_layers):
            u, mean, std, values, indices = self._encode_layer(x[:, layer], layer)
            u_hat = self._decode_layer(values, indices, layer)
            scale = std + self.eps_per_layer[layer] if self.input_norms[layer] == "standardize" else std
            parts.append((u, mean, scale, u_hat, u_hat * std + mean, values, indices))
        z, mean, scale, z_hat, x_hat, values, indices = (torch.stack(column, 1).view(n_tokens * n_layers, -1) for column in zip(*parts))
        empty_values = values.new_zeros(values.shape[0], 0)
        return Reconstruction(z, mean, scale, z_hat, x_hat, values, indices, empty_values, indices.new_zeros(values.shape[0], 0))

    def encode(self, x: torch.Tensor, screen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` [N, L, k] each: each layer's SAE's k latents as its tool picks them, values >= 0."""
        self._check_layers(x)
        codes = [self._encode_layer(x[:, layer], layer)[3:] for layer in range(len(self.layers))]
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

    # ------------------------------------------------------------------ training: refused

    @property
    def k_aux(self) -> int:
        raise MlsaeError(ANALYSIS_ONLY)

    def normalize_decoder_(self) -> None:
        raise MlsaeError(ANALYSIS_ONLY)

    def init_b_pre_(self, first_batch: torch.Tensor) -> None:
        raise MlsaeError(ANALYSIS_ONLY)

    def auxk_residuals(self, out: Reconstruction, dead_latents: torch.Tensor | None) -> AuxKResiduals | None:
        raise MlsaeError(ANALYSIS_ONLY)


def _where(sae: ForeignTopK) -> str:
    return str(sae.source.get("path") or f"the SAE of layer {sae.layer}")


def _check_alike(saes: list[ForeignTopK]) -> None:
    """One SAE per layer, all of one width d, one latent count n and one k (one line naming the first
    difference); at least one."""
    if not saes:
        raise MlsaeError("no SAE to import; point at a SAELens or sparsify SAE folder, or a folder of them (one per layer)")
    by_layer: dict[int, ForeignTopK] = {}
    for sae in saes:
        n, d = sae.W_enc.shape
        shapes = [tuple(sae.W_dec.shape), tuple(sae.b_enc.shape), tuple(sae.b_dec.shape)]
        if sae.input_norm not in NORMALISATION_BY_INPUT_NORM:
            raise MlsaeError(f"{_where(sae)} normalises its inputs as {sae.input_norm!r}, which mlsae cannot reproduce "
                             f"(it reproduces {', '.join(NORMALISATION_BY_INPUT_NORM)}); import another SAE")  # fmt: skip
        if shapes != [(n, d), (n,), (d,)] or not 0 < sae.k <= n:
            raise MlsaeError(f"{_where(sae)} is inconsistent: W_enc [{n}, {d}] but W_dec, b_enc, b_dec {shapes} and k {sae.k}; "
                             "restore the SAE as its tool wrote it")  # fmt: skip
        if sae.layer in by_layer:
            raise MlsaeError(f"two SAEs read layer {sae.layer} ({_where(by_layer[sae.layer])} and {_where(sae)}); "
                             "import one SAE per layer (move the other out of the folder)")  # fmt: skip
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


def load_imported(dirs: list[tuple[SAEFormat, Path]]) -> ImportedTopKSAEs:
    """The per-layer baseline of the one-SAE folders ``dirs`` (formats/__init__.py's ``foreign_sae_dirs``),
    each read by its format; bad folders, two SAEs of one layer and SAEs of different shapes refused in one line."""
    return ImportedTopKSAEs([fmt.read(Path(folder)) for fmt, folder in dirs])

"""The tuned-lens transform of SPEC 2, applied to cached activations, and its exact inverse.

A tuned lens (tuned-lens package format: ``config.json`` + ``params.pt``) holds one affine
translator per ``hidden_states`` index: idx 0 is the embeddings, idx i the output of block i-1.
So block ``l`` uses translator ``l + 1``, and the last block has none: it is left as it is.

Forward ``x' = x + W x + b``; inverse ``x = (I + W)^-1 (x' - b)``, a full solve whose matrix is
inverted once per layer in float64 (never only its diagonal: SPEC 7).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MlsaeError
from .shard_format import file_sha256


@dataclass
class Lens:
    """Translators by hidden-states index: ``weight[i]`` [d, d] and ``bias[i]`` [d], float32."""

    weight: dict[int, torch.Tensor]
    bias: dict[int, torch.Tensor]
    n_layers: int
    d_model: int
    source: str = ""
    sha256: str = ""
    _inverse: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def translator_index(self, layer: int) -> int | None:
        """The translator that block ``layer`` uses, or None for the last block (identity)."""
        return layer + 1 if layer + 1 < self.n_layers else None

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x: [..., d] residual output of block ``layer`` -> lens space [..., d]."""
        idx = self.translator_index(layer)
        if idx is None:
            return x
        w, b = self.weight[idx].to(x.device, x.dtype), self.bias[idx].to(x.device, x.dtype)
        return x + x @ w.T + b

    def inverse(self, x_lens: torch.Tensor, layer: int) -> torch.Tensor:
        """Lens space [..., d] -> residual space [..., d]: (I + W)^-1 (x' - b) as a full solve."""
        idx = self.translator_index(layer)
        if idx is None:
            return x_lens
        if idx not in self._inverse:
            eye = torch.eye(self.d_model, dtype=torch.float64)
            self._inverse[idx] = torch.linalg.inv(eye + self.weight[idx].double()).float()  # [d, d]
        inv, b = self._inverse[idx].to(x_lens.device, x_lens.dtype), self.bias[idx].to(x_lens.device, x_lens.dtype)
        return (x_lens - b) @ inv.T

    def forward_stack(self, x: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """x: [..., n_layers_selected, d] with the blocks ``layers`` along dim -2."""
        return torch.stack([self.forward(x[..., i, :], layer) for i, layer in enumerate(layers)], dim=-2)

    def manifest_entry(self) -> dict:
        return {"path": self.source, "params_sha256": self.sha256}


def load_lens(path: str | Path, n_layers: int, d_model: int) -> Lens:
    """Load a tuned lens directory and check it fits a model of ``n_layers`` blocks of width ``d_model``."""
    root = Path(path)
    config_path, params_path = root / "config.json", root / "params.pt"
    if not (config_path.exists() and params_path.exists()):
        raise MlsaeError(f"--lens {root} is not a tuned-lens directory (needs config.json and params.pt); train one with mlsae-lens train")
    config = json.loads(config_path.read_text())
    if config.get("d_model") != d_model or config.get("num_hidden_layers") != n_layers:
        raise MlsaeError(
            f"lens {root} is for a model with {config.get('num_hidden_layers')} layers of width {config.get('d_model')}, "
            f"but the model has {n_layers} layers of width {d_model}; use a lens trained for this model"
        )
    state = torch.load(params_path, map_location="cpu", weights_only=True)
    weight, bias = {}, {}
    for idx in range(n_layers):
        w = state.get(f"{idx}.weight")
        if w is None or tuple(w.shape) != (d_model, d_model):
            raise MlsaeError(f"lens {root} has no [{d_model}, {d_model}] translator {idx}; the params.pt is damaged or foreign")
        weight[idx] = w.float()
        bias[idx] = state.get(f"{idx}.bias", torch.zeros(d_model)).float()
    return Lens(weight, bias, n_layers, d_model, source=str(root.resolve()), sha256=file_sha256(params_path))

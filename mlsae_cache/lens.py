"""The tuned-lens transform of SPEC 2, applied to cached activations, and its exact inverse.

A tuned lens (tuned-lens package format: ``config.json`` + ``params.pt``) holds one affine
translator per ``hidden_states`` index: idx 0 is the embeddings, idx i the output of block i-1.
So block ``l`` uses translator ``l + 1``, and the last block has none: it is left as it is.

Forward ``x' = x + W x + b``; inverse ``x = (I + W)^-1 (x' - b)``, a full solve whose matrix is
inverted once per layer in float64 (never only its diagonal: SPEC 7).

``load_lens_for_model`` is the one entry point of the commands: it takes a local lens directory or,
online, a hub model name whose pretrained lens the tuned-lens package downloads, and refuses a lens
made for another model, width or layer count in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import MlsaeError, first_line
from .integrity import RECORD_FILE, IntegrityError, has_record, verify_files, warn_once
from .hub import hub_reachable
from .lm import d_model_of, is_local, n_layers_of, resolve_model_name, unembedding_of
from .shard_format import file_sha256

LENS_CONFIG = "config.json"
LENS_PARAMS = "params.pt"
LENS_TRAINING = "training.json"  # written last by mlsae-lens train
LENS_FIX = "train the lens again with mlsae-lens train (or restore the file)"


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

    def apply_translator(self, h: torch.Tensor, idx: int) -> torch.Tensor:
        """h: [..., d] hidden state ``idx`` (0 = embeddings) -> ``h + W h + b`` [..., d]."""
        w, b = self.weight[idx].to(h.device, h.dtype), self.bias[idx].to(h.device, h.dtype)
        return h + h @ w.T + b

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x: [..., d] residual output of block ``layer`` -> lens space [..., d]."""
        idx = self.translator_index(layer)
        return x if idx is None else self.apply_translator(x, idx)

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
    config = read_lens_config(root)
    if config.get("d_model") != d_model or config.get("num_hidden_layers") != n_layers:
        raise MlsaeError(
            f"lens {root} is for a model with {config.get('num_hidden_layers')} layers of width {config.get('d_model')}, "
            f"but the model has {n_layers} layers of width {d_model}; use a lens trained for this model"
        )
    params_path = root / LENS_PARAMS
    try:
        state = torch.load(params_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn zip, a pickle error, an unexpected type: torch raises many kinds
        reason = first_line(exc)
        raise IntegrityError(f"{params_path} cannot be read ({reason}): it is truncated or not a tuned-lens params.pt; {LENS_FIX}") from None
    if not isinstance(state, dict):
        raise IntegrityError(f"{params_path} is not a tuned-lens params.pt (it holds no state dict); {LENS_FIX}")
    weight, bias = {}, {}
    for idx in range(n_layers):
        w = state.get(f"{idx}.weight")
        if w is None or tuple(w.shape) != (d_model, d_model):
            raise MlsaeError(f"lens {root} has no [{d_model}, {d_model}] translator {idx}; the params.pt is damaged or foreign")
        weight[idx] = w.float()
        bias[idx] = state.get(f"{idx}.bias", torch.zeros(d_model)).float()
    return Lens(weight, bias, n_layers, d_model, source=str(root.resolve()), sha256=file_sha256(params_path))


def read_lens_config(root: Path) -> dict:
    """The tuned-lens ``config.json`` of a lens directory (which must also hold ``params.pt``)."""
    config_path, params_path = root / LENS_CONFIG, root / LENS_PARAMS
    if not (config_path.exists() and params_path.exists()):
        raise MlsaeError(f"--lens {root} is not a tuned-lens directory (needs config.json and params.pt); train one with mlsae-lens train")
    verify_lens_files(root)
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        raise MlsaeError(f"{config_path} is not valid JSON; the lens is damaged, train it again with mlsae-lens train") from None
    if not isinstance(config, dict):
        raise MlsaeError(f"{config_path} is not a tuned-lens config; train a lens with mlsae-lens train")
    return config


def verify_lens_files(root: Path) -> None:
    """Check config.json and params.pt against the lens's checksums.json (written by mlsae-lens train).

    A lens from another tool (a hub lens, one saved by the tuned-lens package) has no record and is read
    as it is; one trained by an older mlsae-lens (training.json, no record) loads with a warning.
    """
    if has_record(root):
        verify_files(root, [LENS_CONFIG, LENS_PARAMS], LENS_FIX)
    elif (root / LENS_TRAINING).exists():
        warn_once(str(root), f"lens {root} has no {RECORD_FILE} (trained before mlsae-lens recorded checksums); its files are read unverified")


def canonical_model_name(name: str) -> str:
    """A model's name for comparison: Pythia short names expanded, local directories made absolute."""
    name = resolve_model_name(name)
    return str(Path(name).expanduser().resolve()) if is_local(name) else name


def unembedding_hash(model: nn.Module) -> str:
    """The tuned-lens package's fingerprint of a model's unembedding matrix (``unembed_hash`` in config.json)."""
    from tuned_lens.utils import tensor_hash

    return tensor_hash(unembedding_of(model).weight.detach().cpu().float().numpy())


def check_lens_model(config: dict, root: Path, model: nn.Module, model_name: str) -> None:
    """Refuse a lens trained for another model.

    The lens fits when its ``base_model_name_or_path`` names this model, or when its ``unembed_hash``
    equals this model's (the same weights under another path or name, e.g. a local copy of a hub model).
    """
    lens_model = str(config.get("base_model_name_or_path") or "")
    if lens_model and canonical_model_name(lens_model) == canonical_model_name(model_name):
        return
    if config.get("unembed_hash") and config["unembed_hash"] == unembedding_hash(model):
        return
    raise MlsaeError(
        f"lens {root} was trained for model {lens_model or '(unnamed)'}, not {model_name} (its unembedding differs too); "
        f"use a lens for this model or train one with mlsae-lens train --model {model_name}"
    )


def resolve_lens_dir(spec: str) -> Path:
    """A local lens directory as given, or the pretrained lens of hub model ``spec`` downloaded by tuned-lens."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise MlsaeError(f"lens directory {spec} does not exist; pass a tuned-lens directory (config.json + params.pt) or train one with mlsae-lens train")
    name = resolve_model_name(spec)
    if not hub_reachable():
        raise MlsaeError(
            f"cannot reach the Hugging Face hub to download the pretrained tuned lens for {name} (and no local directory of that name exists); "
            "pass a local lens directory with --lens DIR or train one with mlsae-lens train"
        )
    from tuned_lens.load_artifacts import load_lens_artifacts

    try:
        config_path, _params_path = load_lens_artifacts(name)
    except Exception as exc:  # huggingface_hub raises many error types (not found, gated, network)
        raise MlsaeError(f"no pretrained tuned lens for {name} could be downloaded ({first_line(exc, 200)}); train one with mlsae-lens train") from None
    return Path(config_path).parent


def load_lens_for_model(spec: str | Path, model: nn.Module, model_name: str) -> Lens:
    """Load the lens ``spec`` (local directory or hub model name) and check it was made for ``model``."""
    root = resolve_lens_dir(str(spec))
    config = read_lens_config(root)
    lens = load_lens(root, n_layers_of(model), d_model_of(model))
    check_lens_model(config, root, model, model_name)
    return lens

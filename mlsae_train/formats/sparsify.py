"""EleutherAI's sparsify: one SAE per hookpoint, each in its own folder named after the module path.

A sparsify SAE folder (``SparseCoder.save_to_disk``) holds ``cfg.json`` (the SparseCoderConfig and ``d_in``)
and ``sae.safetensors`` with ``encoder.weight`` [n, d], ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d]
(and ``W_skip`` [d, d] with a skip connection), in float32 or bfloat16. A training run's folder holds one such
folder per hookpoint (``layers.3``, ``gpt_neox.layers.3``: the output of block 3) next to its training
``config.json`` (whose ``model`` we record). Its forward on a raw residual vector x:

    top_acts, top_indices = TopK_k(ReLU((x - b_dec) @ encoder.weight.T + encoder.bias))
    x_hat                 = top_acts @ W_dec[top_indices] + b_dec

(ReLU before TopK: the same latents and values as TopK before ReLU wherever k pre-activations are positive).
Our own run folders hold ``config.json`` + ``sae.safetensors`` and never ``cfg.json``: they are not taken for one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mlsae_cache.errors import MlsaeError

from .base import ForeignTopK, SAEFormat, layer_of_hook, read_float_weights, read_json_object

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
RUN_CONFIG_FILE = "config.json"
NORMALISATION = "sparsify reads raw residual vectors (no per-vector standardisation; ours standardise each vector)"
FIX = "restore the folder as sparsify wrote it (SparseCoder.save_to_disk)"


class SparsifyFormat(SAEFormat):
    name = "sparsify"

    def recognises(self, folder: Path) -> bool:
        return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()

    def read(self, folder: Path) -> ForeignTopK:
        folder = Path(folder)
        cfg = read_json_object(folder / CFG_FILE, "sparsify config", FIX)
        activation = cfg.get("activation", "topk")
        if activation != "topk":
            raise MlsaeError(f"{folder} is a sparsify SAE with the {activation!r} activation, which mlsae does not reproduce; "
                             "import a TopK SAE (activation \"topk\")")  # fmt: skip
        for flag, what in (("skip_connection", "a skip connection (W_skip)"), ("transcode", "a transcoder")):
            if cfg.get(flag):
                raise MlsaeError(f"{folder} is a sparsify SAE with {what}, which is no autoencoder of the residual stream "
                                 "mlsae can reproduce; import a plain TopK SAE")  # fmt: skip
        layer = layer_of_hook(folder.name)
        if layer is None:
            raise MlsaeError(
                f"{folder} is a sparsify SAE of the hookpoint {folder.name!r}, which is not a block's output (the residual "
                "stream mlsae analyses); import SAEs of hookpoints like layers.N (point at a folder holding only those), or name "
                "the folder after its hookpoint"
            )
        tensors = _read_weights(folder / WEIGHTS_FILE)
        if "W_skip" in tensors:
            raise MlsaeError(f"{folder} holds a skip connection (W_skip); import a plain TopK SAE")
        W_enc, b_enc, W_dec, b_dec = (tensors[name] for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec"))
        n_latents, d_model = W_enc.shape
        k = _int(cfg, "k", folder)
        shapes = {"encoder.bias": (b_enc, (n_latents,)), "W_dec": (W_dec, (n_latents, d_model)), "b_dec": (b_dec, (d_model,))}
        for name, (tensor, shape) in shapes.items():
            if tuple(tensor.shape) != shape:
                raise MlsaeError(f"{folder / WEIGHTS_FILE} holds {name} of shape {tuple(tensor.shape)} where encoder.weight "
                                 f"[{n_latents}, {d_model}] needs {shape}; {FIX}")  # fmt: skip
        if int(cfg.get("d_in", d_model)) != d_model or not 0 < k <= n_latents:
            raise MlsaeError(f"{folder / CFG_FILE} says d_in {cfg.get('d_in')} and k {k} but the weights are [{n_latents}, "
                             f"{d_model}]; {FIX}")  # fmt: skip
        source = {"format": self.name, "path": str(folder.resolve()), "model": _run_model(folder.parent), "hook": folder.name,
                  "normalisation": NORMALISATION}  # fmt: skip
        if cfg.get("multi_topk"):
            source["note"] = f"trained with multi-TopK (also decoding its top 4k); read, as sparsify infers, with its top k = {k}"
        return ForeignTopK(W_enc, b_enc, W_dec, b_dec, k, layer, "none", apply_b_dec_to_input=True, source=source)


def _int(cfg: dict, key: str, folder: Path) -> int:
    try:
        return int(cfg[key])
    except (KeyError, TypeError, ValueError):
        raise MlsaeError(f"{folder / CFG_FILE} records no integer {key}; {FIX}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights in float32 (sparsify saves float32 or bfloat16), refused in one line when damaged."""
    tensors = read_float_weights(path, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), "sparsify SAE", FIX)
    if tensors["encoder.weight"].ndim != 2:
        raise MlsaeError(f"{path} holds encoder.weight of shape {tuple(tensors['encoder.weight'].shape)}, not [n, d]; {FIX}")
    return tensors


def _run_model(run: Path) -> str | None:
    """The model a sparsify training run's config.json names (None without a readable one)."""
    try:
        model = json.loads((run / RUN_CONFIG_FILE).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return str(model) if model else None


SPARSIFY = SparsifyFormat()

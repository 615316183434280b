"""The MLSAE paper's reference code (github.com/tim-lawson/mlsae): its published MLSAEs on the Hub.

Its ``MLSAE`` module is saved through huggingface_hub's ``PyTorchModelHubMixin``: a folder (a hub repo such as
``tim-lawson/mlsae-pythia-70m-deduped-x64-k32``) with ``config.json``, the constructor's keyword arguments
(``n_inputs``, ``n_latents``, ``k``, ``dead_steps_threshold``, ``dead_threshold``, ``auxk``, ``standardize``), and
``model.safetensors``: ``encoder.weight`` [n, d] (no encoder bias), ``decoder.weight`` [d, n] (unit-norm columns),
``pre_encoder_bias`` [d], and the training buffer ``last_nonzero`` [n] (its upload script deletes it: optional).
ONE SAE reads every layer's residual stream (the output of each block, ``hidden_states[l]`` without the
embeddings): it reads into a :class:`~.base.ForeignTopK` of ``layer`` None and loads as an ImportedMLSAE. Its
forward on a residual vector x (``standardize``; else z = x and no mapping back):

    z     = (x - mean) / (std + 1e-5)               std: the sample std (torch.std)
    h     = ReLU(TopK_k(encoder.weight @ (z - pre_encoder_bias)))
    z_hat = decoder.weight @ h + pre_encoder_bias
    x_hat = z_hat * std + mean                      std, where ours maps back with std + eps

Repos named ``...-tfm`` hold the Lightning module with the transformer (``MLSAETransformer``: a config of
``model_name``, ``layers``, ``expansion_factor``...), and ``...-lens`` ones an MLSAE of tuned-lens-transformed
residuals: both are refused in one line. Our run folders (``config.json`` + ``sae.safetensors``) and the other
formats' (``cfg.json``) are never taken for one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from mlsae_cache.errors import MlsaeError
from safetensors import SafetensorError, safe_open

from ..run_files import SAE_FILE
from .base import ForeignTopK, SAEFormat, read_float_weights, read_json_object
from .saelens import CFG_FILE as TOOL_CFG_FILE  # SAELens's and sparsify's cfg.json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_KEYS = ("n_inputs", "n_latents", "k")
TRANSFORMER_KEYS = ("model_name", "expansion_factor", "k")
"""MLSAETransformer's constructor arguments (a -tfm repo's config.json)."""
TENSORS = ("encoder.weight", "decoder.weight", "pre_encoder_bias")
STANDARDIZE_EPS = 1e-5
"""The reference's standardize(x, eps=1e-5)."""
NORMALISATION = {
    True: "the reference code's MLSAE standardises each vector on the way in as ours, (x - mean) / (std + eps), and maps "
    "back with std, where ours maps back with std + eps",
    False: "the reference code's MLSAE reads raw residual vectors (no per-vector standardisation; ours standardise each vector)",
}
FIX = "restore the folder as the reference code wrote it (MLSAE.save_pretrained, or the hub repo's files)"
_REPO_NAME = re.compile(r"^mlsae-(?P<model>.+?)-x\d+-k\d+(?P<lens>-lens)?(?P<tfm>-tfm)?$")
"""The reference's repo names (mlsae/utils.py get_repo_id): mlsae-MODEL-xR-kK[-lens][-tfm]."""


class ReferenceFormat(SAEFormat):
    name = "reference"

    def check_repo_name(self, repo_id: str) -> None:
        """The authors' -tfm repos (with the transformer: hundreds of MB to download for nothing) and -lens repos
        are refused by name, before the download."""
        org, _, name = repo_id.partition("/")
        named = _REPO_NAME.match(name) if org == REFERENCE_ORG else None
        if named and named["tfm"]:
            raise MlsaeError(f"{repo_id} is the reference code's Lightning checkpoint with the transformer, not its MLSAE "
                             f"alone; use {repo_id[: -len('-tfm')]} (the same name without -tfm)")  # fmt: skip
        if named and named["lens"]:
            raise MlsaeError(f"{repo_id} is an MLSAE of residuals transformed by a tuned lens (the reference's "
                             "--tuned_lens), which mlsae does not reproduce; use the repo without -lens")  # fmt: skip

    def recognises(self, folder: Path) -> bool:
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            return False
        if (folder / SAE_FILE).exists() or (folder / TOOL_CFG_FILE).exists():
            return False  # one of our runs, or a SAELens/sparsify folder
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return bool(_tensor_names(folder / WEIGHTS_FILE) & {"pre_encoder_bias", "autoencoder.pre_encoder_bias"})
        if not isinstance(config, dict):
            return False
        return all(key in config for key in CONFIG_KEYS) or all(key in config for key in TRANSFORMER_KEYS)

    def read(self, folder: Path) -> ForeignTopK:
        folder = Path(folder)
        repo = _hub_repo_of(folder)
        config = read_json_object(folder / CONFIG_FILE, "config of the reference code's MLSAE", FIX)
        _refuse_transformer(folder, config, repo)
        if repo and (named := _REPO_NAME.match(repo.split("/")[-1])) and named["lens"]:
            raise MlsaeError(f"{folder} is {repo}, an MLSAE of residuals transformed by a tuned lens (the reference's "
                             "--tuned_lens), which mlsae does not reproduce; import the repo without -lens")  # fmt: skip
        n_inputs, n_latents, k = (_int(config, key, folder) for key in CONFIG_KEYS)
        standardize = config.get("standardize", True)  # the constructor's default
        if not isinstance(standardize, bool):
            raise MlsaeError(f"{folder / CONFIG_FILE} has standardize {standardize!r}, not true or false; {FIX}")
        tensors = _read_weights(folder / WEIGHTS_FILE)
        shapes = {"encoder.weight": (n_latents, n_inputs), "decoder.weight": (n_inputs, n_latents),
                  "pre_encoder_bias": (n_inputs,)}  # fmt: skip
        for name, shape in shapes.items():
            if tuple(tensors[name].shape) != shape:
                raise MlsaeError(f"{folder / WEIGHTS_FILE} holds {name} of shape {tuple(tensors[name].shape)} where "
                                 f"config.json's n_inputs {n_inputs} and n_latents {n_latents} need {list(shape)}; {FIX}")  # fmt: skip
        if not 0 < k <= n_latents:
            raise MlsaeError(f"{folder / CONFIG_FILE} has k {k}, not in 1..n_latents={n_latents}; {FIX}")
        named = _REPO_NAME.match(repo.split("/")[-1]) if repo else None
        source = {"format": self.name, "path": str(folder.resolve()), "repo": repo, "model": named["model"] if named else None,
                  "hook": "every block's output (the reference's hidden_states[l])",
                  "normalisation": NORMALISATION[standardize]}  # fmt: skip
        W_enc = tensors["encoder.weight"]  # [n, d]
        W_dec = tensors["decoder.weight"].T.contiguous()  # [n, d]: row j is latent j's direction
        b_dec = tensors["pre_encoder_bias"]  # [d], subtracted before the encoder and added after the decoder
        return ForeignTopK(W_enc, torch.zeros(n_latents), W_dec, b_dec, k, None, "standardize" if standardize else "none",
                           apply_b_dec_to_input=True, eps=STANDARDIZE_EPS, source=source)  # fmt: skip


REFERENCE_ORG = "tim-lawson"
"""Where the reference's repos are published: only names there are judged by name before a download."""


def _hub_repo_of(folder: Path) -> str | None:
    """ORG/NAME when ``folder`` lies in a hub cache (``models--ORG--NAME/snapshots/REV``), else None."""
    for part in reversed(folder.absolute().parts):
        if part.startswith("models--") and part.count("--") == 2:
            return "/".join(part.split("--")[1:])
    return None


def _refuse_transformer(folder: Path, config: dict, repo: str | None) -> None:
    """A -tfm repo (MLSAETransformer: the Lightning module with the transformer) refused, naming the plain repo."""
    named = _REPO_NAME.match(repo.split("/")[-1]) if repo else None
    is_tfm = bool(named and named["tfm"]) or (all(key in config for key in TRANSFORMER_KEYS) and "n_inputs" not in config)
    if not is_tfm:
        return
    if named and named["tfm"]:
        plain = repo[: -len("-tfm")]
    else:  # named as the reference's get_repo_id names it
        model = str(config.get("model_name", "MODEL")).split("/")[-1]
        lens = "-lens" if config.get("tuned_lens") else ""
        plain = f"tim-lawson/mlsae-{model}-x{config.get('expansion_factor')}-k{config.get('k')}{lens}"
    raise MlsaeError(f"{folder} is the reference code's Lightning checkpoint with the transformer (a -tfm repo), not its "
                     f"MLSAE alone; import the plain repo of the same name without -tfm ({plain})")  # fmt: skip


def _int(config: dict, key: str, folder: Path) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MlsaeError(f"{folder / CONFIG_FILE} records no integer {key} ({value!r}); {FIX}")
    return value


def _tensor_names(path: Path) -> set[str]:
    """The tensor names in a safetensors file's header, or none when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return set(file.keys())
    except (SafetensorError, OSError, ValueError):
        return set()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The three weights in float32, refused in one line when unreadable, missing or non-finite."""
    tensors = read_float_weights(path, TENSORS, "reference MLSAE", FIX)
    return {name: tensors[name] for name in TENSORS}


REFERENCE = ReferenceFormat()

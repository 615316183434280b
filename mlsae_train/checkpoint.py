"""What a run directory holds, and writing and reading it atomically.

    RUN/config.json              the run's settings, the SAE's shape and the identity of its data
    RUN/sae.safetensors          the weights (W_enc, W_dec, b_pre) + the SAE's config in the metadata
    RUN/checkpoint.safetensors   everything to continue: weights, Adam state, dead-latent counters,
                                 RNG state; step and token counts in the metadata
    RUN/metrics.jsonl            one line per step

Every file is written under a temporary name in the run directory and renamed into place, so a
kill at any moment leaves either the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlsae_cache.atomic import atomic_write
from mlsae_cache.errors import MlsaeError

from .dead_latents import DeadLatentTracker
from .model import MultiLayerSAE

CONFIG_FILE = "config.json"
SAE_FILE = "sae.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"
WEIGHT_NAMES = ("W_enc", "W_dec", "b_pre")


# mkstemp creates files readable by their owner only; a run's files get the usual mode instead.
def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_sae(model: MultiLayerSAE, path: str | Path) -> None:
    """Write the weights and the SAE's config (in the safetensors metadata) to ``path``."""
    _save_tensors(Path(path), {name: getattr(model, name) for name in WEIGHT_NAMES}, {"mlsae": json.dumps(model.config())})


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> MultiLayerSAE:
    """The SAE saved at ``path``: a run directory (its sae.safetensors) or a .safetensors file.

    ``sae(x)`` reconstructs x [..., d_model] in input space; ``sae.encode(x)`` gives the k active
    latents ``(values, indices)`` after ReLU; ``sae.W_dec`` is [n_latents, d_model]; ``sae.layers``
    lists the model blocks it was trained on.
    """
    path = Path(path)
    file = path / SAE_FILE if path.is_dir() else path
    if not file.exists():
        raise MlsaeError(f"no SAE at {path}: {file} does not exist; point at a run directory written by mlsae-train")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        if "mlsae" not in metadata:
            raise MlsaeError(f"{file} was not written by mlsae-train (no SAE config in its metadata)")
        tensors = {name: f.get_tensor(name) for name in WEIGHT_NAMES}
    config = json.loads(metadata["mlsae"])
    model = MultiLayerSAE(**config)
    with torch.no_grad():
        for name in WEIGHT_NAMES:
            getattr(model, name).copy_(tensors[name])
    return model.to(device)


def save_checkpoint(
    path: str | Path,
    model: MultiLayerSAE,
    optimizer: torch.optim.Optimizer,
    tracker: DeadLatentTracker,
    progress: dict[str, Any],
) -> None:
    """Write everything needed to continue training bit for bit; ``progress`` (step, tokens, ...) goes in the metadata."""
    tensors = {f"model.{name}": getattr(model, name) for name in WEIGHT_NAMES}
    state = optimizer.state_dict()
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer.{param_id}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["dead.tokens_since_active"] = tracker.tokens_since_active
    tensors["rng.torch"] = torch.get_rng_state()
    metadata = {
        "progress": json.dumps(progress),
        "optimizer_param_groups": json.dumps(state["param_groups"]),
        "model_config": json.dumps(model.config()),
    }
    _save_tensors(Path(path), tensors, metadata)


def load_checkpoint(
    path: str | Path, model: MultiLayerSAE, optimizer: torch.optim.Optimizer, tracker: DeadLatentTracker
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns the progress dict."""
    device = model.W_enc.device
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    with torch.no_grad():
        for name in WEIGHT_NAMES:
            getattr(model, name).copy_(tensors[f"model.{name}"])
    param_groups = json.loads(metadata["optimizer_param_groups"])
    for group in param_groups:
        group["betas"] = tuple(group["betas"])
    optimizer_state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, param_id, key = name.split(".", 2)
            optimizer_state.setdefault(int(param_id), {})[key] = value.to(device)
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": param_groups})
    tracker.tokens_since_active.copy_(tensors["dead.tokens_since_active"])
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(metadata["progress"])


def read_progress(path: str | Path) -> dict[str, Any]:
    """The progress metadata of a checkpoint, without loading its tensors."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return json.loads(f.metadata()["progress"])


def run_is_finished(run: str | Path) -> bool:
    """True when the run's weights are final: the trainer writes them before each checkpoint, so a
    checkpoint at the last step means they are (sae.safetensors alone may be a mid-run snapshot)."""
    run = Path(run)
    try:
        progress = read_progress(run / CHECKPOINT_FILE)
    except Exception:  # missing or unreadable: not finished, and --resume will say what is wrong
        return False
    return progress.get("step") == progress.get("total_steps") and (run / SAE_FILE).exists()

"""What a run directory holds, and writing and reading it atomically.

    RUN/config.json              the run's settings (``config.arch``: the dictionary family), the
                                 dictionary's shape (``sae``) and the identity of its data
    RUN/sae.safetensors          the weights (W_enc, W_dec, b_pre) + the dictionary's config (with its
                                 ``arch``; none in files before the families: an MLSAE) in the metadata
    RUN/checkpoint.safetensors   everything to continue: weights, Adam state, dead-latent counters,
                                 RNG state; step and token counts in the metadata
    RUN/metrics.jsonl            one line per step

Every file is written under a temporary name in the run directory and renamed into place, so a
kill at any moment leaves either the previous file or the new one, never a torn one. Both safetensors
files carry a checksum of their tensors and metadata (mlsae_cache.integrity) that every load checks;
sae.safetensors also records the progress (step, tokens, total_steps) it was saved at. The file names are
run_files.py's (a leaf module, which formats/ reads too).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from mlsae_cache.atomic import atomic_write  # noqa: F401 - tests import it from here
from mlsae_cache.errors import MlsaeError, first_line
from mlsae_cache.integrity import DIGEST_KEY, load_safetensors, read_safetensors_metadata, save_safetensors

from .dead_latents import DeadLatentTracker
from .dictionary import Dictionary
from .families import build_dictionary
from .formats import foreign_sae_dirs
from .hub import resolve_run
from .imported import load_imported
from .run_files import CHECKPOINT_FILE, CONFIG_FILE, METRICS_FILE, SAE_FILE  # noqa: F401 - imported from here

WEIGHT_NAMES = ("W_enc", "W_dec", "b_pre")


SAE_FIX = "rerun the run's mlsae-train command with --resume to rewrite it from the checkpoint (or train it again)"
RESUME_FIX = (
    "--resume cannot continue from it: delete it and run the same command with --resume to restart the run "
    "from step 0, or start afresh in another --out"
)


def save_sae(model: Dictionary, path: str | Path, progress: dict[str, Any] | None = None) -> None:
    """Write the weights and the dictionary's config (family included, in the safetensors metadata) to
    ``path``, with a checksum.

    ``progress`` (the trainer's step, tokens and total_steps at this save) goes in the metadata too, so
    that the weights say how far they were trained.
    """
    metadata = {"mlsae": json.dumps(model.config())}
    if progress is not None:
        metadata["progress"] = json.dumps(progress)
    save_safetensors(Path(path), {name: getattr(model, name) for name in WEIGHT_NAMES}, metadata)


def _sae_file(path: Path) -> Path:
    file = path / SAE_FILE if path.is_dir() else path
    if not file.exists():
        raise MlsaeError(f"no SAE at {path}: {file} does not exist; point at a run directory written by mlsae-train")
    return file


def load_sae_and_progress(path: str | Path, device: str | torch.device = "cpu") -> tuple[Dictionary, dict[str, Any] | None]:
    """:func:`load_sae`, and the training progress recorded with the weights (None when not recorded)."""
    path = resolve_run(path)  # an ORG/NAME that is no local path: downloaded from the hub and verified
    if (foreign := foreign_sae_dirs(path)) is not None:  # another tool's SAE folder(s): a per-layer baseline or an MLSAE
        return load_imported(foreign).to(device), None
    file = _sae_file(path)
    tensors, metadata = load_safetensors(file, SAE_FIX)
    if "mlsae" not in metadata:
        raise MlsaeError(f"{file} was not written by mlsae-train (no SAE config in its metadata)")
    try:
        model = build_dictionary(json.loads(metadata["mlsae"]))  # no "arch" (files before the families): an MLSAE
        for name in WEIGHT_NAMES:
            if tuple(tensors[name].shape) != tuple(getattr(model, name).shape):
                raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}")
    except (ValueError, TypeError, KeyError) as exc:
        raise MlsaeError(f"{file} is not a readable SAE ({exc}); {SAE_FIX}") from None
    for name in WEIGHT_NAMES:
        if not torch.isfinite(tensors[name]).all():
            raise MlsaeError(
                f"{file} holds non-finite weights ({name}): its training diverged; train it again with a lower --lr"
            )
    with torch.no_grad():
        for name in WEIGHT_NAMES:
            getattr(model, name).copy_(tensors[name])
    progress = json.loads(metadata["progress"]) if "progress" in metadata else None
    return model.to(device), progress


def weights_digest(path: str | Path) -> str | None:
    """The checksum ``sae.safetensors`` records of itself (what tells two runs' weights apart), None when it records
    none (written before checksums) or ``path`` is not one of our runs."""
    file = Path(path) / SAE_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        return None
    return read_safetensors_metadata(file, SAE_FIX).get(DIGEST_KEY)


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """The dictionary saved at ``path``: a run directory (its sae.safetensors) or a .safetensors file; a
    :class:`~.model.MultiLayerSAE`, :class:`~.per_layer.PerLayerSAEs` or :class:`~.crosscoder.Crosscoder`
    as ``sae.arch`` says. ``path`` may also be a run on the Hugging Face hub (``ORG/NAME``, downloaded and
    verified: hub.py), or a SAELens or sparsify SAE folder (or a folder of them, one per layer): those load
    as an :class:`~.imported.ImportedTopKSAEs`, a per-layer baseline (formats/); or a folder of the MLSAE paper's
    reference code (its hub repos, e.g. ``tim-lawson/mlsae-pythia-70m-deduped-x64-k32``): an
    :class:`~.imported.ImportedMLSAE`.

    ``sae(x)`` reconstructs x [N, L, d_model] (the MLSAE: any [..., d_model]) in input space;
    ``sae.encode(x)`` gives the active latents ``(values, indices)`` after ReLU; ``sae.W_dec`` is
    [n_latents, d_model] (per-layer [L, n_latents, d_model], crosscoder [n_latents, L, d_model]);
    ``sae.layers`` lists the model blocks it was trained on. The file is checked against its checksum; a damaged
    file, or one holding non-finite weights, is refused in one line.
    """
    return load_sae_and_progress(path, device)[0]


def save_checkpoint(
    path: str | Path,
    model: Dictionary,
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
    save_safetensors(Path(path), tensors, metadata)


def load_checkpoint(
    path: str | Path, model: Dictionary, optimizer: torch.optim.Optimizer, tracker: DeadLatentTracker
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into the given objects; returns the progress dict."""
    path = Path(path)
    device = model.W_enc.device
    tensors, metadata = load_safetensors(path, RESUME_FIX)
    try:
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
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # a checkpoint of another shape or program
        reason = first_line(exc)
        raise MlsaeError(f"{path} is not a checkpoint of this run ({reason}); {RESUME_FIX}") from None


def read_progress(path: str | Path) -> dict[str, Any]:
    """The progress metadata of a checkpoint (or of weights saved by the trainer), without loading or
    verifying its tensors; a file without one raises MlsaeError."""
    metadata = read_safetensors_metadata(path, RESUME_FIX)
    if "progress" not in metadata:
        raise MlsaeError(f"{path} records no training progress; point at a file written by mlsae-train")
    try:
        return json.loads(metadata["progress"])
    except ValueError:
        raise MlsaeError(f"{path} has a damaged progress record; {RESUME_FIX}") from None


def training_progress(run: str | Path) -> dict[str, Any] | None:
    """How far a run's weights were trained (step, tokens, total_steps, ...), without verifying them:
    recorded in sae.safetensors since checksums exist, before that in the checkpoint saved with them.
    None when neither records it (e.g. a bare SAE file saved with :func:`save_sae`)."""
    run = Path(run)
    weights = run / SAE_FILE if run.is_dir() else run
    checkpoint = weights.parent / CHECKPOINT_FILE
    for file in (weights, checkpoint):
        try:
            return read_progress(file)
        except MlsaeError:
            continue
    return None


def run_is_finished(run: str | Path) -> bool:
    """True when the run's weights are final: they record the step they were saved at (older runs: the
    trainer wrote them before each checkpoint, so a checkpoint at the last step means they are)."""
    run = Path(run)
    if not (run / SAE_FILE).exists():
        return False
    progress = training_progress(run)
    return progress is not None and progress.get("step") == progress.get("total_steps")

"""Open a trained run and a test cache together, refusing pairs that do not belong together."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from mlsae_cache import open_cache
from mlsae_cache.errors import MlsaeError
from mlsae_cache.reader import Cache
from mlsae_train import MultiLayerSAE, load_sae
from mlsae_train.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, SAE_FILE


@dataclass
class RunAndCache:
    """A trained SAE and the test cache it is evaluated on."""

    sae: MultiLayerSAE
    cache: Cache
    layer_columns: list[int]
    """For each layer of the SAE's layer axis, its position in the cache's layer axis."""
    run_info: dict
    """The run's config.json (empty when only a safetensors file was given)."""

    @property
    def layers(self) -> list[int]:
        """The model block indices analysed, in the order of the SAE's layer axis."""
        return list(self.sae.layers)


def read_run_info(run: Path) -> dict:
    """The run directory's config.json, or {} for a bare .safetensors file."""
    config_file = (run if run.is_dir() else run.parent) / CONFIG_FILE
    if not config_file.exists():
        return {}
    try:
        return json.loads(config_file.read_text())
    except ValueError:
        raise MlsaeError(f"{config_file} is not valid JSON; point --run at an intact run directory") from None


def _load_trained_sae(run: Path) -> MultiLayerSAE:
    """load_sae, with an unfinished run or an unreadable file reported as one line."""
    file = run / SAE_FILE if run.is_dir() else run
    if run.is_dir() and not file.exists() and (run / CHECKPOINT_FILE).exists():
        raise MlsaeError(
            f"the run {run} has not finished training ({CHECKPOINT_FILE} but no {SAE_FILE}); "
            "finish it with mlsae-train --resume, or point --run at a finished run"
        )
    try:
        return load_sae(run)
    except MlsaeError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MlsaeError(f"{file} is not a readable SAE checkpoint ({reason}); train it again or restore the file") from None


def open_run_and_cache(run: str | Path, shards: str | Path) -> RunAndCache:
    """Load both and check that the cache holds the model, width, layers and lens the SAE was trained on."""
    run = Path(run)
    if not run.exists():
        raise MlsaeError(f"--run {run} does not exist; point it at a run directory written by mlsae-train")
    sae = _load_trained_sae(run)
    cache = open_cache(shards)
    info = read_run_info(run)
    if sae.d_model != cache.d_model:
        raise MlsaeError(
            f"the SAE in {run} has width {sae.d_model} but the cache {shards} has d_model {cache.d_model}; "
            "evaluate on a cache of the model the SAE was trained on"
        )
    trained_on = info.get("data") or []
    models = {entry.get("model") for entry in trained_on}
    if models and cache.manifest.get("model") not in models:
        raise MlsaeError(
            f"the SAE in {run} was trained on activations of {sorted(map(str, models))[0]} but the cache {shards} holds "
            f"{cache.manifest.get('model')}; evaluate on a cache of the same model"
        )
    lenses = {json.dumps(entry.get("lens"), sort_keys=True) for entry in trained_on}
    cache_lens = json.dumps(cache.manifest.get("lens"), sort_keys=True)
    if lenses and cache_lens not in lenses:
        raise MlsaeError(
            f"the SAE in {run} and the cache {shards} differ in their tuned lens (one has a lens the other lacks, or another one); "
            "evaluate on a cache written with the same --lens as the training cache"
        )
    sae_layers = list(sae.layers) or list(cache.layers)
    missing = [layer for layer in sae_layers if layer not in cache.layers]
    if missing:
        raise MlsaeError(
            f"the SAE in {run} was trained on layer(s) {sae_layers} but the cache {shards} lacks layer {missing[0]}; "
            "use a cache that stores every layer the SAE was trained on"
        )
    sae.layers = sae_layers
    return RunAndCache(sae.eval(), cache, [cache.layers.index(layer) for layer in sae_layers], info)

"""Open a trained run and a test cache together, refusing pairs that do not belong together."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError

from mlsae_cache import open_cache
from mlsae_cache import shard_format as sf
from mlsae_cache.errors import CacheError, MlsaeError, first_line
from mlsae_cache.integrity import verify_files
from mlsae_cache.reader import Cache, verify_shards
from mlsae_train import Dictionary
from mlsae_train.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, SAE_FILE, load_sae_and_progress, training_progress, weights_digest
from mlsae_train.formats import foreign_sae_dirs
from mlsae_train.hub import resolve_run
from mlsae_train.imported import ImportedDictionary, is_imported


@dataclass
class RunAndCache:
    """A trained SAE and the test cache it is evaluated on."""

    sae: Dictionary
    cache: Cache
    layer_columns: list[int]
    """For each layer of the SAE's layer axis, its position in the cache's layer axis."""
    run_info: dict
    """The run's config.json (empty when only a safetensors file was given)."""
    training: dict | None = None
    """How far the weights were trained: step, tokens, total_steps, total_tokens (None when not recorded)."""
    weights_digest: str | None = None
    """The checksum sae.safetensors records of itself: the identity of the weights (None: imported, or unrecorded)."""

    @property
    def layers(self) -> list[int]:
        """The model block indices analysed, in the order of the SAE's layer axis."""
        return list(self.sae.layers)


def read_run_info(run: Path) -> dict:
    """The run directory's config.json, or {} for a bare .safetensors file and for other tools' SAE folders (a
    sparsify run's config.json is its own training config, not ours)."""
    if foreign_sae_dirs(run) is not None:
        return {}
    config_file = (run if run.is_dir() else run.parent) / CONFIG_FILE
    if not config_file.exists():
        return {}
    verify_files(config_file.parent, [CONFIG_FILE], "point --run at an intact run directory", warn_unrecorded=False)
    try:
        return json.loads(config_file.read_text())
    except ValueError:
        raise MlsaeError(f"{config_file} is not valid JSON; point --run at an intact run directory") from None


def _load_trained_sae(run: Path) -> tuple[Dictionary, dict | None]:
    """load_sae (verified against its checksum) and its training progress; an unfinished run or an
    unreadable file reported as one line. Other tools' SAE folders load as an imported per-layer baseline,
    with no training progress of ours."""
    file = run / SAE_FILE if run.is_dir() else run
    if run.is_dir() and not file.exists() and (run / CHECKPOINT_FILE).exists():
        raise MlsaeError(
            f"the run {run} has not finished training ({CHECKPOINT_FILE} but no {SAE_FILE}); "
            "finish it with mlsae-train --resume, or point --run at a finished run"
        )
    try:
        sae, progress = load_sae_and_progress(run)
    except MlsaeError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        reason = first_line(exc)
        raise MlsaeError(f"{file} is not a readable SAE checkpoint ({reason}); train it again or restore the file") from None
    if is_imported(sae):  # another tool's folder (every damage refused in one line by its format): no progress of ours
        return sae, None
    if progress is None:  # weights saved before they recorded it: the checkpoint written right after them does
        progress = training_progress(run)
    return sae, training_record(progress)


def training_record(progress: dict | None) -> dict | None:
    """The trained and planned steps and tokens of a progress record (older ones lack total_tokens)."""
    if not progress or "step" not in progress or "total_steps" not in progress:
        return None
    steps, total = int(progress["step"]), int(progress["total_steps"])
    tokens = int(progress.get("tokens", 0))
    per_step = tokens // steps if steps else 0
    return {
        "steps": steps,
        "total_steps": total,
        "tokens": tokens,
        "total_tokens": int(progress.get("total_tokens", per_step * total)),
        "finished": steps >= total,
    }


def check_finished(run: Path, training: dict | None, allow_unfinished: bool, use: str = "analyse") -> None:
    """Refuse weights saved before the run's last step (killed, or stopped by a full disk) unless allowed; ``use``:
    what the command would do with them (analyse, export, upload), for the fix."""
    if training is None or training["finished"] or allow_unfinished:
        return
    raise MlsaeError(
        f"the run {run} was stopped after step {training['steps']:,} of {training['total_steps']:,} "
        f"({training['tokens']:,} of {training['total_tokens']:,} tokens); finish it with mlsae-train --resume, "
        f"or pass --allow-unfinished to {use} these weights as they are"
    )


def verify_cache_shards(cache: Cache, n_tokens: int, progress: bool = False) -> None:
    """Check the checksum of every shard holding one of the first ``n_tokens`` tokens (the ones analysed)."""
    n_shards = int(np.searchsorted(cache.shard_starts, n_tokens, side="left"))  # shards [0, n_shards) cover them
    manifest = {**cache.manifest, "shards": cache.manifest["shards"][: max(n_shards, 1)]}
    damaged = verify_shards(cache.root, manifest, progress=progress)
    if damaged:
        paths = ", ".join(str(cache.root / sf.SHARD_DIR / name) for name in damaged)
        raise CacheError(
            f"{len(damaged)} damaged shard(s): {paths} (missing, resized or failing its checksum); "
            f"rebuild the cache (`mlsae-cache verify {cache.root}` lists them)"
        )


def open_run_and_cache(run: str | Path, shards: str | Path, allow_unfinished: bool = False) -> RunAndCache:
    """Load both and check that the cache holds the model, width, layers and lens the SAE was trained on,
    and that the SAE finished training (unless ``allow_unfinished``). The cache's shards are checked
    separately (:func:`verify_cache_shards`), once the number of tokens to read is known."""
    run = resolve_run(run)  # a hub name (ORG/NAME) that is no local path: the downloaded, verified snapshot
    if not run.exists():
        raise MlsaeError(f"--run {run} does not exist; point it at a run directory written by mlsae-train")
    sae, training = _load_trained_sae(run)
    check_finished(run, training, allow_unfinished)
    cache = open_cache(shards)
    if is_imported(sae):  # no config.json of ours: where the SAEs came from, and the checks' warnings
        info = {"sources": sae.sources, "warnings": _check_imported(sae, run, shards, cache)}
    else:
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
    imported_fix = " (or point --run at a folder holding only the SAEs of the layers the cache has)"
    missing = [layer for layer in sae_layers if layer not in cache.layers]
    if missing:
        raise MlsaeError(
            f"the SAE in {run} was trained on layer(s) {sae_layers} but the cache {shards} lacks layer {missing[0]}; "
            "use a cache that stores every layer the SAE was trained on"
            + (imported_fix if is_imported(sae) else "")
        )
    sae.layers = sae_layers
    digest = None if is_imported(sae) else weights_digest(run)
    return RunAndCache(sae.eval(), cache, [cache.layers.index(layer) for layer in sae_layers], info, training, digest)


def _check_imported(sae: ImportedDictionary, run: Path, shards: str | Path, cache: Cache) -> list[str]:
    """Other tools' SAEs read the raw residual stream: a cache of tuned-lens activations is refused; a cache of
    another model than the SAEs record is a warning (each tool spells model names its own way). Returns the
    warnings, also printed."""
    if cache.manifest.get("lens"):
        raise MlsaeError(
            f"the cache {shards} holds tuned-lens activations but the imported SAEs in {run} read the raw residual stream; "
            "analyse them on a cache written without --lens"
        )
    cache_model = cache.manifest.get("model")
    recorded = sorted({str(source["model"]) for source in sae.sources if source.get("model")})
    if not cache_model or not recorded:
        return []
    if any(Path(model).name.lower() == Path(str(cache_model)).name.lower() for model in recorded):
        return []
    line = (f"warning: the imported SAEs in {run} record the model {', '.join(recorded)} but the cache {shards} holds "
            f"{cache_model}; if these are different models their metrics mean nothing")  # fmt: skip
    print(line, file=sys.stderr)
    return [line]

"""The model card (the repo's README.md) of a run uploaded by ``mlsae-export hub``: YAML front matter the hub
indexes (library, tags, base model) and a short body made from the run's config.json, the progress recorded with
its weights and, when given, the summary.json of an analysis of it (its test metrics)."""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from mlsae_train.hub import parse_hub_name

PROJECT_URL = "https://arxiv.org/abs/2409.04185"
FAMILIES = {
    "mlsae": "A multi-layer sparse autoencoder (MLSAE): one TopK SAE for the residual stream of every layer",
    "per-layer": "A per-layer suite of TopK sparse autoencoders: one SAE for each layer's residual stream",
    "crosscoder": "An acausal TopK crosscoder: one sparse code per token, read from and written to every layer's residual stream",
}
TEST_METRICS = (  # (summary key in metrics_mean, or at the top level for MMCS; column title)
    ("fvu", "FVU"), ("delta_ce", "delta CE (nats)"), ("kl_per_token", "KL (nats/token)"),
    ("dead_fraction", "dead fraction"), ("mmcs_mean", "MMCS"),
)  # fmt: skip


def is_hub_model_id(model: object) -> bool:
    """Whether ``model`` names a model on the hub (``ORG/NAME``) rather than a local folder or a made-up name."""
    if not isinstance(model, str) or Path(model).exists():
        return False
    name = parse_hub_name(model)
    return name is not None and name.revision is None and name.subfolder is None


def _layers(layers: list[int]) -> str:
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]} ({len(layers)} layers)"
    return ", ".join(map(str, layers)) + f" ({len(layers)} layer{'s' * (len(layers) != 1)})"


def _number(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _training(progress: dict | None, batch_tokens: object) -> str:
    if not progress or "step" not in progress:
        return "not recorded"
    steps, total = int(progress["step"]), int(progress.get("total_steps", progress["step"]))
    tokens = int(progress.get("tokens", 0))
    batch = f" of {batch_tokens:,} tokens" if isinstance(batch_tokens, int) else ""
    if steps >= total:
        return f"{tokens:,} ({steps:,} steps{batch})"
    return f"{tokens:,} (stopped at step {steps:,} of {total:,} steps{batch}: unfinished)"


def _caches(data: list[dict]) -> str:
    parts = []
    for entry in data:
        lens = entry.get("lens")
        lens_text = f"tuned lens `{lens.get('path')}`" if isinstance(lens, dict) else "no tuned lens"
        parts.append(f"{entry.get('n_tokens', 0):,} tokens, layers {_layers(list(entry.get('layers') or []))}, {lens_text}")
    return "; ".join(parts) or "not recorded"


def test_metrics(summary: dict) -> list[tuple[str, str]]:
    """(title, formatted value) of each test metric the analysis measured (mean over layers)."""
    means = summary.get("metrics_mean") or {}
    found = [(title, _number(summary.get(key) if key == "mmcs_mean" else means.get(key))) for key, title in TEST_METRICS]
    return [(title, value) for title, value in found if value is not None]


def model_card(
    repo_id: str, run_info: dict, progress: dict | None, summary: dict | None = None, saelens_folders: list[str] | None = None
) -> str:
    """README.md of the uploaded run ``repo_id``; ``saelens_folders``: the repo's SAELens copies of it (mlsae-export
    hub --saelens), one per layer."""
    sae = run_info.get("sae") or {}
    config = run_info.get("config") or {}
    data = run_info.get("data") or []
    arch = sae.get("arch", "mlsae")
    models = sorted({str(entry.get("model")) for entry in data if entry.get("model")})
    model = models[0] if models else "an unrecorded model"
    d_model, n_latents, k = sae.get("d_model"), sae.get("n_latents"), sae.get("k")
    front: dict = {"library_name": "mlsae", "tags": list(dict.fromkeys(["sparse-autoencoder", "mlsae", arch]))}
    if is_hub_model_id(model):
        front["base_model"] = model
    per = {"per-layer": " per layer's SAE", "crosscoder": ""}.get(arch, "")
    k_unit = "token (shared by its layers)" if arch == "crosscoder" else "token and layer"
    eps = f"{sae.get('eps', 1e-5):.0e}".replace("e-0", "e-")  # 1e-5
    rows = [
        ("language model", f"`{model}`"),
        ("layers", _layers(list(sae.get("layers") or []))),
        ("family (`arch`)", f"`{arch}`"),
        ("d_model", f"{d_model}"),
        ("latents n", f"{n_latents:,}{per} (R = {n_latents // d_model} x d_model)" if d_model and n_latents else "?"),
        ("active latents k", f"{k} per {k_unit}"),
        ("tokens trained", _training(progress, config.get("batch_tokens"))),
        ("training cache", _caches(data)),
        ("input", f"each residual vector standardised, (x - mean) / (std + {eps}) over its d_model entries, and the "
                  "reconstruction mapped back (the SAE works in the standardised space)"),
    ]  # fmt: skip
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {repo_id}", "",
        f"{FAMILIES.get(arch, f'A {arch} sparse dictionary')}. Trained with mlsae ([Lawson et al.]({PROJECT_URL})) on "
        f"`{model}`.", "",
        "| | |", "| --- | --- |", *(f"| {name} | {value} |" for name, value in rows), "",
    ]  # fmt: skip
    if summary is not None and (metrics := test_metrics(summary)):
        tokens = summary.get("n_tokens")
        lines += [
            "## Test metrics", "",
            f"Measured by `mlsae-analyse` on {tokens:,} held-out tokens (means over layers):" if isinstance(tokens, int)
            else "Measured by `mlsae-analyse` on held-out tokens (means over layers):", "",
            "| " + " | ".join(title for title, _ in metrics) + " |", "|" + " --- |" * len(metrics),
            "| " + " | ".join(value for _, value in metrics) + " |", "",
        ]  # fmt: skip
    export = (
        f"mlsae-export saelens {repo_id} --out SAES   # one SAELens SAE per layer, for SAELens-based tools"
        if arch != "crosscoder" else None
    )  # fmt: skip
    lines += [
        "## Use", "",
        "With mlsae installed:", "",
        "```python", "from mlsae_train import load_sae", "",
        f'sae = load_sae("{repo_id}")  # downloaded into the hub cache, every file checked against its checksum',
        "```", "",
        "```bash",
        f"mlsae-analyse --run {repo_id} --shards TEST_CACHE --out ANALYSIS   # TEST_CACHE: an mlsae-cache of {model}",
        *([export] if export else []),
        "```", "",
        *(["A crosscoder has no SAELens equivalent: `mlsae-export saelens` refuses it.", ""] if not export else []),
        *_saelens_use(repo_id, saelens_folders or []),
        "## Files", "",
        "- `config.json`: the run's settings and the identity of its training cache",
        "- `sae.safetensors`: the weights (`W_enc`, `W_dec`, `b_pre`), with the dictionary's config, the training progress "
        "and a checksum in its metadata",
        "- `checksums.json`: the size and digest of every other file here",
        "- `metrics.jsonl`: the training metrics, one line per step (when the run kept them)",
        *([f"- `{saelens_folders[0].rsplit('/', 1)[0]}/`: the same SAE as SAELens TopK SAEs, one folder per layer "
           "(`cfg.json`, `sae_weights.safetensors`)"] if saelens_folders else []),
        "",
        "The training checkpoint (`checkpoint.safetensors`: the Adam state and dead-latent counters that resume "
        "training) is not uploaded: these weights can be used and analysed, not trained further.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _saelens_use(repo_id: str, folders: list[str]) -> list[str]:
    """How SAELens loads the repo's SAELens copies (none: nothing)."""
    if not folders:
        return []
    return [
        f"SAELens loads each layer's SAE straight from this repo ({len(folders)} of them, `{folders[0]}` to "
        f"`{folders[-1]}`):", "",
        "```python", "from sae_lens import SAE", "",
        f'sae = SAE.from_pretrained("{repo_id}", "{folders[0]}")', "```", "",
        "Their input normalisation is SAELens's `layer_norm`, the same per-vector standardisation on the way in; on "
        "the way out SAELens maps back with std where mlsae uses std + eps (a relative change of eps / std).", "",
    ]  # fmt: skip

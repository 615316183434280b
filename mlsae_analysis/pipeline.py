"""The steps of ``mlsae-analyse``: each reads what it is given, writes its own files (named by layout.py)
and returns what the later steps and summary.json need.

    open_inputs       the run, the test cache and the language model, checked against each other
    encode            latents/ and the per-layer sums, in one pass over the cache (encode.py)
    metrics_table     reconstruction and outlier metrics per layer, and the warnings they raise
    downstream_table  delta CE and KL per layer, by splicing reconstructions into the language model
    write_metrics     metrics.csv and its figure
    write_neighbours  neighbours.parquet and mmcs.csv
    write_residual    residual.csv and figs 1 and 4
    layer view        the family's own view of how its latents spread over layers (LAYER_VIEWS)
    write_examples    examples.parquet and token_texts.parquet
    summary_of        summary.json's content

Every step but the layer view holds for any dictionary that reconstructs [N, L, d] from [N, L, d], seen
through its family's :class:`.families.AnalysedFamily` (how its latents are stored and counted). The
layer view is the family's (LAYER_VIEWS, by ``arch``), each writing latent_layers.parquet with the same
leading columns and the heatmap of p_layer_* (latents ordered by E[L | J]):
  mlsae       P(L | J) with ratios 11 and 12 and the single-prompt heatmap (:func:`mlsae_layer_view`)
  per-layer   each latent's own layer (:func:`per_layer_layer_view`)
  crosscoder  decoder-norm shares s_j(l) and their activation-weighted counterpart (:func:`crosscoder_layer_view`)
The crosscoder's delta CE and KL also splice every layer at once (splice_all_layers.csv; downstream.py says
what that measures).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl
import torch
from torch import nn

from mlsae_cache import shard_format as sf
from mlsae_cache.errors import MlsaeError
from mlsae_cache.lens import Lens, load_lens_for_model
from mlsae_cache.lm import d_model_of, load_model, load_tokenizer
from mlsae_train.imported import is_imported
from mlsae_train.screened_topk import use_screen

from . import layout, plots
from .config import AnalyseConfig
from .downstream import downstream_metrics, kept_positions, make_reconstructor
from .encode import encode_cache, scan_latents
from .examples import top_examples
from .families import AnalysedFamily, family_of
from .family_layers import crosscoder_latent_table, per_layer_latent_table, weighted_layer_table
from .files import atomic_write, write_csv, write_parquet
from .inputs import RunAndCache, open_run_and_cache, verify_cache_shards
from .layer_distributions import latent_layer_table, layer_statistics, variance_ratios, write_layer_distributions
from .metrics import NormOutliers, ReconstructionMetrics, concentration_warnings
from .mmcs import mean_and_std
from .neighbours import decoder_neighbours
from .prompt import prompt_latents, prompt_tokens
from .residual import ResidualStatistics
from .single_prompt import single_prompt_layer_table
from .token_texts import context_token_ids, decoded_strings, token_text_table, tokenizer_strings

PER_LAYER_CURVES = ("fvu", "mse", "l1", "l1_per_token", "delta_ce")
DOWNSTREAM_COLUMNS = ("ce_clean", "ce_spliced", "delta_ce", "kl_per_token", "kl_per_sequence")


# ----------------------------------------------------------------------------- inputs


@dataclass
class LanguageModel:
    """The model the cache was made from, for splicing and the single prompt."""

    model: nn.Module
    tokenizer: Any
    lens: Lens | None


@dataclass
class AnalysisInputs:
    """What every step may read: the options, the run and cache, and the language model (None with --no-downstream)."""

    config: AnalyseConfig
    data: RunAndCache
    n_tokens: int
    """The first n_tokens tokens of the cache are analysed."""
    screen: bool
    """Whether top-k latents are picked through the exact bfloat16 screen."""
    lm: LanguageModel | None
    family: AnalysedFamily
    """How the analysis sees the dictionary's family (families.py)."""

    @property
    def layers(self) -> list[int]:
        return self.data.layers

    @property
    def model_label(self) -> str:
        """The model's short name (the last part of its path or hub id)."""
        return Path(str(self.data.cache.manifest.get("model"))).name


def _load_language_model(config: AnalyseConfig, data: RunAndCache) -> LanguageModel | None:
    """The language model, tokenizer and lens for splicing and the prompt; None with --no-downstream."""
    if not config.downstream:
        return None
    name = config.model or data.cache.manifest.get("model")
    if not name:
        raise MlsaeError("the cache does not record its model; pass --model (or --no-downstream)")
    tokenizer = load_tokenizer(str(name))
    prompt_tokens(config.prompt, tokenizer)  # refuse an empty prompt before any long work
    model = load_model(str(name), device=config.device)
    if d_model_of(model) != data.sae.d_model:
        raise MlsaeError(
            f"model {name} has width {d_model_of(model)} but the SAE has {data.sae.d_model}; pass the model the cache was made from"
        )
    lens_entry = data.cache.manifest.get("lens")
    lens: Lens | None = None
    if lens_entry:
        lens = load_lens_for_model(lens_entry["path"], model, str(name))
        if lens.sha256 != lens_entry.get("params_sha256"):
            raise MlsaeError(f"the lens at {lens_entry['path']} changed since the cache was written; restore it or rebuild the cache")
    return LanguageModel(model, tokenizer, lens)


def open_inputs(config: AnalyseConfig) -> AnalysisInputs:
    """Open and check the run, the cache (its shards verified unless --no-verify) and the language model."""
    config.check()
    data = open_run_and_cache(config.run, config.shards, config.allow_unfinished)
    family = family_of(data.sae)  # a family the analysis does not know is refused before any long work
    n_tokens = data.cache.n_tokens if config.max_tokens is None else min(config.max_tokens, data.cache.n_tokens)
    if config.verify:  # a damaged shard would pass for data: MSE 30x off, exit 0
        verify_cache_shards(data.cache, n_tokens, config.progress)
    lm = _load_language_model(config, data)
    data.sae = data.sae.to(config.device)
    return AnalysisInputs(config, data, n_tokens, use_screen(config.screen, config.device), lm, family)


# ----------------------------------------------------------------------------- the encode pass


@dataclass
class Encoded:
    """The encode pass's results: the sparse latents stored in ``folder`` and the per-layer sums taken on the way."""

    folder: Path
    recon: ReconstructionMetrics
    residual: ResidualStatistics
    outliers: NormOutliers

    def latents(self) -> pl.LazyFrame:
        """token, layer, latent, activation: the active latents, lazily, in token order."""
        return scan_latents(self.folder / layout.LATENTS_DIR)

    def tokens(self) -> pl.LazyFrame:
        """token, sequence, position, token_id of every analysed token."""
        return pl.scan_parquet(self.folder / layout.TOKENS)


def encode(inputs: AnalysisInputs, out: Path) -> Encoded:
    """Encode the analysed tokens into latents/, summing the reconstruction, residual and outlier statistics."""
    data, sae = inputs.data, inputs.data.sae
    recon = ReconstructionMetrics(len(inputs.layers), sae.d_model, sae.n_latents)
    outliers = NormOutliers(len(inputs.layers), inputs.n_tokens)
    residual = ResidualStatistics(inputs.layers, data.cache.layer_means()[data.layer_columns])  # means [nL, d]
    config = inputs.config
    encode_cache(data, out, inputs.n_tokens, [recon, residual, outliers], config.batch_tokens, config.device, config.progress,
                 inputs.screen)  # fmt: skip
    return Encoded(out, recon, residual, outliers)


# ----------------------------------------------------------------------------- metrics.csv (Table 1, figs 9-11)


def metrics_table(inputs: AnalysisInputs, encoded: Encoded) -> tuple[pl.DataFrame, list[str]]:
    """Per layer (layer, layer_index, the reconstruction metrics, the outlier columns) and the warnings
    about layers whose variance a few tokens carry (also printed on stderr). L0 and L1 are named by what
    they count: ``l0``, ``l1`` per (token, layer) vector, ``l0_per_token``, ``l1_per_token`` for a crosscoder."""
    data = inputs.data
    outlier_columns = encoded.outliers.per_layer(encoded.recon, lambda ids: data.cache.read(ids, data.layer_columns))
    layers = inputs.layers
    recon = encoded.recon.per_layer()
    if inputs.family.sparsity_unit == "token":
        recon = {("l0_per_token" if k == "l0" else "l1_per_token" if k == "l1" else k): v for k, v in recon.items()}
    per_layer = pl.DataFrame({"layer": layers, "layer_index": list(range(len(layers))), **recon, **outlier_columns})
    warnings = concentration_warnings(layers, outlier_columns["var_share_top_1pct"], inputs.n_tokens)
    for line in warnings:
        print(line, file=sys.stderr)
    return per_layer, warnings


@dataclass
class Downstream:
    """Delta CE and KL: per layer, and (crosscoder) with every layer spliced at once."""

    per_layer: pl.DataFrame
    """layer_index and DOWNSTREAM_COLUMNS per layer (NaN with --no-downstream)."""
    all_layers: dict | None
    """DOWNSTREAM_COLUMNS with every analysed layer spliced in one pass (None: not measured)."""
    n_sequences: int | None
    """Sequences spliced (None with --no-downstream)."""


def splices_all_layers(inputs: AnalysisInputs) -> bool:
    """Whether the family's downstream metrics include every layer spliced at once: the crosscoder's, which
    reconstructs all layers of a token from one latent vector."""
    return inputs.family.arch == "crosscoder"


def downstream_table(inputs: AnalysisInputs, encoded: Encoded) -> Downstream:
    """Splice each layer's reconstruction into the language model over the first --downstream-sequences
    sequences (and, for the crosscoder, all layers at once)."""
    if inputs.lm is None:
        nan = [float("nan")] * len(inputs.layers)
        return Downstream(pl.DataFrame({"layer_index": list(range(len(inputs.layers))), **{c: nan for c in DOWNSTREAM_COLUMNS}}),
                          None, None)  # fmt: skip
    config, cache, lm = inputs.config, inputs.data.cache, inputs.lm
    tokens = encoded.tokens().collect()
    sequences = np.unique(tokens["sequence"].to_numpy())
    if config.downstream_sequences is not None:
        sequences = sequences[: config.downstream_sequences]
    seq_len = int(cache.manifest["seq_len"])
    input_ids = torch.from_numpy(cache.sequence_tokens(sequences))  # [N, S]
    kept = kept_positions(tokens, sequences, seq_len)  # [N, S]
    reconstruct = make_reconstructor(inputs.data.sae, inputs.layers, lm.lens)
    splice_all = splices_all_layers(inputs)
    spliced = downstream_metrics(lm.model, input_ids, kept, inputs.layers, reconstruct, config.lm_batch_size, config.progress,
                                 splice_all=splice_all)  # fmt: skip
    per_layer = spliced.filter(pl.col("layer_index").is_not_null()).drop("layer")
    all_layers = spliced.filter(pl.col("layer_index").is_null()).select(DOWNSTREAM_COLUMNS).row(0, named=True) if splice_all else None
    return Downstream(per_layer, all_layers, len(sequences))


def write_splice_all_layers(out: Path, downstream: Downstream) -> None:
    """splice_all_layers.csv: delta CE and KL with every analysed layer spliced at once (when measured)."""
    if downstream.all_layers is not None:
        write_csv(pl.DataFrame([downstream.all_layers]), out / layout.SPLICE_ALL_LAYERS)


def _with_mean_row(per_layer: pl.DataFrame, dead_any: float) -> pl.DataFrame:
    """Per-layer rows plus a `mean` row (every column the mean over layers); `dead_every_layer`, the
    fraction of latents never active at any layer, is set on the mean row only (metrics.py)."""
    numeric = [c for c in per_layer.columns if c not in ("layer", "layer_index")]  # fmt: skip
    per_layer = per_layer.with_columns(dead_every_layer=pl.lit(float("nan")))
    mean_row = per_layer.select(pl.col(numeric).mean()).with_columns(dead_every_layer=pl.lit(dead_any))
    rows = per_layer.with_columns(pl.col("layer").cast(pl.String)).drop("layer_index")
    return pl.concat([rows, mean_row.with_columns(layer=pl.lit("mean")).select(rows.columns)], how="vertical_relaxed")


def write_metrics(out: Path, per_layer: pl.DataFrame, dead_any: float) -> dict:
    """metrics.csv (per layer and mean) and the per-layer curves; returns the mean row, less its name."""
    table = _with_mean_row(per_layer, dead_any)
    write_csv(table, out / layout.METRICS)
    curves = [c for c in PER_LAYER_CURVES if c in per_layer.columns and per_layer[c].is_not_nan().any()]
    plots.plot_per_layer_curves(per_layer, curves, out / layout.METRICS_FIGURE, series=None, log_metrics=("mse",))
    return {k: v for k, v in table.row(-1, named=True).items() if k != "layer"}


# ----------------------------------------------------------------------------- decoder neighbours, MMCS (Table 2)


def write_neighbours(inputs: AnalysisInputs, out: Path) -> tuple[float, float]:
    """neighbours.parquet (the page's latent browser) and mmcs.csv from one chunked search per dictionary
    of the family (families.py: each per-layer SAE on its own): each latent's most similar other decoder
    row is its rank-0 neighbour. Returns MMCS (mean, std) over all the family's latents."""
    sae, config = inputs.data.sae, inputs.config
    parts = []
    for first_id, rows in inputs.family.decoder_groups(sae):
        found = decoder_neighbours(rows, chunk_size=config.mmcs_chunk, progress=config.progress, screen=inputs.screen)
        parts.append(found.with_columns(pl.col("latent") + first_id, pl.col("neighbour") + first_id))
    neighbours = pl.concat(parts)
    write_parquet(neighbours, out / layout.NEIGHBOURS)
    nearest = neighbours.filter(pl.col("rank") == 0).sort("latent")["cosine"]
    mmcs_mean, mmcs_std = mean_and_std(torch.tensor(nearest.to_numpy()))
    n_latents = inputs.family.total_latents(sae)
    write_csv(pl.DataFrame({"n_latents": [n_latents], "mmcs_mean": [mmcs_mean], "mmcs_std": [mmcs_std]}), out / layout.MMCS)
    return mmcs_mean, mmcs_std


# ----------------------------------------------------------------------------- residual stream (figs 1, 4)


def write_residual(encoded: Encoded, out: Path) -> None:
    """residual.csv, the adjacent-layer cosine curve and the mean-norm curve."""
    table = encoded.residual.table()
    write_csv(table, out / layout.RESIDUAL)
    n_layers = table.height
    plots.plot_per_layer_curves(table.head(max(n_layers - 1, 1)), ["cos_next"], out / layout.RESIDUAL_COS_NEXT_FIGURE, series=None)
    plots.plot_per_layer_curves(table, ["mean_norm"], out / layout.RESIDUAL_NORM_FIGURE, layer="layer_index", series=None,
                                relative_layer=True)  # fmt: skip


# ----------------------------------------------------------------------------- the family's view of layers


LayerView = Callable[[AnalysisInputs, Encoded, Path], dict]
"""(inputs, encoded, out) -> the view's entries of summary.json, after writing its files into out."""


def mlsae_layer_view(inputs: AnalysisInputs, encoded: Encoded, out: Path) -> dict:
    """The MLSAE's: eq. 10 per (token, latent), P(L | J) per latent and its heatmap (fig 2), variance
    ratios 11 and 12 (fig 5), and the single-prompt heatmap (fig 3)."""
    latents = encoded.latents()
    atomic_write(out / layout.LAYER_DISTRIBUTIONS, lambda tmp: write_layer_distributions(latents, tmp))
    stats = layer_statistics(latents, len(inputs.layers))
    latent_table = latent_layer_table(stats)
    write_parquet(latent_table, out / layout.LATENT_LAYERS)
    sae, label = inputs.data.sae, inputs.model_label
    lens_note = " + tuned lens" if inputs.data.cache.manifest.get("lens") else ""
    heatmap_title = f"{label}{lens_note}, R={sae.n_latents // sae.d_model}, k={sae.k}: P(L | J) over {inputs.n_tokens:,} tokens"
    plots.plot_layer_heatmap(latent_table, out / layout.HEATMAP_FIGURE, title=heatmap_title)
    ratios = variance_ratios(stats)
    ratios_table = pl.DataFrame([{"model": label, **ratios}])
    write_csv(ratios_table, out / layout.VARIANCE_RATIOS)
    plots.plot_variance_ratios(ratios_table, out / layout.VARIANCE_RATIOS_FIGURE)
    write_single_prompt(inputs, out)
    return {"variance_ratios": ratios}


def write_single_prompt(inputs: AnalysisInputs, out: Path) -> None:
    """single_prompt.csv and its heatmap (fig 3): P(L | prompt, J) of the latents active on --prompt."""
    if inputs.lm is None:
        return
    lm, prompt = inputs.lm, inputs.config.prompt
    rows, _texts = prompt_latents(prompt, lm.tokenizer, lm.model, inputs.data.sae, inputs.layers, lm.lens)
    table = single_prompt_layer_table(rows, len(inputs.layers))
    write_csv(table, out / layout.SINGLE_PROMPT)
    if table.height:
        plots.plot_layer_heatmap(table, out / layout.SINGLE_PROMPT_FIGURE, title=f"Single prompt: \"{prompt}\"",
                                 value_label="P(L = layer | prompt, J)")  # fmt: skip


def _heatmap_title(inputs: AnalysisInputs, what: str) -> str:
    sae, label = inputs.data.sae, inputs.model_label
    lens_note = " + tuned lens" if inputs.data.cache.manifest.get("lens") else ""
    return f"{label}{lens_note}, {sae.arch} R={sae.n_latents // sae.d_model}, k={sae.k}: {what}"


def per_layer_layer_view(inputs: AnalysisInputs, encoded: Encoded, out: Path) -> dict:
    """The per-layer suite's: each latent in its own SAE's layer (latent_layers.parquet, one-hot; its heatmap)."""
    sae = inputs.data.sae
    table = per_layer_latent_table(encoded.latents(), len(inputs.layers), sae.n_latents)
    write_parquet(table, out / layout.LATENT_LAYERS)
    plots.plot_layer_heatmap(table, out / layout.HEATMAP_FIGURE, title=_heatmap_title(inputs, "each latent's layer"),
                             value_label="latent of this layer's SAE")  # fmt: skip
    return {"layer_view": "each latent of SAE l lives in layer l (latent id l*n + j)"}


def crosscoder_layer_view(inputs: AnalysisInputs, encoded: Encoded, out: Path) -> dict:
    """The crosscoder's (SPEC 9): s_j(l) = ||W_dec[j, l]||^2 per latent, E[L | J] = sum_l l s_j(l), and the
    activation-weighted share over the test tokens (family_layers.py), with a heatmap of each."""
    table = crosscoder_latent_table(encoded.latents(), inputs.data.sae.W_dec)
    write_parquet(table, out / layout.LATENT_LAYERS)
    plots.plot_layer_heatmap(table, out / layout.HEATMAP_FIGURE, value_label="s_j(l) = ||W_dec[j, l]||^2",
                             title=_heatmap_title(inputs, "decoder-norm share per layer, all latents by E[L | J]"))  # fmt: skip
    weighted = weighted_layer_table(table)
    if weighted.height:
        what = f"activation-weighted share, active latents by E[L | J], {inputs.n_tokens:,} tokens"
        plots.plot_layer_heatmap(weighted, out / layout.WEIGHTED_HEATMAP_FIGURE, value_label="activation-weighted share",
                                 title=_heatmap_title(inputs, what))  # fmt: skip
    active = table.filter(pl.col("n_tokens") > 0)["mean_layer"]
    return {
        "layer_view": "decoder-norm share s_j(l) = ||W_dec[j, l]||^2 and its activation-weighted counterpart",
        "mean_expected_layer": float(table["mean_layer"].mean()),  # type: ignore[arg-type]  # E_J[E[L | J]], all latents
        "mean_expected_layer_active": float(active.mean()) if active.len() else None,  # type: ignore[arg-type]
    }


LAYER_VIEWS: dict[str, LayerView] = {"mlsae": mlsae_layer_view, "per-layer": per_layer_layer_view, "crosscoder": crosscoder_layer_view}


def layer_view_of(sae: nn.Module) -> LayerView:
    """The layer view of the dictionary's family (its ``arch``)."""
    arch = sae.arch
    if arch not in LAYER_VIEWS:
        raise MlsaeError(f"mlsae-analyse cannot analyse a {arch} dictionary (it analyses {', '.join(LAYER_VIEWS)}); "
                         "analyse a run trained by this mlsae-train")  # fmt: skip
    return LAYER_VIEWS[arch]


# ----------------------------------------------------------------------------- examples (the latent browser)


def write_examples(inputs: AnalysisInputs, encoded: Encoded, out: Path) -> None:
    """examples.parquet (each latent's top activating tokens with context) and token_texts.parquet
    (the text of every token in those contexts, so that the page needs no tokenizer)."""
    config = inputs.config
    examples = top_examples(encoded.latents(), encoded.tokens(), config.n_examples, config.context_tokens)
    if inputs.lm is not None:
        strings = decoded_strings(inputs.lm.tokenizer)
        examples = examples.with_columns(
            context_text=pl.Series([inputs.lm.tokenizer.decode(ids) for ids in examples["context_ids"].to_list()], dtype=pl.String)
        )
    else:  # --no-downstream loads no model; the tokenizer alone is cheap (without one: ids, with a warning)
        strings = tokenizer_strings(config.model or inputs.data.cache.manifest.get("model"), fix=None)
    write_parquet(examples, out / layout.EXAMPLES)
    write_parquet(token_text_table(context_token_ids(examples), strings), out / layout.TOKEN_TEXTS)


# ----------------------------------------------------------------------------- summary.json


def _manifest_digest(cache_dir: str | Path) -> str | None:
    """The digest a cache's manifest records of itself (None: no readable manifest there)."""
    try:
        return json.loads((Path(cache_dir) / sf.MANIFEST).read_text()).get(sf.MANIFEST_DIGEST)
    except (OSError, ValueError, AttributeError):
        return None


def train_data_of(run_info: dict) -> list[dict] | None:
    """The caches the run was trained on: its config.json ``data`` entries, each with the cache's ``path``
    (``--shards`` as given, made absolute when it exists from here) and its manifest's ``digest``
    (None when that cache cannot be read from here). None when the run records no data (bare weights)."""
    entries = run_info.get("data")
    if not entries:
        return None
    shards = (run_info.get("config") or {}).get("shards") or [None] * len(entries)
    out = []
    for entry, path in zip(entries, shards):
        located = Path(path).resolve() if path and Path(path).exists() else path
        out.append({**entry, "path": None if located is None else str(located),
                    "digest": _manifest_digest(located) if located else None})  # fmt: skip
    return out


def summary_of(
    inputs: AnalysisInputs, metrics_mean: dict, mmcs: tuple[float, float], layer_view: dict, warnings: list[str],
    downstream: Downstream | None = None,
) -> dict:
    """summary.json: what was analysed and how (the family, its training and test caches, the spliced
    sequences; for other tools' SAEs, where they came from and how their normalisation differs), the mean
    metrics, MMCS, the layer view's entries, the warnings."""
    config, data, sae = inputs.config, inputs.data, inputs.data.sae
    imported = imported_record(sae)
    return {
        # a hub name (ORG/NAME) as given: compare and the HTML page reach the run through it again
        "run": str(Path(config.run).resolve()) if Path(config.run).exists() else config.run,
        "weights_digest": data.weights_digest,  # which weights: tells apart runs of equal settings
        "arch": sae.arch,
        "cache": str(Path(config.shards).resolve()),
        "cache_digest": data.cache.manifest.get(sf.MANIFEST_DIGEST),
        "train_data": train_data_of(data.run_info),
        "model": data.cache.manifest.get("model"),
        "lens": data.cache.manifest.get("lens"),
        "layers": inputs.layers,
        "d_model": sae.d_model,
        "n_latents": sae.n_latents,
        "expansion_factor": sae.n_latents // sae.d_model,
        "k": sae.k,
        "latents_total": inputs.family.total_latents(sae),
        "sparsity_unit": inputs.family.sparsity_unit,
        "n_tokens": inputs.n_tokens,
        "downstream_sequences": None if downstream is None else downstream.n_sequences,
        "splice_all_layers": None if downstream is None else downstream.all_layers,
        "encode_kernel": "bfloat16 screen + float32 candidates" if inputs.screen else "float32",
        "metrics_mean": metrics_mean,
        "mmcs_mean": mmcs[0],
        "mmcs_std": mmcs[1],
        **layer_view,
        "training": data.training,  # steps and tokens trained and planned (null: not recorded with the weights)
        "imported": imported,  # null: trained by mlsae-train
        "warnings": [*data.run_info.get("warnings", []), *warnings] if imported else warnings,  # imported: the model check's too
    }


def imported_record(sae: nn.Module) -> dict | None:
    """For other tools' SAEs (an :class:`~mlsae_train.imported.ImportedDictionary`: one per layer, or one shared
    by all): their formats, each SAE's source and how their input normalisation differs from ours; None for our own
    dictionaries."""
    if not is_imported(sae):
        return None
    formats = sorted({str(source.get("format")) for source in sae.sources})
    return {"formats": formats, "sources": sae.sources, "normalisation": sae.normalisation}

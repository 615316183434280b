"""``mlsae-analyse``: evaluate one trained MLSAE on a held-out cache (tables and figures of the paper).

Everything is written into a temporary sibling of ``--out`` that is renamed to ``--out`` at the very
end, so ``--out`` either holds a complete analysis or does not exist. ``mlsae-analyse report ...``
gathers several analysed runs (see report.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl
import torch

from mlsae_cache.clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files
from mlsae_cache.lens import Lens, load_lens_for_model
from mlsae_cache.lm import d_model_of, load_model, load_tokenizer
from mlsae_cache.path_kinds import require_cache_path, require_run_path
from mlsae_train.screened_topk import use_screen

from . import plots
from .config import AnalyseConfig
from .downstream import downstream_metrics, kept_positions, make_reconstructor
from .encode import TOKENS_FILE, encode_cache, scan_latents
from .examples import top_examples
from .files import atomic_write, write_csv, write_fresh_directory, write_parquet
from .html_report import write_analysis_html
from .inputs import RunAndCache, open_run_and_cache, verify_cache_shards
from .layer_distributions import latent_layer_table, layer_statistics, variance_ratios, write_layer_distributions
from .metrics import NormOutliers, ReconstructionMetrics, concentration_warnings
from .mmcs import mean_and_std
from .neighbours import NEIGHBOURS_FILE, decoder_neighbours
from .prompt import prompt_latents, prompt_tokens
from .residual import ResidualStatistics
from .single_prompt import single_prompt_layer_table

PER_LAYER_CURVES = ("fvu", "mse", "l1", "delta_ce")
# an analysis stopped half-way keeps nothing (--out appears only complete): what Ctrl-C and a full disk say
NOTHING_KEPT = "nothing was kept (--out is written only once the analysis has finished); run the same command again to start over"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="mlsae-analyse",
        description="Evaluate a trained MLSAE on a held-out cache: metrics, MMCS, residual statistics, "
        "distributions over layers, figures. `mlsae-analyse report RUN_OUT... --out DIR` compares analysed runs.",
    )
    add_dataclass_arguments(parser, AnalyseConfig)
    return parser


def _load_language_model(config: AnalyseConfig, data: RunAndCache):
    """(model, tokenizer, lens) for splicing and the prompt, or Nones with --no-downstream."""
    if not config.downstream:
        return None, None, None
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
    return model, tokenizer, lens


def _metrics_table(per_layer: pl.DataFrame, dead_any: float) -> pl.DataFrame:
    """Per-layer rows plus a `mean` row (every column the mean over layers); `dead_every_layer`, the
    fraction of latents never active at any layer, is set on the mean row only (metrics.py)."""
    numeric = [c for c in per_layer.columns if c not in ("layer", "layer_index")]
    per_layer = per_layer.with_columns(dead_every_layer=pl.lit(float("nan")))
    mean_row = per_layer.select(pl.col(numeric).mean()).with_columns(dead_every_layer=pl.lit(dead_any))
    rows = per_layer.with_columns(pl.col("layer").cast(pl.String)).drop("layer_index")
    return pl.concat([rows, mean_row.with_columns(layer=pl.lit("mean")).select(rows.columns)], how="vertical_relaxed")


def analyse(config: AnalyseConfig, out: Path) -> dict:
    """Write every output into ``out`` (a fresh directory); returns the summary."""
    config.check()
    data = open_run_and_cache(config.run, config.shards, config.allow_unfinished)
    n_tokens = data.cache.n_tokens if config.max_tokens is None else min(config.max_tokens, data.cache.n_tokens)
    if config.verify:  # a damaged shard would pass for data: MSE 30x off, exit 0
        verify_cache_shards(data.cache, n_tokens, config.progress)
    model, tokenizer, lens = _load_language_model(config, data)
    layers = data.layers
    n_layers = len(layers)
    sae = data.sae.to(config.device)

    out.mkdir(parents=True)
    recon = ReconstructionMetrics(n_layers, sae.d_model, sae.n_latents)
    outliers = NormOutliers(n_layers, n_tokens)
    layer_means = data.cache.layer_means()[data.layer_columns]  # [nL, d]
    residual = ResidualStatistics(layers, layer_means)
    screen = use_screen(config.screen, config.device)
    latents_dir = encode_cache(
        data, out, n_tokens, [recon, residual, outliers], config.batch_tokens, config.device, config.progress, screen
    )

    # metrics.csv (Table 1) and figs 9-11
    outlier_columns = outliers.per_layer(recon, lambda ids: data.cache.read(ids, data.layer_columns))
    per_layer = pl.DataFrame({"layer": layers, "layer_index": list(range(n_layers)), **recon.per_layer(), **outlier_columns})
    warnings = concentration_warnings(layers, outlier_columns["var_share_top_1pct"], n_tokens)
    for line in warnings:
        print(line, file=sys.stderr)
    if model is not None:
        tokens = pl.read_parquet(latents_dir / TOKENS_FILE)
        sequences = np.unique(tokens["sequence"].to_numpy())
        if config.downstream_sequences is not None:
            sequences = sequences[: config.downstream_sequences]
        seq_len = int(data.cache.manifest["seq_len"])
        input_ids = torch.from_numpy(data.cache.sequence_tokens(sequences))  # [N, S]
        kept = kept_positions(tokens, sequences, seq_len)  # [N, S]
        spliced = downstream_metrics(
            model, input_ids, kept, layers, make_reconstructor(sae, layers, lens), config.lm_batch_size, config.progress
        )
        per_layer = per_layer.join(spliced.drop("layer"), on="layer_index")
    else:
        per_layer = per_layer.with_columns(
            [pl.lit(float("nan")).alias(c) for c in ("ce_clean", "ce_spliced", "delta_ce", "kl_per_token", "kl_per_sequence")]
        )
    write_csv(_metrics_table(per_layer, recon.dead_fraction_any_layer()), out / "metrics.csv")
    curves = [c for c in PER_LAYER_CURVES if per_layer[c].is_not_nan().any()]
    plots.plot_per_layer_curves(per_layer, curves, out / "metrics", series=None, log_metrics=("mse",))

    # neighbours.parquet (the HTML browser) and mmcs.csv (Table 2) from one chunked search:
    # each latent's most similar other decoder row is its rank-0 neighbour
    neighbours = decoder_neighbours(sae.W_dec.detach(), chunk_size=config.mmcs_chunk, progress=config.progress, screen=screen)
    write_parquet(neighbours, out / NEIGHBOURS_FILE)
    nearest = neighbours.filter(pl.col("rank") == 0).sort("latent")["cosine"]
    mmcs_mean, mmcs_std = mean_and_std(torch.tensor(nearest.to_numpy()))
    write_csv(pl.DataFrame({"n_latents": [sae.n_latents], "mmcs_mean": [mmcs_mean], "mmcs_std": [mmcs_std]}), out / "mmcs.csv")

    # residual.csv, figs 1 and 4
    residual_table = residual.table()
    write_csv(residual_table, out / "residual.csv")
    plots.plot_per_layer_curves(residual_table.head(max(n_layers - 1, 1)), ["cos_next"], out / "residual_cos_next", series=None)
    plots.plot_per_layer_curves(residual_table, ["mean_norm"], out / "residual_norm", layer="layer_index", series=None, relative_layer=True)

    # distributions over layers: eq. 10 per (token, latent, layer), per-latent table (fig 2), ratios (fig 5)
    latents = scan_latents(latents_dir)
    atomic_write(out / "layer_distributions.parquet", lambda tmp: write_layer_distributions(latents, tmp))
    stats = layer_statistics(latents, n_layers)
    latent_table = latent_layer_table(stats)
    write_parquet(latent_table, out / "latent_layers.parquet")
    label = Path(str(data.cache.manifest.get("model"))).name
    lens_note = " + tuned lens" if data.cache.manifest.get("lens") else ""
    heatmap_title = f"{label}{lens_note}, R={sae.n_latents // sae.d_model}, k={sae.k}: P(L | J) over {n_tokens:,} tokens"
    plots.plot_layer_heatmap(latent_table, out / "heatmap", title=heatmap_title)
    ratios = variance_ratios(stats)
    ratios_table = pl.DataFrame([{"model": label, **ratios}])
    write_csv(ratios_table, out / "variance_ratios.csv")
    plots.plot_variance_ratios(ratios_table, out / "variance_ratios")

    # single-prompt heatmap (fig 3)
    if model is not None:
        rows, texts = prompt_latents(config.prompt, tokenizer, model, sae, layers, lens)
        prompt_table = single_prompt_layer_table(rows, n_layers)
        write_csv(prompt_table, out / "single_prompt.csv")
        if prompt_table.height:
            plots.plot_layer_heatmap(prompt_table, out / "single_prompt", title=f"Single prompt: \"{config.prompt}\"",
                                     value_label="P(L = layer | prompt, J)")  # fmt: skip

    # examples.parquet
    examples = top_examples(latents, pl.scan_parquet(latents_dir / TOKENS_FILE), config.n_examples, config.context_tokens)
    if tokenizer is not None:
        examples = examples.with_columns(
            context_text=pl.Series([tokenizer.decode(ids) for ids in examples["context_ids"].to_list()], dtype=pl.String)
        )
    write_parquet(examples, out / "examples.parquet")

    mean = _metrics_table(per_layer, recon.dead_fraction_any_layer()).row(-1, named=True)
    summary = {
        "run": str(Path(config.run).resolve()),
        "cache": str(Path(config.shards).resolve()),
        "model": data.cache.manifest.get("model"),
        "lens": data.cache.manifest.get("lens"),
        "layers": layers,
        "d_model": sae.d_model,
        "n_latents": sae.n_latents,
        "expansion_factor": sae.n_latents // sae.d_model,
        "k": sae.k,
        "n_tokens": n_tokens,
        "encode_kernel": "bfloat16 screen + float32 candidates" if screen else "float32",
        "metrics_mean": {k: v for k, v in mean.items() if k != "layer"},
        "mmcs_mean": mmcs_mean,
        "mmcs_std": mmcs_std,
        "variance_ratios": ratios,
        "training": data.training,  # steps and tokens trained and planned (null: not recorded with the weights)
        "warnings": warnings,
    }
    atomic_write(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1, default=float) + "\n"))
    record_files(out)  # checksums.json, after every file it covers; readers (report, HTML) verify against it
    return summary


def _analyse_main(argv: Sequence[str] | None) -> int:
    config: AnalyseConfig = config_from_args(AnalyseConfig, build_parser().parse_args(argv))
    out = Path(config.out)
    config.check()
    require_run_path(config.run)  # a path of the wrong kind is named as such, before --out is touched
    require_cache_path(config.shards, "--shards")

    def fill(partial: Path) -> None:
        analyse(config, partial)
        write_analysis_html(partial, progress=config.progress)

    write_fresh_directory(out, fill)
    print(f"wrote {out} (open {out / 'report.html'} in a browser)", file=sys.stderr)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from .report import report_main

        return report_main(argv[1:])
    return _analyse_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv, resumes=NOTHING_KEPT)


if __name__ == "__main__":
    sys.exit(main())

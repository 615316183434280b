"""``mlsae-analyse report RUN_OUT... --out DIR``: the paper's cross-run tables and figures.

Each RUN_OUT is a directory written by ``mlsae-analyse`` (summary.json, metrics.csv, and for the
heatmaps latent_layers.parquet). Runs are grouped by model, ordered by size (the size in the model's
name, e.g. pythia-70m < pythia-160m < pythia-1b; else about 12 nL d^2 parameters), standard before
tuned lens, then by expansion factor R and sparsity k. Tables 1 and 2 and fig. 5 compare models at one
reference (R, k): the pair most (model, lens) groups were run with (ties: the centre of the sweeps over
R and k, then the more runs, then the larger R and k). Parts whose inputs are absent (no tuned-lens
run, no sweep over R or k) are left out.

Writes into --out (tables as CSV, figures as PNG + PDF):
  tables.csv                       one row per run: configuration, mean metrics, MMCS, ratios 11 and 12
  table1.csv                       Table 1: mean FVU, MSE, L1, delta CE, KL (rows) per model (columns), per variant
  table2.csv                       Table 2: MMCS mean and std per model and variant
  variance_ratios.csv/.png         fig. 5: ratios 11 and 12 per model, standard and tuned lens
  variance_ratios_vs_expansion_factor.png, variance_ratios_vs_k.png   fig. 6: the ratios against R or k (log2)
  mmcs_vs_expansion_factor.png, mmcs_vs_k.png                         fig. 13: MMCS against R or k (log2)
  heatmaps.png                     aggregate heatmaps P(L | J) of every run (figs. 2 and 7), lens variants side by side
  per_layer.csv/.png               FVU, MSE, L1, delta CE against relative layer, one line per run (figs. 9-11)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Sequence

import polars as pl

from mlsae_cache.clitools import OneLineErrorParser
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files

from . import layout, plots
from .files import write_csv, write_fresh_directory
from .html_report import write_sweep_html

STANDARD, TUNED_LENS = "standard", "tuned lens"
SWEPT = ("expansion_factor", "k")
SYMBOL = {"expansion_factor": "R", "k": "k"}
SWEEP_NAME = {"expansion_factor": "expansion factor R", "k": "sparsity k"}
# Table 1's rows: (column of metrics.csv / summary, the paper's name).
TABLE1_METRICS = (
    ("fvu", "FVU"),
    ("mse", "MSE"),
    ("l1", "L1 norm"),
    ("delta_ce", "Delta CE loss"),
    ("kl_per_sequence", "KL divergence (per sequence)"),
    ("kl_per_token", "KL divergence (per token)"),
)
PER_LAYER_METRICS = ("fvu", "mse", "l1", "delta_ce")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kmb])(?![a-z])", re.IGNORECASE)
_SCALE = {"k": 1e3, "m": 1e6, "b": 1e9}


def model_size(name: str, n_layers: int, d_model: int) -> float:
    """Parameters, from the last size in the name (``pythia-70m`` -> 7e7, ``SmolLM2-135M`` -> 1.35e8),
    else the transformer blocks' 12 nL d^2."""
    sizes = _SIZE.findall(name)
    if sizes:
        number, unit = sizes[-1]
        return float(number) * _SCALE[unit.lower()]
    return 12.0 * n_layers * d_model**2


def mlsae_analyses(run_dirs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(the MLSAE analyses, the others): the paper's tables are over P(L | J) and the variance ratios,
    which only the MLSAE has. Analyses written before the families record no arch: MLSAEs."""
    mlsae, others = [], []
    for run_dir in map(Path, run_dirs):
        (mlsae if (layout.read_summary(run_dir).get("arch") or "mlsae") == "mlsae" else others).append(run_dir)
    return mlsae, others


def read_runs(run_dirs: Sequence[Path]) -> pl.DataFrame:
    """One row per analysed run, sorted by variant, model size, R, k: the data of every table."""
    rows = []
    for run_dir in map(Path, run_dirs):
        summary = layout.read_summary(run_dir)
        arch = summary.get("arch") or "mlsae"  # analyses written before the families are MLSAEs'
        if arch != "mlsae":  # its tables are the paper's, over P(L | J) and the variance ratios only the MLSAE has
            raise MlsaeError(f"{run_dir} is an analysis of a {arch} run; mlsae-analyse report gathers MLSAE analyses "
                             "(set families side by side with mlsae-analyse compare ANALYSIS... --out DIR)")  # fmt: skip
        try:
            rows.append(_run_row(run_dir, summary))
        except KeyError as missing:
            summary_file = run_dir / layout.SUMMARY
            raise MlsaeError(f"{summary_file} lacks {missing}; analyse that run again with this mlsae-analyse") from None
    runs = pl.DataFrame(rows).sort("variant", "model_size", "model", "expansion_factor", "k", maintain_order=True)
    lens = pl.when(pl.col("variant") == TUNED_LENS).then(pl.lit(" + lens")).otherwise(pl.lit(""))
    runs = runs.with_columns(run=pl.format("{}{} R={} k={}", "model", lens, "expansion_factor", "k"))
    # Runs alike in all four are told apart by their directory.
    directory = pl.col("dir").map_elements(lambda d: Path(d).name, return_dtype=pl.String)
    twins = pl.when(pl.len().over("run") > 1).then(pl.format("{} ({})", "run", directory)).otherwise("run")
    return runs.with_columns(run=twins).select("run", pl.exclude("run"))


def _run_row(run_dir: Path, summary: dict) -> dict:
    """The numbers of one summary.json (KeyError when it lacks one)."""
    model = Path(str(summary.get("model"))).name
    n_layers, d_model = len(summary.get("layers") or []), int(summary["d_model"])
    means, ratios = summary["metrics_mean"], summary["variance_ratios"]
    # dead_fraction: mean over layers of each layer's dead fraction; dead_every_layer: never active at any
    # layer (NaN for analyses made before it was recorded)
    metrics = ("fvu", "mse", "l0", "l1", "dead_fraction", "dead_every_layer", "delta_ce", "kl_per_token", "kl_per_sequence")
    return {
        "dir": str(run_dir),
        "model": model,
        "variant": TUNED_LENS if summary.get("lens") else STANDARD,
        "expansion_factor": int(summary["expansion_factor"]),
        "k": int(summary["k"]),
        "n_layers": n_layers,
        "d_model": d_model,
        "n_latents": int(summary["n_latents"]),
        "n_tokens": int(summary["n_tokens"]),
        "model_size": model_size(model, n_layers, d_model),
        **{name: _number(means.get(name)) for name in metrics},
        "mmcs_mean": _number(summary["mmcs_mean"]),
        "mmcs_std": _number(summary["mmcs_std"]),
        "ratio_11": _number(ratios["ratio_11"]),
        "ratio_12": _number(ratios["ratio_12"]),
    }


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def reference_config(runs: pl.DataFrame) -> tuple[int, int]:
    """The (R, k) that most (model, variant) groups were run with; ties: the centre of the sweeps (the
    pair through which the most R values at its k and k values at its R were run), then more runs,
    then the larger R and k."""
    r_values_at_k = runs.group_by("k").agg(n_r=pl.col("expansion_factor").n_unique())
    k_values_at_r = runs.group_by("expansion_factor").agg(n_k=pl.col("k").n_unique())
    counts = (
        runs.group_by(SWEPT)
        .agg(groups=pl.struct("model", "variant").n_unique(), n_runs=pl.len())
        .join(r_values_at_k, on="k")
        .join(k_values_at_r, on="expansion_factor")
        .with_columns(sweep=pl.col("n_r") + pl.col("n_k"))
        .sort("groups", "sweep", "n_runs", *SWEPT, descending=True)
    )
    return int(counts["expansion_factor"][0]), int(counts["k"][0])


def _model_column(runs: pl.DataFrame) -> pl.Expr:
    """A run's column in Table 1: its model, or its run label when the model has several runs there."""
    return pl.when(pl.len().over("variant", "model") > 1).then(pl.col("run")).otherwise(pl.col("model"))


def table1(at_reference: pl.DataFrame) -> pl.DataFrame:
    """Table 1: one row per (variant, metric), one column per model, metrics as in the paper."""
    with_column = at_reference.with_columns(column=_model_column(at_reference))
    models = with_column["column"].unique(maintain_order=True).to_list()
    blocks = []
    for variant, group in with_column.group_by("variant", maintain_order=True):
        for metric, name in TABLE1_METRICS:
            if group[metric].is_nan().all():
                continue  # e.g. delta CE of runs analysed with --no-downstream
            values = dict(zip(group["column"].to_list(), group[metric].to_list()))
            blocks.append({"variant": variant[0], "expansion_factor": group["expansion_factor"][0], "k": group["k"][0],
                           "metric": name, **{model: values.get(model) for model in models}})  # fmt: skip
    return pl.DataFrame(blocks, infer_schema_length=None)


def table2(at_reference: pl.DataFrame) -> pl.DataFrame:
    """Table 2: MMCS mean and standard deviation per model, per variant."""
    return at_reference.select("variant", "model", "expansion_factor", "k", "mmcs_mean", "mmcs_std", "run")


def _with_series(runs: pl.DataFrame, by: Sequence[str]) -> tuple[pl.DataFrame, str]:
    """`runs` with a legend label column made of the `by` columns that vary among them; its name."""
    varying = [column for column in by if runs[column].n_unique() > 1] or [by[0]]
    name = ", ".join(varying).capitalize()  # e.g. "Model, variant"
    return runs.with_columns(pl.concat_str([pl.col(column) for column in varying], separator=", ").alias(name)), name


def plot_sweeps(runs: pl.DataFrame, reference: tuple[int, int], out: Path) -> list[str]:
    """Figs. 6 and 13: ratios and MMCS against R (at the reference k) and k (at the reference R).

    Drawn for a parameter only when some (model, variant) was run with two or more of its values.
    """
    written = []
    for swept, fixed, fixed_value in (("expansion_factor", "k", reference[1]), ("k", "expansion_factor", reference[0])):
        sweep = runs.filter(pl.col(fixed) == fixed_value)
        if sweep.group_by("model", "variant").agg(pl.col(swept).n_unique()).get_column(swept).max() < 2:  # type: ignore[operator]
            continue
        sweep, series = _with_series(sweep, ("model", "variant"))
        against = f"against {SWEEP_NAME[swept]} ({SYMBOL[fixed]} = {fixed_value})"
        ratios_figure, mmcs_figure = layout.variance_ratios_vs_figure(swept), layout.mmcs_vs_figure(swept)
        plots.plot_variance_ratios(sweep, out / ratios_figure, x=swept, series=series, log_x=True,
                                   title=f"Variance ratios {against}")  # fmt: skip
        plots.plot_against(sweep, ["mmcs_mean"], out / mmcs_figure, x=swept, series=series, log_x=True,
                           title=f"MMCS {against}")  # fmt: skip
        written += [ratios_figure, mmcs_figure]
    return written


def plot_heatmaps(runs: pl.DataFrame, out: Path) -> bool:
    """Every run's aggregate heatmap from its latent_layers.parquet; standard and tuned lens as two columns.

    Runs whose directory lacks the file are left out; returns whether a figure was written.
    """
    runs = runs.filter(pl.col("dir").map_elements(lambda d: (Path(d) / layout.LATENT_LAYERS).exists(), return_dtype=pl.Boolean))
    if runs.height == 0:
        return False
    variants = runs["variant"].unique(maintain_order=True).to_list()

    n_columns = 2 if len(variants) == 2 else 1 if runs.height <= 4 else 2 if runs.height <= 12 else 3

    def cell(row: dict) -> tuple[str, plots.HeatmapImage]:
        """One panel; only its binned image stays in memory, not the run's per-latent table."""
        title = row["run"] if len(variants) == 1 else row["run"].replace(" + lens", "")
        table = layout.read_table(row["dir"], layout.LATENT_LAYERS)
        return title, plots.HeatmapImage.from_table(table, plots.MAX_HEATMAP_COLUMNS // n_columns)

    if len(variants) == 2:  # rows: (model, R, k, dir name when duplicated), columns: variants
        keyed = runs.with_columns(key=pl.col("run").str.replace(" + lens", "", literal=True))
        keys = keyed["key"].unique(maintain_order=True).to_list()
        by_key = {(row["key"], row["variant"]): row for row in keyed.iter_rows(named=True)}
        grid = [[cell(by_key[(key, v)]) if (key, v) in by_key else None for v in (STANDARD, TUNED_LENS)] for key in keys]
        column_titles = ["Standard", "Tuned lens"]
    else:
        cells = [cell(row) for row in runs.iter_rows(named=True)]
        grid = [cells[start : start + n_columns] for start in range(0, len(cells), n_columns)]
        column_titles = None
    title = "Aggregate heatmaps: P(L = layer | J = latent), latents sorted by expected layer"
    plots.plot_layer_heatmap_grid(grid, out / layout.REPORT_HEATMAPS_FIGURE, column_titles=column_titles, title=title)
    return True


def _per_layer(runs: pl.DataFrame) -> pl.DataFrame | None:
    """Every run's per-layer metrics.csv rows (runs without one are left out; None when none has one)."""
    frames = []
    for row in runs.iter_rows(named=True):
        if not (Path(row["dir"]) / layout.METRICS).exists():
            continue
        metrics = layout.read_table(row["dir"], layout.METRICS, infer_schema_length=None)
        metrics = metrics.filter(pl.col("layer").cast(pl.String) != "mean").with_columns(pl.col("layer").cast(pl.Int64))
        frames.append(metrics.with_row_index("layer_index").with_columns(
            run=pl.lit(row["run"]), n_layers=pl.lit(metrics.height)))  # fmt: skip
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def report(run_dirs: Sequence[Path], out: Path) -> None:
    """Write every table and figure into ``out`` (a fresh directory)."""
    runs = read_runs(run_dirs)
    reference = reference_config(runs)
    at_reference = runs.filter((pl.col("expansion_factor") == reference[0]) & (pl.col("k") == reference[1]))
    out.mkdir(parents=True)
    write_csv(runs, out / layout.REPORT_RUNS)
    write_csv(table1(at_reference), out / layout.REPORT_TABLE1)
    write_csv(table2(at_reference), out / layout.REPORT_TABLE2)

    # fig. 5: the ratios per model at the reference (R, k), standard and tuned lens
    fig5 = at_reference.select("run", "model", "variant", "expansion_factor", "k", "ratio_11", "ratio_12")
    write_csv(fig5, out / layout.REPORT_VARIANCE_RATIOS)
    series = "variant" if fig5["variant"].n_unique() > 1 else None
    x = "run" if fig5.select("model", "variant").is_duplicated().any() else "model"
    plots.plot_variance_ratios(fig5, out / layout.REPORT_VARIANCE_RATIOS_FIGURE, x=x, series=series,
                               title=f"Variance ratios per {x} (R = {reference[0]}, k = {reference[1]})")  # fmt: skip
    plot_sweeps(runs, reference, out)
    plot_heatmaps(runs, out)

    layers = _per_layer(runs)
    if layers is None:
        return
    write_csv(layers, out / layout.REPORT_PER_LAYER)
    metrics = [m for m in PER_LAYER_METRICS if m in layers.columns and layers[m].cast(pl.Float64).is_not_nan().any()]
    plots.plot_per_layer_curves(layers, metrics, out / layout.REPORT_PER_LAYER_FIGURE, layer="layer_index", series="run",
                                relative_layer=True, log_metrics=("mse",))  # fmt: skip


def report_main(argv: Sequence[str]) -> int:
    parser = OneLineErrorParser(prog="mlsae-analyse report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="directories written by mlsae-analyse")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    args = parser.parse_args(argv)
    every_run = [Path(r) for r in args.runs]
    runs, others = mlsae_analyses(every_run)
    if others:  # a sweep over families (sweeps/families.toml) reports its MLSAEs and links every run's page
        print(f"warning: {', '.join(map(str, others))}: not MLSAE analyses, left out of the tables (their pages are "
              "linked); set the families side by side with mlsae-analyse compare ANALYSIS... --out DIR", file=sys.stderr)
    if not runs:
        raise MlsaeError("none of the analyses given is of an MLSAE run; mlsae-analyse report gathers MLSAE analyses "
                         "(set families side by side with mlsae-analyse compare ANALYSIS... --out DIR)")  # fmt: skip

    def fill(partial: Path) -> None:
        report(runs, partial)
        record_files(partial)  # before the page, which reads the tables back (verified) and adds itself
        write_sweep_html(partial, every_run)  # relative links: partial and out are siblings

    write_fresh_directory(Path(args.out), fill)
    return 0


"""``mlsae-analyse report RUN_OUT... --out DIR``: cross-run tables and figures from analysed runs.

Each RUN_OUT is a directory written by ``mlsae-analyse``. Writes tables.csv (Tables 1 and 2: the mean
metrics and MMCS per run), variance_ratios.csv + figure (figs 5, 6), and per_layer.csv + figure of
FVU / MSE / L1 / delta CE against relative layer, one line per run (figs 9-11, 13).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import polars as pl

from mlsae_cache.clitools import OneLineErrorParser
from mlsae_cache.errors import MlsaeError

from . import plots
from .files import write_csv


def _run_label(summary: dict) -> str:
    model = Path(str(summary.get("model"))).name
    lens = "+lens" if summary.get("lens") else ""
    return f"{model}{lens} R={summary['expansion_factor']} k={summary['k']}"


def report(run_dirs: Sequence[Path], out: Path) -> None:
    rows, per_layer = [], []
    for run_dir in run_dirs:
        summary_file = Path(run_dir) / "summary.json"
        if not summary_file.exists():
            raise MlsaeError(f"{run_dir} holds no summary.json; give directories written by mlsae-analyse")
        summary = json.loads(summary_file.read_text())
        label = _run_label(summary)
        if any(row["run"] == label for row in rows):  # two runs alike: tell them apart by directory
            label = f"{label} ({Path(run_dir).name})"
        rows.append({"run": label, "model": Path(str(summary["model"])).name, "lens": bool(summary.get("lens")),
                     "expansion_factor": summary["expansion_factor"], "k": summary["k"],
                     **summary["metrics_mean"], "mmcs_mean": summary["mmcs_mean"], "mmcs_std": summary["mmcs_std"],
                     **{k: v for k, v in summary["variance_ratios"].items() if k.startswith("ratio")}})  # fmt: skip
        metrics = pl.read_csv(Path(run_dir) / "metrics.csv").filter(pl.col("layer") != "mean")
        per_layer.append(metrics.with_row_index("layer_index").with_columns(
            run=pl.lit(label), n_layers=pl.lit(metrics.height)))  # fmt: skip
    table = pl.DataFrame(rows)
    out.mkdir(parents=True)
    write_csv(table, out / "tables.csv")
    write_csv(table.select("run", "model", "lens", "expansion_factor", "k", "ratio_11", "ratio_12"), out / "variance_ratios.csv")
    plots.plot_variance_ratios(table, out / "variance_ratios", x="run")
    layers = pl.concat(per_layer, how="vertical_relaxed")
    write_csv(layers, out / "per_layer.csv")
    metrics = [m for m in ("fvu", "mse", "l1", "delta_ce") if layers[m].is_not_nan().any()]
    plots.plot_per_layer_curves(layers, metrics, out / "per_layer", layer="layer_index", series="run", relative_layer=True)


def report_main(argv: Sequence[str]) -> int:
    parser = OneLineErrorParser(prog="mlsae-analyse report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="directories written by mlsae-analyse")
    parser.add_argument("--out", required=True, help="output directory (must not exist)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise MlsaeError(f"--out {out} already exists; choose a new directory or remove it")
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        report([Path(r) for r in args.runs], partial)
        os.rename(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return 0

"""``mlsae-analyse``: evaluate one trained dictionary (MLSAE, per-layer SAEs or crosscoder) on a held-out
cache (tables and figures of the paper, and each family's view of its layers).

Everything is written into a temporary sibling of ``--out`` that is renamed to ``--out`` at the very
end, so ``--out`` either holds a complete analysis or does not exist. ``mlsae-analyse report ...``
gathers several analysed runs (see report.py); ``mlsae-analyse compare ...`` sets analyses of runs of
different families side by side (see compare.py).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from mlsae_cache.clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from mlsae_cache.integrity import record_files
from mlsae_cache.path_kinds import require_cache_path, require_run_path

from . import layout, pipeline
from .config import AnalyseConfig
from .files import write_fresh_directory
from .html_report import write_analysis_html

# an analysis stopped half-way keeps nothing (--out appears only complete): what Ctrl-C and a full disk say
NOTHING_KEPT = "nothing was kept (--out is written only once the analysis has finished); run the same command again to start over"


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="mlsae-analyse",
        description="Evaluate a trained dictionary (MLSAE, per-layer SAEs or crosscoder) on a held-out cache: metrics, "
        "MMCS, residual statistics, distributions over layers, figures. `mlsae-analyse report RUN_OUT... --out DIR` "
        "compares analysed MLSAE runs; `mlsae-analyse compare ANALYSIS... --out DIR` compares families.",
    )
    add_dataclass_arguments(parser, AnalyseConfig)
    return parser


def analyse(config: AnalyseConfig, out: Path) -> dict:
    """Write every output into ``out`` (a fresh directory) step by step (pipeline.py); returns the summary."""
    inputs = pipeline.open_inputs(config)
    layer_view = pipeline.layer_view_of(inputs.data.sae)  # a family without one is refused before any work
    out.mkdir(parents=True)
    encoded = pipeline.encode(inputs, out)
    per_layer, warnings = pipeline.metrics_table(inputs, encoded)
    downstream = pipeline.downstream_table(inputs, encoded)
    per_layer = per_layer.join(downstream.per_layer, on="layer_index", how="left", maintain_order="left")
    metrics_mean = pipeline.write_metrics(out, per_layer, inputs.family.dead_fraction(encoded.recon.active))
    pipeline.write_splice_all_layers(out, downstream)
    mmcs = pipeline.write_neighbours(inputs, out)
    pipeline.write_residual(encoded, out)
    layer_entries = layer_view(inputs, encoded, out)
    pipeline.write_examples(inputs, encoded, out)
    summary = pipeline.summary_of(inputs, metrics_mean, mmcs, layer_entries, warnings, downstream)
    layout.write_summary(out, summary)
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
        write_analysis_html(partial)  # from the files just written

    write_fresh_directory(out, fill)
    print(f"wrote {out} (open {out / layout.PAGE} in a browser)", file=sys.stderr)
    return 0


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from .report import report_main

        return report_main(argv[1:])
    if argv and argv[0] == "compare":
        from .compare import compare_main

        return compare_main(argv[1:])
    return _analyse_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv, resumes=NOTHING_KEPT)


if __name__ == "__main__":
    sys.exit(main())

"""``mlsae-analyse compare ANALYSIS... --out DIR``: dictionary families side by side (issue 13 item 3, SPEC 9).

Each ANALYSIS is a directory written by ``mlsae-analyse`` for one run: an MLSAE, a per-layer suite of SAEs or
a crosscoder (the ``arch`` in its summary.json, else in its run's config.json; absent: ``mlsae``). The comparison is refused unless every
run was trained on the same cache and evaluated on the same test cache (same tokens, same spliced
sequences) at the same layers, and unless each analysis is given once. Other tools' SAEs analysed as a per-layer
baseline (summary.json ``imported``: sparsify, SAELens) were trained elsewhere: their training cache is not checked,
and where they cover fewer layers the runs are compared on the layers all of them share (said in the markdown).

Writes into --out:
  comparison.csv        one row per (run, layer) and one per run with layer "mean" (the mean over its layers):
                        FVU, MSE, delta CE, KL per token, dead fraction, and the run's costs (latents, active
                        latents per token, parameters, training FLOPs per token; SPEC 9), repeated on each row
  comparison.md         the mean rows as a markdown table, and which budgets the runs share (also printed)
  comparison.png/.pdf   per-layer FVU and delta CE, one line per run
  match_per_layer.*,    cross-dictionary matching (SPEC 9, mlsae_analysis/matching.py) of each MLSAE run
  match_crosscoder.*    against each per-layer / crosscoder run: parquet, json (the E[L | J] vs best-layer
                        correlations) and heatmap; with several such pairs the stem gains both folder names.
                        An imported per-layer run on some of the MLSAE's layers is matched on those (the
                        others are blank columns, never the best layer)
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl

from mlsae_cache import shard_format as sf
from mlsae_cache.atomic import atomic_write_text
from mlsae_cache.clitools import OneLineErrorParser, field_docs, run_command
from mlsae_cache.distributed import resolve_device
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files

from . import layout, matching, plots
from .files import write_csv, write_fresh_directory
from .inputs import read_run_info

ARCHS = ("mlsae", "per-layer", "crosscoder")
DEFAULT_ARCH = "mlsae"  # runs and analyses written before the families record no arch
# per-layer metrics taken from metrics.csv (the mean row is recomputed as their mean over layers)
COMPARED_METRICS = ("fvu", "mse", "delta_ce", "kl_per_token", "dead_fraction")
PLOTTED = ("fvu", "delta_ce")
COSTS = ("latents", "active_latents_per_token", "parameters", "training_flops_per_token")
# clean CE of two analyses over the same spliced sequences agrees to float rounding (batching, device)
CLEAN_CE_RTOL = 1e-4
MEAN_ROW = "mean"
# what a stopped comparison leaves (nothing: --out appears only complete)
NOTHING_KEPT = "nothing was kept (--out is written only once the comparison has finished); run the same command again"


def family_costs(arch: str, n_latents: int, k: int, n_layers: int, d_model: int) -> dict[str, int]:
    """What a family of n latents (per dictionary), k active, over L layers of width d costs (SPEC 9).

    - latents: every latent of the family (n; n x L for the per-layer suite, one dictionary per layer).
    - active_latents_per_token: k x L for the MLSAE and the per-layer suite (k per vector), k for the
      crosscoder (k per token, shared by all its layers).
    - parameters: encoder and decoder weights, MLSAE 2nd, per-layer 2ndL, crosscoder 2nLd. Biases (b_pre:
      d, dL, Ld) are left out, as SPEC 9 leaves them out.
    - training_flops_per_token: forward + backward (x 2 per multiply-add) of a dense encoder (forward,
      weight gradient, input gradient: 3 x its weights) and a sparse decoder (the same over the k active
      rows): L (6nd + 6kd) for the MLSAE and the per-layer suite, 6nLd + 6kLd for the crosscoder.
    """
    if arch not in ARCHS:
        raise MlsaeError(f"unknown dictionary family {arch!r}; expected one of {', '.join(ARCHS)}")
    n, L, d = int(n_latents), int(n_layers), int(d_model)
    if arch == "crosscoder":
        return {"latents": n, "active_latents_per_token": k, "parameters": 2 * n * L * d,
                "training_flops_per_token": 6 * n * L * d + 6 * k * L * d}  # fmt: skip
    return {
        "latents": n * L if arch == "per-layer" else n,
        "active_latents_per_token": k * L,
        "parameters": 2 * n * d * (L if arch == "per-layer" else 1),
        "training_flops_per_token": L * (6 * n * d + 6 * k * d),
    }


@dataclass(frozen=True)
class AnalysedRun:
    """One analysis folder: its summary, per-layer metrics and what identifies its data."""

    folder: Path
    summary: dict
    arch: str
    """The family: the summary's ``arch``, else the run's (its config.json), else "mlsae"."""
    per_layer: pl.DataFrame
    """metrics.csv without its mean row: layer (int) and COMPARED_METRICS."""
    train_data: list[dict]
    """The training caches: model, n_tokens, layers, d_model, lens, path and (when readable) its manifest digest."""
    test_cache: dict
    """The test cache: path, tokens analysed, model, lens and (when readable) its manifest digest."""
    run_info: dict
    """The analysed run's config.json ({} when the run is gone or was given as bare weights)."""

    @property
    def layers(self) -> list[int]:
        return [int(layer) for layer in self.summary["layers"]]

    @property
    def imported(self) -> dict | None:
        """Other tools' SAEs (formats, sources, normalisation: summary.json ``imported``); None for a run of ours."""
        return self.summary.get("imported") or None

    def costs(self) -> dict[str, int]:
        summary = self.summary
        return family_costs(self.arch, summary["n_latents"], summary["k"], len(self.layers), summary["d_model"])


@dataclass(frozen=True)
class ComparisonTables:
    """The comparison of several analysed runs: one row per (run, layer) and one per run with layer "mean"."""

    table: pl.DataFrame
    runs: tuple[AnalysedRun, ...] = ()
    """The analyses compared, in the order given."""

    @property
    def means(self) -> pl.DataFrame:
        return self.table.filter(pl.col("layer") == MEAN_ROW)

    @property
    def per_layer(self) -> pl.DataFrame:
        """The rows of single layers, layer as an integer."""
        return self.table.filter(pl.col("layer") != MEAN_ROW).with_columns(pl.col("layer").cast(pl.Int64))


def _manifest_digest(cache: str | Path) -> str | None:
    """The digest a cache's manifest records of itself, or None when no readable manifest is there."""
    try:
        return json.loads((Path(cache) / sf.MANIFEST).read_text()).get(sf.MANIFEST_DIGEST)
    except (OSError, ValueError, AttributeError):
        return None


def _run_info(summary: dict) -> dict:
    """The analysed run's config.json; {} when the run is gone or was given as bare weights."""
    run = Path(str(summary["run"]))
    return read_run_info(run) if run.exists() else {}


def _train_data(folder: Path, summary: dict, info: dict) -> list[dict]:
    """The caches the analysed run was trained on: the summary's ``train_data`` when it records it, else the
    run's config.json ``info`` (its ``data`` identity and ``--shards``, whose manifests give the digests)."""
    if summary.get("train_data") is not None:
        return list(summary["train_data"])
    run = summary["run"]
    if not info.get("data"):
        raise MlsaeError(
            f"{folder} is an analysis of {run}, which records no training cache (missing, or weights without their "
            "run directory's config.json), so it cannot be shown to share the others' training tokens; "
            "compare analyses of runs trained by mlsae-train whose run directories are in place"
        )
    shards = info.get("config", {}).get("shards") or [None] * len(info["data"])
    return [{**entry, "path": path, "digest": _manifest_digest(path) if path else None}
            for entry, path in zip(info["data"], shards)]  # fmt: skip


def _read_per_layer(folder: Path) -> pl.DataFrame:
    path = folder / layout.METRICS
    if not path.exists():
        raise MlsaeError(f"{folder} holds no {layout.METRICS}; {layout.FIX}")
    metrics = layout.read_table(folder, layout.METRICS, infer_schema_length=None)
    missing = [c for c in ("layer", *COMPARED_METRICS) if c not in metrics.columns]
    if missing:
        raise MlsaeError(f"{path} lacks column {missing[0]}; {layout.FIX}")
    layer = pl.col("layer").cast(pl.String)
    return (
        metrics.filter(layer.str.contains(r"^\d+$"))  # single layers; not the mean (or any other aggregate) row
        .select(pl.col("layer").cast(pl.String).cast(pl.Int64), *[pl.col(c).cast(pl.Float64) for c in COMPARED_METRICS])
    )


def read_analysis(folder: Path) -> AnalysedRun:
    """One analysis folder, with a one-line error for anything missing or unreadable."""
    summary = layout.read_summary(folder)
    try:
        info = _run_info(summary)
        arch = str(summary.get("arch") or info.get("sae", {}).get("arch") or DEFAULT_ARCH)
        if arch not in ARCHS:
            raise MlsaeError(f"{folder} is an analysis of an unknown dictionary family {arch!r} (known: {', '.join(ARCHS)}); "
                             "compare analyses written by this mlsae-analyse")  # fmt: skip
        per_layer = _read_per_layer(folder)
        test_cache = {
            "path": str(summary["cache"]),
            "n_tokens": int(summary["n_tokens"]),
            "model": summary.get("model"),
            "lens": summary.get("lens"),
            "digest": summary.get("cache_digest") or _manifest_digest(summary["cache"]),
        }
        train_data = [] if summary.get("imported") else _train_data(folder, summary, info)  # imported: trained elsewhere
        run = AnalysedRun(folder, summary, arch, per_layer, train_data, test_cache, info)
        run.costs()  # n_latents, k, d_model present
    except KeyError as missing:
        raise MlsaeError(f"{folder / layout.SUMMARY} lacks {missing}; analyse that run again with this mlsae-analyse") from None
    if run.per_layer["layer"].to_list() != run.layers:
        raise MlsaeError(f"{folder / layout.METRICS} holds layers {run.per_layer['layer'].to_list()} but {layout.SUMMARY} "
                         f"names {run.layers}; {layout.FIX}")  # fmt: skip
    return run


def _same_data(a: list[dict], b: list[dict]) -> bool:
    """Two training-data records name the same caches: equal identities (model, tokens, layers, width, lens),
    and equal digests where both are known (a cache may have moved: its path is not compared)."""
    if len(a) != len(b):
        return False
    located = ("path", "digest")
    for x, y in zip(a, b):
        if {k: v for k, v in x.items() if k not in located} != {k: v for k, v in y.items() if k not in located}:
            return False
        if x.get("digest") and y.get("digest") and x["digest"] != y["digest"]:
            return False
    return True


def _same_test_cache(a: dict, b: dict) -> bool:
    """Same tokens of the same cache: its digest when both are known (the path otherwise), tokens, model and lens."""
    same_cache = a["digest"] == b["digest"] if a["digest"] and b["digest"] else a["path"] == b["path"]
    return same_cache and all(a[key] == b[key] for key in ("n_tokens", "model", "lens"))


def check_comparable(runs: Sequence[AnalysedRun]) -> None:
    """Refuse, in one line, analyses that do not measure the same thing: given twice, of the same run, of
    runs trained on other caches, evaluated on other test tokens or spliced sequences, or at other layers.
    Imported runs (trained elsewhere) skip the training-cache check, and may cover other layers than ours as
    long as all the runs share one (:func:`shared_layers`)."""
    seen: set[Path] = set()
    for run in runs:
        if run.folder.resolve() in seen:
            raise MlsaeError(f"{run.folder} is given twice; name each analysis once")
        seen.add(run.folder.resolve())
    first = runs[0]
    ours = [run for run in runs if not run.imported]
    for run in runs[1:]:
        pair = f"{first.folder} and {run.folder}"
        if Path(str(run.summary["run"])) == Path(str(first.summary["run"])):
            raise MlsaeError(f"{pair} are analyses of the same run {run.summary['run']}; give one analysis per run")
        if not _same_test_cache(first.test_cache, run.test_cache):
            raise MlsaeError(
                f"{pair} were evaluated on different test tokens ({_describe([first.test_cache])} vs "
                f"{_describe([run.test_cache])}); analyse every run on the same --shards with the same --max-tokens"
            )
        if run.summary.get("d_model") != first.summary.get("d_model"):
            raise MlsaeError(f"{pair} have different widths d_model; compare runs on the same model")
    for run in ours[1:]:  # our own runs: the same training cache and the same layers
        pair = f"{ours[0].folder} and {run.folder}"
        if not _same_data(ours[0].train_data, run.train_data):
            raise MlsaeError(f"{pair} are of runs trained on different caches ({_describe(ours[0].train_data)} vs "
                             f"{_describe(run.train_data)}); compare runs trained on the same cache")  # fmt: skip
        if run.layers != ours[0].layers:
            raise MlsaeError(f"{pair} cover different layers ({ours[0].layers} vs {run.layers}); "
                             "compare runs trained and analysed on the same layers")  # fmt: skip
    if not shared_layers(runs):
        raise MlsaeError("the runs share no layer (" + "; ".join(f"{run.folder}: {run.layers}" for run in runs) + "); "
                         "compare imported SAEs with runs on the layers they cover")  # fmt: skip
    _check_same_spliced_sequences(runs)


def shared_layers(runs: Sequence[AnalysedRun]) -> list[int]:
    """The layers every run covers, in the first run's order: what the comparison is on (all of them unless an
    imported run covers fewer)."""
    return [layer for layer in runs[0].layers if all(layer in run.layers for run in runs[1:])]


def _check_same_spliced_sequences(runs: Sequence[AnalysedRun]) -> None:
    """Delta CE is over the sequences spliced: the clean CE of every layer must agree wherever it was measured."""
    measured = [run for run in runs if "ce_clean" in run.summary.get("metrics_mean", {})]
    clean = {run.folder: run.summary["metrics_mean"]["ce_clean"] for run in measured}
    clean = {folder: float(ce) for folder, ce in clean.items() if ce is not None and not math.isnan(float(ce))}
    if len(clean) < 2:
        return
    (first, ce_first), *others = clean.items()
    for folder, ce in others:
        if not math.isclose(ce, ce_first, rel_tol=CLEAN_CE_RTOL):
            raise MlsaeError(
                f"{first} and {folder} spliced different sequences (clean CE {ce_first:.6g} vs {ce:.6g} nats); "
                "analyse every run with the same --downstream-sequences and --max-tokens"
            )


def _describe(caches: list[dict]) -> str:
    return "; ".join(f"{c.get('path') or c.get('model')}: {c.get('n_tokens')} tokens" +
                     (f", {c['digest'][:19]}" if c.get("digest") else "") for c in caches)  # fmt: skip


def _run_labels(runs: Sequence[AnalysedRun]) -> list[str]:
    """``arch R=.. k=..`` (imported runs: ``(FORMAT, trained elsewhere)`` after it); runs alike in all of it are told
    apart by their folder name."""
    labels = [f"{run.arch} R={run.summary['n_latents'] // run.summary['d_model']} k={run.summary['k']}" + _elsewhere(run)
              for run in runs]  # fmt: skip
    return [f"{label} ({run.folder.name})" if labels.count(label) > 1 else label for label, run in zip(labels, runs)]


def _elsewhere(run: AnalysedRun) -> str:
    """`` (sparsify, trained elsewhere)`` for an imported run, "" for a run of ours."""
    return f" ({', '.join(run.imported.get('formats') or [])}, trained elsewhere)" if run.imported else ""


def compare_analyses(folders: Sequence[Path]) -> ComparisonTables:
    """Read and check the analyses, and build the table: per run, a row per layer and its mean row."""
    if not folders:
        raise MlsaeError("no analysis given; name at least one directory written by mlsae-analyse")
    runs = [read_analysis(Path(folder)) for folder in folders]
    check_comparable(runs)
    layers = shared_layers(runs)
    frames = []
    for run, label in zip(runs, _run_labels(runs)):
        per_layer = run.per_layer.filter(pl.col("layer").is_in(layers))  # all its layers unless an imported run covers fewer
        mean = per_layer.select(pl.col(COMPARED_METRICS).mean())
        rows = pl.concat([per_layer.with_columns(pl.col("layer").cast(pl.String)), mean.with_columns(layer=pl.lit(MEAN_ROW))],
                         how="diagonal")  # fmt: skip
        training = run.summary.get("training") or {}
        frames.append(rows.with_columns(
            run=pl.lit(label), arch=pl.lit(run.arch), n_latents=pl.lit(int(run.summary["n_latents"])),
            k=pl.lit(int(run.summary["k"])), n_layers=pl.lit(len(run.layers)), d_model=pl.lit(int(run.summary["d_model"])),
            **{name: pl.lit(value, dtype=pl.Int64) for name, value in run.costs().items()},
            training_tokens=pl.lit(training.get("tokens"), dtype=pl.Int64), analysis=pl.lit(str(run.folder)),
        ))  # fmt: skip
    table = pl.concat(frames, how="vertical")
    first = ["run", "arch", "layer", *COMPARED_METRICS, *COSTS]
    return ComparisonTables(table.select(*first, pl.exclude(first)), tuple(runs))


def matching_pairs(runs: Sequence[AnalysedRun]) -> list[tuple[AnalysedRun, AnalysedRun, str]]:
    """(MLSAE run, per-layer or crosscoder run, file stem) for every such pair: the family's stem
    (matching.STEMS) when it is the only pair of its family, else the stem with both folder names."""
    pairs = [(a, b) for a in runs if a.arch == "mlsae" for b in runs if b.arch in matching.STEMS]
    stems = []
    for a, b in pairs:
        alike = sum(1 for _, other in pairs if other.arch == b.arch)
        stems.append(matching.STEMS[b.arch] if alike == 1 else f"{matching.STEMS[b.arch]}-{a.folder.name}-vs-{b.folder.name}")
    return [(a, b, stem) for (a, b), stem in zip(pairs, stems)]


def write_matchings(runs: Sequence[AnalysedRun], out: Path, device: str) -> list[str]:
    """Match every MLSAE run's decoder against every per-layer and crosscoder run's (SPEC 9) and write
    the results into ``out``; returns one line per pair for the terminal. An imported run on some of the
    MLSAE's layers is matched on those (the others are blank columns, matching.py); one on a layer the
    MLSAE lacks is not matched, with a line saying why (E[L | J] is over the MLSAE's layers only)."""
    lines = []
    for mlsae_run, other, stem in matching_pairs(runs):
        lacking = [layer for layer in other.layers if layer not in mlsae_run.layers]
        if lacking:
            lines.append(f"{stem}: not matched: {mlsae_run.folder.name} covers layers {mlsae_run.layers} but {other.folder.name} "
                         f"{other.layers}, with layer(s) {lacking} the MLSAE lacks; matching needs SAEs of the MLSAE's layers "
                         "(all or some) and no other")  # fmt: skip
            continue
        seeds = {run.run_info.get("config", {}).get("seed") for run in (mlsae_run, other)}
        if len(seeds) == 1 and None not in seeds:
            # the families draw their initial directions from one stream (per-layer SAE l starts where an MLSAE of
            # that seed starts; crosscoder block (j, l) is the MLSAE's row j*L + l): latents that barely moved
            # from their start then match at similarity 1, whatever they learnt
            print(f"warning: {mlsae_run.folder.name} and {other.folder.name} were trained with the same --seed {seeds.pop()}, so "
                  "their initial decoders share directions and latents that barely moved match at similarity 1; "
                  "train the runs you match with different seeds", file=sys.stderr)  # fmt: skip
        match = matching.match_runs(mlsae_run.summary["run"], other.summary["run"], mlsae_run.folder, device=device)
        matching.write_matching(match, out, stem=stem)
        c = match.correlation
        stats = f"Pearson {c.pearson:.3f}, Spearman {c.spearman:.3f}" if c.reason is None else f"correlation undefined ({c.reason})"
        without = match.layers_without_sae
        among = (f" (SAEs at layers {list(other.layers)} only, none at {without}: the best layer among those)"
                 if without else "")  # fmt: skip
        lines.append(f"{stem}: E[L | J] of {mlsae_run.folder.name} vs the best-matching layer of {other.folder.name}{among}: {stats}")
    return lines


def _si(value: float) -> str:
    """1234567 -> '1.23 M' (plain below a thousand)."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}"
    return f"{value:g}"


def _fixed(value: float | None, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _significant(value: float | None, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}g}"


MARKDOWN_COLUMNS = (  # (column, header, format)
    ("run", "run", str),
    ("fvu", "FVU", lambda v: _fixed(v, 3)),
    ("mse", "MSE", lambda v: _significant(v, 4)),
    ("delta_ce", "delta CE (nats)", lambda v: _fixed(v, 3)),
    ("kl_per_token", "KL (nats/token)", lambda v: _fixed(v, 3)),
    ("dead_fraction", "dead", lambda v: _fixed(v, 3)),
    ("latents", "latents", lambda v: f"{v:,}"),
    ("active_latents_per_token", "active / token", lambda v: f"{v:,}"),
    ("parameters", "parameters", _si),
    ("training_flops_per_token", "train FLOPs / token", _si),
    ("training_tokens", "train tokens", lambda v: "n/a" if v is None else _si(v)),
)


def markdown_table(tables: ComparisonTables) -> str:
    """The mean rows as a markdown table, then one line on which costs the runs share and which differ."""
    means = tables.means
    header = "| " + " | ".join(name for _, name, _ in MARKDOWN_COLUMNS) + " |"
    rule = "| --- |" + " ---: |" * (len(MARKDOWN_COLUMNS) - 1)
    rows = ["| " + " | ".join(fmt(row[col]) for col, _, fmt in MARKDOWN_COLUMNS) + " |" for row in means.iter_rows(named=True)]
    layers = tables.per_layer["layer"].unique(maintain_order=True).to_list()
    budgets = ("n_latents", "k", *COSTS, "training_tokens")
    equal = [name for name in budgets if means[name].n_unique() == 1]
    differ = [name for name in budgets if name not in equal]
    notes = [
        f"Mean over layers {', '.join(map(str, layers))}; n = latents per dictionary (R x d), k = active per vector "
        "(MLSAE, per-layer) or per token (crosscoder); parameters leave out biases.",
        f"Equal across runs: {', '.join(equal) or 'none'}. Different: {', '.join(differ) or 'none'}.",
        *_imported_notes(tables.runs, layers),
    ]
    return "\n".join([header, rule, *rows, "", *notes]) + "\n"


def _imported_notes(runs: Sequence[AnalysedRun], layers: list[int]) -> list[str]:
    """Lines on the imported runs: trained elsewhere (no training cache of ours, their normalisation), and the
    layers left out when one covers fewer than the others."""
    notes = []
    for run, label in zip(runs, _run_labels(runs)):
        if run.imported:
            notes.append(f"{label}: its training cache is not checked against the others', only its test tokens; "
                         f"{run.imported.get('normalisation')}")  # fmt: skip
    left_out = [f"{run.folder.name} {[layer for layer in run.layers if layer not in layers]}" for run in runs
                if any(layer not in layers for layer in run.layers)]  # fmt: skip
    if left_out:
        notes.append(f"Compared on the layers all runs share ({', '.join(map(str, layers))}); left out: {'; '.join(left_out)} "
                     "(the costs are each run's own, over all its layers).")
    return notes


def plot_comparison(tables: ComparisonTables, path_stem: Path) -> list[Path]:
    """Per-layer FVU and delta CE (panels; delta CE only when some analysis measured it), one line per run."""
    per_layer = tables.per_layer
    metrics = [m for m in PLOTTED if per_layer[m].is_not_nan().any()]
    return plots.plot_per_layer_curves(per_layer, metrics, path_stem, layer="layer", series="run",
                                       title="Dictionary families on the same test tokens")  # fmt: skip


def write_comparison(tables: ComparisonTables, out: Path, device: str = "cpu") -> str:
    """Write the CSV, the markdown table, the figure and the matchings into ``out`` (created); returns
    the markdown (with a line per matching)."""
    out.mkdir(parents=True)
    write_csv(tables.table, out / layout.COMPARISON)
    markdown = markdown_table(tables)
    atomic_write_text(out / layout.COMPARISON_MARKDOWN, markdown)
    plot_comparison(tables, out / layout.COMPARISON_FIGURE)
    matched = write_matchings(tables.runs, out, device)
    record_files(out)
    return markdown + "".join(f"\n{line}\n" for line in matched)


@dataclass
class CompareConfig:
    analyses: list[str]
    """Directories written by mlsae-analyse, one per run (MLSAE, per-layer suite or crosscoder), all of runs
    trained on the same cache and analysed on the same test cache."""

    out: str
    """Output directory; it must not exist yet (it is written in a temporary sibling and renamed at the end)."""

    device: str = "auto"
    """Where the cross-dictionary matching runs: cuda, cpu, or auto (cuda when a GPU is visible)."""


def build_parser() -> OneLineErrorParser:
    """``ANALYSIS... --out DIR``; the help of each comes from CompareConfig's field docstrings."""
    docs = field_docs(CompareConfig)
    parser = OneLineErrorParser(prog="mlsae-analyse compare", description=__doc__.splitlines()[0])
    parser.add_argument("analyses", nargs="+", metavar="ANALYSIS", help=docs["analyses"])
    parser.add_argument("--out", required=True, help=docs["out"])
    parser.add_argument("--device", default=CompareConfig.device, help=docs["device"])
    return parser


def compare_main(argv: Sequence[str] | None) -> int:
    """The command without its error handling (``mlsae-analyse compare`` wraps it, as it does report)."""
    config = CompareConfig(**vars(build_parser().parse_args(argv)))
    device = str(resolve_device(config.device))
    tables = compare_analyses([Path(folder) for folder in config.analyses])  # refused before --out is touched
    markdown: list[str] = []
    write_fresh_directory(Path(config.out), lambda partial: markdown.append(write_comparison(tables, partial, device)))
    print(markdown[0], end="")
    print(f"wrote {config.out}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(compare_main, argv, resumes=NOTHING_KEPT)


if __name__ == "__main__":
    sys.exit(main())

"""Self-contained HTML reports: one file per analysis (with a latent browser) and one per sweep.

The file opens from disk with no server and makes no requests: figures are embedded as base64 PNG,
tables are rendered from the CSVs, and the latent browser's data is one JSON object in a
``<script type="application/json">`` tag, read by plain inline JavaScript (templates/browser.js).

Embedded browser data (``latent_browser_data``), kept bounded: per latent its P(L | J) over layers,
E[L], Var(L), how many tokens it fired on, its top ``max_contexts`` examples from examples.parquet,
each cut to ``context_radius`` tokens either side of the active token, and its nearest decoder
neighbours (neighbours.parquet, see neighbours.py). Big numeric arrays travel as base64 of
little-endian typed arrays ({"dtype", "b64"}), tokens as indices into a table of the distinct token
strings used, so that 131,072 latents stay in the tens of megabytes.

The page only reads the files the analysis wrote (layout.py names them): it loads no SAE and
recomputes nothing; token texts come from token_texts.parquet (analyses written before it existed:
from the tokenizer named in summary.json). Rebuild a report by hand:
``python -m mlsae_analysis.html_report ANALYSIS_DIR``, or for a cross-run report directory
``python -m mlsae_analysis.html_report REPORT_DIR --runs DIR...``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import polars as pl

from mlsae_cache.atomic import atomic_write_text
from mlsae_cache.clitools import OneLineErrorParser, add_dataclass_arguments, config_from_args, run_command
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files, verified

from . import layout
from .layer_distributions import layer_prob_columns
from .token_texts import TokenStrings, stored_strings, tokenizer_strings

MAX_CONTEXTS = 5
CONTEXT_RADIUS = 6
MAX_TABLE_ROWS = 200  # rows rendered per table; the CSV beside the report has them all
MAX_LATENT_TABLE_ROWS = 30  # per-latent tables (e.g. single_prompt.csv): the strongest rows only
# Figures are saved at 200 dpi (plots.PNG_DPI); 0.6 CSS px per pixel shows them a little larger than on paper.
FIGURE_SCALE = 0.6

# What each known file shows; unknown CSVs and PNGs are shown too, titled by file name.
TABLE_TITLES = {
    layout.REPORT_TABLE1: "Table 1: mean metrics per model at the reference R and k",
    layout.REPORT_TABLE2: "Table 2: mean max cosine similarity of decoder rows per model",
    layout.REPORT_RUNS: "Mean metrics, MMCS and variance ratios, every run",
    layout.METRICS: "Reconstruction and downstream metrics per layer (Table 1)",
    layout.MMCS: "Mean max cosine similarity of decoder rows (Table 2)",
    layout.VARIANCE_RATIOS: "Variance ratios of the layer distributions (eqs. 11, 12)",
    layout.RESIDUAL: "Residual stream: cosine similarity of adjacent layers and mean norm",
    layout.SINGLE_PROMPT: "Latents active on the single prompt (strongest first)",
    layout.SPLICE_ALL_LAYERS: "Delta CE and KL with every layer spliced at once (crosscoder; with every position kept "
                              "this equals splicing the last layer alone)",
    layout.REPORT_PER_LAYER: "Metrics per layer, every run",
}
FIGURE_TITLES = {
    layout.HEATMAP_FIGURE: "Each latent's spread over layers (MLSAE: P(L | J), fig. 2), latents sorted by E[L]",
    layout.WEIGHTED_HEATMAP_FIGURE: "Crosscoder: activation-weighted share per layer, active latents sorted by E[L]",
    layout.SINGLE_PROMPT_FIGURE: "Latents active on the single prompt (fig. 3)",
    layout.METRICS_FIGURE: "Metrics per layer (figs. 9-11)",
    layout.REPORT_PER_LAYER_FIGURE: "Metrics against relative layer, every run (figs. 9-11)",
    layout.REPORT_HEATMAPS_FIGURE: "P(L | J) per latent for every run, latents sorted by E[L] (figs. 2, 7)",
    layout.variance_ratios_vs_figure("expansion_factor"): "Variance ratios against the expansion factor R (fig. 5)",
    layout.variance_ratios_vs_figure("k"): "Variance ratios against k (fig. 5)",
    layout.mmcs_vs_figure("expansion_factor"): "MMCS against the expansion factor R, with and without the tuned lens (fig. 13)",
    layout.mmcs_vs_figure("k"): "MMCS against k, with and without the tuned lens (fig. 13)",
    layout.RESIDUAL_COS_NEXT_FIGURE: "Cosine similarity of adjacent residual layers (fig. 1)",
    layout.RESIDUAL_NORM_FIGURE: "Mean residual norm per layer (fig. 4)",
    layout.VARIANCE_RATIOS_FIGURE: "Variance ratios, with and without the tuned lens (figs. 5, 6)",
}


# What the latent browser's bar chart (p_layer_* of latent_layers.parquet) shows for each family, and the
# sections each family's page has: every family has the summary, the latent browser, metrics.csv, mmcs.csv,
# residual.csv and their figures; the MLSAE adds variance_ratios.csv and the single prompt (figs 3, 5), the
# crosscoder splice_all_layers.csv and the activation-weighted heatmap.
LAYER_LABELS = {
    "mlsae": "Distribution over layers, P(L | J = {latent})",
    "per-layer": "Layer of the SAE that latent {latent} belongs to (id = layer position x n + j)",
    "crosscoder": "Decoder-norm share per layer, s_j(l) = ||W_dec[j, l]||^2 of latent j = {latent} "
                  "(it fires per token, for every layer)",
}

# ----------------------------------------------------------------------------- embedded data


def _packed(values: np.ndarray, dtype: str) -> dict:
    """A numeric array as {"dtype", "b64"}: base64 of its little-endian bytes, for a JS typed array."""
    little = {"uint8": "u1", "int8": "i1", "uint16": "<u2", "int32": "<i4", "uint32": "<u4", "float32": "<f4"}[dtype]
    data = np.ascontiguousarray(np.asarray(values).astype(little, copy=False)).tobytes()
    return {"dtype": dtype, "b64": base64.b64encode(data).decode("ascii")}


def _uint_dtype(max_value: int) -> str:
    """The narrowest unsigned type that holds 0..max_value."""
    return "uint8" if max_value < 2**8 else "uint16" if max_value < 2**16 else "uint32"


def trimmed_contexts(examples: pl.DataFrame, max_contexts: int, context_radius: int) -> pl.DataFrame:
    """The top ``max_contexts`` examples per latent, contexts cut to ``context_radius`` tokens either side.

    Returns latent, rank, layer, activation, context_ids (cut) and context_offset (the active token's
    index in the cut context), sorted by latent then rank.
    """
    start = (pl.col("context_offset") - context_radius).clip(lower_bound=0)
    return (
        examples.lazy()
        .filter(pl.col("rank") < max_contexts)
        .select(
            pl.col("latent").cast(pl.Int64),
            pl.col("rank"),
            pl.col("layer").cast(pl.Int64),
            pl.col("activation").cast(pl.Float32),
            pl.col("context_ids").list.slice(start, pl.col("context_offset") - start + context_radius + 1),
            (pl.col("context_offset") - start).cast(pl.Int64).alias("context_offset"),
        )
        .sort("latent", "rank")
        .collect()
    )


def _dense(n_latents: int, latents: np.ndarray, values: np.ndarray, fill: float, dtype) -> np.ndarray:
    """values placed at their latents' rows of an array over all ``n_latents`` latents."""
    out = np.full((n_latents, *values.shape[1:]), fill, dtype=dtype)
    out[latents] = values
    return out


def _neighbour_arrays(neighbours: pl.DataFrame, n_latents: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [n, k], cosines [n, k]) from a neighbours.parquet table covering every latent."""
    k = int(neighbours["rank"].max()) + 1 if neighbours.height else 0  # type: ignore[arg-type]
    if k == 0 or neighbours.height != n_latents * k or int(neighbours["latent"].max()) != n_latents - 1:  # type: ignore[arg-type]
        raise MlsaeError(
            f"{layout.NEIGHBOURS} does not cover the {n_latents} latents of this analysis; {layout.FIX}"
        )
    ordered = neighbours.sort("latent", "rank")
    return ordered["neighbour"].to_numpy().reshape(n_latents, k), ordered["cosine"].to_numpy().reshape(n_latents, k)


def latent_browser_data(
    analysis_dir: str | Path,
    token_strings: TokenStrings,
    neighbours: pl.DataFrame | None = None,
    max_contexts: int = MAX_CONTEXTS,
    context_radius: int = CONTEXT_RADIUS,
) -> dict:
    """The JSON object the latent browser reads (see the module docstring). Arrays run over all latents."""
    analysis_dir = Path(analysis_dir)
    summary = layout.read_summary(analysis_dir)
    layers = [int(layer) for layer in summary["layers"]]
    n_latents = int(summary.get("latents_total") or summary["n_latents"])  # the per-layer suite's ids run over L*n
    table = layout.read_table(analysis_dir, layout.LATENT_LAYERS)
    ids = table["latent"].to_numpy()
    p_layer = table.select(layer_prob_columns(table)).to_numpy()  # [active latents, nL]
    if p_layer.shape[1] != len(layers):
        raise MlsaeError(f"{layout.LATENT_LAYERS} has {p_layer.shape[1]} layers but {layout.SUMMARY} lists {len(layers)}; re-run the analysis")

    contexts = trimmed_contexts(layout.read_table(analysis_dir, layout.EXAMPLES), max_contexts, context_radius)
    lengths = contexts["context_ids"].list.len().to_numpy()  # [C]
    flat_ids = contexts["context_ids"].explode().drop_nulls().to_numpy()  # [sum of lengths]
    vocab_ids, token_index = np.unique(flat_ids, return_inverse=True)
    per_latent = np.bincount(contexts["latent"].to_numpy(), minlength=n_latents)  # [n]
    top_activation = contexts.filter(pl.col("rank") == 0)

    data = {
        "n_latents": n_latents,
        "layers": layers,
        "n_tokens": int(summary.get("n_tokens") or 0),
        "max_contexts": max_contexts,
        "context_radius": context_radius,
        "mean_layer": _packed(_dense(n_latents, ids, table["mean_layer"].to_numpy(), np.nan, np.float32), "float32"),
        "var_layer": _packed(_dense(n_latents, ids, table["var_layer"].to_numpy(), np.nan, np.float32), "float32"),
        "n_active": _packed(_dense(n_latents, ids, table["n_tokens"].to_numpy(), 0, np.int32), "int32"),
        "max_activation": _packed(_dense(n_latents, top_activation["latent"].to_numpy(),
                                         top_activation["activation"].to_numpy(), np.nan, np.float32), "float32"),  # fmt: skip
        # P(L | J) in units of 1/65535: [n * nL], row-major by latent
        "p_layer": _packed(np.rint(_dense(n_latents, ids, p_layer, 0.0, np.float64) * 65535), "uint16"),
        "vocab": token_strings(vocab_ids.tolist()),
        # contexts, latent by latent in rank order; the page turns the counts and lengths into offsets
        "ctx_count": _packed(per_latent, _uint_dtype(max_contexts)),  # [n]
        "ctx_length": _packed(lengths, _uint_dtype(2 * context_radius + 1)),  # [C]
        "ctx_tokens": _packed(token_index, _uint_dtype(len(vocab_ids) - 1)),  # [sum of lengths] into vocab
        "ctx_offset": _packed(contexts["context_offset"].to_numpy(), _uint_dtype(2 * context_radius)),  # [C] active token
        "ctx_activation": _packed(contexts["activation"].to_numpy(), "float32"),  # [C]
        "k_neighbours": 0,
        # what p_layer is for this family, and whether a context fired at one layer (not a crosscoder's: per token)
        "layer_label": LAYER_LABELS.get(str(summary.get("arch") or "mlsae"), LAYER_LABELS["mlsae"]),
    }
    if contexts["layer"].null_count() == 0:  # [C] layer-axis position of each context's activation
        data["ctx_layer"] = _packed(contexts["layer"].to_numpy(), _uint_dtype(len(layers) - 1))
    if neighbours is not None:
        indices, cosines = _neighbour_arrays(neighbours, n_latents)
        data.update(k_neighbours=indices.shape[1], nb_index=_packed(indices, "uint32"), nb_cosine=_packed(cosines, "float32"))
    return data


# ----------------------------------------------------------------------------- HTML pieces


def _template(name: str) -> str:
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def _format_cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def table_html(df: pl.DataFrame, max_rows: int = MAX_TABLE_ROWS) -> str:
    """A scrollable HTML table; p_layer_* columns are left out, latent ids link to the latent browser."""
    columns = [c for c in df.columns if not c.startswith("p_layer_")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for row in df.head(max_rows).select(columns).iter_rows():
        cells = []
        for column, value in zip(columns, row):
            text = _format_cell(value)
            if column == "latent" and isinstance(value, int):
                text = f'<a href="#latent={value}" class="latent-link" data-latent="{value}">{value}</a>'
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    note = f'<p class="note">first {max_rows} of {df.height} rows</p>' if df.height > max_rows else ""
    return f'<div class="table-scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>{note}'


def _ordered(paths: list[Path], known: Sequence[str], key: Callable[[Path], str]) -> list[Path]:
    """Known files first, in the given order, then the rest by name."""
    rank = {name: i for i, name in enumerate(known)}
    return sorted(paths, key=lambda p: (rank.get(key(p), len(rank)), p.name))


def tables_section(directory: Path, skip: Sequence[str] = ()) -> str:
    parts = []
    for csv in _ordered(list(directory.glob("*.csv")), list(TABLE_TITLES), lambda p: p.name):
        if csv.name in skip:
            continue
        df = pl.read_csv(verified(csv, layout.FIX))
        max_rows = MAX_TABLE_ROWS
        if "latent" in df.columns:  # one row per latent: show the strongest few
            max_rows = MAX_LATENT_TABLE_ROWS
            if "total_activation" in df.columns:
                df = df.sort("total_activation", descending=True)
        title = TABLE_TITLES.get(csv.name, csv.stem)
        parts.append(f'<div class="card"><h3>{html.escape(title)} <span class="file">{csv.name}</span></h3>{table_html(df, max_rows)}</div>')
    return f'<section id="tables"><h2>Tables</h2>{"".join(parts)}</section>' if parts else ""


def _png_width(data: bytes) -> int:
    return int.from_bytes(data[16:20], "big")  # the IHDR chunk, right after the 8-byte signature


def figures_section(directory: Path) -> str:
    """Every PNG of the directory, embedded, each shown at FIGURE_SCALE of its pixel width (at most the page's)."""
    parts = []
    for png in _ordered(list(directory.glob("*.png")), list(FIGURE_TITLES), lambda p: p.stem):
        title = FIGURE_TITLES.get(png.stem, png.stem)
        data = verified(png, layout.FIX).read_bytes()
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        width = round(_png_width(data) * FIGURE_SCALE)
        parts.append(f'<figure class="card" style="width: {width}px"><img src="{uri}" alt="{html.escape(title)}" '
                     f'title="click to enlarge"><figcaption>{html.escape(title)} <span class="file">{png.name}</span>'
                     "</figcaption></figure>")  # fmt: skip
    return f'<section id="figures"><h2>Figures</h2><div class="figures">{"".join(parts)}</div></section>' if parts else ""


def _dead_cards(metrics: dict) -> list[tuple[str, object, str]]:
    """The two dead fractions, each named for what it is. Analyses written before ``dead_every_layer``
    existed stored the every-layer fraction as the mean row's ``dead_fraction``."""
    if "dead_every_layer" not in metrics:
        return [("dead at every layer", metrics.get("dead_fraction"), "latents never active at any layer on the test set")]
    return [("dead per layer (mean)", metrics.get("dead_fraction"), "fraction of latents never active at a layer, averaged over layers"),
            ("dead at every layer", metrics.get("dead_every_layer"), "latents never active at any layer on the test set")]  # fmt: skip


def _summary_cards(summary: dict) -> str:
    metrics = summary.get("metrics_mean", {})
    ratios = summary.get("variance_ratios", {})
    cards = [("FVU", metrics.get("fvu"), "fraction of variance unexplained, mean over layers"),
             ("MSE", metrics.get("mse"), "mean squared error, mean over layers"),
             ("L0 sparsity", metrics.get("l0"), "active latents per token and layer"),
             ("L0 per token", metrics.get("l0_per_token"), "active latents per token (crosscoder: shared by all layers)"),
             ("ΔCE", metrics.get("delta_ce"), "increase of the LM's loss with one layer spliced, mean over layers"),
             *_dead_cards(metrics), ("MMCS", summary.get("mmcs_mean"), "mean max cosine similarity of decoder rows"),
             ("ratio 11", ratios.get("ratio_11"), "eq. 11"), ("ratio 12", ratios.get("ratio_12"), "eq. 12")]  # fmt: skip
    return "".join(f'<div class="stat" title="{html.escape(tip)}"><div class="value">{_format_cell(v)}</div>'
                   f'<div class="label">{html.escape(k)}</div></div>' for k, v, tip in cards if v is not None)  # fmt: skip


def _warnings_html(summary: dict) -> str:
    """The analysis's warnings (e.g. a few tokens carrying most of a layer's variance), one line each."""
    lines = [str(line).removeprefix("warning: ") for line in summary.get("warnings") or []]
    return "".join(f'<p class="warning">⚠ {html.escape(line)}</p>' for line in lines)


def _page(title: str, subtitle: str, nav: Sequence[tuple[str, str]], body: str, scripts: str = "") -> str:
    links = "".join(f'<a href="#{anchor}">{html.escape(label)}</a>' for anchor, label in nav)
    slots = {"TITLE": html.escape(title), "CSS": _template("report.css"), "PAGE_JS": _template("page.js"),
             "SUBTITLE": subtitle, "NAV": links, "BODY": body, "SCRIPTS": scripts}  # fmt: skip
    # one pass, so that text inside a filled slot is never taken for another slot
    return re.sub(r"@([A-Z_]+)@", lambda m: slots[m.group(1)], _template("report.html"))


def _json_script(element_id: str, data: dict) -> str:
    # "</" could close the script element early; "<\/" is the same string to JSON.parse.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _training_fact(training: dict | None) -> str | None:
    """How far the SAE was trained, e.g. "1,000 of 1,000 steps (131,072,000 tokens)"; None when not recorded."""
    if not training:
        return None
    fact = f"{training['steps']:,} of {training['total_steps']:,} steps ({training['tokens']:,} tokens)"
    return fact if training.get("finished", True) else fact + ", UNFINISHED"


def _facts(summary: dict) -> str:
    layers = summary.get("layers") or []
    facts = [("family", summary.get("arch")), ("model", summary.get("model")), ("layers", f"{layers[0]}–{layers[-1]} ({len(layers)})" if layers else None),
             ("d_model", summary.get("d_model")), ("latents", summary.get("n_latents")), ("k", summary.get("k")),
             ("tokens analysed", summary.get("n_tokens")), ("trained", _training_fact(summary.get("training"))),
             ("run", summary.get("run")), ("cache", summary.get("cache")),
             ("trained elsewhere", _imported_fact(summary.get("imported")))]  # fmt: skip
    return " · ".join(f"{k} <b>{html.escape(str(v))}</b>" for k, v in facts if v is not None)


def _imported_fact(imported: dict | None) -> str | None:
    """Other tools' SAEs: their formats and how their input normalisation differs from ours; None for our own runs."""
    if not imported:
        return None
    formats = ", ".join(imported.get("formats") or [])
    shared = any(source.get("layer") is None for source in imported.get("sources") or [])  # one SAE for all layers
    analysed_as = "one SAE shared by every layer, analysed as an MLSAE" if shared else "SAEs, analysed as a per-layer baseline"
    return f"{formats} {analysed_as}. {imported.get('normalisation') or ''}".strip()


# ----------------------------------------------------------------------------- writers


def _stored_neighbours(analysis_dir: Path) -> pl.DataFrame | None:
    """The analysis's neighbours.parquet; None for an analysis written before it existed (no neighbours shown)."""
    if not (analysis_dir / layout.NEIGHBOURS).exists():
        return None
    return layout.read_table(analysis_dir, layout.NEIGHBOURS)


def _stored_token_strings(analysis_dir: Path, summary: dict) -> TokenStrings:
    """Token texts from token_texts.parquet; for an analysis written before it existed, from the tokenizer
    of the model in summary.json (or ids, with a warning, when that cannot be loaded)."""
    if not (analysis_dir / layout.TOKEN_TEXTS).exists():
        return tokenizer_strings(summary.get("model"))
    return stored_strings(layout.read_table(analysis_dir, layout.TOKEN_TEXTS))


def write_analysis_html(
    analysis_dir: str | Path,
    out_file: str | Path | None = None,
    *,
    token_strings: TokenStrings | None = None,
    max_contexts: int = MAX_CONTEXTS,
    context_radius: int = CONTEXT_RADIUS,
) -> Path:
    """Write one self-contained HTML report of an analysis directory (default <analysis_dir>/report.html)
    from the files the analysis wrote (nothing is recomputed).

    token_strings: token ids -> text; by default the analysis's token_texts.parquet.
    """
    analysis_dir = Path(analysis_dir)
    out_file = Path(out_file) if out_file is not None else analysis_dir / layout.PAGE
    summary = layout.read_summary(analysis_dir)
    if max_contexts < 1 or context_radius < 0:
        raise MlsaeError(f"max_contexts must be >= 1 and context_radius >= 0, got {max_contexts} and {context_radius}")
    strings = token_strings or _stored_token_strings(analysis_dir, summary)
    data = latent_browser_data(analysis_dir, strings, _stored_neighbours(analysis_dir), max_contexts, context_radius)
    model = Path(str(summary.get("model"))).name
    arch = str(summary.get("arch") or "mlsae")
    family = {"mlsae": "MLSAE", "per-layer": "Per-layer SAEs", "crosscoder": "Crosscoder"}.get(arch, arch)
    if summary.get("imported"):  # trained elsewhere: say whose
        family = f"Imported {family} ({', '.join(summary['imported'].get('formats') or [])})"
    title = f"{family} analysis: {model}, R={summary.get('expansion_factor')}, k={summary.get('k')}"
    body = (
        f'<section id="summary">{_warnings_html(summary)}<div class="stats">{_summary_cards(summary)}</div></section>'
        + _template("browser.html")
        + tables_section(analysis_dir)
        + figures_section(analysis_dir)
    )
    scripts = _json_script("latent-data", data) + f"<script>{_template('browser.js')}</script>"
    nav = [("browser", "Latent browser"), ("tables", "Tables"), ("figures", "Figures")]
    written = atomic_write_text(out_file, _page(title, _facts(summary), nav, body, scripts))
    _record_if_inside(analysis_dir, written)
    return written


def _record_if_inside(directory: Path, written: Path) -> None:
    """Add a page written into an analysis or report directory to its checksum record (if it has one)."""
    if written.parent.resolve() == directory.resolve():
        record_files(directory, [written.name], create=False)


def write_sweep_html(
    report_dir: str | Path,
    run_dirs: Sequence[str | Path],
    out_file: str | Path | None = None,
) -> Path:
    """Write the cross-run report's HTML (default <report_dir>/report.html), linking each run's own report.

    run_dirs are the analysis directories the report compares; each one's report.html is written
    first if absent (from that analysis's files).
    """
    report_dir = Path(report_dir)
    out_file = Path(out_file) if out_file is not None else report_dir / layout.PAGE
    if not report_dir.is_dir():
        raise MlsaeError(f"report directory {report_dir} does not exist; write it with mlsae-analyse report")
    rows = []
    for analysis_dir in map(Path, run_dirs):
        summary = layout.read_summary(analysis_dir)
        run_report = analysis_dir / layout.PAGE
        if not run_report.exists():
            write_analysis_html(analysis_dir)
        href = Path(os.path.relpath(run_report.resolve(), out_file.parent.resolve())).as_posix()
        metrics = summary.get("metrics_mean", {})
        rows.append(
            f'<tr><td><a href="{html.escape(href)}">{html.escape(analysis_dir.name)}</a></td>'
            f"<td>{html.escape(Path(str(summary.get('model'))).name)}</td><td class=num>{summary.get('n_latents')}</td>"
            f"<td class=num>{summary.get('k')}</td><td class=num>{_format_cell(metrics.get('fvu'))}</td>"
            f"<td class=num>{_format_cell(metrics.get('delta_ce'))}</td><td class=num>{_format_cell(summary.get('mmcs_mean'))}</td></tr>"
        )
    head = "".join(f"<th>{c}</th>" for c in ("analysis", "model", "latents", "k", "FVU", "ΔCE", "MMCS"))
    runs = (f'<section id="runs"><h2>Runs</h2><div class="card"><p class="note">Each run\'s own report (tables, '
            f"figures, latent browser) opens from its link.</p><div class=table-scroll><table><thead><tr>{head}</tr>"
            f'</thead><tbody>{"".join(rows)}</tbody></table></div></div></section>')  # fmt: skip
    body = runs + tables_section(report_dir) + figures_section(report_dir)
    nav = [("runs", "Runs"), ("tables", "Tables"), ("figures", "Figures")]
    subtitle = f"{len(rows)} runs · {html.escape(str(report_dir.resolve()))}"
    written = atomic_write_text(out_file, _page("MLSAE sweep report", subtitle, nav, body))
    _record_if_inside(report_dir, written)
    return written


# ----------------------------------------------------------------------------- command line


@dataclass
class HtmlReportConfig:
    runs: list[str] | None = None
    """For a cross-run report directory: the analysis directories it compares (their reports are linked)."""

    out: str | None = None
    """The HTML file to write (default: report.html inside the directory)."""

    tokenizer: str | None = None
    """Tokenizer (directory or hub id) for the contexts (default: the analysis's token_texts.parquet)."""

    max_contexts: int = MAX_CONTEXTS
    """Top contexts embedded per latent."""

    context_radius: int = CONTEXT_RADIUS
    """Tokens of context kept on each side of the active token."""

    progress: bool = True
    """Accepted for older commands; the page only reads files and shows no progress bar."""


def _main(argv: Sequence[str] | None) -> int:
    # no abbreviations: --run (an option of old versions, which recomputed neighbours) must not pass for --runs
    parser = OneLineErrorParser(prog="python -m mlsae_analysis.html_report", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("directory", help="an analysis directory (mlsae-analyse) or a report directory (mlsae-analyse report)")
    add_dataclass_arguments(parser, HtmlReportConfig)
    args = parser.parse_args(argv)
    config: HtmlReportConfig = config_from_args(HtmlReportConfig, args)
    directory = Path(args.directory)
    if not directory.is_dir():
        raise MlsaeError(f"{directory} is not a directory; give one written by mlsae-analyse")
    if config.runs:
        written = write_sweep_html(directory, config.runs, config.out)
    else:
        strings = tokenizer_strings(config.tokenizer, required=True) if config.tokenizer else None
        written = write_analysis_html(directory, config.out, token_strings=strings, max_contexts=config.max_contexts,
                                      context_radius=config.context_radius)  # fmt: skip
    print(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

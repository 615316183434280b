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

Rebuild a report by hand: ``python -m mlsae_analysis.html_report ANALYSIS_DIR [--run RUN_DIR]``, or
for a cross-run report directory ``python -m mlsae_analysis.html_report REPORT_DIR --runs DIR...``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import sys
import warnings
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

from .layer_distributions import layer_prob_columns
from .neighbours import NEIGHBOURS_FILE, write_run_neighbours

REPORT_FILE = "report.html"
# what to do about a damaged file of an analysis (or report) directory
ANALYSIS_FIX = "analyse the run again with mlsae-analyse (or restore the file)"
MAX_CONTEXTS = 5
CONTEXT_RADIUS = 6
MAX_TABLE_ROWS = 200  # rows rendered per table; the CSV beside the report has them all
MAX_LATENT_TABLE_ROWS = 30  # per-latent tables (e.g. single_prompt.csv): the strongest rows only
# Figures are saved at 200 dpi (plots.PNG_DPI); 0.6 CSS px per pixel shows them a little larger than on paper.
FIGURE_SCALE = 0.6

TokenStrings = Callable[[Sequence[int]], list[str]]

# What each known file shows; unknown CSVs and PNGs are shown too, titled by file name.
TABLE_TITLES = {
    "table1.csv": "Table 1: mean metrics per model at the reference R and k",
    "table2.csv": "Table 2: mean max cosine similarity of decoder rows per model",
    "tables.csv": "Mean metrics, MMCS and variance ratios, every run",
    "metrics.csv": "Reconstruction and downstream metrics per layer (Table 1)",
    "mmcs.csv": "Mean max cosine similarity of decoder rows (Table 2)",
    "variance_ratios.csv": "Variance ratios of the layer distributions (eqs. 11, 12)",
    "residual.csv": "Residual stream: cosine similarity of adjacent layers and mean norm",
    "single_prompt.csv": "Latents active on the single prompt (strongest first)",
    "per_layer.csv": "Metrics per layer, every run",
}
FIGURE_TITLES = {
    "heatmap": "P(L | J) per latent, latents sorted by E[L] (fig. 2)",
    "single_prompt": "Latents active on the single prompt (fig. 3)",
    "metrics": "Metrics per layer (figs. 9-11)",
    "per_layer": "Metrics against relative layer, every run (figs. 9-11)",
    "heatmaps": "P(L | J) per latent for every run, latents sorted by E[L] (figs. 2, 7)",
    "variance_ratios_vs_expansion_factor": "Variance ratios against the expansion factor R (fig. 5)",
    "variance_ratios_vs_k": "Variance ratios against k (fig. 5)",
    "mmcs_vs_expansion_factor": "MMCS against the expansion factor R, with and without the tuned lens (fig. 13)",
    "mmcs_vs_k": "MMCS against k, with and without the tuned lens (fig. 13)",
    "residual_cos_next": "Cosine similarity of adjacent residual layers (fig. 1)",
    "residual_norm": "Mean residual norm per layer (fig. 4)",
    "variance_ratios": "Variance ratios, with and without the tuned lens (figs. 5, 6)",
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
            f"{NEIGHBOURS_FILE} does not cover the {n_latents} latents of this analysis; "
            "rebuild it by passing the run directory (--run RUN_DIR)"
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
    summary = read_summary(analysis_dir)
    n_latents, layers = int(summary["n_latents"]), [int(layer) for layer in summary["layers"]]
    table = pl.read_parquet(verified(analysis_dir / "latent_layers.parquet", ANALYSIS_FIX))
    ids = table["latent"].to_numpy()
    p_layer = table.select(layer_prob_columns(table)).to_numpy()  # [active latents, nL]
    if p_layer.shape[1] != len(layers):
        raise MlsaeError(f"latent_layers.parquet has {p_layer.shape[1]} layers but summary.json lists {len(layers)}; re-run the analysis")

    contexts = trimmed_contexts(pl.read_parquet(verified(analysis_dir / "examples.parquet", ANALYSIS_FIX)), max_contexts, context_radius)
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
        "ctx_layer": _packed(contexts["layer"].to_numpy(), _uint_dtype(len(layers) - 1)),  # [C] layer-axis position
        "ctx_activation": _packed(contexts["activation"].to_numpy(), "float32"),  # [C]
        "k_neighbours": 0,
    }
    if neighbours is not None:
        indices, cosines = _neighbour_arrays(neighbours, n_latents)
        data.update(k_neighbours=indices.shape[1], nb_index=_packed(indices, "uint32"), nb_cosine=_packed(cosines, "float32"))
    return data


def read_summary(analysis_dir: Path) -> dict:
    summary_file = analysis_dir / "summary.json"
    if not summary_file.exists():
        raise MlsaeError(f"{analysis_dir} holds no summary.json; give a directory written by mlsae-analyse")
    try:
        return json.loads(verified(summary_file, ANALYSIS_FIX).read_text())
    except ValueError:
        raise MlsaeError(f"{summary_file} is not valid JSON; {ANALYSIS_FIX}") from None


def tokenizer_strings(name: str | None, required: bool = False) -> TokenStrings:
    """Token id -> text with a tokenizer (directory or hub id).

    Without one (or, unless ``required``, when it cannot be loaded: a warning) ids show as "<id>".
    """
    if name:
        from mlsae_cache.lm import load_tokenizer

        try:
            tokenizer = load_tokenizer(str(name))
            return lambda ids: tokenizer.batch_decode([[i] for i in ids])
        except MlsaeError as exc:
            if required:
                raise
            warnings.warn(f"contexts are shown as token ids: {exc} (pass --tokenizer DIR)", stacklevel=2)
    return lambda ids: [f"<{i}>" for i in ids]


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
        df = pl.read_csv(verified(csv, ANALYSIS_FIX))
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
        data = verified(png, ANALYSIS_FIX).read_bytes()
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
    facts = [("model", summary.get("model")), ("layers", f"{layers[0]}–{layers[-1]} ({len(layers)})" if layers else None),
             ("d_model", summary.get("d_model")), ("latents", summary.get("n_latents")), ("k", summary.get("k")),
             ("tokens analysed", summary.get("n_tokens")), ("trained", _training_fact(summary.get("training"))),
             ("run", summary.get("run")), ("cache", summary.get("cache"))]  # fmt: skip
    return " · ".join(f"{k} <b>{html.escape(str(v))}</b>" for k, v in facts if v is not None)


# ----------------------------------------------------------------------------- writers


def _resolve_neighbours(analysis_dir: Path, run_dir: str | Path | None, progress: bool, device: str) -> pl.DataFrame | None:
    """With a run: (re)compute neighbours.parquet from its decoder. Without: the stored one, if any."""
    if run_dir is not None:
        write_run_neighbours(run_dir, analysis_dir, progress=progress, device=device)
        record_files(analysis_dir, [NEIGHBOURS_FILE], create=False)
    path = analysis_dir / NEIGHBOURS_FILE
    return pl.read_parquet(verified(path, ANALYSIS_FIX)) if path.exists() else None


def write_analysis_html(
    analysis_dir: str | Path,
    out_file: str | Path | None = None,
    run_dir: str | Path | None = None,
    *,
    token_strings: TokenStrings | None = None,
    max_contexts: int = MAX_CONTEXTS,
    context_radius: int = CONTEXT_RADIUS,
    progress: bool = True,
    device: str = "auto",
) -> Path:
    """Write one self-contained HTML report of an analysis directory (default <analysis_dir>/report.html).

    run_dir: the trained run; its decoder gives each latent's nearest neighbours, stored as
    <analysis_dir>/neighbours.parquet. Without it a stored neighbours.parquet is used, if present.
    token_strings: token ids -> text; by default the tokenizer of the model in summary.json.
    device: where the neighbours are computed ("auto": CUDA when available).
    """
    analysis_dir = Path(analysis_dir)
    out_file = Path(out_file) if out_file is not None else analysis_dir / REPORT_FILE
    summary = read_summary(analysis_dir)
    if max_contexts < 1 or context_radius < 0:
        raise MlsaeError(f"max_contexts must be >= 1 and context_radius >= 0, got {max_contexts} and {context_radius}")
    neighbours = _resolve_neighbours(analysis_dir, run_dir, progress, device)
    strings = token_strings or tokenizer_strings(summary.get("model"))
    data = latent_browser_data(analysis_dir, strings, neighbours, max_contexts, context_radius)
    model = Path(str(summary.get("model"))).name
    title = f"MLSAE analysis: {model}, R={summary.get('expansion_factor')}, k={summary.get('k')}"
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
    *,
    progress: bool = True,
) -> Path:
    """Write the cross-run report's HTML (default <report_dir>/report.html), linking each run's own report.

    run_dirs are the analysis directories the report compares; each one's report.html is written
    first if absent (with neighbours from the run named in its summary.json, when that still exists).
    """
    report_dir = Path(report_dir)
    out_file = Path(out_file) if out_file is not None else report_dir / REPORT_FILE
    if not report_dir.is_dir():
        raise MlsaeError(f"report directory {report_dir} does not exist; write it with mlsae-analyse report")
    rows = []
    for analysis_dir in map(Path, run_dirs):
        summary = read_summary(analysis_dir)
        run_report = analysis_dir / REPORT_FILE
        if not run_report.exists():
            run = summary.get("run")
            run = run if run and Path(run).exists() and not (analysis_dir / NEIGHBOURS_FILE).exists() else None
            write_analysis_html(analysis_dir, run_dir=run, progress=progress)
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
    run: str | None = None
    """The trained run (directory or .safetensors) of an analysis: its decoder gives each latent's nearest neighbours."""

    runs: list[str] | None = None
    """For a cross-run report directory: the analysis directories it compares (their reports are linked)."""

    out: str | None = None
    """The HTML file to write (default: report.html inside the directory)."""

    tokenizer: str | None = None
    """Tokenizer (directory or hub id) for the contexts (default: the model named in summary.json)."""

    max_contexts: int = MAX_CONTEXTS
    """Top contexts embedded per latent."""

    context_radius: int = CONTEXT_RADIUS
    """Tokens of context kept on each side of the active token."""

    device: str = "auto"
    """Where decoder neighbours are computed with --run: cpu, cuda, or auto (cuda when available)."""

    progress: bool = True
    """Show progress bars."""


def _main(argv: Sequence[str] | None) -> int:
    parser = OneLineErrorParser(prog="python -m mlsae_analysis.html_report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="an analysis directory (mlsae-analyse) or a report directory (mlsae-analyse report)")
    add_dataclass_arguments(parser, HtmlReportConfig)
    args = parser.parse_args(argv)
    config: HtmlReportConfig = config_from_args(HtmlReportConfig, args)
    directory = Path(args.directory)
    if not directory.is_dir():
        raise MlsaeError(f"{directory} is not a directory; give one written by mlsae-analyse")
    if config.runs:
        written = write_sweep_html(directory, config.runs, config.out, progress=config.progress)
    else:
        strings = tokenizer_strings(config.tokenizer, required=True) if config.tokenizer else None
        written = write_analysis_html(directory, config.out, config.run, token_strings=strings, max_contexts=config.max_contexts,
                                      context_radius=config.context_radius, progress=config.progress,
                                      device=config.device)  # fmt: skip
    print(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

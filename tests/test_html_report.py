"""HTML reports: the embedded browser data against its sources, and the page in real headless Chromium.

The analysis directories here are small and synthetic but made by the pipeline's own functions
(latent_layer_table, top_examples, token_text_table, decoder_neighbours, plot_layer_heatmap, save_sae,
report), with the real Pythia tokenizer, so their files have exactly the schema mlsae-analyse writes.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from matplotlib.image import imread

from mlsae_analysis import layout
from mlsae_analysis.examples import top_examples
from mlsae_analysis.html_report import latent_browser_data, main, write_analysis_html, write_sweep_html
from mlsae_analysis.layer_distributions import latent_layer_table, layer_prob_columns
from mlsae_analysis.neighbours import decoder_neighbours
from mlsae_analysis.plots import plot_layer_heatmap
from mlsae_analysis.report import report
from mlsae_analysis.token_texts import context_token_ids, decoded_strings, token_text_table
from mlsae_train import MultiLayerSAE, load_sae
from mlsae_train.checkpoint import save_sae
from models import ENGLISH, assert_one_line_error

CHROMIUM = Path("/usr/bin/chromium")
N_LATENTS, LAYERS, D_MODEL = 48, [3, 4, 5, 6], 16
FOX = 7  # the latent that fires on " fox", strongly, at the third layer
DEAD = N_LATENTS - 1  # never fires
N_EXAMPLES, CONTEXT_TOKENS = 6, 5


# ----------------------------------------------------------------------------- a synthetic analysis


def write_analysis(out: Path, run: Path, tokenizer, tokenizer_dir: Path, seed: int = 0) -> Path:
    """An analysis directory (and its run) of N_LATENTS latents over LAYERS, on pseudo-English tokens."""
    rng = np.random.default_rng(seed)
    words = [ids[0] for ids in (tokenizer.encode(" " + w) for w in ENGLISH) if len(ids) == 1]
    fox, newline = tokenizer.encode(" fox")[0], tokenizer.encode("\n")[0]
    n_sequences, seq_len = 8, 32
    token_id = rng.choice(words + [newline], size=n_sequences * seq_len)  # [T]
    token_id[rng.choice(token_id.size, size=12, replace=False)] = fox
    tokens = pl.DataFrame({"token": np.arange(token_id.size), "sequence": np.arange(token_id.size) // seq_len,
                           "position": np.arange(token_id.size) % seq_len, "token_id": token_id})  # fmt: skip
    rows = []  # (token, layer, latent, activation): 3 random latents per (token, layer), FOX on fox tokens
    for t in range(token_id.size):
        for layer in range(len(LAYERS)):
            if token_id[t] == fox:
                rows.append((t, layer, FOX, 5.0 if layer == 2 else 0.5))
                continue
            for latent in rng.choice([j for j in range(N_LATENTS) if j not in (FOX, DEAD)], size=3, replace=False):
                rows.append((t, layer, int(latent), float(rng.uniform(0.1, 4.0))))
    latents = pl.DataFrame(rows, schema=["token", "layer", "latent", "activation"], orient="row")
    out.mkdir(parents=True)
    table = latent_layer_table(latents, len(LAYERS))
    table.write_parquet(out / layout.LATENT_LAYERS)
    examples = top_examples(latents.lazy(), tokens, N_EXAMPLES, CONTEXT_TOKENS)
    examples.write_parquet(out / layout.EXAMPLES)
    token_text_table(context_token_ids(examples), decoded_strings(tokenizer)).write_parquet(out / layout.TOKEN_TEXTS)
    plot_layer_heatmap(table, out / layout.HEATMAP_FIGURE, title="synthetic: P(L | J)")
    per_layer = {"layer": [str(layer) for layer in LAYERS] + ["mean"], "fvu": [0.3, 0.2, 0.1, 0.2, 0.2],
                 "mse": [1.0, 2.0, 3.0, 4.0, 2.5], "l1": [5.0, 6, 7, 8, 6.5], "delta_ce": [0.1, 0.2, 0.3, 0.4, 0.25]}  # fmt: skip
    pl.DataFrame(per_layer).write_csv(out / layout.METRICS)
    sae = MultiLayerSAE(D_MODEL, N_LATENTS, k=3, layers=LAYERS, generator=torch.Generator().manual_seed(seed))
    save_sae(sae, run)
    decoder_neighbours(sae.W_dec, progress=False).write_parquet(out / layout.NEIGHBOURS)
    summary = {"run": str(run), "model": str(tokenizer_dir), "lens": None, "layers": LAYERS, "d_model": D_MODEL,
               "n_latents": N_LATENTS, "expansion_factor": N_LATENTS // D_MODEL, "k": 3, "n_tokens": token_id.size,
               "metrics_mean": {"fvu": 0.2, "mse": 2.5, "l1": 6.5, "delta_ce": 0.25}, "mmcs_mean": 0.4, "mmcs_std": 0.1,
               "variance_ratios": {"ratio_11": 0.8, "ratio_12": 0.3}}  # fmt: skip
    (out / layout.SUMMARY).write_text(json.dumps(summary))
    return out


@pytest.fixture(scope="module")
def analysis(tmp_path_factory, pythia_tokenizer, pythia_tokenizer_dir) -> Path:
    root = tmp_path_factory.mktemp("html")
    return write_analysis(root / "analysis", root / "run.safetensors", pythia_tokenizer, pythia_tokenizer_dir)


def unpack(spec: dict) -> np.ndarray:
    dtypes = {"uint8": "u1", "int8": "i1", "uint16": "<u2", "int32": "<i4", "uint32": "<u4", "float32": "<f4"}
    return np.frombuffer(base64.b64decode(spec["b64"]), dtype=dtypes[spec["dtype"]])


def brute_force_neighbours(W: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    unit = W.astype(np.float64) / np.linalg.norm(W, axis=1, keepdims=True)
    cosine = unit @ unit.T  # [n, n]
    np.fill_diagonal(cosine, -np.inf)
    order = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(cosine, order, axis=1)


def visible(text: str) -> str:
    """The page's rendering of token text: newlines and tabs as visible arrows."""
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5")


# ----------------------------------------------------------------------------- the data


@pytest.mark.parametrize("chunk_size, screen", [(1, False), (7, False), (4096, False), (7, True), (4096, True)])
def test_neighbours_match_brute_force(chunk_size: int, screen: bool) -> None:
    W = torch.randn(60, 8, generator=torch.Generator().manual_seed(0)) * torch.rand(60, 1) * 3
    table = decoder_neighbours(W, k=5, chunk_size=chunk_size, progress=False, screen=screen)
    assert table.columns == ["latent", "rank", "neighbour", "cosine"] and table.height == 60 * 5
    indices, cosines = brute_force_neighbours(W.numpy(), 5)
    ordered = table.sort("latent", "rank")
    assert ordered["latent"].to_list() == np.repeat(np.arange(60), 5).tolist()
    np.testing.assert_array_equal(ordered["neighbour"].to_numpy().reshape(60, 5), indices)
    np.testing.assert_allclose(ordered["cosine"].to_numpy().reshape(60, 5), cosines, atol=1e-6)
    # k is capped at the number of other latents
    assert decoder_neighbours(W[:3], k=5, progress=False)["rank"].max() == 1


def test_contexts_and_layer_data_match_the_analysis_files(analysis: Path) -> None:
    max_contexts, radius = 4, 2
    data = latent_browser_data(analysis, lambda ids: [f"t{i}" for i in ids], None, max_contexts, radius)
    examples = pl.read_parquet(analysis / "examples.parquet")
    table = pl.read_parquet(analysis / "latent_layers.parquet")
    assert data["n_latents"] == N_LATENTS and data["layers"] == LAYERS and data["k_neighbours"] == 0

    # per latent: P(L | J), E[L], token count; the dead latent has none
    p_layer = unpack(data["p_layer"]).reshape(N_LATENTS, len(LAYERS)) / 65535
    n_active, mean_layer = unpack(data["n_active"]), unpack(data["mean_layer"])
    for row in table.iter_rows(named=True):
        j = row["latent"]
        np.testing.assert_allclose(p_layer[j], [row[c] for c in layer_prob_columns(table)], atol=1 / 65535)
        assert n_active[j] == row["n_tokens"] and mean_layer[j] == pytest.approx(row["mean_layer"], rel=1e-6)
    assert n_active[DEAD] == 0 and np.isnan(mean_layer[DEAD]) and not p_layer[DEAD].any()

    # contexts: the top max_contexts examples in rank order, cut to +-radius, read back against the token table
    vocab = data["vocab"]
    ctx_start = np.concatenate([[0], np.cumsum(unpack(data["ctx_count"]), dtype=np.int64)])  # [n + 1]
    token_start = np.concatenate([[0], np.cumsum(unpack(data["ctx_length"]), dtype=np.int64)])  # [C + 1]
    ctx_tokens, offsets = unpack(data["ctx_tokens"]), unpack(data["ctx_offset"])
    layers, activations = unpack(data["ctx_layer"]), unpack(data["ctx_activation"])
    by_sequence = {}  # (sequence, position) -> token id, from the full contexts examples.parquet stores
    for r in examples.iter_rows(named=True):
        for i, t in enumerate(r["context_ids"]):
            by_sequence[(r["sequence"], r["position"] - r["context_offset"] + i)] = t
    assert ctx_start[-1] == examples.filter(pl.col("rank") < max_contexts).height
    for j in range(N_LATENTS):
        expected = examples.filter((pl.col("latent") == j) & (pl.col("rank") < max_contexts)).sort("rank")
        assert ctx_start[j + 1] - ctx_start[j] == expected.height
        for c, row in zip(range(ctx_start[j], ctx_start[j + 1]), expected.iter_rows(named=True)):
            shown = [int(vocab[i][1:]) for i in ctx_tokens[token_start[c] : token_start[c + 1]]]
            at = offsets[c]
            assert shown[at] == row["token_id"]  # the highlighted token is the example's token
            first = row["position"] - at
            assert first == max(row["position"] - min(radius, CONTEXT_TOKENS), 0)
            assert shown == [by_sequence[(row["sequence"], first + i)] for i in range(len(shown))]
            assert len(shown) - at - 1 == min(radius, CONTEXT_TOKENS, 31 - row["position"])
            assert layers[c] == row["layer"] and activations[c] == pytest.approx(row["activation"])
    assert all(unpack(data["ctx_activation"])[ctx_start[FOX] : ctx_start[FOX + 1]] == 5.0)


def test_embedded_json_survives_script_closing_text(analysis: Path, tmp_path: Path) -> None:
    nasty = "</script><script>document.title='pwned'</script>"
    out = write_analysis_html(analysis, tmp_path / "r.html", token_strings=lambda ids: [nasty] * len(ids))
    page = out.read_text()
    start = page.index('<script type="application/json" id="latent-data">') + len('<script type="application/json" id="latent-data">')
    data = json.loads(page[start : page.index("</script>", start)])
    assert set(data["vocab"]) == {nasty}
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "") and "https://" not in page  # no external requests


def test_cli_writes_the_report_and_errors_are_one_line(analysis: Path, tmp_path: Path, capsys) -> None:
    assert main([str(analysis), "--out", str(tmp_path / "cli.html"), "--max-contexts", "2", "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().err and (tmp_path / "cli.html").stat().st_size > 10_000
    assert main([str(tmp_path / "missing")]) == 2
    assert_one_line_error(capsys.readouterr().err, "missing", "not a directory")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert_one_line_error(capsys.readouterr().err, "summary.json")


def test_page_names_both_dead_fractions_warns_and_documents_links(analysis: Path, tmp_path: Path) -> None:
    summary = json.loads((analysis / "summary.json").read_text())
    copy = tmp_path / "analysis"
    copy.mkdir()
    for path in analysis.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    line = "warning: at layer(s) 4-5 the top 1% of tokens by norm (3 of 256) carry over half of the variance"
    summary["metrics_mean"].update(l0=3.0, dead_fraction=0.125, dead_every_layer=0.0208)
    (copy / "summary.json").write_text(json.dumps({**summary, "warnings": [line]}))
    page = write_analysis_html(copy, tmp_path / "r.html", token_strings=lambda ids: ["x"] * len(ids)).read_text()
    stats = {label: value for value, label in re.findall(r'<div class="value">([^<]*)</div><div class="label">([^<]*)</div>', page)}
    assert stats["dead per layer (mean)"] == "0.125" and stats["dead at every layer"] == "0.0208"
    assert stats["L0 sparsity"] == "3" and "L0" not in stats and "dead" not in stats
    assert page.count('<p class="warning">') == 1 and "at layer(s) 4-5 the top 1% of tokens" in page
    assert "<code>#latent=ID</code>" in page and "<code>#search=TEXT</code>" in page
    # an analysis written before dead_every_layer existed: its mean-row dead_fraction was the every-layer one
    summary["metrics_mean"] = {"fvu": 0.2, "dead_fraction": 0.03}
    (copy / "summary.json").write_text(json.dumps(summary))
    page = write_analysis_html(copy, tmp_path / "old.html", token_strings=lambda ids: ["x"] * len(ids)).read_text()
    stats = {label: value for value, label in re.findall(r'<div class="value">([^<]*)</div><div class="label">([^<]*)</div>', page)}
    assert stats["dead at every layer"] == "0.03" and not any(k.startswith("dead per") for k in stats)
    assert '<p class="warning">' not in page


# ----------------------------------------------------------------------------- the page in Chromium


def chromium_or_skip() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("MLSAE_REQUIRE_CHROMIUM") == "1":
        pytest.fail(f"MLSAE_REQUIRE_CHROMIUM=1 but {CHROMIUM} is missing; install it with apt-get install -y chromium")
    pytest.skip(f"headless Chromium is not installed ({CHROMIUM}; Debian package chromium)")


def chromium(profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    command = [str(chromium_or_skip()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class Dom(HTMLParser):
    """The elements of a serialised DOM as dicts (tag, attrs, text of all descendants, parent)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str) -> None:
        super().__init__()
        self.nodes: list[dict] = []
        self.stack: list[dict] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = {"tag": tag, "attrs": dict(attrs), "text": "", "parent": self.stack[-1] if self.stack else None}
        self.nodes.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()["tag"] != tag:
            pass

    def handle_data(self, data):
        for node in self.stack:
            node["text"] += data

    def find(self, cls: str | None = None, within: dict | None = None, tag: str | None = None, **attrs: str) -> list[dict]:
        def inside(node):
            while node is not None:
                if node is within:
                    return True
                node = node["parent"]
            return False

        return [n for n in self.nodes
                if (tag is None or n["tag"] == tag) and (cls is None or cls in n["attrs"].get("class", "").split())
                and all(n["attrs"].get(k.replace("_", "-")) == v for k, v in attrs.items())
                and (within is None or inside(n))]  # fmt: skip


def rendered(profile: Path, page: Path, fragment: str) -> Dom:
    dom = Dom(chromium(profile, f"{page.resolve().as_uri()}#{fragment}", "--dump-dom").stdout)
    errors = dom.find(id="js-errors")
    assert errors and errors[0]["text"] == "" and "hidden" in errors[0]["attrs"], errors[0]["text"]
    assert dom.find(data_browser_ready="1"), "the browser script did not finish"
    return dom


@pytest.mark.slow
def test_page_in_headless_chromium(analysis: Path, pythia_tokenizer, tmp_path: Path) -> None:
    chromium_or_skip()
    run = Path(json.loads((analysis / "summary.json").read_text())["run"])
    page = write_analysis_html(analysis)  # neighbours and token texts from the analysis's files
    examples = pl.read_parquet(analysis / "examples.parquet")
    table = pl.read_parquet(analysis / "latent_layers.parquet")
    nb_index, nb_cosine = brute_force_neighbours(load_sae(run).W_dec.detach().numpy(), 5)

    latent = int(table.sort("n_tokens")["latent"][len(table) // 2])
    dom = rendered(tmp_path / "profile", page, f"search={latent}")
    detail = dom.find(id="latent-detail")[0]
    assert detail["attrs"]["data-latent"] == str(latent)
    # distribution over layers: one bar per layer, heights from latent_layers.parquet
    bars = dom.find("bar", within=detail)
    expected_p = table.filter(pl.col("latent") == latent).select(layer_prob_columns(table)).row(0)
    assert [b["attrs"]["data-layer"] for b in bars] == [str(layer) for layer in LAYERS]
    np.testing.assert_allclose([float(b["attrs"]["data-p"]) for b in bars], expected_p, atol=2e-4)
    # top contexts: rank order, layer shown, the example's own token highlighted
    contexts = dom.find("context", within=detail)
    expected = examples.filter(pl.col("latent") == latent).sort("rank").head(len(contexts))
    assert len(contexts) == min(5, N_EXAMPLES)
    for context, row in zip(contexts, expected.iter_rows(named=True)):
        assert context["attrs"]["data-layer"] == str(LAYERS[row["layer"]])
        assert context["text"].startswith(f"layer {LAYERS[row['layer']]}")  # the badge: not "L3", which reads as L0 sparsity
        assert [m["text"] for m in dom.find(within=context, tag="mark")] == [visible(pythia_tokenizer.decode([row["token_id"]]))]
        assert float(context["attrs"]["data-activation"]) == pytest.approx(row["activation"], abs=1e-3)
    # nearest decoder neighbours, by cosine of decoder rows, clickable
    links = dom.find("neighbour", within=detail)
    assert [int(a["attrs"]["data-latent"]) for a in links] == nb_index[latent].tolist()
    assert [a["attrs"]["href"] for a in links] == [f"#latent={j}" for j in nb_index[latent]]
    assert f"cos {nb_cosine[latent, 0]:.3f}" in detail["text"]

    # a text search lists first the latent whose top contexts have it as the active token
    dom = rendered(tmp_path / "profile", page, "search=%20fox")
    first_row = dom.find(within=dom.find(id="latent-rows")[0], tag="li")[0]
    assert first_row["attrs"]["data-latent"] == str(FOX)
    detail = dom.find(id="latent-detail")[0]
    assert detail["attrs"]["data-latent"] == str(FOX)
    assert {n["text"] for n in dom.find(within=detail, tag="mark")} == {" fox"}
    assert {n["attrs"]["data-layer"] for n in dom.find("context", within=detail)} == {str(LAYERS[2])}

    # a dead latent by id: no contexts, but still its neighbours
    dom = rendered(tmp_path / "profile", page, f"latent={DEAD}")
    detail = dom.find(id="latent-detail")[0]
    assert "never fired" in detail["text"] and len(dom.find("neighbour", within=detail)) == 5

    # an id that names no latent says so, whether it comes from #latent=, #search= or is not a number
    for fragment, named in ((f"latent={N_LATENTS}", str(N_LATENTS)), (f"search={N_LATENTS + 5}", str(N_LATENTS + 5)),
                            ("latent=abc", "\u201cabc\u201d")):  # fmt: skip
        dom = rendered(tmp_path / "profile", page, fragment)
        detail = dom.find(id="latent-detail")[0]
        assert f"There is no latent {named} in this report: latent ids run from 0 to {N_LATENTS - 1}." in detail["text"]
        assert dom.find("unknown-latent", within=detail)

    screenshot = tmp_path / "page.png"
    chromium(tmp_path / "profile", f"{page.resolve().as_uri()}#search={latent}", f"--screenshot={screenshot}", "--window-size=1280,1600")
    pixels = imread(screenshot)[..., :3]  # [height, width, 3]
    assert pixels.shape[:2] == (1600, 1280)
    rgb = (pixels * 255).round().astype(np.int64)
    assert len(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])) > 50  # text, bars, marks: not blank


@pytest.mark.slow
def test_sweep_page_links_each_runs_report(tmp_path: Path, pythia_tokenizer, pythia_tokenizer_dir) -> None:
    runs = [write_analysis(tmp_path / f"a{i}", tmp_path / f"run{i}.safetensors", pythia_tokenizer, pythia_tokenizer_dir, seed=i)
            for i in range(2)]  # fmt: skip
    report(runs, tmp_path / "sweep")
    page = write_sweep_html(tmp_path / "sweep", runs)
    for run in runs:  # written because absent
        assert (run / layout.PAGE).exists()
    html = page.read_text()
    assert html.count('href="../a0/report.html"') == 1 and html.count('href="../a1/report.html"') == 1
    assert "tables.csv" in html and "data:image/png;base64," in html
    if CHROMIUM.exists() or os.environ.get("MLSAE_REQUIRE_CHROMIUM") == "1":
        dom = Dom(chromium(tmp_path / "profile", page.resolve().as_uri(), "--dump-dom").stdout)
        assert dom.find(id="js-errors")[0]["text"] == ""
        hrefs = [n["attrs"]["href"] for n in dom.find(tag="a") if n["attrs"].get("href", "").endswith("report.html")]
        assert [(page.parent / h).resolve() for h in hrefs] == [(run / "report.html").resolve() for run in runs]

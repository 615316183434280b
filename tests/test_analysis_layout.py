"""The analysis folder's layout (mlsae_analysis/layout.py): every file an analysis writes is named there,
summary.json is read and written only through it, and the page is made from the folder's files alone."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from models import assert_one_line_error

from mlsae_analysis import layout
from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.html_report import main as html_main
from mlsae_analysis.pipeline import layer_view_of
from mlsae_cache import integrity
from mlsae_cache.errors import MlsaeError
from mlsae_cache.writer import write_array_cache
from mlsae_train import MultiLayerSAE, save_sae

N_TOKENS, N_LAYERS, D_MODEL, N_LATENTS, K = 60, 2, 8, 16, 2


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    """A finished analysis (no language model) of a tiny synthetic cache, and the run it was made from beside it."""
    root = tmp_path_factory.mktemp("layout")
    acts = np.random.default_rng(0).normal(size=(N_TOKENS, N_LAYERS, D_MODEL)).astype(np.float32)
    cache = write_array_cache(root / "cache", acts, seq_len=10, shard_tokens=30)
    sae = MultiLayerSAE(D_MODEL, N_LATENTS, K, layers=list(range(N_LAYERS)), generator=torch.Generator().manual_seed(0))
    save_sae(sae, root / "sae.safetensors")
    out = root / "analysis"
    assert analyse_main(["--run", str(root / "sae.safetensors"), "--shards", str(cache), "--out", str(out), "--no-downstream",
                         "--no-progress", "--batch-tokens", "32"]) == 0  # fmt: skip
    return out


def copy_of(folder: Path, to: Path) -> Path:
    for path in folder.rglob("*"):
        if path.is_file():
            (to / path.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            (to / path.relative_to(folder)).write_bytes(path.read_bytes())
    return to


def test_every_file_of_an_analysis_is_named_by_the_layout(analysis: Path) -> None:
    figures = [layout.METRICS_FIGURE, layout.RESIDUAL_COS_NEXT_FIGURE, layout.RESIDUAL_NORM_FIGURE, layout.HEATMAP_FIGURE,
               layout.VARIANCE_RATIOS_FIGURE]  # the single prompt's needs the language model  # fmt: skip
    tables = [layout.SUMMARY, layout.TOKENS, layout.METRICS, layout.NEIGHBOURS, layout.MMCS, layout.RESIDUAL,
              layout.LAYER_DISTRIBUTIONS, layout.LATENT_LAYERS, layout.VARIANCE_RATIOS, layout.EXAMPLES, layout.TOKEN_TEXTS,
              layout.PAGE, integrity.RECORD_FILE]  # fmt: skip
    parts = [layout.latent_part(i) for i in range(N_TOKENS // 32 + 1)]  # --batch-tokens 32: one part per batch
    expected = {*tables, *parts, *(f"{stem}.{suffix}" for stem in figures for suffix in ("png", "pdf"))}
    written = {p.relative_to(analysis).as_posix() for p in analysis.rglob("*") if p.is_file()}
    assert written == expected
    assert set(integrity.recorded_files(analysis)) == expected - {integrity.RECORD_FILE}


def test_summary_round_trip_keeps_the_record_true(analysis: Path, tmp_path: Path) -> None:
    folder = copy_of(analysis, tmp_path / "a")
    summary = layout.read_summary(folder)
    assert summary == json.loads((analysis / layout.SUMMARY).read_text()) and summary["n_tokens"] == N_TOKENS
    layout.write_summary(folder, {**summary, "n_tokens": 7, "ratio": np.float64(0.5)})  # numpy numbers are written as floats
    assert layout.read_summary(folder) == {**summary, "n_tokens": 7, "ratio": 0.5}
    integrity.verify_files(folder, None, "")  # the record followed the edit
    (folder / layout.SUMMARY).write_text((folder / layout.SUMMARY).read_text().replace('"n_tokens": 7', '"n_tokens": 8'))
    with pytest.raises(integrity.IntegrityError, match="summary.json is damaged"):
        layout.read_summary(folder)
    (folder / layout.SUMMARY).unlink()
    with pytest.raises(MlsaeError, match="holds no summary.json"):
        layout.read_summary(folder)
    # a folder without a record (written before checksums): not JSON is one line, not a traceback
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / layout.SUMMARY).write_text("{not json")
    with pytest.raises(MlsaeError, match="is not valid JSON"):
        layout.read_summary(tmp_path / "old")


def _embedded(page: Path) -> dict:
    text = page.read_text()
    start = text.index('id="latent-data">') + len('id="latent-data">')
    return json.loads(text[start : text.index("</script>", start)].replace("<\\/", "</"))


def test_the_page_is_made_from_the_folder_alone(analysis: Path, tmp_path: Path, recwarn) -> None:
    """Token texts from token_texts.parquet (no tokenizer is tried), neighbours from neighbours.parquet."""
    folder = copy_of(analysis, tmp_path / "a")
    texts = layout.read_table(folder, layout.TOKEN_TEXTS)
    context_ids = layout.read_table(folder, layout.EXAMPLES)["context_ids"].explode().unique().sort()
    assert texts["token_id"].to_list() == context_ids.to_list()  # every token of every context, once
    assert texts["text"].to_list() == [f"<{i}>" for i in context_ids]  # written without a tokenizer: ids
    marked = texts.with_columns(text=pl.format("tok{}", "token_id"))  # texts no tokenizer would give
    marked.write_parquet(folder / layout.TOKEN_TEXTS)
    integrity.record_files(folder, [layout.TOKEN_TEXTS])
    (folder / layout.PAGE).unlink()
    recwarn.clear()
    assert html_main([str(folder)]) == 0
    assert not [w for w in recwarn if "token ids" in str(w.message)]  # the cache's model "synthetic" has no tokenizer
    data = _embedded(folder / layout.PAGE)
    assert data["vocab"] and set(data["vocab"]) <= {f"tok{i}" for i in texts["token_id"].to_list()}
    neighbours = layout.read_table(folder, layout.NEIGHBOURS).sort("latent", "rank")
    stored = np.frombuffer(base64.b64decode(data["nb_index"]["b64"]), dtype="<u4")
    np.testing.assert_array_equal(stored, neighbours["neighbour"].to_numpy())
    integrity.verify_files(folder, None, "")  # the new page joined the record


def test_html_report_no_longer_takes_a_run(analysis: Path, capsys) -> None:
    assert html_main([str(analysis), "--run", str(analysis.parent / "sae.safetensors")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--run")


def test_every_family_has_a_layer_view_and_an_unknown_one_is_one_line() -> None:
    views = {arch: layer_view_of(SimpleNamespace(arch=arch)).__name__ for arch in ("mlsae", "per-layer", "crosscoder")}
    assert views == {"mlsae": "mlsae_layer_view", "per-layer": "per_layer_layer_view", "crosscoder": "crosscoder_layer_view"}
    with pytest.raises(MlsaeError, match="cannot analyse a transcoder dictionary"):
        layer_view_of(SimpleNamespace(arch="transcoder"))

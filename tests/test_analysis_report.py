"""``mlsae-analyse report``: the cross-run tables hold exactly the analysed runs' numbers, grouped as the
paper's (models by size, standard beside tuned lens, one reference (R, k)), and every figure is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from models import assert_one_line_error

from mlsae_analysis.cli import main as analyse_main
from mlsae_analysis.report import model_size, read_runs, reference_config
from mlsae_cache.integrity import record_files
from mlsae_cache.writer import write_array_cache
from mlsae_train import MultiLayerSAE, save_sae

D_MODEL = 16
# (model as the cache records it, its layers); (R, k) per model. pythia-160m is given first: the
# report must still order it after pythia-70m.
MODELS = {"EleutherAI/pythia-160m": 4, "pythia-70m": 3}
CONFIGS = {"EleutherAI/pythia-160m": [(2, 2), (4, 2), (4, 4)], "pythia-70m": [(4, 2)]}


def _analyse(run: Path, cache: Path, out: Path) -> None:
    assert analyse_main(["--run", str(run), "--shards", str(cache), "--out", str(out), "--no-downstream",
                         "--no-progress", "--batch-tokens", "64"]) == 0  # fmt: skip


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict[str, Path]:
    """Analysed runs by name "model/R-k"; "pythia-160m/4-2-lens" is a tuned-lens twin (its summary says so)."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    dirs = {}
    for model, n_layers in MODELS.items():
        acts = (rng.normal(size=(120, n_layers, D_MODEL)) + rng.normal(size=(1, n_layers, D_MODEL))).astype(np.float32)
        name = model.split("/")[-1]
        cache = write_array_cache(root / "caches" / name, acts, model=model, seq_len=12)
        for seed, (R, k) in enumerate(CONFIGS[model]):
            seeded = torch.Generator().manual_seed(seed)
            sae = MultiLayerSAE(D_MODEL, R * D_MODEL, k, layers=list(range(n_layers)), generator=seeded)
            save_sae(sae, root / "runs" / f"{name}-{R}-{k}.safetensors")
            dirs[f"{name}/{R}-{k}"] = root / "analysis" / name / f"R{R}-k{k}"
            dirs[f"{name}/{R}-{k}"].parent.mkdir(parents=True, exist_ok=True)
            _analyse(root / "runs" / f"{name}-{R}-{k}.safetensors", cache, dirs[f"{name}/{R}-{k}"])
    lens = root / "analysis" / "pythia-160m" / "R4-k2-lens"
    shutil.copytree(dirs["pythia-160m/4-2"], lens)
    summary = json.loads((lens / "summary.json").read_text())
    summary["lens"] = {"path": "lenses/pythia-160m", "params_sha256": "0" * 64}
    summary["metrics_mean"]["fvu"] = 0.5  # tell the twin's numbers apart from the original's
    summary["mmcs_mean"] = 0.25
    (lens / "summary.json").write_text(json.dumps(summary))
    record_files(lens, ["summary.json"])  # a twin analysis, not a damaged one: its checksum follows the edit
    dirs["pythia-160m/4-2-lens"] = lens
    return dirs


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_model_size_from_name_or_shape():
    assert model_size("pythia-70m", 6, 512) == 70e6
    assert model_size("pythia-1.4b-deduped", 24, 2048) == 1.4e9
    assert model_size("SmolLM2-135M-Instruct", 30, 576) == 135e6
    assert model_size("smollm2", 30, 576) == 12 * 30 * 576**2
    names = ["pythia-1b", "pythia-160m", "pythia-70m", "pythia-410m"]
    assert sorted(names, key=lambda n: model_size(n, 1, 1)) == ["pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b"]


def test_reference_config_is_the_one_most_groups_share():
    runs = pl.DataFrame(
        {
            "model": ["a", "a", "a", "b", "c", "c"],
            "variant": ["standard"] * 6,
            "expansion_factor": [16, 32, 64, 64, 16, 64],
            "k": [32, 32, 32, 32, 32, 32],
        }
    )
    assert reference_config(runs) == (64, 32)  # in a, b and c; 16 only in a and c
    assert reference_config(runs.filter(pl.col("model") != "b")) == (64, 32)  # tie 16/64 (2 groups, 2 runs): larger R
    assert reference_config(runs.head(1)) == (16, 32)
    sweeps = pl.DataFrame({"model": ["a"] * 5, "variant": ["standard"] * 5,
                           "expansion_factor": [16, 32, 64, 32, 32], "k": [32, 32, 32, 16, 64]})  # fmt: skip
    assert reference_config(sweeps) == (32, 32)  # where the sweep over R meets the sweep over k


def test_report_tables_hold_each_runs_numbers(analysed, tmp_path):
    out = tmp_path / "report"
    assert analyse_main(["report", *map(str, analysed.values()), "--out", str(out)]) == 0

    runs = pl.read_csv(out / "tables.csv")
    assert runs["run"].to_list() == [
        "pythia-70m R=4 k=2",
        "pythia-160m R=2 k=2",
        "pythia-160m R=4 k=2",
        "pythia-160m R=4 k=4",
        "pythia-160m + lens R=4 k=2",
    ]
    for row in runs.iter_rows(named=True):
        summary = summary_of(Path(row["dir"]))
        assert row["fvu"] == pytest.approx(summary["metrics_mean"]["fvu"])
        assert row["mmcs_mean"] == pytest.approx(summary["mmcs_mean"])
        assert row["ratio_11"] == pytest.approx(summary["variance_ratios"]["ratio_11"])
        assert row["n_layers"] == len(summary["layers"])

    # Table 1 at the reference (R=4, k=2): metrics as rows, models as columns in size order
    table1 = pl.read_csv(out / "table1.csv")
    assert table1.columns == ["variant", "expansion_factor", "k", "metric", "pythia-70m", "pythia-160m"]
    assert set(table1["variant"]) == {"standard", "tuned lens"}
    assert "Delta CE loss" not in table1["metric"].to_list()  # analysed with --no-downstream: left out
    standard = table1.filter(pl.col("variant") == "standard")
    assert standard["metric"].to_list() == ["FVU", "MSE", "L1 norm"]
    expected = pl.read_csv(analysed["pythia-70m/4-2"] / "metrics.csv").filter(pl.col("layer") == "mean")
    for metric, column in (("FVU", "fvu"), ("MSE", "mse"), ("L1 norm", "l1")):
        assert standard.filter(pl.col("metric") == metric)["pythia-70m"][0] == pytest.approx(expected[column][0])
    lens = table1.filter(pl.col("variant") == "tuned lens")
    assert lens.filter(pl.col("metric") == "FVU")["pythia-160m"][0] == pytest.approx(0.5)
    assert lens["pythia-70m"].is_null().all()  # no tuned-lens run of pythia-70m

    table2 = pl.read_csv(out / "table2.csv")
    assert table2.select("variant", "model").rows() == [("standard", "pythia-70m"), ("standard", "pythia-160m"),
                                                         ("tuned lens", "pythia-160m")]  # fmt: skip
    mmcs = pl.read_csv(analysed["pythia-160m/4-2"] / "mmcs.csv")
    assert table2["mmcs_mean"][1] == pytest.approx(mmcs["mmcs_mean"][0])
    assert table2["mmcs_std"][1] == pytest.approx(mmcs["mmcs_std"][0])

    ratios = pl.read_csv(out / "variance_ratios.csv")
    own = pl.read_csv(analysed["pythia-70m/4-2"] / "variance_ratios.csv")
    assert ratios["ratio_12"][0] == pytest.approx(own["ratio_12"][0])

    per_layer = pl.read_csv(out / "per_layer.csv")
    assert dict(per_layer.group_by("run").len().rows()) == dict(zip(runs["run"], runs["n_layers"]))
    np.testing.assert_allclose(per_layer.filter(pl.col("run") == "pythia-70m R=4 k=2")["fvu"].to_numpy(),
                               pl.read_csv(analysed["pythia-70m/4-2"] / "metrics.csv")["fvu"][:3].to_numpy())  # fmt: skip

    figures = ["variance_ratios", "variance_ratios_vs_expansion_factor", "variance_ratios_vs_k",
               "mmcs_vs_expansion_factor", "mmcs_vs_k", "heatmaps", "per_layer"]  # fmt: skip
    for name in figures:
        assert (out / f"{name}.png").stat().st_size > 5000 and (out / f"{name}.pdf").exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_report_of_one_run_leaves_out_the_sweeps(analysed, tmp_path):
    out = tmp_path / "one"
    assert analyse_main(["report", str(analysed["pythia-70m/4-2"]), "--out", str(out)]) == 0
    assert set(pl.read_csv(out / "table1.csv")["variant"]) == {"standard"}
    assert not list(out.glob("*_vs_*"))
    assert (out / "heatmaps.png").exists() and (out / "variance_ratios.png").exists()


def test_runs_alike_are_told_apart_by_directory(analysed, tmp_path):
    twin = tmp_path / "again"
    shutil.copytree(analysed["pythia-70m/4-2"], twin)
    labels = read_runs([analysed["pythia-70m/4-2"], twin])["run"].to_list()
    assert labels == ["pythia-70m R=4 k=2 (R4-k2)", "pythia-70m R=4 k=2 (again)"]


def test_bad_inputs_are_one_line_and_leave_no_out(analysed, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(analysed["pythia-70m/4-2"], broken)
    (broken / "summary.json").write_text("{not json")
    old_format = tmp_path / "old"
    shutil.copytree(analysed["pythia-70m/4-2"], old_format)
    (old_format / "summary.json").write_text(json.dumps({"model": "x"}))
    for edited in (broken, old_format):  # contents the checksums vouch for: the parsing is what is tested here
        record_files(edited, ["summary.json"])
    (tmp_path / "taken").mkdir()
    cases = [
        ([str(tmp_path / "nothing")], tmp_path / "out", "summary.json"),
        ([str(broken)], tmp_path / "out", "not valid JSON"),
        ([str(old_format)], tmp_path / "out", "lacks"),
        ([str(analysed["pythia-70m/4-2"])], tmp_path / "taken", "already exists"),
        ([str(analysed["pythia-70m/4-2"])], tmp_path / "no" / "parent", "parent directory"),
    ]
    for runs, out, fragment in cases:
        assert analyse_main(["report", *runs, "--out", str(out)]) == 2
        assert_one_line_error(capsys.readouterr().err, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "old", "taken"]
    assert not list((tmp_path / "taken").iterdir())

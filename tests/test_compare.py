"""``mlsae-analyse compare``: the costs of each family counted by brute force, the table holding exactly the
analyses' numbers (read from a real analysis folder), the refusals of analyses that do not measure the same
thing, and the files written."""

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
from mlsae_analysis.compare import COMPARED_METRICS as METRICS, compare_analyses, family_costs, main
from mlsae_cache.integrity import record_files
from mlsae_cache.writer import write_array_cache
from mlsae_train import MultiLayerSAE, load_sae
from mlsae_train.cli import main as train_main

LAYERS, D_MODEL, R, K = [1, 3, 5], 8, 4, 2  # three layers: the mean of the metrics is not their median


# ---- costs: a forward + backward written out one multiply-add at a time ----


class CountedSAE:
    """One TopK SAE step on a vector u = z - b_pre of width m (d for the MLSAE and per-layer SAEs, L*d for the
    crosscoder), every multiply-add counted: dense encoder, sparse decoder, gradients of W_enc, W_dec, b_pre."""

    def __init__(self) -> None:
        self.macs = 0

    def step(self, W_enc, W_dec, b_pre, z, k):
        """Returns (loss, grads of W_enc, W_dec, b_pre, active latents); loss = ||z_hat - z||^2."""
        n, m = W_enc.shape
        u = z - b_pre
        pre = np.zeros(n)
        for i in range(n):
            for j in range(m):
                pre[i] += W_enc[i, j] * u[j]
                self.macs += 1
        active = [int(i) for i in np.argsort(-pre, kind="stable")[:k]]  # TopK, then ReLU: k decoder rows
        h = np.maximum(pre, 0.0)
        z_hat = b_pre.copy()
        for i in active:
            for j in range(m):
                z_hat[j] += h[i] * W_dec[i, j]
                self.macs += 1
        g_zhat = 2 * (z_hat - z)
        g_dec, g_h = np.zeros_like(W_dec), np.zeros(n)
        for i in active:
            for j in range(m):
                g_dec[i, j] = h[i] * g_zhat[j]
                g_h[i] += W_dec[i, j] * g_zhat[j]
                self.macs += 2
        g_pre = np.where(pre > 0, g_h, 0.0)  # through the ReLU
        g_enc, g_u = np.zeros_like(W_enc), np.zeros(m)
        for i in range(n):  # dense: the encoder's gradient is taken for every row (zero off the active ones)
            for j in range(m):
                g_enc[i, j] = g_pre[i] * u[j]
                g_u[j] += W_enc[i, j] * g_pre[i]
                self.macs += 2
        return float(((z_hat - z) ** 2).sum()), g_enc, g_dec, g_zhat - g_u, len(active)


def _torch_step(W_enc, W_dec, b_pre, z, k):
    """The same loss by autograd (the counted program must compute the real gradients)."""
    W_enc, W_dec, b_pre = (torch.tensor(a, requires_grad=True) for a in (W_enc, W_dec, b_pre))
    pre = W_enc @ (torch.tensor(z) - b_pre)
    values, indices = pre.topk(k)
    h = torch.zeros_like(pre).scatter(0, indices, values.relu())
    loss = ((W_dec.T @ h + b_pre - torch.tensor(z)) ** 2).sum()
    loss.backward()
    return loss.item(), W_enc.grad.numpy(), W_dec.grad.numpy(), b_pre.grad.numpy()


def _counted_family(arch, n, k, L, d, rng):
    """(MACs, weight values excluding biases, active latents) of one token's training step, gradients checked."""
    x = rng.normal(size=(L, d))
    counter = CountedSAE()
    if arch == "crosscoder":  # W_enc, W_dec [n, L, d]: one vector of L*d per token
        W_enc, W_dec, b_pre = rng.normal(size=(n, L, d)), rng.normal(size=(n, L, d)), rng.normal(size=(L, d))
        cases = [(W_enc.reshape(n, L * d), W_dec.reshape(n, L * d), b_pre.reshape(L * d), x.reshape(L * d))]
    elif arch == "per-layer":  # W_enc, W_dec [L, n, d]: layer l's own SAE
        W_enc, W_dec, b_pre = rng.normal(size=(L, n, d)), rng.normal(size=(L, n, d)), rng.normal(size=(L, d))
        cases = [(W_enc[l], W_dec[l], b_pre[l], x[l]) for l in range(L)]
    else:  # one [n, d] dictionary for every layer
        W_enc, W_dec, b_pre = rng.normal(size=(n, d)), rng.normal(size=(n, d)), rng.normal(size=d)
        cases = [(W_enc, W_dec, b_pre, x[l]) for l in range(L)]
    active = 0
    for case in cases:
        loss, *grads, n_active = counter.step(*case, k)
        expected_loss, *expected_grads = _torch_step(*case, k)
        assert loss == pytest.approx(expected_loss)
        for grad, expected in zip(grads, expected_grads):
            np.testing.assert_allclose(grad, expected, rtol=1e-9, atol=1e-9)
        active += n_active
    return counter.macs, W_enc.size + W_dec.size, active


@pytest.mark.parametrize("arch", ["mlsae", "per-layer", "crosscoder"])
def test_family_costs_are_the_counted_ones(arch):
    n, k, L, d = 7, 2, 3, 4
    rng = np.random.default_rng(1)
    macs, n_weights, active = _counted_family(arch, n, k, L, d, rng)
    costs = family_costs(arch, n, k, L, d)
    assert costs["training_flops_per_token"] == 2 * macs
    assert costs["parameters"] == n_weights
    assert costs["active_latents_per_token"] == active
    assert costs["latents"] == n * (L if arch == "per-layer" else 1)


def test_mlsae_parameters_are_the_real_models_weights():
    sae = MultiLayerSAE(D_MODEL, R * D_MODEL, K, layers=LAYERS)
    weights = sum(p.numel() for name, p in sae.named_parameters() if name != "b_pre")
    assert family_costs("mlsae", R * D_MODEL, K, len(LAYERS), D_MODEL)["parameters"] == weights


# ---- folders: one real analysis, and copies standing for the other families ----


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, Path]:
    """A real MLSAE run trained by mlsae-train and analysed by mlsae-analyse (no arch in its summary)."""
    root = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(0)
    train, test = (write_array_cache(root / name, rng.normal(size=(n, len(LAYERS), D_MODEL)).astype(np.float32),
                                     layers=LAYERS, model="m", seq_len=8) for name, n in (("train", 64), ("test", 48)))
    assert train_main(["--shards", str(train), "--out", str(root / "runs" / "mlsae"), "--expansion-factor", str(R),
                       "-k", str(K), "--batch-tokens", "16", "--no-progress"]) == 0  # fmt: skip
    assert analyse_main(["--run", str(root / "runs" / "mlsae"), "--shards", str(test), "--out", str(root / "mlsae"),
                         "--no-downstream", "--no-progress", "--batch-tokens", "64"]) == 0  # fmt: skip
    trained = {"mlsae": root / "runs" / "mlsae"}
    for arch in ("per-layer", "crosscoder"):  # real runs of the other families on the same cache, for the matching
        trained[arch] = root / "trained" / arch
        assert train_main(["--shards", str(train), "--out", str(trained[arch]), "--arch", arch, "--expansion-factor", str(R),
                           "-k", str(K), "--batch-tokens", "16", "--no-progress"]) == 0  # fmt: skip
    return {"root": root, "analysis": root / "mlsae", "run": root / "runs" / "mlsae", "train": train, "test": test, "trained": trained}


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))
    record_files(path.parent, [path.name])  # edited on purpose: its checksum follows


def family(real, dest: Path, arch: str | None, seed: int, run_arch: str | None = None, run_source: Path | None = None,
           **summary_edits) -> Path:  # fmt: skip
    """A copy of the real analysis (and of its run, or of ``run_source``) standing for another run of ``arch``
    (in its summary; or, with ``run_arch``, only in its run's config.json): per-layer metrics replaced by known
    random values (delta CE and KL included), the mean row their mean."""
    shutil.copytree(real["analysis"], dest)
    run = real["root"] / "runs" / dest.name
    if not run.exists():
        shutil.copytree(run_source or real["run"], run)
    if run_arch is not None:
        _edit_json(run / "config.json", lambda config: config["sae"].update(arch=run_arch))
    metrics = pl.read_csv(dest / "metrics.csv", infer_schema_length=None)
    rows = metrics.filter(pl.col("layer") != "mean")
    values = np.random.default_rng(seed).uniform(0.01, 0.99, size=(rows.height, len(METRICS)))
    rows = rows.with_columns(**{m: pl.Series(values[:, i]) for i, m in enumerate(METRICS)}, ce_clean=pl.lit(3.0))
    mean = rows.select(pl.exclude("layer").mean()).with_columns(layer=pl.lit("mean"))
    pl.concat([rows, mean.select(rows.columns)]).write_csv(dest / "metrics.csv")
    record_files(dest, ["metrics.csv"])

    def edit(summary):
        for key in ("arch", "train_data"):  # the copy's family and training data come from its run (or the edits)
            summary.pop(key, None)
        summary.update({"run": str(run), **summary_edits})
        if arch is not None:
            summary["arch"] = arch
        summary["metrics_mean"]["ce_clean"] = 3.0

    _edit_json(dest / "summary.json", edit)
    return dest


@pytest.fixture(scope="module")
def families(real) -> dict[str, Path]:
    root = real["root"]
    return {
        "mlsae": real["analysis"],
        "per-layer": family(real, root / "per-layer", "per-layer", seed=1, run_source=real["trained"]["per-layer"]),
        # arch from the run (a real crosscoder run, whose config.json says so)
        "crosscoder": family(real, root / "crosscoder", None, seed=2, run_arch="crosscoder", run_source=real["trained"]["crosscoder"]),
    }


def _inputs(folder: Path) -> tuple[pl.DataFrame, dict]:
    metrics = pl.read_csv(folder / "metrics.csv", infer_schema_length=None)
    return metrics, json.loads((folder / "summary.json").read_text())


def test_table_of_a_real_analysis_holds_its_numbers(real):
    tables = compare_analyses([real["analysis"]])
    metrics, summary = _inputs(real["analysis"])
    assert summary["arch"] == "mlsae"
    per_layer = tables.per_layer
    assert per_layer["layer"].to_list() == LAYERS == summary["layers"]
    for metric in METRICS:
        written = metrics.filter(pl.col("layer") != "mean")[metric].cast(pl.Float64).to_numpy()
        np.testing.assert_array_equal(per_layer[metric].to_numpy(), written)
        mean = tables.means[metric][0]
        assert mean == pytest.approx(float(np.mean(written)), nan_ok=True)
        assert mean == pytest.approx(float(metrics.filter(pl.col("layer") == "mean")[metric][0]), nan_ok=True)
    costs = family_costs("mlsae", summary["n_latents"], summary["k"], len(LAYERS), summary["d_model"])
    assert summary["n_latents"] == R * D_MODEL and summary["k"] == K
    for name, value in costs.items():
        assert tables.table[name].to_list() == [value] * (len(LAYERS) + 1)
    assert tables.table["arch"].to_list() == ["mlsae"] * (len(LAYERS) + 1)
    assert tables.table["training_tokens"].to_list() == [summary["training"]["tokens"]] * (len(LAYERS) + 1)


def test_three_families_side_by_side(real, families, tmp_path, capsys):
    out = tmp_path / "cmp"
    folders = [families[a] for a in ("mlsae", "per-layer", "crosscoder")]
    assert "arch" not in _inputs(families["crosscoder"])[1]  # read from its run's config.json
    assert main([*map(str, folders), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # the runs share --seed 0: their initial decoders share directions, which the matching warns about
    assert captured.err.count("warning:") == 2 and "same --seed 0" in captured.err
    table = pl.read_csv(out / "comparison.csv", infer_schema_length=None)
    assert table.height == 3 * (len(LAYERS) + 1)
    for arch, folder in zip(("mlsae", "per-layer", "crosscoder"), folders):
        metrics, summary = _inputs(folder)
        rows = table.filter(pl.col("arch") == arch)
        assert rows["layer"].cast(pl.String).to_list() == [*map(str, LAYERS), "mean"]
        for metric in METRICS:
            written = metrics.filter(pl.col("layer") != "mean")[metric].cast(pl.Float64).to_numpy()
            got = rows[metric].cast(pl.Float64).to_numpy()
            np.testing.assert_allclose(got[:-1], written, rtol=1e-15, equal_nan=True)
            np.testing.assert_allclose(got[-1], np.mean(written), rtol=1e-12, equal_nan=True)
        costs = family_costs(arch, R * D_MODEL, K, len(LAYERS), D_MODEL)
        for name, value in costs.items():
            assert rows[name].to_list() == [value] * (len(LAYERS) + 1)
        fvu_mean = float(np.mean(rows["fvu"][:-1].to_numpy()))
        assert f"| {rows['run'][0]} | {fvu_mean:.3f} |" in printed  # the markdown row: run, then mean FVU
    # the budgets: n and k equal, the rest differs (per-layer: L dictionaries; crosscoder: k per token)
    assert "Equal across runs: n_latents, k, training_flops_per_token, training_tokens." in printed
    markdown = (out / "comparison.md").read_text()
    assert printed.startswith(markdown)
    for suffix in ("png", "pdf"):
        assert (out / f"comparison.{suffix}").stat().st_size > 1000
    # the cross-dictionary matching of the MLSAE against each of the others (SPEC 9), recomputed by brute force
    mlsae = load_sae(real["run"])
    for arch, stem in (("per-layer", "match_per_layer"), ("crosscoder", "match_crosscoder")):
        other = load_sae(real["trained"][arch])
        rows = mlsae.W_dec.detach().double() / mlsae.W_dec.detach().double().norm(dim=1, keepdim=True)  # [n, d]
        decoders = other.W_dec.detach().double()
        per_layer = decoders if arch == "per-layer" else decoders.transpose(0, 1)  # [L, m, d]
        per_layer = per_layer / per_layer.norm(dim=2, keepdim=True)
        brute = torch.stack([(rows @ layer.T).max(dim=1).values for layer in per_layer], dim=1)  # [n, L]
        table = pl.read_parquet(out / f"{stem}.parquet")
        sims = table.select([f"sim_layer_{layer}" for layer in LAYERS]).to_numpy()
        np.testing.assert_allclose(sims, brute.numpy(), atol=1e-5)
        # best layer: the table's own argmax (the runs are barely trained, so layers can tie to float rounding)
        assert table["best_layer"].to_list() == [LAYERS[i] for i in sims.argmax(axis=1).tolist()]
        assert f"{stem}: E[L | J] of mlsae vs the best-matching layer of {arch}" in printed
        assert json.loads((out / f"{stem}.json").read_text())["against"] == arch
        assert (out / f"{stem}.png").stat().st_size > 1000


def test_refusals_are_one_line_and_write_nothing(real, families, tmp_path, capsys):
    root = real["root"]
    # another test cache (its path and digest), and the same cache read to another --max-tokens
    other_test = family(real, root / "other-test", "per-layer", seed=3, cache=str(root / "elsewhere"), cache_digest="blake3:0123")
    fewer_tokens = family(real, root / "fewer-tokens", "per-layer", seed=3, n_tokens=40)
    # trained on another cache: same model, tokens, layers and width (config.json's identity alike), other content
    ones = np.ones((64, len(LAYERS), D_MODEL), np.float32)
    other_train = write_array_cache(root / "train2", ones, layers=LAYERS, model="m", seq_len=8)
    shutil.copytree(real["run"], root / "runs" / "other-train")
    _edit_json(root / "runs" / "other-train" / "config.json", lambda c: c["config"].update(shards=[str(other_train)]))
    other_content = family(real, root / "other-train", "crosscoder", seed=4)
    # trained on a cache of other tokens count (config.json's data identity differs)
    shutil.copytree(real["run"], root / "runs" / "more-train")
    _edit_json(root / "runs" / "more-train" / "config.json", lambda c: c["data"][0].update(n_tokens=128))
    more_train = family(real, root / "more-train", "crosscoder", seed=5)
    other_layers = family(real, root / "other-layers", "per-layer", seed=6, layers=[1, 3, 6])
    spliced = family(real, root / "spliced", "crosscoder", seed=7)
    _edit_json(spliced / "summary.json", lambda s: s["metrics_mean"].update(ce_clean=3.5))
    bare = family(real, root / "bare", "per-layer", seed=8, run=str(root / "sae.safetensors"))
    unknown = family(real, root / "unknown", "transcoder", seed=10)
    mlsae, per_layer = families["mlsae"], families["per-layer"]
    cases = [
        ([mlsae, other_test], "different test tokens"),
        ([mlsae, fewer_tokens], "different test tokens"),
        ([mlsae, other_content], "trained on different caches"),
        ([mlsae, more_train], "trained on different caches"),
        ([mlsae, per_layer, mlsae], "given twice"),
        ([mlsae, Path(str(mlsae) + "/")], "given twice"),
        ([per_layer, other_layers], "metrics.csv holds layers"),  # the copy's metrics say 1, 3, 5
        ([per_layer, spliced], "spliced different sequences"),
        ([mlsae, bare], "records no training cache"),
        ([mlsae, unknown], "unknown dictionary family 'transcoder'"),
        ([mlsae, tmp_path / "nothing"], "summary.json"),
    ]
    for folders, fragment in cases:
        out = tmp_path / "out"
        assert main([*map(str, folders), "--out", str(out)]) == 2, fragment
        assert_one_line_error(capsys.readouterr().err, fragment)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_same_run_twice_other_layers_and_a_taken_out(real, families, tmp_path, capsys):
    twin = tmp_path / "twin"
    shutil.copytree(families["per-layer"], twin)
    one_layer = family(real, real["root"] / "one-layer", "per-layer", seed=9, layers=[LAYERS[0]])
    metrics = pl.read_csv(one_layer / "metrics.csv", infer_schema_length=None)
    metrics.filter(pl.col("layer").is_in([str(LAYERS[0]), "mean"])).write_csv(one_layer / "metrics.csv")
    record_files(one_layer, ["metrics.csv"])
    cases = (([families["per-layer"], twin], "same run"), ([families["mlsae"], one_layer], "different layers"))
    for folders, fragment in cases:
        assert main([*map(str, folders), "--out", str(tmp_path / "out")]) == 2
        assert_one_line_error(capsys.readouterr().err, fragment)
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("kept")
    assert main([str(families["mlsae"]), "--out", str(tmp_path / "taken")]) == 2
    assert_one_line_error(capsys.readouterr().err, "already exists")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]


def test_real_analyses_of_the_three_families(real, tmp_path, capsys):
    """The reader against the writer for every family: real analyses of the trained runs, compared."""
    folders = [real["analysis"]]
    for arch in ("per-layer", "crosscoder"):
        folders.append(tmp_path / arch)
        assert analyse_main(["--run", str(real["trained"][arch]), "--shards", str(real["test"]), "--out", str(folders[-1]),
                             "--no-downstream", "--no-progress", "--batch-tokens", "64"]) == 0  # fmt: skip
    tables = compare_analyses(folders)
    for arch, folder in zip(("mlsae", "per-layer", "crosscoder"), folders):
        metrics, summary = _inputs(folder)
        assert summary["arch"] == arch
        rows = tables.per_layer.filter(pl.col("arch") == arch)
        written = metrics.filter(pl.col("layer").cast(pl.String).str.contains(r"^\d+$"))["fvu"].cast(pl.Float64).to_numpy()
        np.testing.assert_array_equal(rows["fvu"].to_numpy(), written)
        for name, value in family_costs(arch, R * D_MODEL, K, len(LAYERS), D_MODEL).items():
            assert rows[name].to_list() == [value] * len(LAYERS)
    assert main([*map(str, folders), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "match_per_layer.parquet").exists() and (tmp_path / "cmp" / "match_crosscoder.parquet").exists()

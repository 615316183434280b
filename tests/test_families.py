"""The three dictionary families (SPEC 3 and 9): each against its dense formulas, the exact links between
them (per-layer suite == L single-layer runs, crosscoder on one layer == that layer's MLSAE), planted
truth recovered, checkpoints, DDP, the screen, and every bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlsae_cache import write_array_cache
from mlsae_cache.errors import MlsaeError
from mlsae_cache.integrity import record_files, save_safetensors
from mlsae_train import FAMILIES, Crosscoder, MultiLayerSAE, PerLayerSAEs, TrainConfig, load_sae, save_sae, train
from mlsae_train.checkpoint import read_progress
from mlsae_train.cli import main
from mlsae_train.dead_latents import DeadLatentTracker
from mlsae_train.model import aux_k_for
from mlsae_train.step import accumulate_gradients, make_optimizer, train_step

ARCHS = list(FAMILIES)
D, N_LATENTS, K, LAYERS = 12, 40, 4, [0, 2, 5]


def make_family(arch, dtype=torch.float64, seed=0):
    """A family's dictionary moved away from its init, so that nothing is accidentally symmetric."""
    g = torch.Generator().manual_seed(seed)
    model = FAMILIES[arch](D, N_LATENTS, K, LAYERS, generator=g).to(dtype)
    with torch.no_grad():
        model.W_enc.add_(0.3 * torch.randn(model.W_enc.shape, generator=g, dtype=dtype))
        model.b_pre.copy_(0.2 * torch.randn(model.b_pre.shape, generator=g, dtype=dtype))
    return model


def make_batch(b=9, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 10.0, 100.0], dtype=dtype)[:, None]  # layers of very different size
    return torch.randn(b, len(LAYERS), D, generator=g, dtype=dtype) * scales + 3


def _top(pre, k, dead_mask=None):
    """h = ReLU(TopK(pre)) densely, over the latents in dead_mask only if given."""
    if dead_mask is not None:
        pre = pre.masked_fill(~dead_mask, float("-inf"))
        k = min(k, int(dead_mask.sum()))
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))


def _auxk(e, e_hat):
    """SPEC 3: ||e - e_hat||^2 / ||e - mean(e)||^2 over the rows of e [M, d]."""
    return ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()


def dense_family_loss(arch, p, x, k, eps, dead, k_aux, alpha):
    """SPEC 3 / 9 written out densely from the formulas: ``(loss to backpropagate, fvu [L], auxk)`` where
    auxk is what the step reports (the per-layer suite: the mean of its layers' AuxK)."""
    b, L, d = x.shape
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    z = (x - mean) / (std + eps)  # [b, L, d]
    W_enc, W_dec, b_pre = p["W_enc"], p["W_dec"], p["b_pre"]
    n = W_enc.shape[-2] if arch == "per-layer" else W_enc.shape[0]
    dead_mask = torch.zeros(L * n if arch == "per-layer" else n, dtype=torch.bool)
    dead_mask[dead] = True
    if arch == "mlsae":
        rows = z.reshape(-1, d)
        pre = (rows - b_pre) @ W_enc.T
        z_hat = (_top(pre, k) @ W_dec + b_pre).view(b, L, d)
        error = (z - z_hat).detach().reshape(-1, d)
        aux = [_auxk(error, _top(pre, k_aux, dead_mask) @ W_dec)] if dead_mask.any() else []
    elif arch == "per-layer":
        z_hat, aux = [], []
        for l in range(L):
            pre = (z[:, l] - b_pre[l]) @ W_enc[l].T
            z_hat.append(_top(pre, k) @ W_dec[l] + b_pre[l])
            mask = dead_mask.view(L, n)[l]
            e = (z[:, l] - z_hat[-1]).detach()
            aux.append(_auxk(e, _top(pre, k_aux, mask) @ W_dec[l]) if mask.any() else torch.zeros((), dtype=x.dtype))
        z_hat = torch.stack(z_hat, 1)
    else:  # crosscoder: pre[t] = sum_l W_enc[:, l, :] (z[t, l] - b_pre[l]), z_hat[t, l] = W_dec[:, l, :]^T h[t] + b_pre[l]
        pre = torch.einsum("tld,nld->tn", z - b_pre, W_enc)
        z_hat = torch.einsum("tn,nld->tld", _top(pre, k), W_dec) + b_pre
        error = (z - z_hat).detach()  # [b, L, d]
        e_hat = torch.einsum("tn,nld->tld", _top(pre, k_aux, dead_mask), W_dec) if dead_mask.any() else None
        aux = [_auxk(error.reshape(-1, d), e_hat.reshape(-1, d))] if e_hat is not None else []
    x_hat = z_hat * (std + eps) + mean
    fvu = ((x - x_hat) ** 2).sum((0, 2)) / ((x - x.mean(0)) ** 2).sum((0, 2))  # eq. 3, per layer
    auxk = torch.stack(aux).mean() if aux else torch.zeros((), dtype=x.dtype)
    if arch == "per-layer":  # L independent losses: SAE l's gradient is that of FVU_l + alpha AuxK_l
        return (fvu + alpha * torch.stack(aux)).sum(), fvu, auxk
    return fvu.mean() + alpha * auxk, fvu, auxk


def project_out_rows(grad, W_dec, arch):
    """Remove from grad each latent's component along its (unit) decoder row, or block for the crosscoder."""
    g, w = (grad.flatten(1), W_dec.flatten(1)) if arch == "crosscoder" else (grad, W_dec)
    return (g - (g * w).sum(-1, keepdim=True) * w).view(grad.shape)


def dense_gradients(model, x, dead, alpha):
    p = {name: t.detach().clone().requires_grad_() for name, t in model.named_parameters()}
    loss, fvu, auxk = dense_family_loss(model.arch, p, x, model.k, model.eps, dead, model.k_aux, alpha)
    loss.backward()
    grads = {name: t.grad for name, t in p.items()}
    grads["W_dec"] = project_out_rows(grads["W_dec"], p["W_dec"].detach(), model.arch)
    return grads, fvu, auxk


# dead latents, numbered as each family's tracker flattened: per-layer l*n + j. Layer 0 has more dead
# latents than k_aux (8), layer 1 fewer (its AuxK codes are padded), layer 2 none (its AuxK is 0).
DEAD = {
    "mlsae": torch.tensor([0, 3, 4, 7, 8, 11, 12, 20, 21, 25, 30, 31, 33, 38, 39]),
    "per-layer": torch.tensor([0, 3, 4, 7, 8, 11, 12, 20, 21, 25, 30, 33, 38, 39, 41, 57, 79]),
    "crosscoder": torch.tensor([1, 2, 5, 6, 9, 10, 13, 14, 17, 18, 22, 26, 27, 29, 34, 35, 36, 37]),  # 18 > k_aux 16
}


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_and_gradients_equal_the_dense_formulas(arch):
    """The sparse encoder and decoder compute what the dense formulas compute, values and gradients."""
    model = make_family(arch)
    x = make_batch()
    target = torch.randn_like(x)
    x_hat = model(x)
    assert x_hat.shape == x.shape
    ((x_hat - target) ** 2).sum().backward()
    p = {name: t.detach().clone().requires_grad_() for name, t in model.named_parameters()}
    b, L, d = x.shape
    mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
    z = (x - mean) / (std + model.eps)
    if arch == "mlsae":
        z_hat = _top((z - p["b_pre"]) @ p["W_enc"].T, K) @ p["W_dec"] + p["b_pre"]
    elif arch == "per-layer":
        layer_codes = [_top((z[:, l] - p["b_pre"][l]) @ p["W_enc"][l].T, K) for l in range(L)]
        z_hat = torch.stack([h @ p["W_dec"][l] + p["b_pre"][l] for l, h in enumerate(layer_codes)], 1)
    else:
        h = _top(torch.einsum("tld,nld->tn", z - p["b_pre"], p["W_enc"]), K)
        z_hat = torch.einsum("tn,nld->tld", h, p["W_dec"]) + p["b_pre"]
    reference = z_hat * (std + model.eps) + mean
    ((reference - target) ** 2).sum().backward()
    torch.testing.assert_close(x_hat, reference)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, p[name].grad, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_gradients_equal_the_dense_formulas_with_dead_latents(arch):
    """FVU + AuxK as SPEC 3 / 9 define them for each family; W_dec's gradient without its parallel part;
    micro-batches give the same step."""
    model = make_family(arch)
    x = make_batch(b=10)
    dead = DEAD[arch]
    terms = accumulate_gradients(model, x, dead, auxk_alpha=1 / 32)
    grads, fvu, auxk = dense_gradients(model, x, dead, 1 / 32)
    assert auxk > 0
    torch.testing.assert_close(terms.fvu_per_layer, fvu)
    torch.testing.assert_close(torch.tensor(terms.auxk, dtype=torch.float64), auxk)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    parts = accumulate_gradients(model, x, dead, auxk_alpha=1 / 32, micro_batch_tokens=3)
    assert abs(parts.auxk - terms.auxk) < 1e-12 and torch.equal(parts.active, terms.active)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, whole[name], msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_active_latents(arch):
    model = make_family(arch)
    L, n = len(LAYERS), N_LATENTS
    expected = {"mlsae": (n, D), "per-layer": (L, n, D), "crosscoder": (n, L, D)}[arch]
    assert model.W_dec.shape == model.W_enc.shape == expected
    assert model.b_pre.shape == ((D,) if arch == "mlsae" else (L, D))
    assert model.dead_shape == ((L, n) if arch == "per-layer" else (n,))
    assert model.k_aux == aux_k_for(L * D if arch == "crosscoder" else D, n)
    x = make_batch(b=5)
    values, indices = model.encode(x)
    assert values.shape == indices.shape == ((5, K) if arch == "crosscoder" else (5, L, K))
    # active latents: brute force from the encoded codes
    active = model.active_latents(model.reconstruct(x))
    brute = torch.zeros(model.dead_shape, dtype=torch.bool)
    if arch == "per-layer":
        for l in range(L):
            brute[l, indices[:, l][values[:, l] > 0]] = True
    else:
        brute[indices[values > 0]] = True
    assert torch.equal(active, brute) and brute.any()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_step_keeps_unit_decoder_rows_and_removes_the_parallel_gradient(arch):
    model = make_family(arch, dtype=torch.float32)
    model.normalize_decoder_()
    x = make_batch(dtype=torch.float32)
    accumulate_gradients(model, x, DEAD[arch], auxk_alpha=1 / 32)
    rows = (lambda t: t.flatten(1)) if arch == "crosscoder" else (lambda t: t)
    along = (rows(model.W_dec.grad) * rows(model.W_dec)).sum(-1)  # each latent's gradient along its row / block
    assert along.abs().max() < 1e-6 * rows(model.W_dec.grad).abs().max()
    tracker = DeadLatentTracker(model.dead_shape, dead_tokens=9)
    optimizer = make_optimizer(model, lr=1e-2)
    for _ in range(2):
        metrics = train_step(model, optimizer, tracker, x, 9, 1 / 32)
        norms = torch.linalg.vector_norm(rows(model.W_dec), dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms))
    assert metrics["dead_fraction"] > 0 and metrics["auxk"] > 0  # the second step trained the dead latents


@pytest.mark.parametrize("arch", ["per-layer", "crosscoder"])
def test_screen_equals_the_float32_top_k(arch):
    model = make_family(arch, dtype=torch.float32)
    x = make_batch(b=16, dtype=torch.float32)
    plain = model.reconstruct(x, DEAD[arch])
    screened = model.reconstruct(x, DEAD[arch], screen=True)
    for name in ("indices", "aux_indices"):
        assert torch.equal(getattr(plain, name).sort(1).values, getattr(screened, name).sort(1).values), name
    # the same latents; their float32 values from another dot-product kernel (layers are up to 100x apart)
    torch.testing.assert_close(screened.x_hat, plain.x_hat, rtol=1e-5, atol=1e-6 * float(x.abs().max()))
    grads = {}
    for flag in (False, True):
        accumulate_gradients(model, x, DEAD[arch], 1 / 32, screen=flag)
        grads[flag] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


# ---- training end to end: the exact links between the families ----


def sparse_acts(n_tokens, n_layers, d, n_features=6, seed=0):
    """Tokens made of a few planted directions per layer: latents die, so AuxK and the dead counters matter."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n_layers, n_features, d))
    codes = rng.random((n_tokens, n_layers, n_features)) * (rng.random((n_tokens, n_layers, n_features)) < 0.3)
    acts = np.einsum("tlf,lfd->tld", codes, features) + 0.01 * rng.standard_normal((n_tokens, n_layers, d))
    return acts.astype(np.float32)


def config(cache, out, **overrides):
    settings = {
        "shards": [str(cache)], "out": str(out), "expansion_factor": 4, "k": 2, "batch_tokens": 32, "dead_tokens": 64,
        "save_every_tokens": 64, "seed": 5, "progress": False, "lr": 3e-3, "device": "cpu",
    }  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def metrics(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("tokens_per_s")
    return rows


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_array_cache(tmp_path_factory.mktemp("cache") / "c", sparse_acts(320, 3, 8), layers=[1, 4, 6], shard_tokens=100)


def test_per_layer_suite_equals_separate_single_layer_runs(cache, tmp_path):
    """SAE l of a per-layer run takes the steps of a `--layers l` MLSAE run (same seed and data): the same
    init, b_pre, dead counters and AuxK, the same gradient (the sum over layers of their own losses)."""
    train(config(cache, tmp_path / "suite", arch="per-layer"))
    suite = load_sae(tmp_path / "suite")
    suite_state = load_file(str(tmp_path / "suite" / "checkpoint.safetensors"))
    suite_rows = metrics(tmp_path / "suite")
    assert isinstance(suite, PerLayerSAEs) and suite.layers == [1, 4, 6]
    assert max(row["dead_fraction"] for row in suite_rows) > 0  # AuxK took part
    auxk_per_layer = []
    for index, layer in enumerate([1, 4, 6]):
        single_run = tmp_path / f"layer{layer}"
        train(config(cache, single_run, layers=[layer]))
        single = load_sae(single_run)
        for name in ("W_enc", "W_dec", "b_pre"):
            torch.testing.assert_close(getattr(suite, name)[index], getattr(single, name), rtol=1e-5, atol=1e-6, msg=name)
        single_state = load_file(str(single_run / "checkpoint.safetensors"))
        assert torch.equal(suite_state["dead.tokens_since_active"][index], single_state["dead.tokens_since_active"])
        single_rows = metrics(single_run)
        for a, b in zip(suite_rows, single_rows):
            assert abs(a[f"fvu_layer_{layer}"] - b[f"fvu_layer_{layer}"]) < 1e-5
        auxk_per_layer.append([row["auxk"] for row in single_rows])
        assert single_state["dead.tokens_since_active"].numel() == suite_state["dead.tokens_since_active"][index].numel()
    np.testing.assert_allclose([row["auxk"] for row in suite_rows], np.mean(auxk_per_layer, axis=0), rtol=1e-5, atol=1e-7)
    assert max(max(a) for a in auxk_per_layer) > 0


def test_crosscoder_on_one_layer_equals_the_single_layer_sae(cache, tmp_path):
    train(config(cache, tmp_path / "cc", arch="crosscoder", layers=[4]))
    train(config(cache, tmp_path / "sae", layers=[4]))
    cc, sae = load_sae(tmp_path / "cc"), load_sae(tmp_path / "sae")
    assert isinstance(cc, Crosscoder) and isinstance(sae, MultiLayerSAE) and cc.W_dec.shape == (32, 1, 8)
    for name in ("W_enc", "W_dec", "b_pre"):
        torch.testing.assert_close(getattr(cc, name).reshape(getattr(sae, name).shape), getattr(sae, name), rtol=1e-5, atol=1e-6)
    assert max(row["dead_fraction"] for row in metrics(tmp_path / "sae")) > 0
    for a, b in zip(metrics(tmp_path / "cc"), metrics(tmp_path / "sae")):
        assert a.keys() == b.keys() and all(abs(a[key] - b[key]) < 1e-5 for key in a)


@pytest.mark.parametrize("arch", ["per-layer", "crosscoder"])
def test_resume_after_an_interruption_is_bit_for_bit(cache, tmp_path, arch):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(config(cache, full, arch=arch))
    train(config(cache, resumed, arch=arch), stop_after_steps=5)  # "killed" after step 5; checkpoint from step 4
    assert read_progress(resumed / "checkpoint.safetensors")["step"] == 4
    train(config(cache, resumed, arch=arch, resume=True))
    a, b = load_file(str(full / "checkpoint.safetensors")), load_file(str(resumed / "checkpoint.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metrics(full) == metrics(resumed)
    assert max(row["dead_fraction"] for row in metrics(full)) > 0
    sae = load_sae(resumed)
    assert sae.arch == arch and type(sae) is FAMILIES[arch]
    info = json.loads((resumed / "config.json").read_text())
    assert info["config"]["arch"] == info["sae"]["arch"] == arch


# ---- planted truth ----


def _centred_unit(rng, *shape):
    """Random directions over the last axis, centred (standardisation removes each vector's mean) and unit norm."""
    v = rng.standard_normal(shape)
    v -= v.mean(-1, keepdims=True)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _sparse_codes(rng, n_tokens, n_features, active):
    """[n_tokens, n_features]: ``active`` features per token, magnitudes 1..2."""
    codes = np.zeros((n_tokens, n_features))
    chosen = np.argsort(rng.random((n_tokens, n_features)), axis=1)[:, :active]
    np.put_along_axis(codes, chosen, 1 + rng.random((n_tokens, active)), axis=1)
    return codes


def mean_max_cosine(truth, learned):
    """For each true direction [m, D], its best cosine similarity with a learned one [n, D]; the mean."""
    t = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    w = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    return float((t @ w.T).max(1).mean())


def test_planted_per_layer_dictionaries_are_recovered_by_the_per_layer_suite(tmp_path):
    rng = np.random.default_rng(0)
    n_tokens, n_layers, d, m = 4096, 2, 32, 16
    truth = _centred_unit(rng, n_layers, m, d)  # each layer its own dictionary
    acts = np.stack([_sparse_codes(rng, n_tokens, m, 2) @ truth[l] for l in range(n_layers)], 1)
    cache = write_array_cache(tmp_path / "c", acts.astype(np.float32), shard_tokens=4096)
    train(config(cache, tmp_path / "r", arch="per-layer", expansion_factor=2, k=2, batch_tokens=128, lr=1e-2, epochs=3,
                 dead_tokens=1024))  # fmt: skip
    sae = load_sae(tmp_path / "r")
    scores = [mean_max_cosine(truth[l], sae.W_dec[l].detach().numpy()) for l in range(n_layers)]
    assert min(scores) >= 0.9, scores


def test_planted_cross_layer_features_are_recovered_by_the_crosscoder(tmp_path):
    rng = np.random.default_rng(1)
    n_tokens, n_layers, d, m = 4096, 3, 16, 16
    # feature j writes truth[j, l] to layer l, as much to each (so per-vector standardisation keeps the block's shape)
    truth = _centred_unit(rng, m, n_layers, d) / np.sqrt(n_layers)
    acts = np.einsum("tm,mld->tld", _sparse_codes(rng, n_tokens, m, 2), truth)
    cache = write_array_cache(tmp_path / "c", acts.astype(np.float32), shard_tokens=4096)
    train(config(cache, tmp_path / "r", arch="crosscoder", expansion_factor=2, k=2, batch_tokens=128, lr=1e-2, epochs=3,
                 dead_tokens=1024))  # fmt: skip
    cc = load_sae(tmp_path / "r")
    score = mean_max_cosine(truth.reshape(m, -1), cc.W_dec.detach().numpy().reshape(cc.n_latents, -1))
    assert score >= 0.9, score


# ---- data parallel ----


# (2 gloo processes == 1 process for every family: tests/test_train_ddp.py)


# ---- bad input: one line, nothing written or lost ----


def run_cli(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_line_error(code, err, *words):
    assert code not in (0, None), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


TINY = ["--expansion-factor", "4", "-k", "2", "--batch-tokens", "32", "--no-progress", "--device", "cpu"]


def test_unknown_arch_is_one_line(cache, tmp_path, capsys):
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(tmp_path / "r"), "--arch", "sparsecoder", *TINY])
    assert_one_line_error(code, err, "--arch", "sparsecoder", "per-layer", "crosscoder")
    with pytest.raises(MlsaeError, match="--arch 'sparsecoder' is not a dictionary family"):
        config(cache, tmp_path / "r", arch="sparsecoder").check()
    assert not (tmp_path / "r").exists()


def test_crosscoder_k_above_its_latents_is_one_line(cache, tmp_path, capsys):
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(tmp_path / "r"), "--arch", "crosscoder", *TINY, "-k", "40"])
    assert_one_line_error(code, err, "-k 40", "32 latents")
    assert not (tmp_path / "r").exists()


def test_resume_with_another_arch_is_refused_and_old_runs_resume_as_mlsae(cache, tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["--shards", str(cache), "--out", str(run), "--arch", "per-layer", *TINY]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(run), "--arch", "crosscoder", "--resume", *TINY])
    assert_one_line_error(code, err, "--arch", "'crosscoder'", "'per-layer'")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    # a run written before the families: its config records no arch, and it is an MLSAE
    old = tmp_path / "old"
    assert main(["--shards", str(cache), "--out", str(old), *TINY]) == 0
    info = json.loads((old / "config.json").read_text())
    del info["config"]["arch"], info["sae"]["arch"]
    (old / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    record_files(old, ["config.json"])  # its checksum as that run recorded it (--resume verifies the file)
    code, err = run_cli(capsys, ["--shards", str(cache), "--out", str(old), "--arch", "crosscoder", "--resume", *TINY])
    assert_one_line_error(code, err, "--arch", "'crosscoder'", "'mlsae'")
    assert main(["--shards", str(cache), "--out", str(old), "--resume", *TINY]) == 0


def test_weights_without_arch_load_as_mlsae_and_an_unknown_arch_is_refused(tmp_path):
    sae = MultiLayerSAE(8, 16, 2, layers=[3], generator=torch.Generator().manual_seed(0))
    weights = {name: getattr(sae, name) for name in ("W_enc", "W_dec", "b_pre")}
    legacy = {key: value for key, value in sae.config().items() if key != "arch"}
    save_safetensors(tmp_path / "old.safetensors", weights, {"mlsae": json.dumps(legacy)})
    loaded = load_sae(tmp_path / "old.safetensors")
    assert type(loaded) is MultiLayerSAE and torch.equal(loaded.W_dec, sae.W_dec) and loaded.layers == [3]
    save_safetensors(tmp_path / "odd.safetensors", weights, {"mlsae": json.dumps({**legacy, "arch": "sparsecoder"})})
    with pytest.raises(MlsaeError, match="sparsecoder") as error:
        load_sae(tmp_path / "odd.safetensors")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("arch", ["per-layer", "crosscoder"])
def test_saved_families_round_trip_and_reject_inputs_of_other_layers(tmp_path, arch):
    model = make_family(arch, dtype=torch.float32)
    save_sae(model, tmp_path / "sae.safetensors")
    loaded = load_sae(tmp_path)
    assert type(loaded) is type(model) and loaded.layers == LAYERS
    x = make_batch(b=4, dtype=torch.float32)
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"takes x \[N, 3, 12\]"):
        model(x[:, :2])
    with pytest.raises(ValueError, match="needs the layers"):
        FAMILIES[arch](D, N_LATENTS, K, [])

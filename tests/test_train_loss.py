"""The loss (per-layer FVU + alpha * AuxK) and the dead-latent window, against brute force."""

import torch

from mlsae_train import MultiLayerSAE
from mlsae_train.dead_latents import DeadLatentTracker
from mlsae_train.loss import ResidualMoments, fvu_per_layer, total_variance_per_layer
from mlsae_train.step import accumulate_gradients, make_optimizer, train_step


def make_sae(d=12, n=40, k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sae = MultiLayerSAE(d, n, k, layers=[0, 2, 5], generator=g).to(dtype)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(n, d, generator=g, dtype=dtype))
        sae.b_pre.copy_(0.2 * torch.randn(d, generator=g, dtype=dtype))
    return sae


def make_batch(b=9, n_layers=3, d=12, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 10.0, 100.0], dtype=dtype)[:n_layers, None]  # layers of very different size
    return torch.randn(b, n_layers, d, generator=g, dtype=dtype) * scales + 3


def dense_loss(x, W_enc, W_dec, b_pre, k, eps, dead, k_aux, alpha):
    """SPEC 3's loss written densely, straight from the formulas."""
    b, L, d = x.shape
    rows = x.reshape(-1, d)
    mean, std = rows.mean(-1, keepdim=True), rows.std(-1, keepdim=True)
    z = (rows - mean) / (std + eps)
    pre = (z - b_pre) @ W_enc.T
    top = pre.topk(k, dim=1)
    h = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    z_hat = h @ W_dec + b_pre
    x_hat = (z_hat * (std + eps) + mean).view(b, L, d)
    fvu = ((x - x_hat) ** 2).sum((0, 2)) / ((x - x.mean(0)) ** 2).sum((0, 2))  # eq. 3, per layer
    e = (z - z_hat).detach()
    dead_mask = torch.zeros(W_enc.shape[0], dtype=torch.bool)
    dead_mask[dead] = True
    if len(dead) == 0:
        return fvu.mean(), fvu, torch.zeros((), dtype=x.dtype)
    aux = pre.masked_fill(~dead_mask, float("-inf")).topk(min(k_aux, len(dead)), dim=1)
    h_dead = torch.zeros_like(pre).scatter(1, aux.indices, torch.relu(aux.values))
    e_hat = h_dead @ W_dec  # no bias
    auxk = ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    return fvu.mean() + alpha * auxk, fvu, auxk


def test_fvu_matches_eq3_and_the_mean_predictor_scores_one():
    x = make_batch()
    x_hat = x + 0.1 * torch.randn_like(x)
    total = total_variance_per_layer(x)
    expected = torch.stack([((x[:, l] - x_hat[:, l]) ** 2).sum() / ((x[:, l] - x[:, l].mean(0)) ** 2).sum() for l in range(3)])
    torch.testing.assert_close(fvu_per_layer(x, x_hat, total), expected)
    mean_predictor = x.mean(0, keepdim=True).expand_as(x)
    torch.testing.assert_close(fvu_per_layer(x, mean_predictor, total), torch.ones(3, dtype=torch.float64))


def test_auxk_denominator_from_moments_matches_brute_force():
    e = torch.randn(30, 5, dtype=torch.float64) + 2
    moments = ResidualMoments(5, "cpu")
    for part in e.split(7):  # accumulated over micro-batches
        moments.add(part)
    torch.testing.assert_close(moments.total_variance(), ((e - e.mean(0)) ** 2).sum())


def dense_gradients(sae, x, dead, alpha):
    """Gradients of the dense loss, W_dec's with each (unit) row's parallel component removed (SPEC 3)."""
    p = {name: t.detach().clone().requires_grad_() for name, t in sae.named_parameters()}
    loss, fvu, auxk = dense_loss(x, p["W_enc"], p["W_dec"], p["b_pre"], sae.k, sae.eps, dead, sae.k_aux, alpha)
    loss.backward()
    grads = {name: t.grad for name, t in p.items()}
    rows = p["W_dec"].detach()
    grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * rows).sum(1, keepdim=True) * rows
    return grads, fvu, auxk


DEAD = torch.tensor([0, 3, 4, 7, 8, 11, 12, 20, 21, 25, 30, 31, 33, 38, 39])  # 15 dead > k_aux = 8


def test_gradients_equal_dense_reference_with_dead_latents():
    sae = make_sae()
    x = make_batch()
    assert sae.k_aux == 8
    terms = accumulate_gradients(sae, x, DEAD, auxk_alpha=1 / 32)
    grads, fvu, auxk = dense_gradients(sae, x, DEAD, 1 / 32)
    assert auxk > 0
    torch.testing.assert_close(terms.fvu_per_layer, fvu)
    torch.testing.assert_close(torch.tensor(terms.auxk, dtype=torch.float64), auxk)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_micro_batches_give_the_same_gradients():
    sae = make_sae()
    x = make_batch(b=10)
    whole = accumulate_gradients(sae, x, DEAD, auxk_alpha=1 / 32)
    whole_grads = [p.grad.clone() for p in sae.parameters()]
    parts = accumulate_gradients(sae, x, DEAD, auxk_alpha=1 / 32, micro_batch_tokens=3)
    torch.testing.assert_close(parts.fvu_per_layer, whole.fvu_per_layer)
    assert abs(parts.auxk - whole.auxk) < 1e-12 and torch.equal(parts.active, whole.active)
    for param, grad in zip(sae.parameters(), whole_grads):
        torch.testing.assert_close(param.grad, grad)


def test_auxk_target_is_detached():
    """AuxK's gradient is the one computed with e = z - z_hat held constant (FVU weighted out via alpha)."""
    sae = make_sae()
    x = make_batch()
    dead = torch.arange(10)
    accumulate_gradients(sae, x, dead, auxk_alpha=1.0)
    with_aux = {name: p.grad.clone() for name, p in sae.named_parameters()}
    accumulate_gradients(sae, x, None, auxk_alpha=1.0)
    aux_only = {name: with_aux[name] - p.grad for name, p in sae.named_parameters()}
    p = {name: t.detach().clone().requires_grad_() for name, t in sae.named_parameters()}
    _, _, auxk = dense_loss(x, p["W_enc"], p["W_dec"], p["b_pre"], sae.k, sae.eps, dead, sae.k_aux, 1.0)
    auxk.backward()
    rows = p["W_dec"].detach()
    p["W_dec"].grad -= (p["W_dec"].grad * rows).sum(1, keepdim=True) * rows
    for name, grad in aux_only.items():
        torch.testing.assert_close(grad, p[name].grad, msg=name)


def test_auxk_is_exactly_zero_when_nothing_is_dead():
    sae = make_sae()
    x = make_batch()
    grads, _, _ = dense_gradients(sae, x, torch.tensor([], dtype=torch.long), 0.0)
    for dead in (None, torch.tensor([], dtype=torch.long)):
        terms = accumulate_gradients(sae, x, dead, auxk_alpha=1 / 32)
        assert terms.auxk == 0.0
        for name, param in sae.named_parameters():
            torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_dead_window_counts_tokens():
    tracker = DeadLatentTracker(n_latents=4, dead_tokens=10)
    values = torch.tensor([[1.0, 0.0]])  # latent 2 is among the top k but its activation is 0: not active
    indices = torch.tensor([[1, 2]])
    for _ in range(2):
        tracker.update(DeadLatentTracker.active_mask(values, indices, 4), n_tokens=4)
    assert tracker.dead_latents().tolist() == []  # 8 tokens < 10
    tracker.update(DeadLatentTracker.active_mask(values, indices, 4), n_tokens=4)
    assert tracker.dead_latents().tolist() == [0, 2, 3]  # 12 tokens >= 10 without activating
    assert tracker.dead_fraction() == 0.75
    tracker.update(DeadLatentTracker.active_mask(torch.tensor([[2.0]]), torch.tensor([[3]]), 4), n_tokens=4)
    assert tracker.dead_latents().tolist() == [0, 2]
    assert tracker.tokens_since_active.tolist() == [16, 4, 16, 0]


def test_train_step_keeps_decoder_rows_unit_norm_and_reports_metrics():
    sae = make_sae(dtype=torch.float32)
    optimizer = make_optimizer(sae, lr=1e-2)
    tracker = DeadLatentTracker(sae.n_latents, dead_tokens=9)
    x = make_batch(dtype=torch.float32)
    first = train_step(sae, optimizer, tracker, x, 9, 1 / 32)
    assert first["auxk"] == 0.0 and first["dead_fraction"] == 0.0
    assert abs(first["loss"] - first["fvu"]) < 1e-12
    assert set(first) >= {"loss", "fvu", "fvu_layer_0", "fvu_layer_2", "fvu_layer_5", "auxk", "dead_fraction"}
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents))
    second = train_step(sae, optimizer, tracker, x, 9, 1 / 32)  # 9 tokens seen: the unused latents are dead
    assert second["dead_fraction"] > 0 and second["auxk"] > 0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(sae.n_latents))

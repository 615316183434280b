"""The autoencoder of SPEC section 3 against brute-force dense references and exact known cases."""

import pytest
import torch

from mlsae_train import MultiLayerSAE, load_sae, save_sae
from mlsae_train.model import aux_k_for, standardize


def make_sae(d=12, n=40, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sae = MultiLayerSAE(d, n, k, layers=[1, 3], generator=g).to(dtype)
    with torch.no_grad():  # move away from the init, so that nothing is accidentally symmetric
        sae.W_enc.add_(0.3 * torch.randn(n, d, generator=g, dtype=dtype))
        sae.W_dec.add_(0.3 * torch.randn(n, d, generator=g, dtype=dtype))
        sae.b_pre.copy_(0.5 * torch.randn(d, generator=g, dtype=dtype))
    return sae


def dense_reference(x, W_enc, W_dec, b_pre, k, eps):
    """SPEC 3 written out densely: standardize, ReLU(TopK(W_enc (z - b_pre))), W_dec^T h + b_pre, map back."""
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)  # sample std, divisor d - 1
    z = (x - mean) / (std + eps)
    pre = (z - b_pre) @ W_enc.T
    top = pre.topk(k, dim=-1)
    h = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    z_hat = h @ W_dec + b_pre
    return z_hat * (std + eps) + mean, h


def test_standardize_round_trip_and_moments():
    x = torch.randn(7, 3, 16, dtype=torch.float64) * 5 + 2
    z, mean, scale = standardize(x, eps=1e-5)
    torch.testing.assert_close(z.mean(-1), torch.zeros(7, 3, dtype=torch.float64))
    torch.testing.assert_close(z.std(-1), x.std(-1) / (x.std(-1) + 1e-5))
    torch.testing.assert_close(z * scale + mean, x)


def test_init_ties_decoder_to_encoder_with_unit_rows():
    sae = MultiLayerSAE(8, 32, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sae.W_enc, sae.W_dec)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert sae.W_dec.shape == (32, 8) and sae.b_pre.shape == (8,)
    assert torch.count_nonzero(sae.b_pre) == 0


def test_forward_and_gradients_equal_dense_reference():
    sae = make_sae()
    x = torch.randn(6, 2, 12, dtype=torch.float64) * 3 + 1
    target = torch.randn_like(x)
    x_hat = sae(x)
    ((x_hat - target) ** 2).sum().backward()

    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    ref, _ = dense_reference(x, params["W_enc"], params["W_dec"], params["b_pre"], sae.k, sae.eps)
    ((ref - target) ** 2).sum().backward()
    torch.testing.assert_close(x_hat, ref)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, msg=name)


def test_encode_gives_the_k_largest_latents_after_relu():
    sae = make_sae()
    x = torch.randn(5, 12, dtype=torch.float64)
    values, indices = sae.encode(x)
    assert values.shape == indices.shape == (5, sae.k)
    assert (values >= 0).all()
    _, h = dense_reference(x, sae.W_enc, sae.W_dec, sae.b_pre, sae.k, sae.eps)
    dense = torch.zeros_like(h).scatter(1, indices, values)
    torch.testing.assert_close(dense, h.detach())


def test_k_equal_to_n_is_a_relu_autoencoder():
    sae = make_sae(d=6, n=9, k=9)
    x = torch.randn(11, 6, dtype=torch.float64)
    z, mean, scale = standardize(x, sae.eps)
    h = torch.relu((z - sae.b_pre) @ sae.W_enc.T)  # no TopK at all
    expected = (h @ sae.W_dec + sae.b_pre) * scale + mean
    torch.testing.assert_close(sae(x), expected)


def test_rejects_k_larger_than_n():
    with pytest.raises(ValueError):
        MultiLayerSAE(4, 8, 9)


def test_gradient_projection_leaves_the_gradient_orthogonal_to_each_row():
    sae = make_sae()
    sae.normalize_decoder_()  # the projection assumes unit rows, as during training
    x = torch.randn(6, 2, 12, dtype=torch.float64)
    target = torch.randn_like(x)
    ((sae.reconstruct(x, project_decoder_grad=True).x_hat.view_as(x) - target) ** 2).sum().backward()
    projected = sae.W_dec.grad.clone()
    sae.zero_grad()
    ((sae(x) - target) ** 2).sum().backward()
    full = sae.W_dec.grad
    assert (projected * sae.W_dec).sum(1).abs().max() < 1e-12  # orthogonal to each row
    expected = full - (full * sae.W_dec).sum(1, keepdim=True) * sae.W_dec  # only the parallel part removed
    torch.testing.assert_close(projected, expected.detach())


def test_normalize_decoder_gives_unit_rows_and_keeps_directions():
    sae = make_sae()
    before = sae.W_dec.detach().clone()
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40, dtype=torch.float64))
    torch.testing.assert_close(sae.W_dec * before.norm(dim=1, keepdim=True), before)


@pytest.mark.parametrize("d, n, expected", [(512, 32768, 256), (576, 36864, 256), (16, 64, 8), (2048, 131072, 1024), (512, 100, 100)])
def test_k_aux_is_a_power_of_two_near_half_the_width(d, n, expected):
    assert aux_k_for(d, n) == expected


def test_save_and_load_sae(tmp_path):
    sae = make_sae(dtype=torch.float32)
    save_sae(sae, tmp_path / "sae.safetensors")
    loaded = load_sae(tmp_path)
    assert loaded.layers == [1, 3] and loaded.k == sae.k and loaded.W_dec.shape == (40, 12)
    x = torch.randn(4, 2, 12)
    torch.testing.assert_close(loaded(x), sae(x))
    v, i = loaded.encode(x)
    assert v.shape == (4, 2, sae.k) and i.shape == (4, 2, sae.k)

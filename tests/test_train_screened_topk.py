"""The bfloat16 screen picks the float32 top-k: against float64 brute force, on near-ties that bfloat16
cannot see, at every scale, and on the rows it hands to the float32 kernel."""

import pytest
import torch

import mlsae_train.screened_topk as screened_topk_module
from mlsae_train import MultiLayerSAE
from mlsae_train.screened_topk import (
    OUTPUT_ROUNDING,
    EncoderScreen,
    _bf16_at_most,
    _group_count,
    _kth_largest,
    _threshold,
    bf16_matmul_is_fast,
    screened_topk,
)
from mlsae_train.topk_encoder import topk_encode


def assert_exact_topk(x: torch.Tensor, W: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    """values/indices are the top-k of x @ W.T: the same set as float64 brute force wherever the k-th and
    (k+1)-th exact values differ by more than float32 rounding, and float32-accurate values."""
    exact = x.double() @ W.double().T  # [N, n]
    scale = torch.linalg.vector_norm(x.double(), dim=1, keepdim=True) * torch.linalg.vector_norm(W.double(), dim=1).max()
    tolerance = 1e-5 * scale  # [N, 1]: float32 dot products of d terms
    assert ((values.double() - exact.gather(1, indices)).abs() <= tolerance).all(), "values are not the float32 dot products"
    assert all(len(set(row.tolist())) == k for row in indices), "a latent was picked twice"
    ordered = exact.sort(dim=1, descending=True).values
    if k < W.shape[0]:
        clear = (ordered[:, k - 1] - ordered[:, k]) > 2 * tolerance[:, 0]  # rows without a float32 tie at the boundary
    else:
        clear = torch.ones(x.shape[0], dtype=torch.bool)
    reference = exact.topk(k, dim=1).indices
    same = indices.sort(dim=1).values == reference.sort(dim=1).values
    assert same.all(dim=1)[clear].all(), "a clear top-k latent was missed"
    assert clear.float().mean() > 0.5  # the test means something


@pytest.mark.parametrize(
    "n_rows, d, n_latents, k",
    [(300, 64, 1024, 8), (257, 48, 999, 5), (64, 32, 96, 1), (40, 16, 64, 31), (100, 24, 256, 16)],
)
def test_equals_float64_brute_force(n_rows, d, n_latents, k):
    g = torch.Generator().manual_seed(n_latents)
    x = torch.randn(n_rows, d, generator=g) + 0.3
    W = torch.nn.functional.normalize(torch.randn(n_latents, d, generator=g), dim=1)
    values, indices = screened_topk(x, EncoderScreen(W), k)
    assert_exact_topk(x, W, k, values, indices)


def test_rows_with_many_candidates_go_through_the_second_table(monkeypatch):
    monkeypatch.setattr(screened_topk_module, "PAD_WIDTH", 1)  # most rows then overflow the first table
    g = torch.Generator().manual_seed(8)
    x = torch.randn(300, 64, generator=g)
    W = torch.nn.functional.normalize(torch.randn(2048, 64, generator=g), dim=1)
    values, indices = screened_topk(x, EncoderScreen(W), 16)
    assert_exact_topk(x, W, 16, values, indices)


def test_kth_largest_of_each_row():
    table = torch.randint(-300, 300, (50, 77), dtype=torch.int16, generator=torch.Generator().manual_seed(9))
    for k in (1, 5, 77):
        expected = table.sort(dim=1, descending=True).values[:, k - 1]
        assert torch.equal(_kth_largest(table, k), expected)


def test_small_chunks_give_the_same_answer():
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(70, 32, generator=g), torch.randn(512, 32, generator=g)
    screen = EncoderScreen(W)
    whole = screened_topk(x, screen, 6)
    chunked = screened_topk(x, screen, 6, chunk_rows=9)
    order, chunked_order = whole[1].argsort(1), chunked[1].argsort(1)  # top-k comes back unsorted
    assert torch.equal(whole[1].gather(1, order), chunked[1].gather(1, chunked_order))
    assert torch.equal(whole[0].gather(1, order), chunked[0].gather(1, chunked_order))


def test_near_ties_that_bfloat16_cannot_tell_apart():
    # Latents come in pairs whose rows differ by 2^-12 relative: equal after rounding to bfloat16, but
    # their float32 pre-activations differ by far more than float32 rounding. With k odd, a pair
    # straddles the boundary in every row and only the exact recompute can order it.
    g = torch.Generator().manual_seed(2)
    d, pairs, k = 32, 128, 7
    base = torch.nn.functional.normalize(torch.randn(pairs, d, generator=g), dim=1).bfloat16().float()
    W = torch.stack([base, base + 2.0**-12 * base.abs()], dim=1).reshape(2 * pairs, d)  # rows 2i, 2i+1
    assert torch.equal(W[0::2].bfloat16(), W[1::2].bfloat16())
    x = torch.randn(500, d, generator=g).abs() + 0.5  # positive: the nudge raises the odd row's value
    values, indices = screened_topk(x, EncoderScreen(W), k)
    assert_exact_topk(x, W, k, values, indices)
    # the top (k + 1) / 2 pairs fill k slots: the last slot must go to the pair's larger (odd) row
    exact = (x.double() @ W.double().T).topk(k, dim=1).indices
    assert torch.equal(indices.sort(1).values, exact.sort(1).values)


@pytest.mark.parametrize("scale", [1e-6, 1e-2, 1.0, 1e3, 1e6])
def test_every_scale_and_a_massive_component(scale):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 40, generator=g) * scale
    x[::3, 5] *= 500  # a few huge components, as in the residual stream's massive activations
    W = torch.randn(300, 40, generator=g) * 0.1
    values, indices = screened_topk(x, EncoderScreen(W), 9)
    assert_exact_topk(x, W, 9, values, indices)


def test_the_error_bound_holds_for_every_latent():
    g = torch.Generator().manual_seed(4)
    for scale in (1e-3, 1.0, 1e4):
        x = torch.randn(256, 96, generator=g) * scale
        x[:, 0] *= 300
        W = torch.randn(700, 96, generator=g)
        screen = EncoderScreen(W)
        x_bf16 = x.bfloat16()
        approx = (x_bf16 @ screen.W_enc_bf16.T).double()  # [N, n], rounded to bfloat16 as the screen sees it
        exact = x.double() @ W.double().T
        relative = OUTPUT_ROUNDING / (1 - OUTPUT_ROUNDING)
        allowed = screen.error_bound(x, x_bf16).double()[:, None] + relative * approx.abs()
        assert ((approx - exact).abs() <= allowed).all()
        assert ((approx - exact).abs() > 0.05 * allowed).any()  # and it is not uselessly loose


def test_the_error_bound_is_reached_when_every_rounding_goes_the_same_way():
    # x and a row of W all 1 + delta, just under bfloat16's rounding midpoint: both round down to 1, and
    # Cauchy-Schwarz is an equality. The error is then the whole bound (less its 2^-10 margin), so a
    # bound any smaller would be wrong.
    d, delta = 64, 2.0**-8 - 2.0**-16
    x = torch.full((1, d), 1 + delta)
    W = torch.full((3, d), 1 + delta)
    screen = EncoderScreen(W)
    approx = (x.bfloat16() @ screen.W_enc_bf16.T).double()
    assert (approx == d).all()  # a power of two: no output rounding, the bound alone must cover the error
    error = (x.double() @ W.double().T - approx).abs()  # d (2 delta + delta^2)
    bound = screen.error_bound(x, x.bfloat16()).double()
    assert (error <= bound).all()
    assert (error >= 0.99 * bound).all()


def test_threshold_keeps_the_worst_placed_top_k_latent():
    # k latents at approx = kth whose exact values are as low as the bound allows, and a latent j whose
    # exact value beats them (so it is in the exact top-k) while its approx is as low as allowed.
    # j's approx is exactly the threshold: a higher threshold would drop it.
    relative = OUTPUT_ROUNDING / (1 - OUTPUT_ROUNDING)
    kth, bound = torch.tensor([3.0, 0.5], dtype=torch.float64), torch.tensor([0.2, 0.01], dtype=torch.float64)
    lowest_exact_of_the_k = kth * (1 - relative) - bound
    exact_j = lowest_exact_of_the_k + 1e-12
    lowest_approx_j = (exact_j - bound) / (1 + relative)  # approx (1 + u') >= exact - E when approx >= 0
    threshold = _threshold(kth, bound)
    assert (threshold <= lowest_approx_j).all()
    torch.testing.assert_close(threshold, lowest_approx_j, rtol=0, atol=1e-9)


def test_bf16_threshold_rounds_down():
    threshold = torch.tensor([1.0, 1.0 + 2.0**-9, 0.3, 5e-30, 3.0e38])
    bits = _bf16_at_most(threshold)
    below = bits.view(torch.bfloat16).float()
    above = (bits + 1).view(torch.bfloat16).float()  # the next bfloat16 up
    assert (below <= threshold).all() and (above > threshold).all()


def test_rows_the_screen_cannot_decide_match_the_float32_kernel():
    g = torch.Generator().manual_seed(5)
    d, n, k = 16, 64, 4
    W = torch.randn(n, d, generator=g)
    x = torch.randn(6, d, generator=g)
    x[1] = 0  # every pre-activation 0: no positive threshold
    x[2] = -W[:40].sum(0) * 10  # mostly negative pre-activations
    x[3, 0] = float("nan")
    x[4, 1] = float("inf")
    values, indices = screened_topk(x, EncoderScreen(W), k)
    reference = topk_encode(x, torch.zeros(d), W, k)
    for row in (1, 2):  # decided by the float32 kernel: same values as it gives
        torch.testing.assert_close(values[row].sort().values, reference.values[row].sort().values)
    # a non-finite input row stays visibly non-finite, exactly as the float32 kernel leaves it
    assert torch.isnan(values[3]).all()
    assert torch.isinf(values[4]).all()
    for row in (3, 4):
        torch.testing.assert_close(values[row], reference.values[row], rtol=0, atol=0, equal_nan=True)
    finite = [0, 5]
    assert_exact_topk(x[finite], W, k, values[finite], indices[finite])


def test_group_count_divides_the_latents_and_leaves_room_for_k():
    assert _group_count(8192, 32) == 8
    assert _group_count(1000, 5) == 8
    assert _group_count(999, 5) == 1
    assert _group_count(96, 1) == 8
    assert _group_count(64, 31) == 1
    assert _group_count(4608, 32) == 8


def test_reconstruct_with_the_screen_equals_the_float32_forward():
    g = torch.Generator().manual_seed(6)
    sae = MultiLayerSAE(48, 480, 12, layers=[0, 1, 2], generator=g)
    with torch.no_grad():
        sae.b_pre.normal_(generator=g)
    x = torch.randn(50, 3, 48, generator=g) * 4 + 1
    with torch.no_grad():
        plain = sae.reconstruct(x)
        screened = sae.reconstruct(x, screen=True)
        values, indices = sae.encode(x, screen=True)
    assert torch.equal(plain.indices.sort(1).values, screened.indices.sort(1).values)
    torch.testing.assert_close(screened.x_hat, plain.x_hat, rtol=1e-5, atol=1e-5)
    assert screened.aux_values.shape == (150, 0)
    assert torch.equal(indices.reshape(-1, 12).sort(1).values, plain.indices.sort(1).values)
    torch.testing.assert_close(values.reshape(-1, 12).sort(1).values, plain.values.sort(1).values)


def test_training_through_the_screen_has_the_float32_kernels_auxk_and_gradients():
    g = torch.Generator().manual_seed(7)
    sae = MultiLayerSAE(32, 512, 8, layers=[0, 1], generator=g)
    with torch.no_grad():
        sae.b_pre.normal_(generator=g)
    x = torch.randn(60, 2, 32, generator=g) * 3
    dead = torch.arange(0, 512, 3)  # 171 "dead" latents: AuxK's top-k_aux (16) is picked among them
    results = []
    for screen in (False, True):
        sae.zero_grad()
        out = sae.reconstruct(x, dead_latents=dead, project_decoder_grad=True, screen=screen)
        loss = (out.x_hat - x.reshape(-1, 32)).pow(2).sum() + out.aux_values.square().sum()
        loss.backward()
        results.append((out, [p.grad.clone() for p in (sae.W_enc, sae.W_dec, sae.b_pre)]))
    (plain, plain_grads), (screened, screened_grads) = results
    assert torch.equal(plain.indices.sort(1).values, screened.indices.sort(1).values)
    assert screened.aux_indices.shape == plain.aux_indices.shape == (120, 16)
    assert torch.equal(plain.aux_indices.sort(1).values, screened.aux_indices.sort(1).values)
    assert torch.isin(screened.aux_indices, dead).all()
    torch.testing.assert_close(screened.aux_values.sort(1).values, plain.aux_values.sort(1).values, rtol=1e-5, atol=1e-5)
    for got, expected in zip(screened_grads, plain_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("amx, avx512_bf16", [(False, False), (True, False), (False, True), (True, True)])
def test_bf16_matmul_is_fast_on_a_cpu_exactly_when_it_has_amx_or_avx512_bf16(amx, avx512_bf16, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert bf16_matmul_is_fast("cpu") is (amx or avx512_bf16)


@pytest.mark.parametrize("supported", [False, True])
def test_bf16_matmul_is_fast_on_a_gpu_exactly_when_it_supports_bfloat16(supported, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    assert bf16_matmul_is_fast("cuda") is supported
    assert bf16_matmul_is_fast("meta") is False

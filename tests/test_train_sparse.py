"""The sparse encoder and decoder equal the dense computation, in values and in gradients."""

import pytest
import torch

from mlsae_train.sparse_decode import sparse_decode
from mlsae_train.sparse_ops import (
    latent_sums,
    ragged_row_dots,
    row_dots,
    row_dots_via_embedding_bag,
    scatter_weighted_rows,
    weighted_row_sum,
)
from mlsae_train.topk_encoder import topk_encode


def dense_codes(indices, weights, n):
    """The [R, n] matrix that the sparse (indices, weights) stand for (duplicates add up)."""
    return torch.zeros(indices.shape[0], n, dtype=weights.dtype).scatter_add_(1, indices, weights)


@pytest.fixture
def codes():
    g = torch.Generator().manual_seed(0)
    R, K, n, d = 37, 5, 23, 11
    indices = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(R)])
    weights = torch.randn(R, K, generator=g, dtype=torch.float64)
    table = torch.randn(n, d, generator=g, dtype=torch.float64)
    vectors = torch.randn(R, d, generator=g, dtype=torch.float64)
    return indices, weights, table, vectors


def test_primitives_equal_dense_products(codes):
    indices, weights, table, vectors = codes
    n = table.shape[0]
    dense = dense_codes(indices, weights, n)  # [R, n]
    torch.testing.assert_close(weighted_row_sum(indices, weights, table), dense @ table)
    torch.testing.assert_close(row_dots(indices, table, vectors), (vectors @ table.T).gather(1, indices))
    torch.testing.assert_close(scatter_weighted_rows(indices, weights, vectors, n), dense.T @ vectors)
    torch.testing.assert_close(latent_sums(indices, weights, n), dense.sum(0))


def test_row_dots_off_cpu_path_equals_dense(codes):
    indices, _, table, vectors = codes  # the path used on CUDA, run here on CPU
    torch.testing.assert_close(row_dots_via_embedding_bag(indices, table, vectors), (vectors @ table.T).gather(1, indices))


def test_scatter_handles_repeated_and_unused_latents():
    indices = torch.tensor([[0, 2], [2, 0], [2, 2]])
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    vectors = torch.tensor([[1.0], [10.0], [100.0]])
    out = scatter_weighted_rows(indices, weights, vectors, 4)
    # latent 0: 1*1 + 4*10; latent 2: 2*1 + 3*10 + 5*100 + 6*100; latents 1 and 3: unused
    assert out.flatten().tolist() == [41.0, 0.0, 1132.0, 0.0]


def test_sparse_decode_values_and_gradients_equal_dense(codes):
    indices, weights, table, _ = codes
    n = table.shape[0]
    values = weights.clone().requires_grad_()
    W = table.clone().requires_grad_()
    out = sparse_decode(values, indices, W)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()

    values_ref = weights.clone().requires_grad_()
    W_ref = table.clone().requires_grad_()
    dense = torch.zeros(indices.shape[0], n, dtype=torch.float64).scatter(1, indices, values_ref)
    out_ref = dense @ W_ref
    (out_ref * probe).sum().backward()

    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(values.grad, values_ref.grad)
    torch.testing.assert_close(W.grad, W_ref.grad)


def test_sparse_decode_projected_weight_gradient(codes):
    indices, weights, table, _ = codes
    unit = table / table.norm(dim=1, keepdim=True)
    W = unit.clone().requires_grad_()
    out = sparse_decode(weights, indices, W, project_grad=True)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    dense_grad = dense_codes(indices, weights, unit.shape[0]).T @ probe  # dL/dW of the dense decoder
    expected = dense_grad - (dense_grad * unit).sum(1, keepdim=True) * unit
    torch.testing.assert_close(W.grad, expected)


def test_sparse_decode_keeps_leading_dims(codes):
    indices, weights, table, _ = codes
    out = sparse_decode(weights[:36].view(4, 9, -1), indices[:36].view(4, 9, -1), table)
    assert out.shape == (4, 9, table.shape[1])
    torch.testing.assert_close(out.view(36, -1), weighted_row_sum(indices[:36], weights[:36], table))


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])
def test_topk_encode_values_and_gradients_equal_dense(chunk_rows):
    g = torch.Generator().manual_seed(1)
    N, d, n, k = 29, 8, 40, 4
    z = torch.randn(N, d, generator=g, dtype=torch.float64, requires_grad=True)
    b_pre = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    dead = torch.tensor([1, 5, 6, 17, 33, 39])
    codes = topk_encode(z, b_pre, W_enc, k, dead_latents=dead, k_aux=3, chunk_rows=chunk_rows)
    probe, probe_aux = torch.randn(N, k, generator=g, dtype=torch.float64), torch.randn(N, 3, generator=g, dtype=torch.float64)
    ((codes.values * probe).sum() + (codes.aux_values * probe_aux).sum()).backward()

    z_ref, b_ref, W_ref = (t.detach().clone().requires_grad_() for t in (z, b_pre, W_enc))
    pre = (z_ref - b_ref) @ W_ref.T  # [N, n], the dense computation
    top = pre.topk(k, dim=1)
    dead_pre = pre[:, dead]
    aux = dead_pre.topk(3, dim=1)
    # topk order is unspecified: compare as sets by sorting on the latent index.
    order, order_ref = codes.indices.argsort(1), top.indices.argsort(1)
    assert torch.equal(codes.indices.gather(1, order), top.indices.gather(1, order_ref))
    torch.testing.assert_close(codes.values.gather(1, order), top.values.gather(1, order_ref))
    aux_order, aux_order_ref = codes.aux_indices.argsort(1), dead[aux.indices].argsort(1)
    assert torch.equal(codes.aux_indices.gather(1, aux_order), dead[aux.indices].gather(1, aux_order_ref))
    # The same probes, placed at the latents they multiplied.
    grad_pre = torch.zeros_like(pre).scatter(1, codes.indices, probe)
    grad_pre = grad_pre + torch.zeros_like(pre).scatter(1, codes.aux_indices, probe_aux)
    (pre * grad_pre).sum().backward()
    torch.testing.assert_close(W_enc.grad, W_ref.grad)
    torch.testing.assert_close(b_pre.grad, b_ref.grad)
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_topk_encode_b_pre_gradient_without_input_gradient():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(16, 6, generator=g, dtype=torch.float64)
    b_pre = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    W_enc = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    codes = topk_encode(z, b_pre, W_enc, 3)
    codes.values.sum().backward()
    b_ref = b_pre.detach().clone().requires_grad_()
    pre = (z - b_ref) @ W_enc.detach().T
    pre.gather(1, codes.indices).sum().backward()
    torch.testing.assert_close(b_pre.grad, b_ref.grad)
    assert codes.aux_values.shape == (16, 0)


def test_topk_encode_without_dead_latents_has_no_aux():
    z = torch.randn(5, 4)
    codes = topk_encode(z, torch.zeros(4), torch.randn(9, 4), 2, dead_latents=torch.tensor([], dtype=torch.long), k_aux=4)
    assert codes.aux_indices.shape == (5, 0)


def test_topk_encode_caps_k_aux_at_the_number_of_dead_latents():
    z = torch.randn(5, 4)
    codes = topk_encode(z, torch.zeros(4), torch.randn(9, 4), 2, dead_latents=torch.tensor([3, 8]), k_aux=4)
    assert codes.aux_indices.shape == (5, 2)
    assert set(codes.aux_indices.flatten().tolist()) <= {3, 8}


def test_topk_encode_with_bfloat16_matmul():
    """The mixed-precision path (used on CUDA) also runs on CPU: values in float32, close to exact."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(64, 16, generator=g)
    W_enc = torch.randn(48, 16, generator=g, requires_grad=True)
    b_pre = torch.zeros(16, requires_grad=True)
    codes = topk_encode(z, b_pre, W_enc, 4, matmul_dtype=torch.bfloat16)
    assert codes.values.dtype == torch.float32
    exact = (z @ W_enc.detach().T).gather(1, codes.indices)
    torch.testing.assert_close(codes.values, exact, atol=0.1, rtol=0.02)
    codes.values.sum().backward()
    assert W_enc.grad is not None and W_enc.grad.dtype == torch.float32


def test_ragged_row_dots_on_both_paths_with_an_empty_row(codes):
    _, _, table, vectors = codes  # 37 rows
    g = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 6, (vectors.shape[0],), generator=g)
    counts[3] = 0  # a row without entries
    row_starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    columns = torch.randint(0, table.shape[0], (int(counts.sum()),), generator=g)
    rows = torch.repeat_interleave(torch.arange(vectors.shape[0]), counts)
    expected = (table[columns] * vectors[rows]).sum(1)
    torch.testing.assert_close(ragged_row_dots(row_starts, columns, table, vectors), expected)
    torch.testing.assert_close(row_dots_via_embedding_bag(columns, table, vectors, row_starts), expected)
    assert row_dots(torch.zeros(4, 0, dtype=torch.long), table, vectors[:4]).shape == (4, 0)

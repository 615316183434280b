"""MMCS (appendix B.3) against the full n x n cosine matrix with its diagonal excluded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlsae_analysis.mmcs import max_cosine_similarity, mean_and_std, mmcs, nearest_neighbours
from mlsae_analysis.neighbours import decoder_neighbours
from mlsae_cache.errors import MlsaeError


def brute_force_cosine(W: np.ndarray) -> np.ndarray:
    """[n, n] cosine similarities with -inf on the diagonal."""
    W = W.astype(np.float64)
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)
    return cosine


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 4096])
def test_matches_brute_force(chunk_size: int) -> None:
    W = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)) * torch.rand(50, 1) * 5
    expected = brute_force_cosine(W.numpy()).max(axis=1)
    got = max_cosine_similarity(W, chunk_size=chunk_size)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)
    mean, std = mmcs(W, chunk_size=chunk_size)
    assert mean == pytest.approx(expected.mean(), abs=1e-6)
    assert std == pytest.approx(expected.std(), abs=1e-6)


def test_neighbour_may_have_a_higher_index_and_self_is_never_counted() -> None:
    # Row 0's only non-orthogonal neighbour is row 2 (higher index): comparing with lower-indexed
    # rows only (the reference code's bug) would miss it. Row 1 is orthogonal to row 0 and almost to
    # row 2; counting a row as its own neighbour would give 1 everywhere.
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0], [3.0, 0.3, 0.0], [0.0, -1.0, 0.0]])
    got = max_cosine_similarity(W, chunk_size=2)
    cos_02 = 1 / math.sqrt(1.01)
    # Row 3's similarities are 0, 0 and -0.1/sqrt(1.01): its max is 0, not its own 1.
    assert got.tolist() == pytest.approx([cos_02, 0.0, cos_02, 0.0], abs=1e-7)


def test_orthonormal_rows_have_zero_mmcs_and_duplicates_one() -> None:
    assert max_cosine_similarity(torch.eye(5)).tolist() == [0.0] * 5
    W = torch.cat([torch.eye(4), torch.eye(4)[:1] * 7])  # row 4 duplicates row 0's direction
    assert max_cosine_similarity(W).tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0, 1.0], abs=1e-7)


def test_low_precision_input_is_upcast() -> None:
    W = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    got = max_cosine_similarity(W.to(torch.bfloat16))
    assert got.dtype == torch.float32
    expected = brute_force_cosine(W.to(torch.bfloat16).float().numpy()).max(axis=1)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("screen", [False, True])  # float32 blocks, and the exact bfloat16 screen
def test_nearest_neighbours_matches_brute_force(screen: bool) -> None:
    W = torch.randn(40, 5, generator=torch.Generator().manual_seed(2))
    cosine = brute_force_cosine(W.numpy())
    latents = [0, 39, 17, 17]
    indices, similarities = nearest_neighbours(W, latents, k=6, chunk_size=3, screen=screen)
    assert indices.shape == similarities.shape == (4, 6)
    for row, latent in enumerate(latents):
        expected = np.argsort(-cosine[latent], kind="stable")[:6]
        assert indices[row].tolist() == expected.tolist()
        np.testing.assert_allclose(similarities[row].numpy(), cosine[latent, expected], atol=1e-6)
        assert latent not in indices[row].tolist()
    assert torch.equal(indices[:, 0], torch.tensor([int(np.argmax(cosine[l])) for l in latents]))
    np.testing.assert_allclose(similarities[:, 0].numpy(), max_cosine_similarity(W)[latents].numpy(), atol=1e-7)


def test_user_errors() -> None:
    with pytest.raises(MlsaeError, match="at least 2"):
        max_cosine_similarity(torch.ones(1, 4))
    with pytest.raises(MlsaeError, match="matrix"):
        max_cosine_similarity(torch.ones(4))
    with pytest.raises(MlsaeError, match="chunk_size"):
        max_cosine_similarity(torch.eye(3), chunk_size=0)
    with pytest.raises(MlsaeError, match="k must be between 1 and 2"):
        nearest_neighbours(torch.eye(3), [0], k=3)
    with pytest.raises(MlsaeError, match="latent indices"):
        nearest_neighbours(torch.eye(3), [3], k=1)



@pytest.mark.parametrize("screen", [False, True])
def test_mmcs_from_the_neighbours_table_equals_mmcs(screen: bool):
    """mlsae-analyse takes MMCS from neighbours.parquet's rank-0 column: the same numbers as mmcs()."""
    W_dec = torch.randn(300, 16, generator=torch.Generator().manual_seed(3))
    table = decoder_neighbours(W_dec, chunk_size=64, progress=False, screen=screen)
    nearest = table.filter(table["rank"] == 0).sort("latent")["cosine"].to_numpy()
    np.testing.assert_allclose(nearest, max_cosine_similarity(W_dec, chunk_size=64).numpy(), rtol=1e-6)
    np.testing.assert_allclose(mean_and_std(torch.tensor(nearest)), mmcs(W_dec), rtol=1e-6)


@pytest.mark.parametrize("screen", [False, True])
def test_duplicate_rows_are_each_others_nearest_and_never_their_own(screen: bool) -> None:
    g = torch.Generator().manual_seed(4)
    W = torch.randn(200, 32, generator=g)
    W[7] = W[3] * 2  # the same direction
    W[150] = W[3] * 0.5
    indices, similarities = nearest_neighbours(W, [3, 7, 150, 10], k=3, screen=screen)
    assert sorted(indices[0, :2].tolist()) == [7, 150] and sorted(indices[1, :2].tolist()) == [3, 150]
    assert sorted(indices[2, :2].tolist()) == [3, 7]
    np.testing.assert_allclose(similarities[:3, :2].numpy(), 1.0, atol=1e-6)
    for row, latent in enumerate([3, 7, 150, 10]):
        assert latent not in indices[row].tolist()

"""Weiszfeld's geometric median against exact known cases and the optimality condition."""

import torch

from mlsae_train.geometric_median import geometric_median


def objective(points, y):
    return torch.linalg.vector_norm(points - y, dim=1).sum()


def test_collinear_points_give_the_middle_one():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.5, 0.0], [7.0, 0.0], [100.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(points), torch.tensor([2.5, 0.0], dtype=torch.float64), atol=1e-5, rtol=0)


def test_equilateral_triangle_gives_its_centre():
    angles = torch.tensor([0.0, 2.0944, 4.18879], dtype=torch.float64)
    points = torch.stack([torch.cos(angles), torch.sin(angles)], 1) + torch.tensor([3.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(geometric_median(points), torch.tensor([3.0, -1.0], dtype=torch.float64), atol=1e-4, rtol=0)


def test_random_cloud_satisfies_the_optimality_condition():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(500, 8, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 8, dtype=torch.float64)
    points[:20] += 50  # outliers move the mean, barely the median
    y = geometric_median(points)
    # the gradient of sum ||x_i - y|| vanishes at the minimum
    units = (y - points) / torch.linalg.vector_norm(y - points, dim=1, keepdim=True)
    assert torch.linalg.vector_norm(units.sum(0)) < 1e-2 * len(points) ** 0.5
    assert objective(points, y) < objective(points, points.mean(0))
    for _ in range(10):
        nudge = 0.01 * torch.randn(8, generator=g, dtype=torch.float64)
        assert objective(points, y) <= objective(points, y + nudge)
    assert torch.linalg.vector_norm(y) < 0.25 * torch.linalg.vector_norm(points.mean(0))


def test_float32_input_gives_float32_output():
    points = torch.randn(100, 4)
    assert geometric_median(points).dtype == torch.float32

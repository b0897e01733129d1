"""Frechet distance against closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from mlcm_train.eval.frechet import frechet_distance, frechet_distance_from_stats


def test_identical_gaussians_are_at_distance_zero():
    cov = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=torch.float64)
    mu = torch.tensor([1.0, -1.0], dtype=torch.float64)
    assert frechet_distance_from_stats(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_closed_form():
    # For diagonal covariances: |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    mu_a, mu_b = torch.zeros(3), torch.tensor([3.0, 0.0, 4.0])
    expected = 25.0 + sum((math.sqrt(x) - math.sqrt(y)) ** 2 for x, y in zip(a, b))
    got = frechet_distance_from_stats(
        mu_a.double(), torch.diag(a).double(), mu_b.double(), torch.diag(b).double()
    )
    assert got == pytest.approx(expected, rel=1e-9)


def test_samples_of_one_distribution_are_close_and_of_two_are_far():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 8, generator=g), torch.randn(4000, 8, generator=g)
    assert frechet_distance(x, y) < 0.05
    assert frechet_distance(x, y * 2 + 1) > 8.0 - 0.5  # 8 * 1^2 mean shift + 8 * (2 - 1)^2 scale


def test_bad_shapes_are_explained():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        frechet_distance(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))

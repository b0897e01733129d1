"""Frechet distance between Gaussian fits of two feature sets (FID's formula, Heusel et al. 2017, eq. 6).

``d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``. The matrix square root is taken
through symmetric eigendecompositions in float64 (``S_a^1/2 S_b S_a^1/2`` is symmetric PSD, so its square
root's trace is the sum of the square roots of its eigenvalues), which needs no scipy and never goes complex.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gaussian_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, covariance) of (N, D) features in float64; N must be at least 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features of shape {tuple(features.shape)}: need (N, D) with N >= 2 samples")
    x = features.detach().to(torch.float64)
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp(min=0.0).sqrt()) @ vectors.T


def frechet_distance_from_stats(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Squared Frechet distance of N(mu_a, cov_a) and N(mu_b, cov_b)."""
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    middle = (middle + middle.T) / 2.0  # symmetrise away round-off before eigvalsh
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0.0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2.0 * trace_sqrt
    return float(distance.clamp(min=0.0))


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Squared Frechet distance between the Gaussian fits of two (N, D) feature sets."""
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"feature dimensions differ ({features_a.shape[1]} vs {features_b.shape[1]}); "
            "both sets must come from the same feature network"
        )
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))

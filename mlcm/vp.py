"""The discrete variance-preserving maths shared by the sampler, the scheduler and the trainer.

``a_t = sqrt(acp[t])``, ``s_t = sqrt(1 - acp[t])`` with ``acp`` the DDPM ``alphas_cumprod``
(docs/method.md, "Shared maths"). Timesteps are per-sample LongTensors of shape (B,); results are float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def vp_coefficients(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t, s_t) per sample, shaped to broadcast over ``like`` (B, ...)."""
    acp = alphas_cumprod.to(device=like.device)[t.to(device=like.device, dtype=torch.long)]
    acp = acp.to(torch.float32).reshape(-1, *([1] * (like.ndim - 1)))
    return acp.sqrt(), (1.0 - acp).sqrt()


def x0_from_eps(z: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Clean latent from a noise prediction: ``x0 = (z_t - s_t eps) / a_t``."""
    a_t, s_t = vp_coefficients(alphas_cumprod, t, z)
    return (z.float() - s_t * eps.float()) / a_t


def ddim_to(z_t: Tensor, x0: Tensor, t: Tensor, s: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """DDIM from t to s given x0: ``z_s = a_s x0 + s_s (z_t - a_t x0) / s_t`` (identity when s == t)."""
    a_t, s_t = vp_coefficients(alphas_cumprod, t, z_t)
    a_s, s_s = vp_coefficients(alphas_cumprod, s, z_t)
    x0 = x0.float()
    return a_s * x0 + s_s * (z_t.float() - a_t * x0) / s_t


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion to t: ``z_t = a_t x0 + s_t noise``."""
    a_t, s_t = vp_coefficients(alphas_cumprod, t, x0)
    return a_t * x0.float() + s_t * noise.float()

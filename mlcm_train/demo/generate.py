"""Image generation for the demo table: teacher CFG-DDIM and consistency (LCM/MLCM) sampling, timed.

Both samplers start from the same unit-variance noise and, for the consistency samplers, the same fresh-noise
seed, so rows differ only in the method. Consistency sampling uses ``mlcm.sample_mlcm`` (the official update,
as users run it) through the trainer's eps->denoiser wrapper.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mlcm import default_noise_sampler, sample_mlcm, sigmas_from_alphas_cumprod
from mlcm_train.distill import cfg_eps, ddim_to, x0_from_eps
from mlcm_train.sample_grid import decode_latents, eps_to_denoiser

EpsFn = Callable[[Tensor, Tensor, object], Tensor]


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced DDIM timesteps from the top, e.g. 999, 749, 499, 249 for 4 steps (last step lands on x0)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    stride = num_train_timesteps / steps
    return [round(num_train_timesteps - 1 - i * stride) for i in range(steps)]


@torch.no_grad()
def teacher_cfg_ddim(
    eps_fn: EpsFn,
    noise: Tensor,
    cond: object,
    uncond: object,
    *,
    steps: int,
    guidance_scale: float,
    alphas_cumprod: Tensor,
) -> Tensor:
    """Deterministic CFG-DDIM (Song et al. 2021) over ``ddim_timesteps(steps)``; returns z0."""
    timesteps = ddim_timesteps(steps, len(alphas_cumprod))
    z = noise.float().clone()
    batch = z.shape[0]
    for i, t in enumerate(timesteps):
        t_vec = torch.full((batch,), t, dtype=torch.long)
        eps = cfg_eps(eps_fn, z, t_vec, cond, uncond, guidance_scale)
        x0 = x0_from_eps(z, eps, t_vec, alphas_cumprod)
        if i + 1 == len(timesteps):
            return x0
        z = ddim_to(z, x0, t_vec, torch.full_like(t_vec, timesteps[i + 1]), alphas_cumprod)
    return z


@torch.no_grad()
def consistency_sample(
    eps_fn: EpsFn, noise: Tensor, cond: object, *, timesteps: Sequence[int], alphas_cumprod: Tensor, seed: int
) -> Tensor:
    """Multistep consistency sampling at ``timesteps`` with the official fresh-noise update; returns z0."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod, list(timesteps)).to(noise.device)
    x = noise.float() * (1.0 + sigmas[0] ** 2).sqrt()  # z_T = noise in VE space x = z / a
    denoiser = eps_to_denoiser(eps_fn, alphas_cumprod, list(timesteps), cond)
    # Fresh noise from a stream apart from the starting noise's (mlcm.fresh_noise_seed), as in ComfyUI.
    return sample_mlcm(denoiser, x, sigmas, disable=True, noise_sampler=default_noise_sampler(x, seed))


@dataclass
class Generated:
    images: Tensor  # (N, 3, H, W) in [0, 1]
    seconds: float  # wall time of sampling + decoding, all images
    decode_seconds: float = 0.0  # the VAE-decoding part of ``seconds``


def generate(
    sample_latents: Callable[[Tensor, object, object], Tensor],
    vae: torch.nn.Module,
    noise: Tensor,
    cond: object,
    uncond: object,
    *,
    batch_size: int,
    select: Callable[[object, slice], object],
) -> Generated:
    """Run ``sample_latents(noise, cond, uncond)`` in batches, decode, and time it all."""
    images = []
    decode = 0.0
    start = time.perf_counter()
    for first in range(0, noise.shape[0], batch_size):
        rows = slice(first, min(first + batch_size, noise.shape[0]))
        latents = sample_latents(noise[rows], select(cond, rows), select(uncond, rows))
        tick = time.perf_counter()
        images.append(decode_latents(vae, latents))
        decode += time.perf_counter() - tick
    return Generated(torch.cat(images), time.perf_counter() - start, decode)

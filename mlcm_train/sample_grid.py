"""Sample grids of the student at 1/2/4/8 steps with mlcm's own sampler, saved as PNG (rows: prompts)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlcm import default_noise_sampler, sample_mlcm, segment_timesteps, sigmas_from_alphas_cumprod

log = logging.getLogger(__name__)

EpsFn = Callable[[Tensor, Tensor, object], Tensor]


def eps_to_denoiser(eps_fn: EpsFn, alphas_cumprod: Tensor, timesteps: Sequence[int], cond: object):
    """k-diffusion denoiser ``model(x, sigma) -> x0`` (VE space ``x = z / a``) around an eps UNet call."""
    acp = alphas_cumprod.to(torch.float64)
    steps = torch.as_tensor(list(timesteps), dtype=torch.long)
    table = ((1 - acp[steps]) / acp[steps]).sqrt()

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        # The sigmas are this same boundary table (in float32): the nearest entry is the timestep.
        t = int(steps[(table - float(sigma[0])).abs().argmin()])
        a_t, s_t = float(acp[t].sqrt()), float((1 - acp[t]).sqrt())
        z = x * a_t
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_fn(z, t_vec, cond).float()
        return (z - s_t * eps) / a_t

    return denoise


@torch.no_grad()
def sample_latents(
    eps_fn: EpsFn,
    noise: Tensor,
    cond: object,
    *,
    steps: int,
    segments: int,
    alphas_cumprod: Tensor,
    seed: int = 0,
) -> Tensor:
    """A ``steps``-step MLCM sample (official update) from unit-variance ``noise``; returns latents z0."""
    timesteps = segment_timesteps(steps, segments, num_train_timesteps=len(alphas_cumprod))
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod, timesteps).to(noise.device)
    # z_T = noise at the first boundary; in VE space x = z / a = noise * sqrt(1 + sigma^2).
    x = noise.float() * (1.0 + sigmas[0] ** 2).sqrt()
    denoiser = eps_to_denoiser(eps_fn, alphas_cumprod, timesteps, cond)
    # Fresh noise from a stream apart from the starting noise's (mlcm.fresh_noise_seed), as in ComfyUI.
    return sample_mlcm(denoiser, x, sigmas, disable=True, noise_sampler=default_noise_sampler(x, seed))


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: Tensor) -> Tensor:
    """VAE decode to images in [0, 1], (B, 3, H, W) float32 on CPU."""
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    dtype = next(vae.parameters()).dtype
    images = vae.decode((latents / config.scaling_factor + shift).to(dtype)).sample
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()


def save_grid(images: Sequence[Sequence[Tensor]], path: str | Path) -> Path:
    """Tile ``images[row][col]`` (each (3, H, W) in [0, 1]) into one PNG."""
    from PIL import Image

    rows = [torch.cat(list(row), dim=2) for row in images]
    grid = torch.cat(rows, dim=1)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@torch.no_grad()
def render_sample_grid(
    eps_fn: EpsFn,
    vae: torch.nn.Module,
    cond: object,
    noise: Tensor,
    *,
    step_counts: Sequence[int],
    segments: int,
    alphas_cumprod: Tensor,
    path: str | Path,
    seed: int = 0,
) -> Path:
    """One row per prompt, one column per step count, same noise in every column (compare steps, not seeds)."""
    columns = []
    for steps in step_counts:
        latents = sample_latents(
            eps_fn, noise, cond, steps=steps, segments=segments, alphas_cumprod=alphas_cumprod, seed=seed
        )
        columns.append(decode_latents(vae, latents))
    rows = [[column[i] for column in columns] for i in range(noise.shape[0])]
    return save_grid(rows, path)


def write_training_samples(
    eps_fn: EpsFn,
    teacher: Any,
    embeddings: Any,
    *,
    prompt_count: int,
    rows: int,
    step_counts: Sequence[int],
    segments: int,
    resolution: int | None,
    alphas_cumprod: Tensor,
    path: str | Path,
    seed: int,
) -> Path | None:
    """The periodic grid of a training run: the first ``rows`` prompts, fixed noise, every step count <= M."""
    steps = [s for s in step_counts if s <= segments]
    if not steps:
        return None
    count = min(rows, prompt_count)
    device = alphas_cumprod.device
    cond = embeddings.get(list(range(count))).to(device)
    shape = tuple(teacher.latent_shape(count, resolution))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    path = render_sample_grid(
        eps_fn,
        teacher.vae,
        cond,
        noise,
        step_counts=steps,
        segments=segments,
        alphas_cumprod=alphas_cumprod,
        path=path,
        seed=seed,
    )
    log.info("sample grid %s (rows: prompts, columns: %s steps)", path, steps)
    return path

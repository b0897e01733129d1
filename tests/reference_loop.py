"""Independent re-implementation of the authors' MLCM/TLCM inference loop, for parity tests and benchmarks.

Written from the authors' ``inference.py`` (OPPO-Mente-Lab/TLCM) as docs/method.md, "Sampling", describes it,
deliberately without importing anything from ``mlcm``:

    ts = torch.linspace(999, 0, 9, dtype=int)[subset[steps]]
    z = randn(shape)
    for j in range(len(ts) - 1):
        eps = unet(z, ts[j], cond)
        x0 = (z - sqrt(1 - acp[ts[j]]) * eps) / sqrt(acp[ts[j]])
        z = DDPM add_noise(x0, randn(shape), ts[j + 1])   # fresh noise on every step, the last one included
    return x0

Random numbers come from one ``torch.Generator`` in this order: the initial noise, then one draw per step.

Usage: ``official_loop(eps_fn, noise_shape, steps, generator, alphas_cumprod)`` with
``eps_fn(z, t) -> eps`` (``t`` a Python int) and ``alphas_cumprod`` from e.g. ``DDPMScheduler``; returns the
final x0 latent (not decoded). ``official_tail`` runs the same update from a given latent over given
timesteps (img2img).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

EpsFn = Callable[[Tensor, int], Tensor]

# Index subsets of the 9 boundaries that inference.py keeps for each step count (8 keeps all of them).
OFFICIAL_SUBSETS = {
    1: [0, 8],
    2: [0, 4, 8],
    3: [0, 4, 7, 8],
    4: [0, 2, 4, 7, 8],
    5: [0, 2, 4, 6, 7, 8],
    6: [0, 2, 4, 5, 6, 7, 8],
    7: [0, 2, 3, 4, 5, 6, 7, 8],
    8: [0, 1, 2, 3, 4, 5, 6, 7, 8],
}


def official_boundaries(steps: int) -> list[int]:
    """The boundaries inference.py walks for ``steps`` steps, ending at 0 (e.g. 4 -> [999, 749, 499, 124, 0])."""
    ts = torch.linspace(1000 - 1, 0, 9, dtype=int)
    return [int(ts[i]) for i in OFFICIAL_SUBSETS[steps]]


def _randn(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Gaussian noise drawn on the generator's own device (as diffusers' randn_tensor does)."""
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=generator.device)


def add_noise(x0: Tensor, noise: Tensor, t: int, alphas_cumprod: Tensor) -> Tensor:
    """DDPMScheduler.add_noise for one integer timestep."""
    acp = alphas_cumprod[t].to(x0.dtype)
    return acp.sqrt() * x0 + (1 - acp).sqrt() * noise


def official_tail(
    eps_fn: EpsFn, z: Tensor, boundaries: Sequence[int], generator: torch.Generator, alphas_cumprod: Tensor
) -> Tensor:
    """The official update from latent ``z`` at ``boundaries[0]``, evaluating all but the last boundary."""
    x0 = z
    for j in range(len(boundaries) - 1):
        t = boundaries[j]
        eps = eps_fn(z, t)
        acp = alphas_cumprod[t].to(z.dtype)
        x0 = (z - (1 - acp).sqrt() * eps) / acp.sqrt()
        noise = _randn(x0.shape, generator, x0.dtype).to(x0.device)
        z = add_noise(x0, noise, boundaries[j + 1], alphas_cumprod)
    return x0


def official_loop(
    eps_fn: EpsFn,
    noise_shape: Sequence[int],
    steps: int,
    generator: torch.Generator,
    alphas_cumprod: Tensor,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Text-to-image with the official loop: initial noise from ``generator``, then ``official_tail``."""
    z = _randn(tuple(noise_shape), generator, dtype)
    return official_tail(eps_fn, z, official_boundaries(steps), generator, alphas_cumprod)

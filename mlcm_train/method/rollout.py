"""Few-step student samples: the training rollout and the product's own sampler (docs/method.md, "Sampling").

``student_rollout`` is the official MLCM update in VP form (predict x0 at each segment-boundary timestep,
re-noise it to the next): stage 2 draws its start states with it (arXiv 2406.05768v6, Algorithm 2) and the
reward stage back-propagates through its last K steps (DRaFT-K, arXiv 2309.17400; K=1 is ReFL's single
differentiable step). ``consistency_sample`` runs ``mlcm.sample_mlcm``, the sampler the node pack gives
ComfyUI, for the training sample grids, the demo and ``eval``: what they show is what users get.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mlcm import default_noise_sampler, sample_mlcm, sigmas_from_alphas_cumprod
from mlcm.vp import add_noise, x0_from_eps

EpsFn = Callable[[Tensor, Tensor, Any], Tensor]


def student_rollout(
    eps_fn: EpsFn,
    noise: Tensor,
    renoise: Sequence[Tensor],
    cond: Any,
    *,
    timesteps: Sequence[int],
    alphas_cumprod: Tensor,
    grad_steps: int = 1,
    no_grad_eps_fn: EpsFn | None = None,
) -> Tensor:
    """x0 of a ``len(timesteps)``-step student sample; only the last ``grad_steps`` steps build a graph.

    ``renoise[i]`` is the fresh noise that moves x0 of step i to timestep i+1 (len(timesteps) - 1 tensors);
    ``no_grad_eps_fn`` (default ``eps_fn``) runs the gradient-free steps (e.g. the unwrapped UNet under DDP).
    """
    if len(renoise) < len(timesteps) - 1:
        raise ValueError(
            f"{len(timesteps)} steps need {len(timesteps) - 1} re-noise draws, got {len(renoise)}"
        )
    if grad_steps < 1:
        raise ValueError(f"grad_steps={grad_steps} must be at least 1")
    batch = noise.shape[0]
    first_grad = max(0, len(timesteps) - grad_steps)
    z = noise.float()
    x0 = z
    for i, t in enumerate(timesteps):
        t_vec = torch.full((batch,), int(t), dtype=torch.long, device=noise.device)
        with_grad = i >= first_grad
        fn = eps_fn if with_grad or no_grad_eps_fn is None else no_grad_eps_fn
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            x0 = x0_from_eps(z, fn(z, t_vec, cond), t_vec, alphas_cumprod)
            if i + 1 < len(timesteps):
                t_next = torch.full_like(t_vec, int(timesteps[i + 1]))
                z = add_noise(x0, renoise[i], t_next, alphas_cumprod)
    return x0


def eps_to_denoiser(eps_fn: EpsFn, alphas_cumprod: Tensor, timesteps: Sequence[int], cond: object):
    """k-diffusion denoiser ``model(x, sigma) -> x0`` (VE space ``x = z / a``) around an eps UNet call.

    ``mlcm.sample_mlcm`` speaks sigmas, as ComfyUI does; the UNet needs the timestep back. The sigmas it
    passes are this boundary table, so the nearest entry is the timestep.
    """
    acp = alphas_cumprod.to(torch.float64)
    steps = torch.as_tensor(list(timesteps), dtype=torch.long)
    table = ((1 - acp[steps]) / acp[steps]).sqrt()

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        t = int(steps[(table - float(sigma[0])).abs().argmin()])
        a_t, s_t = float(acp[t].sqrt()), float((1 - acp[t]).sqrt())
        z = x * a_t
        t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_fn(z, t_vec, cond).float()
        return (z - s_t * eps) / a_t

    return denoise


@torch.no_grad()
def consistency_sample(
    eps_fn: EpsFn, noise: Tensor, cond: object, *, timesteps: Sequence[int], alphas_cumprod: Tensor, seed: int
) -> Tensor:
    """Multistep consistency sampling at ``timesteps`` with the official fresh-noise update; returns z0."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod, list(timesteps)).to(noise.device)
    x = noise.float() * (1.0 + sigmas[0] ** 2).sqrt()  # z_T = noise in VE space x = z / a
    denoiser = eps_to_denoiser(eps_fn, alphas_cumprod, list(timesteps), cond)
    # Fresh noise from a stream apart from the starting noise's (mlcm.fresh_noise_seed), as in the node pack.
    return sample_mlcm(denoiser, x, sigmas, disable=True, noise_sampler=default_noise_sampler(x, seed))

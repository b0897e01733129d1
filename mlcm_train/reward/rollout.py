"""Differentiable student samples: a few-step MLCM rollout with gradients through its last K steps and the VAE.

DRaFT-K (Clark et al. 2023): earlier steps run without gradients, the last ``grad_steps`` with them; K=1 is
ReFL's single differentiable step. The rollout is the official MLCM sampler (MLCM_METHOD.md §3): at each
segment-boundary timestep predict x0, then re-noise it to the next timestep with fresh noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mlcm.vp import add_noise, x0_from_eps

from .interface import decoded_to_unit

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


def decode_latents(vae: nn.Module, latents: Tensor, scaling_factor: float) -> Tensor:
    """Student latents -> images in [0, 1] through the VAE decoder (differentiable; checkpointed if enabled)."""
    dtype = next(vae.parameters()).dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    decoded = vae.decode((latents / scaling_factor + shift).to(dtype), return_dict=False)[0]
    return decoded_to_unit(decoded)

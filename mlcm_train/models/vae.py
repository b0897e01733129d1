"""Latents to pixels through the teacher's VAE decoder, differentiably (the reward stage needs its gradient)."""

from __future__ import annotations

from torch import Tensor, nn


def decoded_to_unit(decoded: Tensor) -> Tensor:
    """VAE output in [-1, 1] -> images in [0, 1] (``(x / 2 + 0.5).clamp(0, 1)``, ReFL / diffusers' postprocess)."""
    return (decoded.float() / 2 + 0.5).clamp(0.0, 1.0)


def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """UNet latents -> images in [0, 1], (B, 3, H, W) float32 on the VAE's device (checkpointed if enabled)."""
    config = vae.config
    shift = getattr(config, "shift_factor", None) or 0.0
    dtype = next(vae.parameters()).dtype
    decoded = vae.decode((latents / config.scaling_factor + shift).to(dtype), return_dict=False)[0]
    return decoded_to_unit(decoded)

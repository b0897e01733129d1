"""Batched image generation for evaluation tables: sample latents, decode, and time both."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mlcm_train.models.vae import decode_latents


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
        with torch.no_grad():
            images.append(decode_latents(vae, latents).cpu())
        decode += time.perf_counter() - tick
    return Generated(torch.cat(images), time.perf_counter() - start, decode)

"""MLCM sampling in the k-diffusion convention (``x = x0 + sigma * eps``, the model returns x0).

One function serves every update rule, selected by ``eta`` (the fraction of fresh noise):

- ``eta = 1``: the official TLCM/MLCM update: predict x0, then re-noise it to the next boundary with
  fresh Gaussian noise (docs/method.md, "Sampling"). ComfyUI's built-in ``lcm`` sampler computes the same update;
  given the same fresh noise the two agree (our fresh noise is seeded apart from the starting noise, see
  ``fresh_noise_seed``).
- ``eta = 0``: deterministic: DDIM from each boundary to the next with the model's own noise estimate
  (the Multistep Consistency Models sampler, Heek et al. 2024, Algorithm 2).
- in between: DDIM to ``sigma_s = (1 - eta) * sigma_next``, then forward-diffuse to ``sigma_next``
  with fresh noise (the TCD "gamma" construction), which keeps the marginal noise level exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

try:  # tqdm is present wherever ComfyUI or diffusers are; the core does not require it.
    from tqdm.auto import trange
except ImportError:  # pragma: no cover - exercised only in bare environments

    def trange(n: int, disable: bool | None = None, **_: Any) -> range:
        return range(n)


NoiseSampler = Callable[[Tensor, Tensor], Tensor]

# Named update rules and the eta each one stands for ("blend" takes eta from the user).
UPDATE_RULES: dict[str, float | None] = {"official": 1.0, "deterministic": 0.0, "blend": None}


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor: ...


def rule_eta(rule: str, eta: float = 0.5) -> float:
    """The eta of an update rule name; ``blend`` uses the given ``eta``."""
    if rule not in UPDATE_RULES:
        raise ValueError(f"update rule {rule!r} is unknown; choose one of {', '.join(UPDATE_RULES)}")
    fixed = UPDATE_RULES[rule]
    return eta if fixed is None else fixed


def fresh_noise_seed(seed: int) -> int:
    """The seed of the fresh-noise stream of a sample whose starting noise came from ``seed`` (splitmix64).

    ComfyUI draws the starting noise from a CPU generator seeded with ``seed``. A fresh-noise generator seeded
    with the same number on a CPU tensor repeats that draw, so the first re-noise would reuse the starting
    noise: at 2 steps that is nearly deterministic DDIM, not the official update, and the image would depend on
    the device (a CUDA generator draws other numbers). A mixed seed keeps the two streams independent.
    """
    z = (int(seed) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) >> 1  # 63 bits: every torch generator accepts it


def default_noise_sampler(x: Tensor, seed: int | None = None) -> NoiseSampler:
    """Fresh N(0, I) noise like ``x`` from a generator on ``x``'s device seeded with ``fresh_noise_seed(seed)``."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device)
        generator.manual_seed(fresh_noise_seed(seed))

    def sample(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return torch.randn(x.size(), dtype=x.dtype, layout=x.layout, device=x.device, generator=generator)

    return sample


def renoise(
    x: Tensor,
    denoised: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    eta: float,
    noise_sampler: NoiseSampler | None,
) -> Tensor:
    """Move from ``x`` at ``sigma`` to ``sigma_next`` given the x0 prediction ``denoised``."""
    if eta >= 1.0:  # official: x0 + sigma_next * fresh noise
        return denoised + sigma_next * noise_sampler(sigma, sigma_next)
    eps = (x - denoised) / sigma  # the model's noise estimate (DDIM direction)
    if eta <= 0.0:  # deterministic DDIM to sigma_next
        return denoised + sigma_next * eps
    keep = 1.0 - eta  # DDIM to sigma_s = keep * sigma_next, then forward noise to sigma_next
    fresh = noise_sampler(sigma, sigma_next)
    return denoised + sigma_next * (keep * eps + (1.0 - keep**2) ** 0.5 * fresh)


@torch.no_grad()
def sample_mlcm(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    *,
    eta: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Multistep latent consistency sampling over segment-boundary ``sigmas`` (last sigma 0 returns x0)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must be in [0, 1] (1 = official fresh-noise update, 0 = deterministic)")
    extra_args = {} if extra_args is None else extra_args
    if noise_sampler is None and eta > 0.0:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = renoise(x, denoised, sigmas[i], sigmas[i + 1], eta, noise_sampler)
    return x

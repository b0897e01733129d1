"""MLCM: multistep latent consistency sampling, host-agnostic (torch + stdlib + safetensors).

Glossary (same spelling in nodes, trainer and tests): ``segments`` (M), ``boundaries`` (the M+1
segment edges in timesteps, descending), ``timesteps`` (where the UNet is evaluated), ``sigmas``
(k-diffusion noise levels ``sqrt((1 - acp) / acp)``), ``x0``/``denoised`` (clean-latent prediction),
``eps`` (noise prediction).

``MLCMScheduler`` (diffusers) is loaded lazily so that importing ``mlcm`` never imports diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .lora import (
    LoraModule,
    LoraWeights,
    MLCMLoraMetadata,
    detect_family,
    locate_lora_files,
    read_lora,
    to_kohya_state_dict,
    write_kohya_lora,
)
from .sampling import UPDATE_RULES, default_noise_sampler, fresh_noise_seed, rule_eta, sample_mlcm
from .segments import (
    DEFAULT_SEGMENTS,
    NUM_TRAIN_TIMESTEPS,
    SELECTIONS,
    lcm_timesteps,
    requested_timesteps,
    scaled_linear_alphas_cumprod,
    segment_boundaries,
    segment_timesteps,
    sigmas_from_alphas_cumprod,
)

if TYPE_CHECKING:
    from .scheduler import MLCMScheduler, MLCMSchedulerOutput

__all__ = [
    "LoraModule",
    "LoraWeights",
    "MLCMLoraMetadata",
    "detect_family",
    "locate_lora_files",
    "read_lora",
    "to_kohya_state_dict",
    "write_kohya_lora",
    "DEFAULT_SEGMENTS",
    "NUM_TRAIN_TIMESTEPS",
    "SELECTIONS",
    "UPDATE_RULES",
    "MLCMScheduler",
    "MLCMSchedulerOutput",
    "default_noise_sampler",
    "fresh_noise_seed",
    "lcm_timesteps",
    "requested_timesteps",
    "rule_eta",
    "sample_mlcm",
    "scaled_linear_alphas_cumprod",
    "segment_boundaries",
    "segment_timesteps",
    "sigmas_from_alphas_cumprod",
]

_LAZY = {"MLCMScheduler": ".scheduler", "MLCMSchedulerOutput": ".scheduler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

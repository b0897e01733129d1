"""Adds "mlcm" to the plain KSampler's sampler list and "mlcm_segments" to its scheduler list.

ComfyUI (v0.3.64) has no API for adding sampler or scheduler names. The KSampler node resolves a sampler
name through ``getattr(comfy.k_diffusion.sampling, "sample_" + name)`` and a scheduler name through
``comfy.samplers.SCHEDULER_HANDLERS``; its dropdowns are the module lists ``SAMPLER_NAMES`` and
``SCHEDULER_NAMES``. Extending those globals is the community's de-facto route (dozens of packs do it),
so it is done here once, guarded and idempotent, from ``comfy_entrypoint`` rather than at import time.
If ComfyUI's internals change, the registration logs a warning and is skipped: the three MLCM nodes
(SamplerCustom route) keep working either way. Workflows that use these names fail validation on
installs without this pack; the node route does not have that problem.
"""

from __future__ import annotations

import logging

import torch

from ..mlcm import requested_timesteps
from .sampler import comfy_sample_mlcm
from .schedule import sigmas_at_timesteps

logger = logging.getLogger(__name__)

SAMPLER_NAME = "mlcm"
SCHEDULER_NAME = "mlcm_segments"


def mlcm_segments_scheduler(model_sampling: object, steps: int) -> torch.Tensor:
    """KSampler scheduler: sigmas at the 8-segment boundaries (the standard MLCM LoRA) for ``steps`` sigmas.

    KSampler hands a scheduler only (model_sampling, steps). For img2img it asks for ``int(steps / denoise)``
    steps and keeps the last ``steps + 1`` sigmas, so a request beyond 8 is a low-denoise run, not an error:
    ``requested_timesteps`` makes every tail KSampler may keep start at the boundary of its strength and stay
    on trained boundaries. The sampler logs the timesteps it was given once. LoRAs trained with other
    segment counts need MLCMSegmentSchedule.
    """
    return sigmas_at_timesteps(model_sampling, requested_timesteps(steps))


def register_ksampler_names() -> bool:
    """Register the sampler and scheduler names; True when both are (or already were) registered."""
    try:
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.samplers as samplers

        handlers = samplers.SCHEDULER_HANDLERS
        handler_type = samplers.SchedulerHandler
        name_lists = (samplers.KSAMPLER_NAMES, samplers.SAMPLER_NAMES)
        scheduler_names = samplers.SCHEDULER_NAMES
    except (ImportError, AttributeError) as error:
        logger.warning(
            "ComfyUI-MLCM: could not add '%s'/'%s' to the KSampler lists (%s); this ComfyUI version differs "
            "from the one the pack was tested with. Use the MLCM Sampler and MLCM Segment Schedule nodes.",
            SAMPLER_NAME,
            SCHEDULER_NAME,
            error,
        )
        return False

    if not hasattr(k_sampling, "sample_" + SAMPLER_NAME):
        setattr(k_sampling, "sample_" + SAMPLER_NAME, comfy_sample_mlcm)
    for names in name_lists:
        if SAMPLER_NAME not in names:
            names.append(SAMPLER_NAME)
    if SCHEDULER_NAME not in handlers:
        handlers[SCHEDULER_NAME] = handler_type(mlcm_segments_scheduler)
    if SCHEDULER_NAME not in scheduler_names:
        scheduler_names.append(SCHEDULER_NAME)
    return True

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

from ..mlcm import DEFAULT_SEGMENTS, sample_mlcm, segment_timesteps
from .schedule import sigmas_at_timesteps

logger = logging.getLogger(__name__)

SAMPLER_NAME = "mlcm"
SCHEDULER_NAME = "mlcm_segments"


def mlcm_segments_scheduler(model_sampling: object, steps: int) -> torch.Tensor:
    """KSampler scheduler: official-table sigmas for ``steps`` <= 8 segments (the standard MLCM LoRA).

    KSampler hands a scheduler only (model_sampling, steps), so the LoRA's own segment count is not
    visible here; LoRAs trained with other segment counts need MLCMSegmentSchedule.
    """
    if steps > DEFAULT_SEGMENTS:
        # KSampler asks for int(steps / denoise) sigmas and keeps the last steps + 1 (img2img).
        raise ValueError(
            f"The '{SCHEDULER_NAME}' scheduler was asked for {steps} steps, but an MLCM LoRA has "
            f"{DEFAULT_SEGMENTS} segments (KSampler asks for steps/denoise steps when denoise < 1). Lower "
            "steps or raise denoise, or use the MLCM Segment Schedule node with SamplerCustom"
        )
    return sigmas_at_timesteps(model_sampling, segment_timesteps(steps, DEFAULT_SEGMENTS))


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
        setattr(k_sampling, "sample_" + SAMPLER_NAME, sample_mlcm)
    for names in name_lists:
        if SAMPLER_NAME not in names:
            names.append(SAMPLER_NAME)
    if SCHEDULER_NAME not in handlers:
        handlers[SCHEDULER_NAME] = handler_type(mlcm_segments_scheduler)
    if SCHEDULER_NAME not in scheduler_names:
        scheduler_names.append(SCHEDULER_NAME)
    return True

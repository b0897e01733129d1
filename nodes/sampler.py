"""MLCMSampler: the MLCM update rules as a SAMPLER for SamplerCustom / SamplerCustomAdvanced.

Both routes (this node, and the "mlcm" name in KSampler's list) run ``comfy_sample_mlcm``, which checks
what only the sampler sees before it samples: the cfg the guider will apply (ComfyUI hands a sampler the
guider as ``model.inner_model``, whose ``cfg`` is the widget's value) and the timesteps of the sigmas it
was given, which it logs once per schedule and compares with the LoRA's trained segment boundaries.
"""

from __future__ import annotations

import logging

import comfy.samplers
import torch
from comfy_api.latest import io

from ..mlcm import DEFAULT_SEGMENTS, UPDATE_RULES, rule_eta, sample_mlcm, segment_boundaries
from .schedule import lora_segments
from .schema import schema

logger = logging.getLogger(__name__)
_logged_schedules: set[tuple[int, ...]] = set()


def guider_cfg(model: object) -> float | None:
    """The cfg of the guider behind a sampler function's ``model`` (ComfyUI's KSamplerX0Inpaint), if any."""
    cfg = getattr(getattr(model, "inner_model", None), "cfg", None)
    return float(cfg) if isinstance(cfg, (int, float)) else None


def schedule_timesteps(model: object, sigmas: torch.Tensor) -> tuple[int, ...] | None:
    """The integer timesteps of ``sigmas`` (trailing 0 left out) by the model's own model_sampling."""
    model_sampling = getattr(
        getattr(getattr(model, "inner_model", None), "inner_model", None), "model_sampling", None
    )
    if model_sampling is None or not hasattr(model_sampling, "timestep"):
        return None
    nonzero = sigmas[sigmas > 0]
    return tuple(int(t) for t in model_sampling.timestep(nonzero.to(torch.float32)).round().tolist())


def check_sampling(model: object, sigmas: torch.Tensor) -> None:
    """Warn about a cfg other than 1 (every call, i.e. once per prompt) and log the schedule (once each)."""
    cfg = guider_cfg(model)
    if cfg is not None and cfg != 1.0:
        logger.warning(
            "MLCM: cfg is %g, but an MLCM LoRA has the teacher's guidance baked in: cfg > 1 applies it twice "
            "(over-saturated, burnt images) and doubles the cost. Set cfg to 1.0; at cfg 1 the negative "
            "prompt has no effect.",
            cfg,
        )
    timesteps = schedule_timesteps(model, sigmas)
    if timesteps is None or timesteps in _logged_schedules:
        return
    _logged_schedules.add(timesteps)
    patcher = getattr(getattr(model, "inner_model", None), "model_patcher", None)
    segments = lora_segments(patcher) or DEFAULT_SEGMENTS
    trained = set(segment_boundaries(segments))
    off_grid = [t for t in timesteps if t not in trained]
    if off_grid:
        logger.warning(
            "MLCM: sampling at timesteps %s; %s are not among the LoRA's trained segment boundaries %s, "
            "so this is not the schedule it was trained for. Use the 'mlcm_segments' scheduler or the MLCM "
            "Segment Schedule node.",
            list(timesteps),
            off_grid,
            sorted(trained, reverse=True)[:-1],
        )
    else:
        logger.info("MLCM: sampling at timesteps %s", list(timesteps))


def comfy_sample_mlcm(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
    """``sample_mlcm`` for ComfyUI's KSAMPLER, after ``check_sampling``."""
    check_sampling(model, sigmas)
    return sample_mlcm(model, x, sigmas, extra_args, callback, disable, **options)


class MLCMSampler(io.ComfyNode):
    """Wraps ``mlcm.sample_mlcm`` in ComfyUI's KSAMPLER, which supplies previews, progress and interruption."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MLCMSampler",
            display_name="MLCM Sampler",
            category="sampling/mlcm",
            description=(
                "The MLCM sampler for SamplerCustom or SamplerCustomAdvanced; use it with the sigmas of "
                "MLCM Segment Schedule and cfg 1.0 (the LoRA has the guidance baked in; a higher cfg burns "
                "the image and is reported in the log). 'official' is the authors' update (predict the clean "
                "image, then re-noise it to the next boundary with fresh noise; ComfyUI's 'lcm' sampler "
                "computes the same update, but on the CPU its first re-noise repeats the starting noise, so "
                "images of one seed differ). 'deterministic' moves to the next boundary along the model's own noise estimate "
                "(DDIM, the Multistep Consistency Models sampler): the seed only sets the starting noise. "
                "'blend' mixes the two: eta is the fraction of fresh noise."
            ),
            inputs=[
                io.Combo.Input(
                    "update_rule",
                    options=list(UPDATE_RULES),
                    default="official",
                    tooltip="official = fresh noise each step (authors' sampler); deterministic = DDIM between "
                    "boundaries; blend = a mix set by eta.",
                ),
                io.Float.Input(
                    "eta",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Only used by 'blend': the fraction of fresh noise per step (1 = official, "
                    "0 = deterministic).",
                ),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustom's sampler input.")],
        )

    @classmethod
    def execute(cls, update_rule: str, eta: float) -> io.NodeOutput:
        sampler = comfy.samplers.KSAMPLER(
            comfy_sample_mlcm, extra_options={"eta": rule_eta(update_rule, eta)}
        )
        return io.NodeOutput(sampler)

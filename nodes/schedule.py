"""MLCMSegmentSchedule: MODEL + steps -> SIGMAS at MLCM's segment boundaries, from the model's own model_sampling."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import comfy.model_sampling
import torch
from comfy_api.latest import io

from ..mlcm import DEFAULT_SEGMENTS, SELECTIONS, segment_timesteps
from .schema import schema

logger = logging.getLogger(__name__)

MAX_STEPS = 64
MAX_SEGMENTS = 64
# Key under ModelPatcher.model_options where MLCMLoraLoader leaves the LoRA's MLCM metadata.
MODEL_OPTIONS_KEY = "mlcm"
# ComfyUI's LCM patch (core node "ModelSamplingDiscrete", sampling="lcm") lives in comfy_extras, which
# ComfyUI imports by file path, so its classes cannot be imported reliably: recognise them by name.
LCM_PATCH_CLASS_NAMES = frozenset({"ModelSamplingDiscreteDistilled", "LCM"})


def check_model_sampling(model_sampling: object) -> None:
    """Raise ValueError unless ``model_sampling`` is a plain discrete (1000-step) EPS or V-prediction schedule."""
    mro_names = {cls.__name__ for cls in type(model_sampling).__mro__}
    if mro_names & LCM_PATCH_CLASS_NAMES:
        raise ValueError(
            "The model carries ComfyUI's LCM sampling patch (a 'ModelSamplingDiscrete' node with "
            "sampling='lcm'), which snaps MLCM's segment boundaries onto LCM's 50-step grid; remove that "
            "node (MLCM needs the model's plain eps schedule)"
        )
    discrete = isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and not isinstance(
        model_sampling,
        (comfy.model_sampling.ModelSamplingDiscreteEDM, comfy.model_sampling.StableCascadeSampling),
    )
    prediction_ok = isinstance(model_sampling, comfy.model_sampling.EPS) and not isinstance(
        model_sampling, (comfy.model_sampling.X0, comfy.model_sampling.EDM)
    )
    if not (discrete and prediction_ok):
        raise ValueError(
            f"MLCM needs a discrete-time eps or v-prediction model (SD1.5/SDXL), but this model samples with "
            f"{type(model_sampling).__name__} ({', '.join(cls.__name__ for cls in type(model_sampling).__bases__)}); "
            "load an SD1.5/SDXL checkpoint, or remove any ModelSampling* node (x0, EDM, flow/CONST) before "
            "this one"
        )


def sigmas_at_timesteps(model_sampling: object, timesteps: Sequence[int]) -> torch.Tensor:
    """SIGMAS (descending, trailing 0) at integer ``timesteps``, computed by the model's own model_sampling."""
    check_model_sampling(model_sampling)
    sigmas = model_sampling.sigma(torch.tensor(list(timesteps), dtype=torch.float32))
    return torch.cat([sigmas.float().cpu(), torch.zeros(1)])


def lora_segments(model: object) -> int | None:
    """Segment count MLCMLoraLoader stored on ``model`` (a ModelPatcher) from the LoRA's metadata, if any."""
    options = getattr(model, "model_options", None) or {}
    segments = options.get(MODEL_OPTIONS_KEY, {}).get("segments")
    return int(segments) if segments else None


def lora_supported_steps(model: object) -> list[int] | None:
    """Step counts MLCMLoraLoader stored on ``model`` from the LoRA's metadata, if the LoRA records them."""
    options = getattr(model, "model_options", None) or {}
    steps = options.get(MODEL_OPTIONS_KEY, {}).get("supported_steps")
    return [int(step) for step in steps] if steps else None


def check_supported_steps(steps: int, supported_steps: Sequence[int] | None) -> None:
    """Raise ValueError when ``steps`` exceeds the largest step count the LoRA's metadata supports."""
    if not supported_steps or steps <= max(supported_steps):
        return
    most = max(supported_steps)
    if list(supported_steps) == list(range(1, most + 1)):
        listed = f"1-{most}"
    else:
        listed = ", ".join(str(step) for step in supported_steps)
    raise ValueError(
        f"steps={steps} is too many: this LoRA supports {listed} steps; use at most {most} steps or a LoRA "
        "that supports more"
    )


def _check_widgets(steps: int, segments: int, selection: str, denoise: float) -> str | None:
    """ComfyUI skips its own min/max and list checks for inputs a validate_inputs declares: repeat them."""
    if selection not in SELECTIONS:
        return f"selection={selection!r} is unknown; choose one of {', '.join(SELECTIONS)}"
    if not 1 <= steps <= MAX_STEPS:
        return f"steps={steps} must be between 1 and {MAX_STEPS}"
    if not 0 <= segments <= MAX_SEGMENTS:
        return f"segments={segments} must be between 0 (auto) and {MAX_SEGMENTS}"
    if not 0.0 <= denoise <= 1.0:
        return f"denoise={denoise} must be between 0 and 1"
    return None


class MLCMSegmentSchedule(io.ComfyNode):
    """The schedule node; sigmas come from the model so object patches (e.g. zsnr) are honoured."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MLCMSegmentSchedule",
            display_name="MLCM Segment Schedule",
            category="sampling/mlcm",
            description=(
                "Sigmas for MLCM sampling: the model is evaluated only at the boundaries of the segments the "
                "MLCM LoRA was trained on (for 8 segments: 999, 874, ..., 124), using the authors' table for "
                "2-8 steps. Connect SIGMAS to SamplerCustom (cfg 1.0) together with MLCM Sampler. "
                "Steps cannot exceed the segment count, nor the most steps the LoRA's metadata says it "
                "supports. denoise < 1 (img2img) keeps the tail of the schedule, so every step still lands "
                "on a trained boundary. The 'timesteps' output shows the UNet timesteps used."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The model you sample with (after MLCM LoRA Loader); its own noise schedule turns "
                    "timesteps into sigmas.",
                ),
                io.Int.Input(
                    "steps",
                    default=4,
                    min=1,
                    max=MAX_STEPS,
                    tooltip="Number of model evaluations (1 to the LoRA's segment count, or to the most steps "
                    "it supports when its metadata says; 4 is a good default).",
                ),
                io.Int.Input(
                    "segments",
                    default=0,
                    min=0,
                    max=MAX_SEGMENTS,
                    tooltip="Segments the LoRA was trained with. 0 = auto: read from the LoRA's metadata "
                    f"(via MLCM LoRA Loader), else {DEFAULT_SEGMENTS}; steps are then also held to the most "
                    "steps the LoRA's metadata says it supports. Advanced: leave at 0.",
                ),
                io.Combo.Input(
                    "selection",
                    options=list(SELECTIONS),
                    default="official",
                    tooltip="Which boundaries a k-step run visits: 'official' = the authors' table, "
                    "'uniform' = evenly spaced boundaries, 'lcm' = LCMScheduler's timesteps (999/759/499/259 "
                    "at 4 steps; not segment boundaries).",
                ),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="1.0 for text-to-image. Below 1 (img2img) the run starts at the boundary that "
                    "matches this strength; 0 returns no sigmas.",
                ),
            ],
            outputs=[
                io.Sigmas.Output(tooltip="Descending sigmas ending in 0, for SamplerCustom."),
                io.String.Output("timesteps", display_name="timesteps", tooltip="The UNet timesteps used."),
            ],
        )

    @classmethod
    def validate_inputs(cls, steps: int, segments: int, selection: str, denoise: float) -> bool | str:
        """Reject impossible steps/segments/denoise combinations before the graph runs."""
        if any(value is None for value in (steps, segments, selection, denoise)):
            return True  # linked inputs are not known until execution
        problem = _check_widgets(steps, segments, selection, denoise)
        if problem is not None:
            return problem
        if denoise == 0.0 or segments == 0:
            return True  # auto segments are only known once the model (and its LoRA) arrives
        try:
            segment_timesteps(steps, segments, selection=selection, denoise=denoise)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, model, steps: int, segments: int, selection: str, denoise: float) -> io.NodeOutput:
        if denoise <= 0.0:  # like core BasicScheduler: nothing to denoise
            return io.NodeOutput(torch.FloatTensor([]), "")
        model_sampling = model.get_model_object("model_sampling")
        check_model_sampling(model_sampling)
        if segments == 0:
            segments = lora_segments(model) or DEFAULT_SEGMENTS
            if selection != "lcm":  # lcm timesteps are not boundaries: no segment or step limit applies
                check_supported_steps(steps, lora_supported_steps(model))
        timesteps = segment_timesteps(steps, segments, selection=selection, denoise=denoise)
        sigmas = sigmas_at_timesteps(model_sampling, timesteps)
        text = ", ".join(str(t) for t in timesteps)
        logger.info(
            "MLCM schedule: %d steps over %d segments (%s): timesteps %s", steps, segments, selection, text
        )
        return io.NodeOutput(sigmas, text)

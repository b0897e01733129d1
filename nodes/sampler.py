"""MLCMSampler: the MLCM update rules as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..mlcm import UPDATE_RULES, rule_eta, sample_mlcm


class MLCMSampler(io.ComfyNode):
    """Wraps ``mlcm.sample_mlcm`` in ComfyUI's KSAMPLER, which supplies previews, progress and interruption."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MLCMSampler",
            display_name="MLCM Sampler",
            category="sampling/mlcm",
            description=(
                "The MLCM sampler for SamplerCustom or SamplerCustomAdvanced; use it with the sigmas of "
                "MLCM Segment Schedule and cfg 1.0. 'official' is the authors' update (predict the clean "
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
        sampler = comfy.samplers.KSAMPLER(sample_mlcm, extra_options={"eta": rule_eta(update_rule, eta)})
        return io.NodeOutput(sampler)

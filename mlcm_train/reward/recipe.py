"""What a reward run inherits from the distilled LoRA: segment count, the anchor's stage-2 settings, the teacher.

A LoRA exported by `distill` records its recipe in its metadata (``training.config``); a run checkpoint holds
it in config.json. Where nothing is recorded the paper's values apply (docs/method.md).
"""

from __future__ import annotations

from typing import Any

from mlcm_train.config import RewardConfig
from mlcm_train.method.settings import DistillSettings
from mlcm_train.reward.start import StartLora

DEFAULT_SEGMENTS = 8  # MLCM's M when the LoRA does not record it
DEFAULT_GUIDANCE = 8.0  # the paper's teacher CFG (SDXL) when the LoRA does not record it


def resolve_segments(config: RewardConfig, start: StartLora) -> int:
    """The segment count M: the config's, else the LoRA's metadata, else 8; every step count must fit."""
    segments = config.segments or (start.metadata.segments if start.metadata else None) or DEFAULT_SEGMENTS
    too_many = [s for s in (*config.student_steps, *config.evaluated_steps) if s > segments]
    if too_many:
        raise ValueError(
            f"step counts {too_many} exceed the LoRA's {segments} segments; use at most {segments} steps"
        )
    return segments


def anchor_settings(
    config: RewardConfig, distilled: dict[str, Any] | None, segments: int, steps: int
) -> DistillSettings:
    """The stage-2 settings of the anchor: the LoRA's own recipe where recorded, the config's overrides on top."""
    recipe = distilled or {}
    return DistillSettings(
        segments=segments,
        guidance_scale=config.guidance_scale or float(recipe.get("guidance_scale", DEFAULT_GUIDANCE)),
        loss_type=recipe.get("loss_type", "l2"),
        huber_c=float(recipe.get("huber_c", 0.001)),
        num_train_timesteps=steps,
    )

"""MLCM facts stored in a safetensors header (`__metadata__`, str -> str), plus the ecosystem's keys."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Our keys live under this prefix so they never collide with kohya's `ss_*` or Stability's `modelspec.*`.
MLCM_PREFIX = "mlcm."
# Bump when a key changes meaning; readers accept older versions and warn on newer ones.
METADATA_FORMAT_VERSION = 1

BASE_FAMILIES = ("sd15", "sdxl")
# kohya sd-scripts' `ss_base_model_version` values (library/train_util.py) for our two families.
SS_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
# Stability's model-spec 1.0.0 architecture ids for LoRAs (github.com/Stability-AI/ModelSpec).
MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
MODELSPEC_VERSION = "1.0.0"

KEY_VERSION = MLCM_PREFIX + "format_version"
KEY_SEGMENTS = MLCM_PREFIX + "segments"
KEY_BASE_FAMILY = MLCM_PREFIX + "base_family"
KEY_RECOMMENDED_STEPS = MLCM_PREFIX + "recommended_steps"
KEY_SUPPORTED_STEPS = MLCM_PREFIX + "supported_steps"
KEY_STAGES = MLCM_PREFIX + "stages"
KEY_TRAINING = MLCM_PREFIX + "training"


@dataclass(frozen=True)
class MLCMLoraMetadata:
    """What a sampler needs to know about an MLCM LoRA, and how it was trained."""

    segments: int | None = None  # M, the number of consistency segments the LoRA was trained with
    base_family: str | None = None  # "sd15" | "sdxl"
    recommended_steps: tuple[int, ...] | None = None  # step counts the trainer evaluated as good
    # Step counts the LoRA is meant to be sampled with, increasing; loaders refuse more than the largest.
    supported_steps: tuple[int, ...] | None = None
    stages: tuple[str, ...] = ()  # training stages run, in order (e.g. "mlcd", "inter_segment", "reward")
    training: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable training facts

    def __post_init__(self) -> None:
        if self.segments is not None and (isinstance(self.segments, bool) or self.segments < 1):
            raise ValueError(f"segments={self.segments!r} must be a positive integer (MLCM uses 8)")
        if self.base_family is not None and self.base_family not in BASE_FAMILIES:
            raise ValueError(f"base_family={self.base_family!r} must be one of {BASE_FAMILIES} or None")
        if self.recommended_steps is not None and any(step < 1 for step in self.recommended_steps):
            raise ValueError(f"recommended_steps={self.recommended_steps} must all be positive step counts")
        if self.supported_steps is not None:
            _check_supported_steps(self.supported_steps)

    def to_header(self) -> dict[str, str]:
        """The safetensors `__metadata__` entries for these facts (our `mlcm.*` keys and the ecosystem's)."""
        header = {KEY_VERSION: str(METADATA_FORMAT_VERSION)}
        if self.segments is not None:
            header[KEY_SEGMENTS] = str(int(self.segments))
        if self.base_family is not None:
            header[KEY_BASE_FAMILY] = self.base_family
            header["ss_base_model_version"] = SS_BASE_MODEL_VERSION[self.base_family]
            header["modelspec.sai_model_spec"] = MODELSPEC_VERSION
            header["modelspec.architecture"] = MODELSPEC_ARCHITECTURE[self.base_family]
        if self.recommended_steps is not None:
            header[KEY_RECOMMENDED_STEPS] = json.dumps([int(step) for step in self.recommended_steps])
        if self.supported_steps is not None:
            header[KEY_SUPPORTED_STEPS] = json.dumps(list(self.supported_steps))
        if self.stages:
            header[KEY_STAGES] = json.dumps(list(self.stages))
        if self.training:
            try:
                header[KEY_TRAINING] = json.dumps(self.training, sort_keys=True)
            except TypeError as error:
                raise ValueError(
                    f"MLCMLoraMetadata.training must be JSON-serialisable (str/int/float/bool/list/dict): {error}"
                ) from error
        return header

    @classmethod
    def from_header(cls, header: dict[str, str]) -> MLCMLoraMetadata | None:
        """Parse our keys from a safetensors header; None when the file carries no MLCM metadata."""
        if not header or KEY_VERSION not in header:
            return None
        version = _parse(header, KEY_VERSION, int)
        if version > METADATA_FORMAT_VERSION:
            logger.warning(
                "LoRA metadata format version %d is newer than this loader (%d); reading the keys it knows. "
                "Update ComfyUI-MLCM to read the rest.",
                version,
                METADATA_FORMAT_VERSION,
            )
        segments = _parse(header, KEY_SEGMENTS, int) if KEY_SEGMENTS in header else None
        steps = _parse(header, KEY_RECOMMENDED_STEPS, json.loads) if KEY_RECOMMENDED_STEPS in header else None
        supported = _parse(header, KEY_SUPPORTED_STEPS, _step_list) if KEY_SUPPORTED_STEPS in header else None
        stages = _parse(header, KEY_STAGES, json.loads) if KEY_STAGES in header else []
        training = _parse(header, KEY_TRAINING, json.loads) if KEY_TRAINING in header else {}
        if not isinstance(training, dict):
            raise ValueError(f"LoRA metadata key {KEY_TRAINING!r} must hold a JSON object, got {training!r}")
        return cls(
            segments=segments,
            base_family=header.get(KEY_BASE_FAMILY),
            recommended_steps=tuple(int(step) for step in steps) if steps is not None else None,
            supported_steps=supported,
            stages=tuple(str(stage) for stage in stages),
            training=training,
        )


def _check_supported_steps(steps: tuple[int, ...]) -> None:
    """Raise ValueError unless ``steps`` is a non-empty, strictly increasing tuple of positive ints."""
    valid = (
        isinstance(steps, tuple)
        and len(steps) > 0
        and all(isinstance(step, int) and not isinstance(step, bool) and step >= 1 for step in steps)
        and all(a < b for a, b in zip(steps, steps[1:]))
    )
    if not valid:
        raise ValueError(
            f"supported_steps={steps!r} must be a tuple of positive step counts in increasing order, e.g. "
            "(1, 2, 3, 4, 5, 6, 7, 8); use None when the supported steps are unknown"
        )


def _step_list(text: str) -> tuple[int, ...]:
    """A JSON list of integers, e.g. ``"[1, 2, 4]"``, as a tuple."""
    steps = json.loads(text)
    if not isinstance(steps, list) or not all(isinstance(step, int) for step in steps):
        raise ValueError("expected a JSON list of integers")
    return tuple(steps)


def _parse(header: dict[str, str], key: str, parse: Any) -> Any:
    """Parse one header value, naming the key when it is malformed."""
    try:
        return parse(header[key])
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"LoRA metadata key {key!r} has malformed value {header[key]!r} ({error}); re-export the LoRA "
            "or remove the mlcm.* metadata keys"
        ) from error

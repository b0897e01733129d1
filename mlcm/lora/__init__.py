"""LoRA file formats: read PEFT/diffusers/kohya UNet LoRAs with the right scale, write kohya files."""

from __future__ import annotations

from .family import FAMILY_NAMES, detect_family
from .keys import TARGET_MODULE_PATTERNS, is_target_module, kohya_name, kohya_name_index
from .metadata import MLCMLoraMetadata
from .modules import LoraModule, LoraWeights
from .peft_config import PEFT_DEFAULT_LORA_ALPHA, lora_from_peft_state_dict
from .read import locate_lora_files, read_lora
from .write import to_kohya_state_dict, write_kohya_lora

__all__ = [
    "PEFT_DEFAULT_LORA_ALPHA",
    "TARGET_MODULE_PATTERNS",
    "LoraModule",
    "LoraWeights",
    "MLCMLoraMetadata",
    "FAMILY_NAMES",
    "detect_family",
    "is_target_module",
    "kohya_name",
    "kohya_name_index",
    "locate_lora_files",
    "lora_from_peft_state_dict",
    "read_lora",
    "to_kohya_state_dict",
    "write_kohya_lora",
]

"""What a distill run holds in memory before activations: counted exactly, without loading any weights.

The teacher's UNet is built on the meta device from its own config (a diffusers folder's, or the shipped
SD1.5/SDXL config for a single-file checkpoint), the LoRA is counted module by module as PEFT places it, and
the bytes follow from the run's precision and optimizer. ``--dry-run`` prints it. Activations (what
backward keeps, which grows with resolution and batch) are not estimated here yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlcm_train.config import DistillConfig
from mlcm_train.models.single_file import config_folder, detect_family, read_keys
from mlcm_train.models.teacher import folder_unet_config, unet_config_family
from mlcm_train.run.setup import WEIGHT_DTYPES

# Per trainable parameter: the fp32 weight and its fp32 gradient; AdamW's two moments in fp32 or 8 bits.
LORA_BYTES = 4 + 4
MOMENT_BYTES = {"adamw": 8, "adamw8bit": 2}


@dataclass(frozen=True)
class WeightPlan:
    family: str
    unet_parameters: int
    lora_parameters: int
    frozen_bytes: int  # the UNet's frozen weights at the run's precision
    lora_bytes: int  # LoRA weights + gradients + optimizer moments

    def lines(self) -> list[str]:
        gb = 2**30
        return [
            f"{self.family} UNet: {self.unet_parameters / 1e6:.1f}M parameters, {self.frozen_bytes / gb:.2f} GB frozen",
            f"LoRA: {self.lora_parameters / 1e6:.2f}M parameters, {self.lora_bytes / gb:.2f} GB with gradients "
            "and optimizer moments",
            "not counted: activations (they grow with resolution and batch), the VAE, and the text encoders "
            "until the prompts are encoded",
        ]


def teacher_unet_config(teacher: str, teacher_config: str | None) -> tuple[str, dict]:
    """(family, UNet config) of a teacher path, reading only a safetensors header or JSON files."""
    path = Path(teacher)
    if path.is_dir():
        config = folder_unet_config(path)
        return unet_config_family(config), config
    family = detect_family(read_keys(path))
    return family, folder_unet_config(config_folder(family, teacher_config))


def lora_parameter_count(unet: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on the Linear/Conv2d modules whose name ends in a target
    (PEFT's rule for a list of names): r * (in + out) for a Linear, r * (in * k * k + out) for a Conv2d."""
    total = 0
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += rank * (module.in_channels * kernel // module.groups + module.out_channels)
    return total


def plan_weights(config: DistillConfig, mixed_precision: str) -> WeightPlan:
    """The frozen UNet and the LoRA state of ``config`` at ``mixed_precision`` ("no", "fp16", "bf16")."""
    from diffusers import UNet2DConditionModel

    family, unet_config = teacher_unet_config(config.teacher, config.teacher_config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    unet_parameters = sum(p.numel() for p in unet.parameters())
    lora = lora_parameter_count(unet, tuple(config.lora_targets), config.lora_rank)
    return WeightPlan(
        family=family,
        unet_parameters=unet_parameters,
        lora_parameters=lora,
        frozen_bytes=unet_parameters * WEIGHT_DTYPES[mixed_precision].itemsize,
        lora_bytes=lora * (LORA_BYTES + MOMENT_BYTES[config.optimizer]),
    )

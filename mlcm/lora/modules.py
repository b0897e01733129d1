"""The canonical in-memory LoRA: one low-rank pair per UNet module, keyed by its kohya name."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .metadata import MLCMLoraMetadata


@dataclass(frozen=True)
class LoraModule:
    """One LoRA pair: the base weight W becomes W + (alpha / rank) * up @ down (Hu et al. 2021, eq. 3)."""

    down: Tensor  # (r, in) for Linear, (r, in, kh, kw) for Conv2d
    up: Tensor  # (out, r) for Linear, (out, r, 1, 1) for Conv2d
    alpha: float  # kohya convention: the effective scale is alpha / rank

    def __post_init__(self) -> None:
        down, up = self.down, self.up
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            raise ValueError(
                f"LoRA pair has down {tuple(down.shape)} and up {tuple(up.shape)}; expected (r, in) and "
                "(out, r) for a Linear layer or (r, in, kh, kw) and (out, r, 1, 1) for a Conv2d layer"
            )
        if up.shape[1] != down.shape[0]:
            raise ValueError(
                f"LoRA pair ranks disagree: down {tuple(down.shape)} has rank {down.shape[0]} but up "
                f"{tuple(up.shape)} has rank {up.shape[1]}; the down/up tensors do not belong together"
            )
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise ValueError(
                f"Conv LoRA up weight {tuple(up.shape)} must have a 1x1 kernel; other layouts (LoCon "
                "with lora_mid, Tucker) are not supported"
            )
        if not math.isfinite(self.alpha):
            raise ValueError(f"LoRA alpha must be a finite number, got {self.alpha}")

    @property
    def rank(self) -> int:
        """The LoRA rank r (rows of `down`)."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor applied to up @ down: alpha / rank."""
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """True when the pair targets a Conv2d weight."""
        return self.down.ndim == 4

    def delta(self) -> Tensor:
        """The weight update scale * up @ down in float32, shaped like the base weight."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (product * self.scale).reshape(shape)

    def num_parameters(self) -> int:
        """Number of LoRA parameters in this pair (down plus up)."""
        return self.down.numel() + self.up.numel()


@dataclass(frozen=True)
class LoraWeights:
    """A UNet LoRA read from any supported format, normalised to kohya names with an explicit alpha."""

    # kohya name -> pair: "lora_unet_" + diffusers path for PEFT/diffusers input; kohya files keep their own
    # names, which may spell LDM paths ("lora_unet_input_blocks_4_1_...") that ComfyUI maps just as well.
    modules: dict[str, LoraModule]
    metadata: MLCMLoraMetadata | None  # our header metadata, None for foreign files
    source_format: str  # "peft" | "diffusers" | "kohya"
    ignored_keys: tuple[str, ...] = ()  # keys present in the file but not applied (text encoders)
    alpha_source: str = ""  # human-readable: where each module's scale came from

    def ranks(self) -> tuple[int, ...]:
        """The distinct ranks used, ascending."""
        return tuple(sorted({module.rank for module in self.modules.values()}))

    def num_parameters(self) -> int:
        """Total LoRA parameters over all modules."""
        return sum(module.num_parameters() for module in self.modules.values())

    def to(self, dtype: torch.dtype) -> LoraWeights:
        """A copy with every down/up tensor cast to `dtype` (alpha unchanged)."""
        modules = {
            name: LoraModule(module.down.to(dtype), module.up.to(dtype), module.alpha)
            for name, module in self.modules.items()
        }
        return LoraWeights(modules, self.metadata, self.source_format, self.ignored_keys, self.alpha_source)

"""Group a LoRA state dict's keys into per-module (down, up, alpha) tensors and validate them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .keys import (
    ROLE_ALPHA,
    ROLE_DOWN,
    ROLE_UP,
    SUPPORTED_LAYOUTS,
    is_text_encoder_key,
    kohya_name,
    parse_key,
)
from .modules import LoraModule

# How many offending keys an error message shows.
_SAMPLE_KEYS = 3


@dataclass(frozen=True)
class GroupedKeys:
    """A state dict's UNet LoRA tensors grouped by module, plus the keys that are not applied."""

    source_format: str  # "peft" | "diffusers" | "kohya"
    tensors: dict[str, dict[str, Tensor]]  # module (path or kohya name) -> role -> tensor
    keys: dict[str, dict[str, str]]  # module -> role -> original key, for error messages
    ignored_keys: tuple[str, ...]


def _sample(keys: list[str]) -> str:
    """A short, quoted sample of keys for an error message."""
    shown = ", ".join(repr(key) for key in keys[:_SAMPLE_KEYS])
    return shown + (f" (and {len(keys) - _SAMPLE_KEYS} more)" if len(keys) > _SAMPLE_KEYS else "")


def group_lora_keys(state_dict: Mapping[str, Tensor], origin: str) -> GroupedKeys:
    """Parse every key; raise a ValueError that names `origin` for unknown, mixed or UNet-less layouts."""
    if not state_dict:
        raise ValueError(f"{origin} contains no tensors; it is not a LoRA (re-export it)")
    tensors: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, dict[str, str]] = {}
    formats: dict[str, str] = {}  # format -> first key seen in it
    ignored: list[str] = []
    unknown: list[str] = []
    for key in sorted(state_dict):
        parsed = parse_key(key)
        if parsed is None:
            (ignored if is_text_encoder_key(key) else unknown).append(key)
            continue
        formats.setdefault(parsed.source_format, key)
        roles = keys.setdefault(parsed.module, {})
        if parsed.role in roles:
            raise ValueError(
                f"{origin} has two {parsed.role} tensors for module {parsed.module!r}: {roles[parsed.role]!r} "
                f"and {key!r}; keep one layout per module"
            )
        roles[parsed.role] = key
        tensors.setdefault(parsed.module, {})[parsed.role] = state_dict[key]
    if unknown:
        raise ValueError(
            f"{origin} has keys in an unknown layout, e.g. {_sample(unknown)}. Supported layouts for SD1.5/SDXL "
            f"UNet LoRAs: {SUPPORTED_LAYOUTS}"
        )
    if not tensors:
        raise ValueError(
            f"{origin} contains no UNet LoRA keys: its {len(ignored)} keys are text-encoder LoRA keys, e.g. "
            f"{_sample(ignored)}. MLCM LoRAs patch the UNet only; pick the UNet LoRA file"
        )
    if len(formats) > 1:
        examples = ", ".join(f"{name} ({key!r})" for name, key in formats.items())
        raise ValueError(f"{origin} mixes LoRA key layouts: {examples}; re-export it in one layout")
    return GroupedKeys(next(iter(formats)), tensors, keys, tuple(ignored))


AlphaRule = Callable[[str, int, "float | None"], float]


def build_modules(grouped: GroupedKeys, origin: str, alpha_for: AlphaRule) -> dict[str, LoraModule]:
    """Validate each module's tensors and make LoraModules keyed by kohya name.

    `alpha_for(module, rank, alpha_in_file)` returns the kohya alpha (scale * rank) for the module.
    """
    modules: dict[str, LoraModule] = {}
    origins: dict[str, str] = {}
    for module, roles in grouped.tensors.items():
        keys = grouped.keys[module]
        missing = [role for role in (ROLE_DOWN, ROLE_UP) if role not in roles]
        if missing:
            present = ", ".join(repr(key) for key in keys.values())
            raise ValueError(
                f"{origin}: module {module!r} has no LoRA {' / '.join(missing)} weight (found only {present}); "
                "the file is incomplete, re-export it"
            )
        for role, tensor in roles.items():
            if not torch.is_floating_point(tensor):
                raise ValueError(
                    f"{origin}: {keys[role]!r} has dtype {tensor.dtype}; LoRA weights must be floats"
                )
            # Meta tensors (shape-only models in tests and planning tools) have no values to check.
            if not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                raise ValueError(
                    f"{origin}: {keys[role]!r} contains NaN or infinite values; the LoRA is broken (a diverged "
                    "training run or a bad fp16 cast), use an earlier checkpoint or re-export in float32/bf16"
                )
        down, up = roles[ROLE_DOWN], roles[ROLE_UP]
        alpha_tensor = roles.get(ROLE_ALPHA)
        if alpha_tensor is not None and alpha_tensor.numel() != 1:
            raise ValueError(
                f"{origin}: {keys[ROLE_ALPHA]!r} must be a scalar, got shape {tuple(alpha_tensor.shape)}"
            )
        alpha_in_file = None if alpha_tensor is None else float(alpha_tensor.float().item())
        name = module if grouped.source_format == "kohya" else kohya_name(module)
        if name in modules:
            raise ValueError(
                f"{origin}: modules {origins[name]!r} and {module!r} both map to kohya name {name!r}"
            )
        try:
            alpha = alpha_for(module, int(down.shape[0]), alpha_in_file)
        except ValueError as error:
            raise ValueError(f"{origin}: {error}") from error
        try:
            modules[name] = LoraModule(down, up, alpha)
        except ValueError as error:
            raise ValueError(f"{origin}: module {module!r}: {error}") from error
        origins[name] = module
    return modules

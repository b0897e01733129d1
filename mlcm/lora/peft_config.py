"""PEFT LoraConfig semantics (r, lora_alpha, rank/alpha patterns, rsLoRA) resolved to kohya alphas."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .modules import LoraModule
from .pairs import build_modules, group_lora_keys

# PEFT's LoraConfig field default (peft/tuners/lora/config.py); the official MLCM code never sets
# lora_alpha, so its LoRA trains at 8 / 64 = 0.125 (docs/method.md, "The LoRA and its scale").
PEFT_DEFAULT_LORA_ALPHA = 8.0


def _pattern_key(patterns: Mapping[str, Any], module_path: str) -> str | None:
    """The first pattern PEFT would apply to `module_path` (peft.utils.other.get_pattern_key semantics)."""
    for pattern in patterns:
        try:
            if re.match(rf"(.*\.)?({pattern})$", module_path):
                return pattern
        except re.error as error:
            raise ValueError(
                f"rank_pattern/alpha_pattern key {pattern!r} is not a valid regex: {error}"
            ) from error
    return None


@dataclass(frozen=True)
class PeftScaling:
    """The scale-relevant fields of a PEFT LoraConfig."""

    r: int
    lora_alpha: float
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    source: str = "PEFT config"  # where these values came from, for messages

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str) -> PeftScaling:
        """Read a PEFT adapter_config.json (or diffusers lora_adapter_metadata) dict; reject what we cannot apply."""
        peft_type = config.get("peft_type", "LORA")
        if peft_type not in (None, "LORA"):
            raise ValueError(
                f"{source} has peft_type={peft_type!r}; only plain LoRA adapters (LORA) are supported"
            )
        if config.get("use_dora"):
            raise ValueError(
                f"{source} has use_dora=true; DoRA adapters are not supported, train a plain LoRA"
            )
        if "r" not in config:
            raise ValueError(f"{source} has no 'r' (LoRA rank); it is not a PEFT LoRA config")
        try:
            return cls(
                r=int(config["r"]),
                lora_alpha=float(config.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA)),
                rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
                alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
                use_rslora=bool(config.get("use_rslora", False)),
                source=source,
            )
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(
                f"{source} has a malformed r/lora_alpha/rank_pattern/alpha_pattern: {error}"
            ) from error

    def rank_for(self, module_path: str) -> int:
        """The rank PEFT gives this module: the first matching rank_pattern, else r."""
        key = _pattern_key(self.rank_pattern, module_path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_path: str, rank: int) -> float:
        """The kohya alpha (scale * rank) matching PEFT's scaling for this module; checks the rank."""
        expected = self.rank_for(module_path)
        if rank != expected:
            why = "rank_pattern" if expected != self.r else f"r={self.r}"
            raise ValueError(
                f"{module_path}: lora_A (down) has rank {rank} but {self.source} says {why} gives rank {expected}; "
                "the config does not belong to these weights. Use the config saved with this adapter, or pass "
                "alpha_override=<lora_alpha> to ignore the config"
            )
        key = _pattern_key(self.alpha_pattern, module_path)
        lora_alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        # PEFT scales by lora_alpha / sqrt(r) under rsLoRA (Kalajdzievski 2023); kohya divides by r.
        return lora_alpha * math.sqrt(rank) if self.use_rslora else lora_alpha

    def describe(self) -> str:
        """One line for LoraWeights.alpha_source."""
        rule = (
            f"lora_alpha/sqrt(r) = {self.lora_alpha:g}/sqrt({self.r})"
            if self.use_rslora
            else (f"lora_alpha/r = {self.lora_alpha:g}/{self.r}")
        )
        scale = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        patterns = []
        if self.rank_pattern:
            patterns.append(f"{len(self.rank_pattern)} rank_pattern entries")
        if self.alpha_pattern:
            patterns.append(f"{len(self.alpha_pattern)} alpha_pattern entries")
        extra = f", plus {' and '.join(patterns)}" if patterns else ""
        return f"{self.source}: scale {rule} = {scale:g}{extra}"


def lora_from_peft_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    r: int,
    lora_alpha: float,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    use_rslora: bool = False,
) -> dict[str, LoraModule]:
    """Convert a PEFT UNet LoRA state dict (get_peft_model_state_dict keys) to kohya-named LoraModules."""
    scaling = PeftScaling(
        r=int(r),
        lora_alpha=float(lora_alpha),
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        use_rslora=use_rslora,
        source="the given LoRA config",
    )
    origin = "PEFT state dict"
    grouped = group_lora_keys(state_dict, origin)
    if grouped.source_format == "kohya":
        raise ValueError(f"{origin} has kohya keys; pass PEFT keys (<path>.lora_A.weight / .lora_B.weight)")
    if grouped.ignored_keys:
        raise ValueError(
            f"{origin} has text-encoder keys, e.g. {grouped.ignored_keys[0]!r}; pass the UNet's LoRA state dict only"
        )
    return build_modules(grouped, origin, lambda path, rank, _alpha: scaling.alpha_for(path, rank))

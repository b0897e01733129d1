"""LoRA key layouts: the MLCM target modules, kohya naming, and parsing of PEFT/diffusers/kohya keys."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# The 14 UNet module patterns of the official MLCM/TLCM LoRA (docs/method.md, "The LoRA and its scale"), matched PEFT-style:
# a module is targeted when its name equals a pattern or ends with "." + pattern.
TARGET_MODULE_PATTERNS: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)

KOHYA_UNET_PREFIX = "lora_unet_"
PEFT_PREFIX = "base_model.model."
DIFFUSERS_UNET_PREFIX = "unet."

# Top-level children of diffusers' UNet2DConditionModel: a path starting elsewhere is not a UNet module.
UNET_ROOTS = frozenset(
    {
        "conv_in",
        "time_proj",
        "time_embedding",
        "add_time_proj",
        "add_embedding",
        "encoder_hid_proj",
        "class_embedding",
        "down_blocks",
        "mid_block",
        "up_blocks",
        "conv_norm_out",
        "conv_out",
    }
)
# Prefixes of text-encoder LoRA keys in kohya, diffusers and PEFT files; MLCM LoRAs are UNet-only.
TEXT_ENCODER_PREFIXES = (
    "lora_te_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "text_encoder.",
    "text_encoder_2.",
    "te.",
    "te1.",
    "te2.",
    PEFT_PREFIX + "text_model.",
    "text_model.",
)

SUPPORTED_LAYOUTS = (
    "PEFT (base_model.model.<path>.lora_A.weight / .lora_B.weight, optionally .default.weight), "
    "diffusers (unet.<path>.lora.down.weight / .lora.up.weight, unet.<path>.lora_A.weight, "
    "old unet.<attn>.processor.to_q_lora.down.weight; the 'unet.' prefix is optional), "
    "kohya (lora_unet_<name>.lora_down.weight / .lora_up.weight / .alpha)"
)

_KOHYA = re.compile(r"^(lora_unet_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
_DIFFUSERS_AB = re.compile(r"^(.+)\.lora_([AB])(?:\.default)?\.weight$")
_DIFFUSERS_DOWN_UP = re.compile(r"^(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_DIFFUSERS_OLD = re.compile(r"^(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(.+)\.alpha$")
_DORA_MARKERS = ("lora_magnitude_vector", "dora_scale")
_LYCORIS_MARKERS = (".hada_", ".lokr_", ".oft_", ".boft_")

ROLE_DOWN = "down"
ROLE_UP = "up"
ROLE_ALPHA = "alpha"
_AB_ROLE = {"A": ROLE_DOWN, "B": ROLE_UP, "down": ROLE_DOWN, "up": ROLE_UP}


@dataclass(frozen=True)
class ParsedKey:
    """One state-dict key resolved to (format, module, role)."""

    source_format: str  # "peft" | "diffusers" | "kohya"
    module: str  # diffusers module path (peft/diffusers) or kohya name (kohya)
    role: str  # "down" | "up" | "alpha"


def is_target_module(module_path: str) -> bool:
    """Whether PEFT would target this module with MLCM's 14 patterns (exact name or '.'-suffix match)."""
    return any(module_path == p or module_path.endswith("." + p) for p in TARGET_MODULE_PATTERNS)


def kohya_name(module_path: str) -> str:
    """The kohya module name ComfyUI maps: 'lora_unet_' + the diffusers path with '.' replaced by '_'."""
    if not module_path or module_path.startswith(".") or module_path.endswith(".") or ".." in module_path:
        raise ValueError(
            f"{module_path!r} is not a diffusers module path like 'down_blocks.0.resnets.0.conv1'"
        )
    return KOHYA_UNET_PREFIX + module_path.replace(".", "_")


def kohya_name_index(module_paths: Iterable[str]) -> dict[str, str]:
    """Map kohya name -> module path for a model's modules; raises if two paths share a kohya name."""
    index: dict[str, str] = {}
    for path in module_paths:
        name = kohya_name(path)
        if name in index and index[name] != path:
            raise ValueError(f"modules {index[name]!r} and {path!r} both have kohya name {name!r}")
        index[name] = path
    return index


def is_text_encoder_key(key: str) -> bool:
    """Whether a key belongs to a text-encoder LoRA (never applied by MLCM)."""
    return key.startswith(TEXT_ENCODER_PREFIXES)


def _normalise_diffusers_path(path: str) -> str:
    """Drop attention-processor indirection: '<attn>.processor.to_out' -> '<attn>.to_out.0'."""
    path = path.replace(".processor.", ".")
    if path.endswith(".processor"):
        path = path[: -len(".processor")]
    if path.endswith(".to_out"):
        path += ".0"
    return path


def _unsupported_adapter(key: str) -> str | None:
    """A specific reason when the key belongs to an adapter type we do not apply."""
    if any(marker in key for marker in _DORA_MARKERS):
        return f"{key!r} is a DoRA magnitude; DoRA LoRAs are not supported, export a plain LoRA instead"
    if key.endswith("lora_mid.weight"):
        return (
            f"{key!r} is a LoCon/Tucker mid weight (lora_mid); only plain down/up LoRA pairs are supported, "
            "re-export without the Tucker decomposition"
        )
    if any(marker in key for marker in _LYCORIS_MARKERS):
        return f"{key!r} belongs to a LyCORIS adapter (LoHa/LoKr/OFT); only plain LoRA pairs are supported"
    if key.endswith((".lora_A.bias", ".lora_B.bias", ".lora_A.default.bias", ".lora_B.default.bias")):
        return f"{key!r} is a LoRA bias (PEFT lora_bias=True); only bias-free LoRA pairs are supported"
    return None


def parse_key(key: str) -> ParsedKey | None:
    """Resolve a UNet LoRA key; None for keys that are not UNet LoRA keys (text encoders, unknown)."""
    if is_text_encoder_key(key):
        return None
    reason = _unsupported_adapter(key)
    if reason is not None:
        raise ValueError(reason)
    match = _KOHYA.match(key)
    if match:
        suffix = match.group(2)
        role = ROLE_ALPHA if suffix == "alpha" else ROLE_DOWN if suffix.startswith("lora_down") else ROLE_UP
        return ParsedKey("kohya", match.group(1), role)
    match = _PEFT.match(key)
    if match:
        return _unet_path_key("peft", match.group(1), _AB_ROLE[match.group(2)])
    body = key[len(DIFFUSERS_UNET_PREFIX) :] if key.startswith(DIFFUSERS_UNET_PREFIX) else key
    match = _DIFFUSERS_OLD.match(body)
    if match:
        attention = match.group(1).removesuffix(".processor")
        return _unet_path_key("diffusers", f"{attention}.{match.group(2)}", _AB_ROLE[match.group(3)])
    for pattern in (_DIFFUSERS_AB, _DIFFUSERS_DOWN_UP):
        match = pattern.match(body)
        if match:
            return _unet_path_key("diffusers", match.group(1), _AB_ROLE[match.group(2)])
    match = _DIFFUSERS_ALPHA.match(body)
    if match:
        return _unet_path_key("diffusers", match.group(1), ROLE_ALPHA)
    return None


def _unet_path_key(source_format: str, path: str, role: str) -> ParsedKey | None:
    """A ParsedKey for a diffusers module path, or None when the path is outside the UNet."""
    path = _normalise_diffusers_path(path)
    if path.split(".", 1)[0] not in UNET_ROOTS:
        return None
    return ParsedKey(source_format, path, role)

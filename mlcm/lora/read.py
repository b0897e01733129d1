"""read_lora: PEFT folders, diffusers files and kohya files -> LoraWeights with the right scale."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .keys import ROLE_ALPHA
from .metadata import MLCMLoraMetadata
from .modules import LoraWeights
from .pairs import GroupedKeys, build_modules, group_lora_keys
from .peft_config import PEFT_DEFAULT_LORA_ALPHA, PeftScaling

logger = logging.getLogger(__name__)

# What PEFT's save_pretrained writes, in the order we prefer them.
PEFT_WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT's name, then the name the MLCM/TLCM SDXL release ships its config under (docs/method.md, "The LoRA and its scale").
PEFT_CONFIG_NAMES = ("adapter_config.json", "lora_model_adapter_config.json")
# The safetensors header key diffusers' save_lora_weights / save_lora_adapter write the LoraConfig under
# (diffusers/loaders/lora_base.py LORA_ADAPTER_METADATA_KEY).
DIFFUSERS_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

AlphaRule = Callable[[str, int, "float | None"], float]


def read_lora(path: str | os.PathLike, *, alpha_override: float | None = None) -> LoraWeights:
    """Read a UNet LoRA file or PEFT adapter folder; `alpha_override` sets every module's alpha (scale = alpha/r)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"LoRA not found: {path} does not exist (expected a .safetensors LoRA file or a PEFT adapter folder "
            f"containing {' or '.join(PEFT_WEIGHT_NAMES)})"
        )
    weights_path, config_path = _locate(path)
    state_dict, header = _load_state_dict(weights_path)
    origin = str(weights_path)
    grouped = group_lora_keys(state_dict, origin)
    alpha_rule, alpha_source = _alpha_rule(grouped, config_path, header, alpha_override, origin)
    modules = build_modules(grouped, origin, alpha_rule)
    lora = LoraWeights(
        modules=modules,
        metadata=_read_metadata(header, origin),
        source_format=grouped.source_format,
        ignored_keys=grouped.ignored_keys,
        alpha_source=alpha_source,
    )
    logger.info(
        "Read %s LoRA %s: %d UNet modules, rank %s; %s%s",
        lora.source_format,
        origin,
        len(modules),
        "/".join(str(rank) for rank in lora.ranks()),
        alpha_source,
        f"; ignored {len(lora.ignored_keys)} text-encoder keys" if lora.ignored_keys else "",
    )
    return lora


def locate_lora_files(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """The (weights file, adapter config or None) that read_lora(path) reads; for cache keys."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LoRA not found: {path} does not exist")
    return _locate(path)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """The weights file and, for PEFT layouts, the adapter config next to it."""
    if path.is_dir():
        for name in PEFT_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name, _find_config(path, PEFT_CONFIG_NAMES)
        contents = sorted(child.name for child in path.iterdir())[:10]
        raise FileNotFoundError(
            f"{path} is a folder but has no {' or '.join(PEFT_WEIGHT_NAMES)} (the files PEFT's save_pretrained "
            f"writes); it contains {contents or 'nothing'}. Choose the LoRA .safetensors file itself or a PEFT "
            "adapter folder"
        )
    own_config = f"{path.stem}_adapter_config.json"
    # ComfyUI lists a PEFT folder as `<folder>/adapter_model.safetensors`, so its config is a sibling. Any
    # other file only gets a config named after it: a shared loras folder may hold a stranger's config.
    names = (*PEFT_CONFIG_NAMES, own_config) if path.stem == "adapter_model" else (own_config,)
    return path, _find_config(path.parent, names)


def _find_config(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` that exists in `folder`."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def _load_state_dict(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and the safetensors header of a LoRA file; corrupt files raise ValueError naming the file."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                header = dict(handle.metadata() or {})
                return {key: handle.get_tensor(key) for key in handle.keys()}, header
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(
                f"{path} is corrupt or truncated and cannot be read as safetensors ({error}); re-download or "
                "re-export it"
            ) from error
    if suffix in PICKLE_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
            raise ValueError(
                f"{path} is corrupt, truncated or not a plain tensor checkpoint ({error}); re-download it or "
                "convert it to .safetensors"
            ) from error
        if not isinstance(loaded, dict) or not all(
            isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()
        ):
            raise ValueError(f"{path} does not hold a flat dict of tensors; it is not a LoRA state dict")
        return loaded, {}
    raise ValueError(
        f"{path} has suffix {suffix!r}; LoRAs are read from .safetensors (or {', '.join(PICKLE_SUFFIXES)}) files "
        "or PEFT adapter folders"
    )


def _read_metadata(header: dict[str, str], origin: str) -> MLCMLoraMetadata | None:
    """Our metadata, or None; a malformed mlcm.* header is reported and dropped (the weights stay usable)."""
    try:
        return MLCMLoraMetadata.from_header(header)
    except ValueError as error:
        logger.warning("%s: ignoring its MLCM metadata: %s", origin, error)
        return None


def _diffusers_adapter_config(header: dict[str, str], origin: str) -> dict[str, Any] | None:
    """The UNet's LoraConfig from diffusers' `lora_adapter_metadata` header, if present."""
    raw = header.get(DIFFUSERS_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{origin}: header {DIFFUSERS_ADAPTER_METADATA_KEY!r} is not valid JSON ({error})"
        ) from error
    # Pipeline saves prefix each component's config ("unet.r"); save_lora_adapter writes it bare ("r").
    unet = {key.removeprefix("unet."): value for key, value in config.items() if key.startswith("unet.")}
    if unet:
        return unet
    return config if "r" in config else None


def _alpha_rule(
    grouped: GroupedKeys,
    config_path: Path | None,
    header: dict[str, str],
    alpha_override: float | None,
    origin: str,
) -> tuple[AlphaRule, str]:
    """How each module's alpha is chosen, and a sentence saying so (override > file > config > default)."""
    if alpha_override is not None:
        return _override_rule(grouped, alpha_override)
    with_alpha = sum(ROLE_ALPHA in roles for roles in grouped.tensors.values())
    total = len(grouped.tensors)
    if grouped.source_format == "kohya":
        if with_alpha == total:
            source = "kohya .alpha tensors in the file (scale alpha/rank)"
        else:
            source = (
                f"kohya .alpha tensors for {with_alpha}/{total} modules; the other {total - with_alpha} have no "
                ".alpha so alpha = rank (scale 1.0), as kohya and ComfyUI do"
            )
        return _file_alpha_or(_alpha_equals_rank), source

    scaling = _peft_scaling(config_path, header, origin)
    if scaling is not None:
        rule, source = _file_alpha_or(scaling.alpha_for), scaling.describe()
    elif grouped.source_format == "peft":
        rule = _file_alpha_or(lambda _module, _rank: PEFT_DEFAULT_LORA_ALPHA)
        source = (
            f"no adapter config found: assumed PEFT's default lora_alpha={PEFT_DEFAULT_LORA_ALPHA:g} "
            f"(scale {PEFT_DEFAULT_LORA_ALPHA:g}/r, 0.125 at r=64 as in the official MLCM release)"
        )
        logger.warning(
            "%s: PEFT-format LoRA without adapter_config.json; assuming PEFT's default lora_alpha=%g (scale "
            "%g/r = 0.125 at r=64, as the official MLCM release). If it was trained with another lora_alpha, put "
            "its adapter_config.json (or lora_model_adapter_config.json) next to the file, or set alpha_override "
            "to that lora_alpha.",
            origin,
            PEFT_DEFAULT_LORA_ALPHA,
            PEFT_DEFAULT_LORA_ALPHA,
        )
    else:
        rule = _file_alpha_or(_alpha_equals_rank)
        source = "no alpha in the file or its metadata: diffusers convention alpha = rank (scale 1.0)"
    if with_alpha:
        source = f".alpha tensors in the file for {with_alpha}/{total} modules; otherwise {source}"
    return rule, source


def _override_rule(grouped: GroupedKeys, alpha_override: float) -> tuple[AlphaRule, str]:
    """Every module gets alpha = alpha_override, whatever the file or its config say."""
    if not (math.isfinite(alpha_override) and alpha_override > 0):
        raise ValueError(
            f"alpha_override={alpha_override} must be a positive finite number (the LoRA's lora_alpha)"
        )
    ranks = sorted({int(roles["down"].shape[0]) for roles in grouped.tensors.values() if "down" in roles})
    scales = ", ".join(f"{alpha_override:g}/{rank} = {alpha_override / rank:g}" for rank in ranks)
    alpha = float(alpha_override)
    return (lambda _module, _rank, _in_file: alpha), f"alpha_override={alpha_override:g}: scale {scales}"


def _peft_scaling(config_path: Path | None, header: dict[str, str], origin: str) -> PeftScaling | None:
    """The LoraConfig from the adapter config file, else from diffusers' header metadata, else None."""
    if config_path is None:
        config = _diffusers_adapter_config(header, origin)
        if config is None:
            return None
        return PeftScaling.from_config(config, source=f"header {DIFFUSERS_ADAPTER_METADATA_KEY}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{config_path} is not a readable JSON adapter config ({error}); re-download it"
        ) from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object (a PEFT LoraConfig)")
    return PeftScaling.from_config(config, source=config_path.name)


def _alpha_equals_rank(_module: str, rank: int) -> float:
    """kohya/ComfyUI/diffusers convention when a file has no alpha: scale 1.0."""
    return float(rank)


def _file_alpha_or(fallback: Callable[[str, int], float]) -> AlphaRule:
    """Use the module's alpha tensor when the file has one, else `fallback(module, rank)`."""

    def rule(module: str, rank: int, alpha_in_file: float | None) -> float:
        return alpha_in_file if alpha_in_file is not None else fallback(module, rank)

    return rule

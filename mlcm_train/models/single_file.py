"""Single-file SD1.5/SDXL checkpoints (ComfyUI `models/checkpoints`): read, detect the family, build modules.

Modules are built from diffusers configs (the shipped `mlcm_train/configs/<family>` or a folder that
describes the checkpoint) with empty weights, then filled strictly from the converted state dict, so a
truncated or mismatched file fails loudly instead of leaving random weights behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mlcm_train.models import ldm_keys as cc

logger = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # mlcm_train/configs (package data)
FAMILIES = ("sd15", "sdxl")
# Extensions read with torch.load(weights_only=True); everything else must be safetensors.
TORCH_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load every tensor of a single-file checkpoint (safetensors, or torch.load with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass the path of a .safetensors file")
    if path.suffix.lower() in TORCH_EXTENSIONS:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors have no common base class
            raise ValueError(
                f"{path} could not be read with torch.load(weights_only=True) ({exc}); it is corrupt or "
                "holds more than tensors; convert it to .safetensors"
            ) from exc
        data = data.get("state_dict", data) if isinstance(data, dict) else data
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict of tensors")
        return {k: v for k, v in data.items() if isinstance(v, Tensor)}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint ({exc}); the file is corrupt or truncated "
            "(an interrupted download?): download or save it again"
        ) from exc


def read_keys(path: str | os.PathLike) -> list[str]:
    """Tensor names of a checkpoint without loading the tensors (safetensors header); validates the header."""
    path = Path(path)
    if path.suffix.lower() in TORCH_EXTENSIONS or not path.is_file():
        return list(read_checkpoint(path))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint ({exc}); the file is corrupt or truncated "
            "(an interrupted download?): download or save it again"
        ) from exc
    # ComfyUI marks v-prediction checkpoints with a `v_pred` tensor; some trainers use metadata instead.
    if metadata.get("modelspec.prediction_type", "epsilon").lower() not in ("epsilon", "eps"):
        keys.append("v_pred")
    return keys


def detect_family(keys: Mapping[str, object] | list[str]) -> str:
    """'sd15' or 'sdxl' from the checkpoint's key names (SDXL: second text encoder / label_emb)."""
    names = list(keys)
    if any(k.startswith(cc.SDXL_CLIP_G_PREFIX) or k.startswith(cc.UNET_PREFIX + "label_emb.") for k in names):
        return "sdxl"
    if any(k.startswith(cc.SD15_TEXT_PREFIX) for k in names):
        return "sd15"
    if any(k.startswith("cond_stage_model.model.") for k in names):
        raise ValueError(
            "this is an SD2.x checkpoint (OpenCLIP-H text encoder); only SD1.5 and SDXL teachers are supported"
        )
    if not any(k.startswith(cc.UNET_PREFIX) for k in names):
        raise ValueError(
            "the checkpoint has no `model.diffusion_model.*` UNet weights; it is not an SD1.5/SDXL "
            "single-file checkpoint (a LoRA, a VAE or a UNet-only file?)"
        )
    raise ValueError(
        "the checkpoint has a UNet but no text encoder (`cond_stage_model.*` or `conditioner.*`); "
        "load a full checkpoint or its diffusers folder"
    )


def check_prediction_type(keys: Mapping[str, object] | list[str], path: Path) -> None:
    """Reject v-prediction checkpoints, which ComfyUI marks with a `v_pred` key: MLCM distils eps teachers."""
    if "v_pred" in keys:
        raise ValueError(
            f"{path} is a v-prediction model; the MLCM trainer needs an epsilon-prediction teacher"
        )


def config_folder(family: str, config_dir: str | os.PathLike | None) -> Path:
    """The diffusers config folder describing the checkpoint: `config_dir` when given, else the shipped one."""
    folder = Path(config_dir) if config_dir is not None else SHIPPED_CONFIGS / family
    needed = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    missing = [name for name in needed if not (folder / name / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"config folder {folder} lacks {', '.join(n + '/config.json' for n in missing)} for a {family} "
            "checkpoint; pass a diffusers folder whose configs describe the checkpoint"
        )
    return folder


def build_from_single_file(
    checkpoint: Mapping[str, Tensor], family: str, folder: Path, dtype: torch.dtype
) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder(s) from an LDM-layout state dict, shaped by the configs in `folder`."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        text_encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            if family == "sdxl"
            else None
        )
    text_prefix = cc.SD15_TEXT_PREFIX if family == "sd15" else cc.SDXL_CLIP_L_PREFIX
    states = {
        "unet": (unet, cc.unet_from_ldm(checkpoint, list(unet.state_dict()), unet.config)),
        "vae": (vae, cc.vae_from_ldm(checkpoint, list(vae.state_dict()), vae.config)),
        "text_encoder": (
            text_encoder,
            cc.clip_from_ldm(checkpoint, list(text_encoder.state_dict()), text_prefix),
        ),
    }
    if text_encoder_2 is not None:
        states["text_encoder_2"] = (
            text_encoder_2,
            cc.open_clip_from_ldm(checkpoint, list(text_encoder_2.state_dict())),
        )
    modules: dict[str, torch.nn.Module] = {}
    for name, (module, state) in states.items():
        _load_strict(module, state, name, dtype)
        modules[name] = module
    return modules


def _load_strict(module: torch.nn.Module, state: dict[str, Tensor], name: str, dtype: torch.dtype) -> None:
    expected = module.state_dict()
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{name} weight {key} has shape {tuple(value.shape)} in the checkpoint but {tuple(expected[key].shape)} "
                "in the config; the checkpoint is not the model the config describes (pass the right config folder)"
            )
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    still_empty = [n for n, p in module.named_parameters() if p.is_meta]
    if still_empty:
        raise ValueError(f"{name} weights {still_empty[:3]} were not in the checkpoint")

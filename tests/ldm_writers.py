"""Test-only writers: diffusers / transformers state dicts -> single-file (LDM) keys, the inverse of
``mlcm_train.models.ldm_keys``'s readers, to build single-file checkpoints from tiny random models."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mlcm_train.models.ldm_keys import (
    _QKV,
    SDXL_CLIP_G_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    _is_vae_attention_matrix,
    _open_clip_key_map,
    canonical_clip_key,
    unet_key_map,
    vae_key_map,
)


def unet_to_ldm(state_dict: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Diffusers UNet state dict -> LDM keys with the `model.diffusion_model.` prefix."""
    mapping = unet_key_map(list(state_dict), config)
    return {UNET_PREFIX + mapping[k]: v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    """Diffusers AutoencoderKL state dict -> LDM keys; mid attention linears become 1x1 convs as in LDM."""
    mapping = vae_key_map(list(state_dict), config)
    out = {}
    for k, v in state_dict.items():
        out[VAE_PREFIX + mapping[k]] = v[:, :, None, None] if _is_vae_attention_matrix(k) else v
    return out


def clip_to_ldm(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """transformers CLIPTextModel state dict -> single-file keys (transformers-4 layout under `prefix`)."""
    return {prefix + canonical_clip_key(k): v for k, v in state_dict.items()}


def open_clip_to_ldm(state_dict: Mapping[str, Tensor], prefix: str = SDXL_CLIP_G_PREFIX) -> dict[str, Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP single-file keys (fused qkv, transposed projection)."""
    out = {prefix + ldm: state_dict[k] for k, ldm in _open_clip_key_map(list(state_dict)).items()}
    canonical = {canonical_clip_key(k): v for k, v in state_dict.items()}
    layers = sorted({int(m.group(1)) for k in canonical if (m := _QKV.fullmatch(k))})
    for i in layers:
        base = f"text_model.encoder.layers.{i}.self_attn."
        for param in ("weight", "bias"):
            fused = torch.cat([canonical[f"{base}{p}_proj.{param}"] for p in ("q", "k", "v")])
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{param}"] = fused
    # OpenCLIP computes x @ text_projection, a Linear computes x @ W.T: the file holds the transpose.
    out[prefix + "text_projection"] = canonical["text_projection.weight"].T.contiguous()
    return out

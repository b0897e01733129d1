"""Key conversion between diffusers state dicts and original (LDM) single-file SD1.5/SDXL checkpoints.

The single files ComfyUI loads from `models/checkpoints` use the key layout of the original
Stable Diffusion code (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` for SD1.5,
`conditioner.embedders.{0,1}.*` for SDXL). The mapping is built from the diffusers model's own config and
keys, so one table serves both directions and any block layout (the tiny test models included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Text encoder prefixes per family, in the order of the diffusers components (text_encoder, text_encoder_2).
SD15_TEXT_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1.model."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}


def _split_module(key: str) -> tuple[str, str]:
    """Split 'a.b.weight' into ('a.b', 'weight')."""
    module, _, param = key.rpartition(".")
    return module, param


def _rename(module: str, table: Mapping[str, str]) -> str:
    """Rename the leading part of a dotted module path found in `table`."""
    for old, new in table.items():
        if module == old or module.startswith(old + "."):
            return new + module[len(old) :]
    return module


def _layers_per_block(config: Mapping, n_blocks: int) -> list[int]:
    value = config["layers_per_block"]
    return [int(value)] * n_blocks if isinstance(value, int) else [int(v) for v in value]


def unet_key_map(diffusers_keys: list[str], config: Mapping) -> dict[str, str]:
    """Map each diffusers UNet2DConditionModel key to its LDM key (without the `model.diffusion_model.` prefix)."""
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    down_layers = _layers_per_block(config, len(down_types))
    # Up blocks carry one more resnet than the matching down block (the skip from the block input).
    up_layers = [n + 1 for n in reversed(down_layers)]
    down_start = [1]
    for n in down_layers[:-1]:
        down_start.append(down_start[-1] + n + 1)
    up_start = [0]
    for n in up_layers[:-1]:
        up_start.append(up_start[-1] + n)

    mapping: dict[str, str] = {}
    for key in diffusers_keys:
        module, param = _split_module(key)
        parts = module.split(".")
        if parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{down_start[i] + down_layers[i]}.0.op" + _tail(parts, 5)
            else:
                j = int(parts[3])
                new = _block_member(f"input_blocks.{down_start[i] + j}", kind, parts[4:])
        elif parts[0] == "up_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                slot = 2 if "CrossAttn" in up_types[i] else 1
                new = f"output_blocks.{up_start[i] + up_layers[i] - 1}.{slot}" + _tail(parts, 4)
            else:
                j = int(parts[3])
                new = _block_member(f"output_blocks.{up_start[i] + j}", kind, parts[4:])
        elif parts[0] == "mid_block":
            kind, j = parts[1], int(parts[2])
            index = 1 if kind == "attentions" else 2 * j
            new = _block_member(f"middle_block.{index}", kind, parts[3:], fixed_slot=True)
        else:
            renamed = _rename(module, _UNET_TOP)
            if renamed == module:
                raise ValueError(
                    f"no LDM name known for UNet key {key!r}; the UNet layout is not SD1.5/SDXL-like"
                )
            new = renamed
        mapping[key] = f"{new}.{param}"
    return mapping


def _tail(parts: list[str], start: int) -> str:
    rest = parts[start:]
    return "." + ".".join(rest) if rest else ""


def _block_member(base: str, kind: str, rest: list[str], fixed_slot: bool = False) -> str:
    """LDM name of a resnet (slot 0) or transformer (slot 1) inside an input/output/middle block."""
    inner = ".".join(rest)
    if kind == "resnets":
        inner = _rename(inner, _UNET_RESNET)
        return base if fixed_slot and not inner else f"{base}{'' if fixed_slot else '.0'}.{inner}"
    if kind == "attentions":
        return f"{base}{'' if fixed_slot else '.1'}.{inner}"
    raise ValueError(f"unexpected UNet block member {kind!r} in {base}")


def vae_key_map(diffusers_keys: list[str], config: Mapping) -> dict[str, str]:
    """Map each diffusers AutoencoderKL key to its LDM key (without the `first_stage_model.` prefix)."""
    n_blocks = len(config["block_out_channels"])
    mapping: dict[str, str] = {}
    for key in diffusers_keys:
        module, param = _split_module(key)
        parts = module.split(".")
        side = parts[0]
        if side not in ("encoder", "decoder"):
            mapping[key] = key  # quant_conv / post_quant_conv keep their names
            continue
        sub = parts[1:]
        if sub[0] in ("down_blocks", "up_blocks"):
            i = int(sub[1])
            level = i if sub[0] == "down_blocks" else n_blocks - 1 - i
            stage = "down" if sub[0] == "down_blocks" else "up"
            if sub[2] == "resnets":
                inner = _rename(".".join(sub[4:]), _VAE_RESNET)
                new = f"{side}.{stage}.{level}.block.{sub[3]}.{inner}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                sample = "downsample" if stage == "down" else "upsample"
                new = f"{side}.{stage}.{level}.{sample}.{'.'.join(sub[4:])}"
        elif sub[0] == "mid_block":
            if sub[1] == "resnets":
                inner = _rename(".".join(sub[3:]), _VAE_RESNET)
                new = f"{side}.mid.block_{int(sub[2]) + 1}.{inner}"
            else:
                new = f"{side}.mid.attn_1.{_rename('.'.join(sub[3:]), _VAE_ATTENTION)}"
        else:
            new = f"{side}.{_rename('.'.join(sub), _VAE_TOP)}"
        mapping[key] = f"{new}.{param}"
    return mapping


def _is_vae_attention_matrix(diffusers_key: str) -> bool:
    return (
        ".mid_block.attentions." in diffusers_key
        and re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key) is not None
    )


def unet_from_ldm(
    checkpoint: Mapping[str, Tensor], diffusers_keys: list[str], config: Mapping
) -> dict[str, Tensor]:
    """LDM checkpoint (full single file) -> diffusers UNet state dict for a model with `diffusers_keys`."""
    mapping = unet_key_map(diffusers_keys, config)
    return {k: _take(checkpoint, UNET_PREFIX + ldm, "UNet") for k, ldm in mapping.items()}


def vae_from_ldm(
    checkpoint: Mapping[str, Tensor], diffusers_keys: list[str], config: Mapping
) -> dict[str, Tensor]:
    """LDM checkpoint -> diffusers AutoencoderKL state dict (1x1 conv attention weights become linears)."""
    mapping = vae_key_map(diffusers_keys, config)
    out = {}
    for k, ldm in mapping.items():
        value = _take(checkpoint, VAE_PREFIX + ldm, "VAE")
        out[k] = value.flatten(1) if _is_vae_attention_matrix(k) else value
    return out


def canonical_clip_key(key: str) -> str:
    """The transformers-4 name of a CLIP text model key (`text_model.` prefix), the layout single files use.

    transformers 5 drops the `text_model.` level from CLIPTextModel's own state dict; both spellings map here.
    """
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


def clip_from_ldm(checkpoint: Mapping[str, Tensor], model_keys: list[str], prefix: str) -> dict[str, Tensor]:
    """Single-file CLIP-L weights (transformers layout under `prefix`) -> CLIPTextModel state dict."""
    if prefix + "text_model.embeddings.token_embedding.weight" not in checkpoint and any(
        k.startswith(prefix + "embeddings.") for k in checkpoint
    ):
        # Checkpoints saved with transformers < 4.20 have no `text_model.` level.
        return {
            k: _take(checkpoint, prefix + canonical_clip_key(k)[len("text_model.") :], "text encoder")
            for k in model_keys
        }
    return {k: _take(checkpoint, prefix + canonical_clip_key(k), "text encoder") for k in model_keys}


def _open_clip_key_map(model_keys: list[str]) -> dict[str, str]:
    """CLIP text model key -> OpenCLIP key, for the parameters that are not fused or transposed."""
    table = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    layer = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    mapping = {}
    for key in model_keys:
        canonical = canonical_clip_key(key)
        if canonical in table:
            mapping[key] = table[canonical]
            continue
        match = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", canonical)
        if match and match.group(2) in layer:
            mapping[key] = f"transformer.resblocks.{match.group(1)}.{layer[match.group(2)]}.{match.group(3)}"
    return mapping


_QKV = re.compile(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


def open_clip_from_ldm(
    checkpoint: Mapping[str, Tensor], model_keys: list[str], prefix: str = SDXL_CLIP_G_PREFIX
) -> dict[str, Tensor]:
    """OpenCLIP single-file weights -> CLIPTextModelWithProjection state dict."""
    component = "text encoder 2 (OpenCLIP bigG)"
    out = {k: _take(checkpoint, prefix + ldm, component) for k, ldm in _open_clip_key_map(model_keys).items()}
    for key in model_keys:
        canonical = canonical_clip_key(key)
        if match := _QKV.fullmatch(canonical):
            fused = _take(
                checkpoint,
                f"{prefix}transformer.resblocks.{match.group(1)}.attn.in_proj_{match.group(3)}",
                component,
            )
            out[key] = fused.chunk(3)["qkv".index(match.group(2))]
        elif canonical == "text_projection.weight":
            out[key] = _take(checkpoint, prefix + "text_projection", component).T.contiguous()
    missing = [k for k in model_keys if k not in out]
    if missing:
        raise ValueError(f"no OpenCLIP name known for text encoder 2 keys {missing[:5]}")
    return out


def _take(checkpoint: Mapping[str, Tensor], key: str, component: str) -> Tensor:
    if key not in checkpoint:
        raise ValueError(
            f"the checkpoint has no {key!r} needed by the {component}; the file is truncated or its model "
            "does not match the config it is being loaded with (pass a config folder that describes it)"
        )
    return checkpoint[key]

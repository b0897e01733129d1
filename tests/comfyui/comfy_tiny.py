"""Tiny SD1.5- and SDXL-architecture models built with ComfyUI's own classes (random weights, CPU).

ComfyUI's ops skip weight initialisation (fresh parameters hold whatever memory had, often NaN), so every
builder initialises the weights itself from an explicit generator. ComfyUI is imported inside the
functions: this module must be importable (for collection) without ComfyUI.
"""

from __future__ import annotations

import torch

# ComfyUI unet_config for an SD1.5-shaped UNet: two levels, one res/attention block each, CLIP-L width.
SD15_UNET_CONFIG = {
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 768,
    "in_channels": 4,
    "out_channels": 4,
    "adm_in_channels": None,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_checkpoint": False,
    "image_size": 32,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# The same UNet as a diffusers UNet2DConditionModel config (SD1.5 conventions: 8 heads, conv proj_in).
SD15_DIFFUSERS_CONFIG = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# SDXL-shaped: no attention on the first level, linear proj_in, 2048-wide context, 2816-wide ADM input.
SDXL_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "model_channels": 64,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "use_linear_in_transformer": True,
    "context_dim": 2048,
}
LATENT_SIZE = 8  # latent side: 8x8 keeps a 4-step run well under a second on CPU


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Deterministic, well-scaled weights: fan-in scaled normals, unit norm scales, small biases."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        else:
            param.fill_(1.0)


def tiny_model(family: str, seed: int = 0, *, init: bool = True) -> object:
    """A ComfyUI ModelPatcher around a tiny ``family`` ("sd15" | "sdxl") BaseModel on the CPU."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config_class, unet_config = {
        "sd15": (comfy.supported_models.SD15, SD15_UNET_CONFIG),
        "sdxl": (comfy.supported_models.SDXL, SDXL_UNET_CONFIG),
    }[family]
    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "")
    if init:
        init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def conditioning(family: str, seed: int = 0) -> list:
    """A one-entry CONDITIONING list with random text features (plus SDXL's pooled output and size)."""
    generator = torch.Generator().manual_seed(seed)
    if family == "sd15":
        return [[torch.randn(1, 77, 768, generator=generator), {}]]
    size = LATENT_SIZE * 8
    pooled = torch.randn(1, 1280, generator=generator)
    return [
        [
            torch.randn(1, 77, 2048, generator=generator),
            {"pooled_output": pooled, "width": size, "height": size},
        ]
    ]


def noise_and_latent(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise (from ComfyUI's own prepare_noise) and an empty latent of the tiny size."""
    import comfy.sample

    latent = torch.zeros(1, 4, LATENT_SIZE, LATENT_SIZE)
    return comfy.sample.prepare_noise(latent, seed), latent


@torch.no_grad()
def unet_output(patcher: object, x: torch.Tensor, timestep: float, context: torch.Tensor) -> torch.Tensor:
    """The raw UNet output of ``patcher`` with its weight patches (LoRAs) applied, then removed again."""
    patcher.patch_model()
    try:
        t = torch.full((x.shape[0],), float(timestep))
        return patcher.model.diffusion_model(x, timesteps=t, context=context).clone()
    finally:
        patcher.unpatch_model()

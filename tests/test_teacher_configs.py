"""The shipped SD1.5/SDXL-base configs describe the published models (checked on empty 'meta' weights)."""

from __future__ import annotations

import ldm_writers
import pytest
import torch

from mlcm_train.models import ldm_keys as cc
from mlcm_train.models.single_file import SHIPPED_CONFIGS, config_folder
from mlcm_train.models.teacher import _scheduler_config, alphas_cumprod_from_config

# Published parameter counts of the SD1.5 / SDXL-base components.
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
}
# Tensors per component in the original single-file layout.
LDM_UNET_TENSORS = {"sd15": 686, "sdxl": 1680}
LDM_VAE_TENSORS = 248
# Keys every ComfyUI checkpoint of the family has (upsampler slots, downsamplers, added embedding, ...).
GOLDEN_UNET_KEYS = {
    "sd15": [
        "input_blocks.3.0.op.weight",
        "input_blocks.9.0.op.weight",
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.proj_out.weight",
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "time_embed.2.weight",
        "out.2.weight",
    ],
    "sdxl": [
        "label_emb.0.0.weight",
        "label_emb.0.2.weight",
        "input_blocks.6.0.op.weight",
        "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.5.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight",
    ],
}


def _meta_components(family: str) -> dict[str, torch.nn.Module]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = config_folder(family, None)
    with init_empty_weights():
        out = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if family == "sdxl":
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            out["text_encoder_2"] = CLIPTextModelWithProjection(config)
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shipped_configs_have_published_sizes_and_ldm_layout(family):
    components = _meta_components(family)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in components.items()}
    assert counts == PARAMETERS[family]
    unet = components["unet"]
    ldm = ldm_writers.unet_to_ldm(unet.state_dict(), unet.config)
    assert len(ldm) == LDM_UNET_TENSORS[family]
    for key in GOLDEN_UNET_KEYS[family]:
        assert cc.UNET_PREFIX + key in ldm
    # The mapping is invertible: reading those keys back gives every diffusers key.
    assert cc.unet_from_ldm(ldm, list(unet.state_dict()), unet.config).keys() == unet.state_dict().keys()
    vae = components["vae"]
    vae_ldm = ldm_writers.vae_to_ldm(vae.state_dict(), vae.config)
    assert len(vae_ldm) == LDM_VAE_TENSORS
    assert vae_ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in vae_ldm
    if family == "sdxl":
        clip_g = ldm_writers.open_clip_to_ldm(components["text_encoder_2"].state_dict())
        assert clip_g[cc.SDXL_CLIP_G_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (
            3840,
            1280,
        )
        assert clip_g[cc.SDXL_CLIP_G_PREFIX + "text_projection"].shape == (1280, 1280)
        assert cc.SDXL_CLIP_G_PREFIX + "positional_embedding" in clip_g
    text = ldm_writers.clip_to_ldm(components["text_encoder"].state_dict(), "p.")
    assert "p.text_model.encoder.layers.11.mlp.fc2.weight" in text


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shipped_schedule_is_the_sd_ddpm_schedule(family):
    acp = alphas_cumprod_from_config(_scheduler_config(SHIPPED_CONFIGS / family))
    # sigma = sqrt((1 - acp) / acp) at t=999 is 14.6146 for SD/SDXL (docs/method.md, "Sigmas in ComfyUI").
    assert float(((1 - acp[999]) / acp[999]).sqrt()) == pytest.approx(14.6146, abs=1e-4)
    assert torch.all(acp[1:] < acp[:-1])

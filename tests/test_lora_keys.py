"""Key mapping on real-shaped SD1.5 and SDXL UNets (meta device, no downloads) and per-format key parsing."""

from __future__ import annotations

import pytest
import torch

from mlcm.lora import (
    TARGET_MODULE_PATTERNS,
    LoraWeights,
    detect_family,
    is_target_module,
    kohya_name,
    kohya_name_index,
    lora_from_peft_state_dict,
)
from mlcm.lora.keys import ParsedKey, parse_key

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

# The published UNet configs (runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
# unet/config.json), as differences from UNet2DConditionModel's defaults.
SD15_UNET = {
    "cross_attention_dim": 768,
    "block_out_channels": (320, 640, 1280, 1280),
    "attention_head_dim": 8,
}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "sample_size": 128,
}
# Counted on these meta models at r=64 with the 14 patterns. SDXL's 788 pairs / 196,751,360 parameters are
# the official release's figures (196.75M; docs/method.md, "The LoRA and its scale"); the full UNets have the published
# 859,520,964 (SD1.5) and 2,567,463,684 (SDXL) parameters, which checks the configs themselves.
EXPECTED = {
    "sd15": {"config": SD15_UNET, "pairs": 278, "lora_params": 67_252_224, "unet_params": 859_520_964},
    "sdxl": {"config": SDXL_UNET, "pairs": 788, "lora_params": 196_751_360, "unet_params": 2_567_463_684},
}
OFFICIAL_RANK = 64


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def meta_unet(request: pytest.FixtureRequest):
    """(family, UNet with PEFT's LoRA injected at r=64, all on the meta device)."""
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**EXPECTED[request.param]["config"])
        config = peft.LoraConfig(r=OFFICIAL_RANK, target_modules=list(TARGET_MODULE_PATTERNS))
        unet = peft.inject_adapter_in_model(config, unet)
    return request.param, unet


def _peft_targets(unet: torch.nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def test_published_configs_give_the_published_unet_sizes(meta_unet) -> None:
    family, unet = meta_unet
    base = sum(p.numel() for name, p in unet.named_parameters() if "lora_" not in name)
    assert base == EXPECTED[family]["unet_params"]


def test_every_peft_target_gets_a_unique_kohya_name_that_round_trips(meta_unet) -> None:
    family, unet = meta_unet
    targets = _peft_targets(unet)
    assert len(targets) == EXPECTED[family]["pairs"]
    # Our PEFT-style matcher selects exactly the modules PEFT itself wrapped.
    base_modules = [name for name, _ in unet.named_modules() if name and ".base_layer" not in name]
    assert sorted(name for name in base_modules if is_target_module(name) and "lora_" not in name) == sorted(
        targets
    )
    # Each of the 14 patterns is used; every module gets one kohya name and each name resolves back to it.
    assert {next(p for p in TARGET_MODULE_PATTERNS if t == p or t.endswith("." + p)) for t in targets} == set(
        TARGET_MODULE_PATTERNS
    )
    index = kohya_name_index(targets)
    assert len(index) == len(targets)
    assert all(index[kohya_name(path)] == path for path in targets)
    # Kohya names stay unique against every module of the UNet, not just the targeted ones.
    everything = kohya_name_index(name for name in base_modules if "lora_" not in name)
    assert all(everything[kohya_name(path)] == path for path in targets)


def test_peft_state_dict_of_the_real_unet_converts_completely(meta_unet) -> None:
    from peft.utils import get_peft_model_state_dict

    family, unet = meta_unet
    state_dict = get_peft_model_state_dict(unet)
    modules = lora_from_peft_state_dict(state_dict, r=OFFICIAL_RANK, lora_alpha=8)
    assert set(modules) == {kohya_name(path) for path in _peft_targets(unet)}
    assert sum(module.num_parameters() for module in modules.values()) == EXPECTED[family]["lora_params"]
    assert {module.scale for module in modules.values()} == {8 / OFFICIAL_RANK}
    for path in _peft_targets(unet):
        layer = unet.get_submodule(path).base_layer
        delta_shape = modules[kohya_name(path)].up.shape[:1] + modules[kohya_name(path)].down.shape[1:]
        assert delta_shape == layer.weight.shape, path
    # Prefixed PEFT-model keys convert to the same modules.
    prefixed = {f"base_model.model.{key}": value for key, value in state_dict.items()}
    assert set(lora_from_peft_state_dict(prefixed, r=OFFICIAL_RANK, lora_alpha=8)) == set(modules)
    assert detect_family(LoraWeights(modules, None, "peft")) == family


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
            ParsedKey("peft", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "down"),
        ),
        (
            "base_model.model.mid_block.resnets.0.conv1.lora_B.default.weight",
            ParsedKey("peft", "mid_block.resnets.0.conv1", "up"),
        ),
        (
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight",
            ParsedKey("diffusers", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "down"),
        ),
        (
            "down_blocks.0.resnets.0.time_emb_proj.lora_A.weight",
            ParsedKey("diffusers", "down_blocks.0.resnets.0.time_emb_proj", "down"),
        ),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
            ParsedKey("diffusers", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "up"),
        ),
        (
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_v.lora.up.weight",
            ParsedKey("diffusers", "mid_block.attentions.0.transformer_blocks.0.attn2.to_v", "up"),
        ),
        (
            "unet.down_blocks.0.downsamplers.0.conv.alpha",
            ParsedKey("diffusers", "down_blocks.0.downsamplers.0.conv", "alpha"),
        ),
        (
            "lora_unet_up_blocks_0_upsamplers_0_conv.lora_up.weight",
            ParsedKey("kohya", "lora_unet_up_blocks_0_upsamplers_0_conv", "up"),
        ),
        (
            "lora_unet_input_blocks_1_1_proj_in.alpha",
            ParsedKey("kohya", "lora_unet_input_blocks_1_1_proj_in", "alpha"),
        ),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", None),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight", None),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", None),
        ("diffusion_model.input_blocks.1.1.proj_in.lora_A.weight", None),
    ],
)
def test_parse_key_per_layout(key: str, expected: ParsedKey | None) -> None:
    assert parse_key(key) == expected


def test_kohya_name_replaces_every_dot_and_rejects_non_paths() -> None:
    assert kohya_name("down_blocks.0.attentions.0.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert kohya_name("add_embedding.linear_1") == "lora_unet_add_embedding_linear_1"
    for bad in ("", ".conv1", "down_blocks..conv1", "conv1."):
        with pytest.raises(ValueError, match="module path"):
            kohya_name(bad)
    with pytest.raises(ValueError, match="both have kohya name"):
        kohya_name_index(["a_b.c", "a.b_c"])

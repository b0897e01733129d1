"""Round trips through real PEFT/diffusers writers on a tiny random UNet: the applied delta never changes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mlcm.lora import (
    TARGET_MODULE_PATTERNS,
    LoraWeights,
    MLCMLoraMetadata,
    kohya_name,
    locate_lora_files,
    read_lora,
    to_kohya_state_dict,
    write_kohya_lora,
)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

# A two-level SD1.5-style UNet small enough to build in ~0.1 s; it still has every one of the 14 target
# patterns (cross-attention blocks, a resnet that changes width -> conv_shortcut, down/upsamplers).
TINY_UNET = {
    "sample_size": 8,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
FP32_ATOL = 1e-5
FP16_RELATIVE = 2e-3  # fp16 keeps ~11 bits: relative error per element ~5e-4, products a few times that

PEFT_CASES = {
    "plain": {"r": 4, "lora_alpha": 8},
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"to_q": 2, r"mid_block\..*conv1": 6},
        "alpha_pattern": {"to_k": 2, "time_emb_proj": 16},
    },
    "rslora": {"r": 3, "lora_alpha": 8, "use_rslora": True},
}


def _tiny_unet():
    return diffusers.UNet2DConditionModel(**TINY_UNET)


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Nonzero lora_A and lora_B (PEFT initialises lora_B to zero, which would hide scale errors)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _peft_adapter(folder: Path, case: str, *, safe: bool = True) -> dict[str, torch.Tensor]:
    """Save a PEFT adapter folder for the case; return PEFT's merged-minus-base delta per module path."""
    unet = _tiny_unet()
    base = {name: value.clone() for name, value in unet.state_dict().items()}
    config = peft.LoraConfig(target_modules=list(TARGET_MODULE_PATTERNS), **PEFT_CASES[case])
    model = peft.get_peft_model(unet, config)
    _randomise_lora(model, seed=len(case))
    model.save_pretrained(str(folder), safe_serialization=safe)
    merged = model.merge_and_unload()
    targeted = {
        name for name, module in merged.named_modules() if name.endswith(tuple(TARGET_MODULE_PATTERNS))
    }
    return {
        path: merged.get_submodule(path).weight.detach() - base[f"{path}.weight"]
        for path in targeted
        if isinstance(merged.get_submodule(path), torch.nn.Linear | torch.nn.Conv2d)
    }


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory):
    """Saved PEFT adapter folders and their reference deltas, built once per case for the whole module."""
    cache: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(case: str) -> tuple[Path, dict[str, torch.Tensor]]:
        if case not in cache:
            folder = tmp_path_factory.mktemp(case) / "adapter"
            cache[case] = (folder, _peft_adapter(folder, case))
        return cache[case]

    return get


def _assert_deltas(
    lora: LoraWeights, reference: dict[str, torch.Tensor], *, relative: float | None = None
) -> None:
    assert set(lora.modules) == {kohya_name(path) for path in reference}
    for path, expected in reference.items():
        actual = lora.modules[kohya_name(path)].delta()
        assert actual.shape == expected.shape, path
        tolerance = FP32_ATOL if relative is None else relative * float(expected.abs().max())
        error = float((actual - expected).abs().max())
        assert error <= tolerance, f"{path}: max |delta - PEFT merged delta| = {error:.3g} > {tolerance:.3g}"


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_peft_folder_kohya_round_trip_matches_peft_merge(tmp_path: Path, adapters, case: str) -> None:
    folder, reference = adapters(case)
    lora = read_lora(folder)
    assert lora.source_format == "peft"
    assert lora.ignored_keys == ()
    assert "adapter_config.json" in lora.alpha_source
    _assert_deltas(lora, reference)

    write_kohya_lora(tmp_path / "fp32.safetensors", lora, dtype=torch.float32)
    again = read_lora(tmp_path / "fp32.safetensors")
    assert again.source_format == "kohya"
    assert "kohya .alpha tensors" in again.alpha_source
    _assert_deltas(again, reference)

    write_kohya_lora(tmp_path / "fp16.safetensors", lora)  # the default export dtype
    half = read_lora(tmp_path / "fp16.safetensors")
    assert {module.down.dtype for module in half.modules.values()} == {torch.float16}
    _assert_deltas(half, reference, relative=FP16_RELATIVE)


def test_rank_and_alpha_patterns_follow_peft_semantics(adapters) -> None:
    lora = read_lora(adapters("patterns")[0])
    q = lora.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    k = lora.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"]
    mid = lora.modules["lora_unet_mid_block_resnets_0_conv1"]
    time = lora.modules["lora_unet_up_blocks_1_resnets_0_time_emb_proj"]
    assert (q.rank, q.scale) == (2, 8 / 2)
    assert (k.rank, k.scale) == (4, 2 / 4)
    assert (mid.rank, mid.scale) == (6, 8 / 6)
    assert (time.rank, time.scale) == (4, 16 / 4)
    assert lora.ranks() == (2, 4, 6)


def test_rslora_alpha_is_stored_as_alpha_times_sqrt_rank(adapters) -> None:
    lora = read_lora(adapters("rslora")[0])
    module = next(iter(lora.modules.values()))
    assert module.scale == pytest.approx(8 / 3**0.5, rel=1e-12)
    assert module.alpha == pytest.approx(8 * 3**0.5, rel=1e-12)
    # The kohya file keeps that irrational alpha exactly enough (float32) even for fp16 weights.
    state = to_kohya_state_dict(lora)
    alpha = state[next(key for key in state if key.endswith(".alpha"))]
    assert alpha.dtype == torch.float32
    assert float(alpha) == pytest.approx(8 * 3**0.5, rel=1e-7)


def test_renamed_mlcm_config_is_found_for_folder_and_for_the_file(tmp_path: Path, adapters) -> None:
    source, reference = adapters("plain")
    folder = tmp_path / "TLCMSDXL"
    folder.mkdir()
    shutil.copy(source / "adapter_model.safetensors", folder)
    shutil.copy(source / "adapter_config.json", folder / "lora_model_adapter_config.json")
    for path in (folder, folder / "adapter_model.safetensors"):
        assert locate_lora_files(path) == (
            folder / "adapter_model.safetensors",
            folder / "lora_model_adapter_config.json",
        )
        lora = read_lora(path)
        assert "lora_model_adapter_config.json" in lora.alpha_source
        _assert_deltas(lora, reference)


def test_pickle_adapter_bin_is_read_with_weights_only(tmp_path: Path) -> None:
    reference = _peft_adapter(tmp_path / "adapter", "plain", safe=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    _assert_deltas(read_lora(tmp_path / "adapter"), reference)


def test_bare_peft_file_assumes_default_alpha_8_and_says_how_to_override(
    tmp_path: Path, adapters, caplog: pytest.LogCaptureFixture
) -> None:
    bare = tmp_path / "loras" / "mlcm_lora.safetensors"
    bare.parent.mkdir()
    shutil.copy(adapters("plain")[0] / "adapter_model.safetensors", bare)
    # A stranger's adapter_config.json in a shared loras folder is not this file's config.
    (bare.parent / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 64}))
    assert locate_lora_files(bare) == (bare, None)
    with caplog.at_level(logging.WARNING, logger="mlcm.lora"):
        lora = read_lora(bare)
    assert {module.alpha for module in lora.modules.values()} == {8.0}
    assert "default lora_alpha=8" in lora.alpha_source
    assert "alpha_override" in caplog.text and "adapter_config.json" in caplog.text

    overridden = read_lora(bare, alpha_override=4.0)
    assert {module.scale for module in overridden.modules.values()} == {1.0}
    assert "alpha_override=4" in overridden.alpha_source


def _diffusers_unet_with_lora(case: dict) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny UNet with a diffusers-added adapter, and PEFT's own delta per module."""
    from peft.tuners.lora import LoraLayer

    unet = _tiny_unet()
    unet.add_adapter(peft.LoraConfig(target_modules=list(TARGET_MODULE_PATTERNS), **case))
    _randomise_lora(unet, seed=7)
    deltas = {
        name: module.get_delta_weight("default").detach()
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer)
    }
    return unet, deltas


@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_save_lora_weights_reads_back_with_the_right_scale(
    tmp_path: Path, with_metadata: bool
) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # Without metadata diffusers assumes alpha = rank, so only lora_alpha == r is recoverable there.
    case = {"r": 4, "lora_alpha": 12} if with_metadata else {"r": 4, "lora_alpha": 4}
    unet, reference = _diffusers_unet_with_lora(case)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = unet.peft_config["default"].to_dict() if with_metadata else None
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
    # diffusers' converter renames attention keys only: both layouts meet in one file.
    assert any(key.endswith(".to_q.lora.down.weight") for key in keys)
    assert any(key.endswith(".conv1.lora_A.weight") for key in keys)

    lora = read_lora(path)
    assert lora.source_format == "diffusers"
    assert ("lora_adapter_metadata" in lora.alpha_source) == with_metadata
    assert {module.scale for module in lora.modules.values()} == {case["lora_alpha"] / case["r"]}
    _assert_deltas(lora, reference)


def test_diffusers_save_lora_adapter_file_uses_its_bare_header_config(tmp_path: Path) -> None:
    case = {"r": 4, "lora_alpha": 6}
    unet, reference = _diffusers_unet_with_lora(case)
    unet.save_lora_adapter(str(tmp_path))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert next(iter(handle.keys())).startswith(("down_blocks.", "mid_block.", "up_blocks."))
        assert json.loads(handle.metadata()["lora_adapter_metadata"])["lora_alpha"] == 6
    lora = read_lora(path)
    assert {module.scale for module in lora.modules.values()} == {6 / 4}
    _assert_deltas(lora, reference)


def test_old_diffusers_processor_keys_map_to_attention_modules(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(3)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {}
    for projection, width in (("to_q", 32), ("to_out", 32)):
        tensors[f"unet.{attn}.processor.{projection}_lora.down.weight"] = torch.randn(
            2, width, generator=generator
        )
        tensors[f"unet.{attn}.processor.{projection}_lora.up.weight"] = torch.randn(
            width, 2, generator=generator
        )
    tensors["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight"] = (
        torch.ones(2, 32)
    )
    save_file(tensors, str(tmp_path / "old.safetensors"))
    lora = read_lora(tmp_path / "old.safetensors")
    assert sorted(lora.modules) == [kohya_name(f"{attn}.to_out.0"), kohya_name(f"{attn}.to_q")]
    assert lora.ignored_keys == (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
    )
    assert all(module.scale == 1.0 for module in lora.modules.values())


def test_diffusers_own_kohya_loader_applies_our_file_at_our_scale(tmp_path: Path, adapters) -> None:
    """An independent stock loader (diffusers' kohya converter) must fuse exactly PEFT's delta from our file."""
    from diffusers import StableDiffusionPipeline

    # One alpha for all modules: diffusers 0.42's kohya converter renames per-module alphas of attention
    # layers to old processor names that then match nothing, so it only honours a uniform alpha there.
    folder, reference = adapters("plain")
    write_kohya_lora(tmp_path / "kohya.safetensors", read_lora(folder), dtype=torch.float32)
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "kohya.safetensors"))
    unet = _tiny_unet()
    base = {name: value.clone() for name, value in unet.state_dict().items()}
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas, unet)
    unet.fuse_lora()
    for path, expected in reference.items():
        fused = dict(unet.get_submodule(path).base_layer.named_parameters())["weight"]
        error = float((fused.detach() - base[f"{path}.weight"] - expected).abs().max())
        assert error <= FP32_ATOL, f"{path}: diffusers applies our kohya file off by {error:.3g}"


# First keys and counts of the kohya file written for TINY_UNET with all 14 patterns: a change here means
# exported files changed layout, which breaks users' saved workflows.
GOLDEN_FIRST_KEYS = [
    "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_out.alpha",
    "lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_out.lora_up.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.alpha",
]
GOLDEN_MODULE_COUNT = 79


def test_golden_kohya_key_list_for_the_tiny_unet(tmp_path: Path, adapters) -> None:
    meta = MLCMLoraMetadata(segments=8, base_family="sd15", recommended_steps=(2, 4), stages=("mlcd",))
    write_kohya_lora(tmp_path / "golden.safetensors", read_lora(adapters("plain")[0]), metadata=meta)
    with safe_open(str(tmp_path / "golden.safetensors"), "pt") as handle:
        keys = sorted(handle.keys())
        header = handle.metadata()
    modules = sorted({key.split(".", 1)[0] for key in keys})
    assert keys[: len(GOLDEN_FIRST_KEYS)] == GOLDEN_FIRST_KEYS
    assert len(modules) == GOLDEN_MODULE_COUNT
    assert len(keys) == 3 * GOLDEN_MODULE_COUNT
    for module in modules:
        assert {f"{module}.alpha", f"{module}.lora_down.weight", f"{module}.lora_up.weight"} <= set(keys)
    assert all(module.startswith("lora_unet_") for module in modules)
    suffixes = {pattern.replace(".", "_") for pattern in TARGET_MODULE_PATTERNS}
    assert {next(s for s in suffixes if module.endswith("_" + s)) for module in modules} == suffixes
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8"
    assert header["ss_base_model_version"] == "sd_v1"
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(header["mlcm.recommended_steps"]) == [2, 4]

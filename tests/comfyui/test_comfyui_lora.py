"""MLCMLoraLoader against PEFT's own merge on a tiny UNet, and ComfyUI's stock loader on our kohya export."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from comfy_tiny import SD15_DIFFUSERS_CONFIG, init_weights, tiny_model, unet_output

from mlcm.lora import (
    TARGET_MODULE_PATTERNS,
    LoraModule,
    LoraWeights,
    MLCMLoraMetadata,
    is_target_module,
    kohya_name,
    read_lora,
    write_kohya_lora,
)

PEFT_RANK, PEFT_ALPHA = 4, 8  # a scale of 2, so a loader that ignores the config (scale 1) fails loudly
PEFT_FOLDER = "mlcm_tiny_sd15"
TIMESTEP = 500.0


@pytest.fixture(scope="module")
def peft_case(comfyui, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny diffusers UNet, its PEFT adapter folder, the merged reference output, and the same UNet in ComfyUI."""
    import comfy.utils
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel(**SD15_DIFFUSERS_CONFIG)
    init_weights(unet, seed=3)
    unet.eval()
    patcher = tiny_model("sd15", init=False)
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    unet_state = unet.state_dict()
    # The map lists every key such a UNet could have (e.g. conv_shortcut everywhere); take those present.
    converted = {ldm: unet_state[name] for name, ldm in diffusers_to_ldm.items() if name in unet_state}
    assert len(converted) == len(unet_state), "every diffusers weight has a ComfyUI counterpart"
    patcher.model.diffusion_model.load_state_dict(converted, strict=True)

    config = LoraConfig(r=PEFT_RANK, lora_alpha=PEFT_ALPHA, target_modules=list(TARGET_MODULE_PATTERNS))
    peft_model = get_peft_model(copy.deepcopy(unet), config)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts lora_B at zero: make the adapter do something
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("peft") / PEFT_FOLDER
    peft_model.save_pretrained(str(folder))
    merged = peft_model.merge_and_unload()

    inputs_generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=inputs_generator)
    context = torch.randn(1, 77, 768, generator=inputs_generator)
    t = torch.tensor([TIMESTEP])
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=context).sample
        reference = merged(x, t, encoder_hidden_states=context).sample
    targeted = [name for name, _ in unet.named_modules() if is_target_module(name)]
    return {
        "folder": folder,
        "patcher": patcher,
        "x": x,
        "context": context,
        "base": base,
        "reference": reference,
        "targeted": targeted,
    }


def install(folder: Path, loras_dir: Path) -> str:
    """Copy a PEFT folder into ComfyUI's loras folder; return the name the dropdown shows for it."""
    import shutil

    import folder_paths

    shutil.copytree(folder, loras_dir / folder.name)
    name = f"{folder.name}/adapter_model.safetensors"
    assert name in folder_paths.get_filename_list("loras")
    return name


def load(node_classes: dict[str, type], model: object, lora_name: str, strength=1.0, alpha_override=0.0):
    return tuple(
        node_classes["MLCMLoraLoader"]
        .execute(model=model, lora_name=lora_name, strength=strength, alpha_override=alpha_override)
        .args
    )


def test_comfyui_model_equals_the_diffusers_unet_before_the_lora(peft_case: dict) -> None:
    ours = unet_output(peft_case["patcher"], peft_case["x"], TIMESTEP, peft_case["context"])
    torch.testing.assert_close(ours, peft_case["base"], atol=1e-5, rtol=0)


def test_peft_folder_matches_peft_merge(peft_case: dict, node_classes, loras_dir: Path) -> None:
    name = install(peft_case["folder"], loras_dir)
    patched, report = load(node_classes, peft_case["patcher"], name)
    modules = len(peft_case["targeted"])
    assert f"applied {modules}/{modules} modules" in report
    assert f"{PEFT_ALPHA}/{PEFT_RANK} = 2" in report and "adapter_config.json" in report
    assert "family sd15" in report
    effect = (peft_case["reference"] - peft_case["base"]).abs().max()
    assert effect > 1e-2, "the LoRA must visibly change the output for this comparison to mean anything"
    ours = unet_output(patched, peft_case["x"], TIMESTEP, peft_case["context"])
    torch.testing.assert_close(ours, peft_case["reference"], atol=1e-5, rtol=0)
    # The input model is untouched: ComfyUI patched a clone.
    assert not peft_case["patcher"].patches
    untouched = unet_output(peft_case["patcher"], peft_case["x"], TIMESTEP, peft_case["context"])
    torch.testing.assert_close(untouched, peft_case["base"], atol=1e-5, rtol=0)


def test_alpha_override_replaces_the_config_alpha(peft_case: dict, node_classes, loras_dir: Path) -> None:
    name = install(peft_case["folder"], loras_dir)
    same, report = load(node_classes, peft_case["patcher"], name, alpha_override=PEFT_ALPHA)
    assert "alpha_override=8" in report
    ours = unet_output(same, peft_case["x"], TIMESTEP, peft_case["context"])
    torch.testing.assert_close(ours, peft_case["reference"], atol=1e-5, rtol=0)
    weaker, _ = load(node_classes, peft_case["patcher"], name, alpha_override=PEFT_ALPHA / 8)
    assert (
        unet_output(weaker, peft_case["x"], TIMESTEP, peft_case["context"]) - peft_case["reference"]
    ).abs().max() > 1e-3


def test_kohya_export_works_with_comfyui_stock_loader(peft_case: dict, tmp_path: Path) -> None:
    """The scale trap is fixed: our kohya export carries .alpha, so core LoraLoader applies it correctly."""
    import comfy.sd
    import comfy.utils

    path = tmp_path / "mlcm_tiny_sd15.safetensors"
    write_kohya_lora(path, read_lora(peft_case["folder"]), dtype=torch.float32)
    state_dict = comfy.utils.load_torch_file(str(path), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(peft_case["patcher"], None, state_dict, 1.0, 0.0)
    assert len(patched.patches) == len(peft_case["targeted"])
    ours = unet_output(patched, peft_case["x"], TIMESTEP, peft_case["context"])
    torch.testing.assert_close(ours, peft_case["reference"], atol=1e-5, rtol=0)


def test_metadata_segments_reach_the_schedule(peft_case: dict, node_classes, loras_dir: Path) -> None:
    write_kohya_lora(
        loras_dir / "mlcm_4seg.safetensors",
        read_lora(peft_case["folder"]),
        metadata=MLCMLoraMetadata(segments=4, base_family="sd15", recommended_steps=(2, 4)),
        dtype=torch.float32,
    )
    patched, report = load(node_classes, peft_case["patcher"], "mlcm_4seg.safetensors")
    assert "segments 4" in report
    assert patched.model_options["mlcm"]["segments"] == 4
    assert patched.model_options["mlcm"]["recommended_steps"] == [2, 4]
    assert patched.model_options["mlcm"]["supported_steps"] is None
    schedule = node_classes["MLCMSegmentSchedule"]
    text = schedule.execute(model=patched, steps=4, segments=0, selection="official", denoise=1.0).args[1]
    assert text == "999, 749, 499, 249"  # linspace(999, 0, 5): all four boundaries of a 4-segment LoRA
    with pytest.raises(ValueError, match="exceeds segments=4"):
        schedule.execute(model=patched, steps=5, segments=0, selection="official", denoise=1.0)


def test_metadata_supported_steps_reach_the_schedule(peft_case: dict, node_classes, loras_dir: Path) -> None:
    write_kohya_lora(
        loras_dir / "mlcm_1to4.safetensors",
        read_lora(peft_case["folder"]),
        metadata=MLCMLoraMetadata(segments=8, base_family="sd15", supported_steps=(1, 2, 3, 4)),
        dtype=torch.float32,
    )
    patched, _ = load(node_classes, peft_case["patcher"], "mlcm_1to4.safetensors")
    assert patched.model_options["mlcm"]["supported_steps"] == [1, 2, 3, 4]
    schedule = node_classes["MLCMSegmentSchedule"]
    text = schedule.execute(model=patched, steps=4, segments=0, selection="official", denoise=1.0).args[1]
    assert text == "999, 749, 499, 124"
    with pytest.raises(ValueError, match="this LoRA supports 1-4 steps"):
        schedule.execute(model=patched, steps=5, segments=0, selection="official", denoise=1.0)


def write_pairs(
    path: Path, pairs: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], alpha: float = 4.0
) -> None:
    """A kohya file with random LoRA pairs of the given (down, up) shapes."""
    generator = torch.Generator().manual_seed(6)
    modules = {
        name: LoraModule(torch.randn(down, generator=generator), torch.randn(up, generator=generator), alpha)
        for name, (down, up) in pairs.items()
    }
    write_kohya_lora(path, LoraWeights(modules, None, "kohya"), dtype=torch.float32)


def test_sdxl_lora_on_sd15_says_what_to_load(comfyui, node_classes, loras_dir: Path) -> None:
    # Cross-attention keys read 2048-wide SDXL text features; the SD1.5 model's read 768.
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    write_pairs(loras_dir / "sdxl_lora.safetensors", {name: ((4, 2048), (64, 4))})
    with pytest.raises(
        ValueError, match="This LoRA is for SDXL but the model is SD1.5; load an SDXL checkpoint"
    ):
        load(node_classes, tiny_model("sd15", init=False), "sdxl_lora.safetensors")


def test_misfit_and_unmapped_modules_are_refused(comfyui, node_classes, loras_dir: Path) -> None:
    model = tiny_model("sd15", init=False)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    write_pairs(loras_dir / "misfit.safetensors", {q: ((4, 48), (32, 4))})
    with pytest.raises(ValueError, match=r"1/1 LoRA modules do not fit this model's weight shapes"):
        load(node_classes, model, "misfit.safetensors")
    write_pairs(
        loras_dir / "partial.safetensors",
        {q: ((4, 32), (32, 4)), "lora_unet_down_blocks_7_resnets_0_conv1": ((4, 32, 3, 3), (32, 4, 1, 1))},
    )
    with pytest.raises(ValueError, match=r"1/2 LoRA modules match no weight .*down_blocks_7"):
        load(node_classes, model, "partial.safetensors")


def test_truncated_file_is_a_clear_error(comfyui, node_classes, loras_dir: Path) -> None:
    path = loras_dir / "truncated.safetensors"
    write_pairs(path, {"lora_unet_down_blocks_0_resnets_0_conv1": ((4, 32, 3, 3), (32, 4, 1, 1))})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(node_classes, tiny_model("sd15", init=False), "truncated.safetensors")


@torch.no_grad()
def patched_weights(patcher: object) -> dict[str, torch.Tensor]:
    patcher.patch_model()
    try:
        return {key: value.clone() for key, value in patcher.model.state_dict().items()}
    finally:
        patcher.unpatch_model()


def test_sdxl_lora_covers_every_target_module(comfyui, node_classes, loras_dir: Path) -> None:
    """Every MLCM target module of an SDXL-shaped UNet maps, and lands as W + strength * alpha/r * up @ down."""
    import comfy.utils

    model = tiny_model("sdxl", seed=2)
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    base = {key: value.clone() for key, value in model.model.state_dict().items()}
    pairs, targets = {}, {}
    for diffusers_key, ldm_key in diffusers_to_ldm.items():
        path = diffusers_key.removesuffix(".weight")
        present = f"diffusion_model.{ldm_key}" in base  # the map lists keys this UNet may not have
        if diffusers_key.endswith(".weight") and is_target_module(path) and present:
            weight = base[f"diffusion_model.{ldm_key}"]
            down = (4, *weight.shape[1:])
            pairs[kohya_name(path)] = (down, (weight.shape[0], 4, *([1, 1] if weight.ndim == 4 else [])))
            targets[kohya_name(path)] = f"diffusion_model.{ldm_key}"
    patterns_hit = {
        pattern
        for pattern in TARGET_MODULE_PATTERNS
        if any(p.endswith(pattern.replace(".", "_")) for p in pairs)
    }
    assert patterns_hit == set(TARGET_MODULE_PATTERNS)
    write_pairs(loras_dir / "sdxl_all.safetensors", pairs, alpha=2.0)
    patched, report = load(node_classes, model, "sdxl_all.safetensors", strength=0.5)
    assert f"applied {len(pairs)}/{len(pairs)}" in report and "family sdxl" in report
    weights = patched_weights(patched)
    lora = read_lora(loras_dir / "sdxl_all.safetensors")
    for name, key in targets.items():
        expected = base[key] + 0.5 * lora.modules[name].delta().reshape(base[key].shape)
        torch.testing.assert_close(weights[key], expected, atol=1e-5, rtol=1e-5)


def test_parsed_lora_is_cached_until_the_file_changes(
    peft_case: dict, pack, node_classes, loras_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader_module = pack.module("nodes.lora_loader")
    calls = []
    real_read = loader_module.read_lora

    def counting_read(path, **kwargs):
        calls.append(path)
        return real_read(path, **kwargs)

    monkeypatch.setattr(loader_module, "read_lora", counting_read)
    name = install(peft_case["folder"], loras_dir)
    load(node_classes, peft_case["patcher"], name)
    load(node_classes, peft_case["patcher"], name, strength=0.5)  # same file: parsed once
    assert len(calls) == 1
    load(node_classes, peft_case["patcher"], name, alpha_override=4.0)  # another alpha: parsed again
    assert len(calls) == 2
    config = loras_dir / PEFT_FOLDER / "adapter_config.json"
    config.write_text(config.read_text().replace(f'"lora_alpha": {PEFT_ALPHA}', '"lora_alpha": 16'))
    _, report = load(node_classes, peft_case["patcher"], name)  # the config changed: read again
    assert len(calls) == 3 and "16/4 = 4" in report


@pytest.fixture(scope="module")
def style_case(peft_case: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A second ("style") LoRA on the attention projections of the same UNet, and the reference output of
    the UNet with both adapters merged, by PEFT."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel(**SD15_DIFFUSERS_CONFIG)
    init_weights(unet, seed=3)  # the same base weights as peft_case
    unet.eval()
    mlcm_config = LoraConfig(r=PEFT_RANK, lora_alpha=PEFT_ALPHA, target_modules=list(TARGET_MODULE_PATTERNS))
    model = get_peft_model(copy.deepcopy(unet), mlcm_config)
    model.load_adapter(str(peft_case["folder"]), adapter_name="mlcm")
    style_config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model.add_adapter("style", style_config)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".style." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder = tmp_path_factory.mktemp("style") / "style_lora"
    model.save_pretrained(str(folder), selected_adapters=["style"])
    merged = model.merge_and_unload(adapter_names=["mlcm", "style"])
    with torch.no_grad():
        both = merged(peft_case["x"], torch.tensor([TIMESTEP]), encoder_hidden_states=peft_case["context"]).sample
    return {"folder": folder / "style", "both": both}


def test_an_mlcm_lora_stacks_with_a_style_lora_in_either_order(peft_case, style_case, tmp_path) -> None:
    """MLCM LoRA + style LoRA through ComfyUI's stock loader: the patches add, so either order gives the
    UNet with both merged (by PEFT)."""
    import comfy.sd
    import comfy.utils

    files = {}
    for name, folder in (("mlcm", peft_case["folder"]), ("style", style_case["folder"])):
        files[name] = tmp_path / f"{name}.safetensors"
        write_kohya_lora(files[name], read_lora(folder), dtype=torch.float32)

    def stacked(order: tuple[str, ...]) -> torch.Tensor:
        patcher = peft_case["patcher"]
        for name in order:
            state_dict = comfy.utils.load_torch_file(str(files[name]), safe_load=True)
            patcher, _ = comfy.sd.load_lora_for_models(patcher, None, state_dict, 1.0, 0.0)
        return unet_output(patcher, peft_case["x"], TIMESTEP, peft_case["context"])

    mlcm_first, style_first = stacked(("mlcm", "style")), stacked(("style", "mlcm"))
    torch.testing.assert_close(mlcm_first, style_case["both"], atol=1e-5, rtol=0)
    torch.testing.assert_close(style_first, style_case["both"], atol=1e-5, rtol=0)
    assert not torch.allclose(mlcm_first, peft_case["reference"], atol=1e-4)  # the style LoRA acts


def test_the_mlcm_loader_stacks_with_the_stock_loader(peft_case, style_case, node_classes, loras_dir, tmp_path):
    """The official PEFT folder through MLCM LoRA Loader, the style LoRA through the stock loader: same sum."""
    import comfy.sd
    import comfy.utils

    style_file = tmp_path / "style.safetensors"
    write_kohya_lora(style_file, read_lora(style_case["folder"]), dtype=torch.float32)
    style = comfy.utils.load_torch_file(str(style_file), safe_load=True)
    name = install(peft_case["folder"], loras_dir)
    after, _ = load(node_classes, comfy.sd.load_lora_for_models(peft_case["patcher"], None, style, 1.0, 0.0)[0], name)
    before, _ = comfy.sd.load_lora_for_models(load(node_classes, peft_case["patcher"], name)[0], None, style, 1.0, 0.0)
    for patched in (after, before):
        out = unet_output(patched, peft_case["x"], TIMESTEP, peft_case["context"])
        torch.testing.assert_close(out, style_case["both"], atol=1e-5, rtol=0)

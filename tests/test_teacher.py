"""Teacher loading (diffusers folder and single file), text encoding parity with diffusers, bad inputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_sd15, make_tiny_single_file, make_tiny_tokenizer, single_file_config_dir

from mlcm_train.models import single_file
from mlcm_train.models.teacher import alphas_cumprod_from_config, load_teacher
from mlcm_train.models.tokenizers import find_comfyui_root, find_tokenizers, load_tokenizers

FAMILIES = ("sd15", "sdxl")
PROMPTS = ["a cat", "the red dog at the door", ""]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (diffusers folder, single-file checkpoint) holding the same tiny weights."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for family in FAMILIES:
        checkpoint = make_tiny_single_file(root, family)
        out[family] = (single_file_config_dir(checkpoint), checkpoint)
    return out


def _config_only_copy(folder: Path, dest: Path) -> Path:
    """A copy of a diffusers folder without tokenizers (configs and weights only)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("tokenizer*"))
    return dest


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_folder_loads_frozen_with_family_and_schedule(tiny, family):
    from diffusers import DDPMScheduler

    teacher = load_teacher(tiny[family][0])
    assert teacher.family == family
    modules = [teacher.unet, teacher.vae, *teacher.text_encoders]
    assert len(teacher.text_encoders) == (2 if family == "sdxl" else 1)
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(not m.training for m in modules)
    reference = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).alphas_cumprod
    assert teacher.alphas_cumprod.dtype == torch.float64 and teacher.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(teacher.alphas_cumprod.float(), reference, rtol=1e-6, atol=0)
    # Tiny configs: latent side 8, VAE factor 2 -> 16 px native resolution.
    assert teacher.resolution == 16
    assert teacher.latent_shape(3) == (3, 4, 8, 8)
    assert teacher.latent_shape(2, resolution=32) == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        teacher.latent_shape(1, resolution=15)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompts_matches_diffusers_pipeline(tiny, family):
    from diffusers import DiffusionPipeline

    folder = tiny[family][0]
    teacher = load_teacher(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    cond = teacher.encode_prompts(PROMPTS)
    uncond = teacher.uncond(len(PROMPTS))
    assert len(cond) == len(PROMPTS) and cond.prompt_embeds.shape[1] == 77
    if family == "sd15":
        embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        assert cond.pooled_embeds is None and cond.time_ids is None
        assert set(cond.unet_kwargs()) == {"encoder_hidden_states"}
        torch.testing.assert_close(cond.prompt_embeds, embeds)
        torch.testing.assert_close(uncond.prompt_embeds, negative)  # SD1.5 null condition = "" encoded
    else:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
        torch.testing.assert_close(cond.prompt_embeds, embeds)
        torch.testing.assert_close(cond.pooled_embeds, pooled)
        # SDXL null condition = zeros (force_zeros_for_empty_prompt), same micro-conditioning as cond.
        assert torch.count_nonzero(negative) == 0 and torch.count_nonzero(negative_pooled) == 0
        torch.testing.assert_close(uncond.prompt_embeds, negative)
        torch.testing.assert_close(uncond.pooled_embeds, negative_pooled)
        time_ids = pipe._get_add_time_ids(
            (16, 16), (0, 0), (16, 16), dtype=embeds.dtype, text_encoder_projection_dim=pooled.shape[-1]
        )
        torch.testing.assert_close(cond.time_ids, time_ids.expand(len(PROMPTS), -1))
        torch.testing.assert_close(uncond.time_ids, cond.time_ids)
        assert set(cond.unet_kwargs()["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    # The conditioning drives the UNet as is.
    latents = torch.randn(teacher.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(0))
    out = teacher.unet(latents, torch.tensor(999), **cond.unet_kwargs()).sample
    assert out.shape == latents.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_round_trip_gives_identical_teacher(tiny, family):
    folder, checkpoint = tiny[family]
    a = load_teacher(folder)
    b = load_teacher(checkpoint, config_dir=folder)
    assert b.family == family
    for ma, mb in [(a.unet, b.unet), (a.vae, b.vae), *zip(a.text_encoders, b.text_encoders)]:
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(not p.requires_grad for p in b.unet.parameters()) and not b.unet.training
    cond = b.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, a.encode_prompts(PROMPTS).prompt_embeds, rtol=0, atol=0)
    latents = torch.randn(b.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    out_a = a.unet(latents, t, **cond.unet_kwargs()).sample
    out_b = b.unet(latents, t, **cond.unet_kwargs()).sample
    assert torch.equal(out_a, out_b)


def test_our_ldm_layout_matches_diffusers_single_file_reader(tiny):
    """Independent reference: diffusers' own LDM->diffusers converter reads our single file identically."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder, checkpoint = tiny["sd15"]
    ours = load_teacher(folder)
    kwargs = {"config": str(folder), "local_files_only": True}
    for module, cls, sub in [(ours.unet, UNet2DConditionModel, "unet"), (ours.vae, AutoencoderKL, "vae")]:
        theirs = cls.from_single_file(str(checkpoint), subfolder=sub, **kwargs).state_dict()
        mine = module.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_load_in_half_precision(tiny):
    folder, checkpoint = tiny["sdxl"]
    teacher = load_teacher(checkpoint, config_dir=folder, dtype=torch.bfloat16)
    assert teacher.dtype == torch.bfloat16
    cond = teacher.encode_prompts(["a cat"])
    assert cond.prompt_embeds.dtype == cond.pooled_embeds.dtype == cond.time_ids.dtype == torch.bfloat16


def test_single_file_tokenizer_from_comfyui_root(tiny, tmp_path):
    folder, checkpoint = tiny["sdxl"]
    configs = _config_only_copy(folder, tmp_path / "configs")
    comfy = tmp_path / "ComfyUI"
    make_tiny_tokenizer(comfy / "comfy" / "sd1_tokenizer")
    teacher = load_teacher(checkpoint, config_dir=configs, comfyui_root=comfy)
    reference = load_teacher(folder)
    # ComfyUI's one tokenizer serves both SDXL encoders; the bigG copy pads with "!" as SDXL's tokenizer_2 does.
    ids = [t("a cat", padding="max_length", max_length=77).input_ids for t in teacher.tokenizers]
    ref_ids = [t("a cat", padding="max_length", max_length=77).input_ids for t in reference.tokenizers]
    assert ids == ref_ids and ids[0][-1] != ids[1][-1]
    torch.testing.assert_close(
        teacher.encode_prompts(PROMPTS).prompt_embeds, reference.encode_prompts(PROMPTS).prompt_embeds
    )


def test_tokenizer_path_flag_takes_precedence(tiny, tmp_path):
    folder, checkpoint = tiny["sd15"]
    configs = _config_only_copy(folder, tmp_path / "configs")
    teacher = load_teacher(
        checkpoint, config_dir=configs, tokenizer_path=make_tiny_tokenizer(tmp_path / "tok")
    )
    assert teacher.encode_prompts(["a cat"]).prompt_embeds.shape == (1, 77, 32)
    with pytest.raises(FileNotFoundError, match="tokenizer_path .*nowhere"):
        load_teacher(checkpoint, config_dir=configs, tokenizer_path=tmp_path / "nowhere")


def test_missing_tokenizer_error_names_every_place_searched(tiny, tmp_path):
    folder, checkpoint = tiny["sd15"]
    configs = _config_only_copy(folder, tmp_path / "configs")
    with pytest.raises(FileNotFoundError) as info:
        load_teacher(checkpoint, config_dir=configs, comfyui_root=tmp_path / "NoComfy")
    message = str(info.value)
    assert "tokenizer_path: not given" in message
    assert str(configs / "tokenizer") in message
    assert str(tmp_path / "NoComfy") in message
    assert "--tokenizer-path" in message
    with pytest.raises(FileNotFoundError, match="no folder at or above"):
        find_tokenizers(1, search_start=tmp_path)


def test_comfyui_root_found_by_walking_up(tmp_path):
    root = tmp_path / "ComfyUI"
    make_tiny_tokenizer(root / "comfy" / "sd1_tokenizer")
    package = root / "custom_nodes" / "ComfyUI-MLCM" / "mlcm_train"
    package.mkdir(parents=True)
    assert find_comfyui_root(package) == root
    assert find_comfyui_root(tmp_path / "elsewhere") is None
    source = find_tokenizers(2, search_start=package)
    assert source.folders == (root / "comfy" / "sd1_tokenizer",) * 2 and source.reuse_first


def test_wrong_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="without model_index.json"):
        load_teacher(tmp_path)


def test_corrupt_and_truncated_checkpoints_are_rejected(tiny, tmp_path):
    folder, checkpoint = tiny["sd15"]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_teacher(garbage)
    truncated = tmp_path / "truncated.safetensors"
    data = checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_teacher(truncated, config_dir=folder)


def test_corrupt_weights_in_a_diffusers_folder(tiny, tmp_path):
    folder = shutil.copytree(tiny["sd15"][0], tmp_path / "copy")
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not load the unet"):
        load_teacher(folder)


def test_v_prediction_metadata_is_rejected_before_loading(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vpred.safetensors"
    save_file(
        {"cond_stage_model.transformer.text_model.x": torch.zeros(1)},
        str(path),
        metadata={"modelspec.prediction_type": "v"},
    )
    with pytest.raises(ValueError, match="v-prediction"):
        load_teacher(path)


def test_checkpoint_missing_a_tensor_fails_loudly(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, checkpoint = tiny["sd15"]
    state = load_file(str(checkpoint))
    del state["model.diffusion_model.out.2.weight"]
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken))
    with pytest.raises(ValueError, match=r"out\.2\.weight"):
        load_teacher(broken, config_dir=folder)


def test_config_that_does_not_describe_the_checkpoint_is_rejected(tiny, tmp_path):
    # The shipped real-size SD1.5 configs cannot hold the tiny weights: an error, not random weights.
    with pytest.raises(ValueError, match="does not match the config"):
        load_teacher(tiny["sd15"][1], tokenizer_path=make_tiny_tokenizer(tmp_path))


def test_family_detection_from_keys():
    assert single_file.detect_family(["model.diffusion_model.label_emb.0.0.weight", "x"]) == "sdxl"
    assert single_file.detect_family(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert (
        single_file.detect_family(["cond_stage_model.transformer.text_model.x", "model.diffusion_model.a"])
        == "sd15"
    )
    with pytest.raises(ValueError, match="SD2"):
        single_file.detect_family(["cond_stage_model.model.ln_final.weight", "model.diffusion_model.a"])
    with pytest.raises(ValueError, match="LoRA"):
        single_file.detect_family(["lora_unet_down_blocks_0.lora_up.weight"])


def test_v_prediction_teacher_rejected(tmp_path):
    with pytest.raises(ValueError, match="epsilon"):
        alphas_cumprod_from_config({"prediction_type": "v_prediction", "beta_start": 0.1, "beta_end": 0.2})
    with pytest.raises(ValueError, match="v-prediction"):
        single_file.check_prediction_type({"v_pred": torch.zeros(1)}, tmp_path / "x.safetensors")


def test_tiny_fixtures_are_deterministic_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = build_tiny_sd15().unet.state_dict(), build_tiny_sd15().unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.comfyui
@pytest.mark.skipif(
    not os.environ.get("MLCM_COMFYUI_PATH"), reason="set MLCM_COMFYUI_PATH to a ComfyUI checkout"
)
def test_real_comfyui_tokenizer_files(tiny):
    root = Path(os.environ["MLCM_COMFYUI_PATH"])
    source = find_tokenizers(2, comfyui_root=root)
    clip_l, clip_g = load_tokenizers(source, max_length=77)
    # Known CLIP BPE ids: <start> a photo of a cat <end>; ComfyUI's config says 8192 tokens, we use 77.
    ids = clip_l("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407] and len(ids) == 77
    assert ids[7] == 49407 and clip_g("a", padding="max_length", max_length=77).input_ids[3] == 0
    assert clip_l.model_max_length == 77
    # The real vocabulary does not fit the tiny text encoder: a clear error, not an index error later.
    folder, checkpoint = tiny["sd15"]
    with pytest.raises(ValueError, match="49408 tokens"):
        load_teacher(checkpoint, config_dir=folder, tokenizer_path=root / "comfy" / "sd1_tokenizer")

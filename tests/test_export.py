"""Export: the trained LoRA applies at the trained scale in our reader, PEFT's merge and diffusers' loader."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import build_tiny_sd15

from mlcm.lora import kohya_name, read_lora
from mlcm_train.config import LORA_TARGET_MODULES, DistillConfig
from mlcm_train.distill import export_distilled
from mlcm_train.models.student import adapters_disabled, attach_lora, lora_parameters, lora_state_dict
from mlcm_train.run.checkpoint import TrainState

RANK, ALPHA = 4, 2.0  # alpha != rank on purpose: scale 0.5 must survive every format


@pytest.fixture(scope="module")
def trained():
    """A tiny SD1.5 UNet with a LoRA whose B weights are random (as after training), plus its base copy."""
    pipe = build_tiny_sd15()
    base = copy.deepcopy(pipe.unet)
    unet = pipe.unet
    attach_lora(unet, rank=RANK, alpha=ALPHA, targets=LORA_TARGET_MODULES)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lora_parameters(unet):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    config = DistillConfig(
        teacher="t", prompts="p", lora_rank=RANK, lora_alpha=ALPHA, segments=8, stages=(1,)
    )
    state = TrainState(global_step=7, phase=1, phase_step=0, cursor=0, family="sd15", prompt_count=3)
    return pipe, base, unet, config, state


def _peft_deltas(base: torch.nn.Module, unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Effective weight change per targeted module, from PEFT's own merge (get_delta_weight)."""
    from peft.tuners.lora import LoraLayer

    deltas = {}
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer):
            deltas[name] = module.get_delta_weight("default").float()
    assert deltas
    return deltas


def test_kohya_export_reads_back_with_trained_scale_and_metadata(trained, tmp_path):
    _, base, unet, config, state = trained
    (path,) = export_distilled(lora_state_dict(unet), config, state, tmp_path, formats=["kohya"])
    lora = read_lora(path)
    deltas = _peft_deltas(base, unet)
    assert set(lora.modules) == {kohya_name(name) for name in deltas}
    for name, delta in deltas.items():
        module = lora.modules[kohya_name(name)]
        assert module.alpha == ALPHA
        torch.testing.assert_close(module.delta(), delta, atol=2e-4, rtol=2e-3)  # fp16 storage
    meta = lora.metadata
    assert meta.segments == 8 and meta.base_family == "sd15" and meta.stages == ("mlcd",)
    assert meta.training["config_hash"] == config.config_hash()
    assert meta.training["prompt_count"] == 3 and meta.training["global_step"] == 7
    assert meta.training["lora_alpha"] == ALPHA and meta.training["config"]["lora_rank"] == RANK


def test_peft_folder_export_reads_back(trained, tmp_path):
    _, base, unet, config, state = trained
    (folder,) = export_distilled(lora_state_dict(unet), config, state, tmp_path, formats=["peft"])
    lora = read_lora(folder)
    for name, delta in _peft_deltas(base, unet).items():
        torch.testing.assert_close(lora.modules[kohya_name(name)].delta(), delta, atol=1e-6, rtol=1e-5)


def test_diffusers_file_loads_in_load_lora_weights_at_trained_scale(trained, tmp_path):
    """diffusers' load_lora_weights on a fresh pipeline reproduces the student's output exactly."""
    from diffusers import StableDiffusionPipeline

    pipe, _, unet, config, state = trained
    (path,) = export_distilled(lora_state_dict(unet), config, state, tmp_path, formats=["diffusers"])
    fresh = build_tiny_sd15()
    assert isinstance(fresh, StableDiffusionPipeline)
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([999, 400])
    text = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        ours = unet(z, t, encoder_hidden_states=text).sample
        theirs = fresh.unet(z, t, encoder_hidden_states=text).sample
        with adapters_disabled(unet):
            teacher = unet(z, t, encoder_hidden_states=text).sample
    assert (ours - teacher).abs().max() > 1e-3  # the LoRA matters, so the comparison means something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_only_lora_trainable_and_student_starts_at_teacher():
    pipe = build_tiny_sd15()
    unet = pipe.unet
    params = attach_lora(unet, rank=RANK, alpha=ALPHA, targets=LORA_TARGET_MODULES)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in params}
    assert all(p.dtype == torch.float32 for p in params)
    z, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        student = unet(z, t, encoder_hidden_states=text).sample
        with adapters_disabled(unet):
            teacher = unet(z, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(student, teacher)  # B = 0 at init


def test_lora_stays_fp32_over_bf16_base():
    unet = build_tiny_sd15().unet
    params = attach_lora(
        unet, rank=RANK, alpha=ALPHA, targets=LORA_TARGET_MODULES, weight_dtype=torch.bfloat16
    )
    assert all(p.dtype == torch.float32 for p in params)
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)


def test_bad_export_format_is_rejected(trained, tmp_path):
    _, _, unet, config, state = trained
    with pytest.raises(ValueError, match="unknown"):
        export_distilled(lora_state_dict(unet), config, state, tmp_path, formats=["ckpt"])


def test_init_from_exported_lora_reproduces_the_student(trained, tmp_path):
    """--init-lora: a kohya export loaded into a fresh adapter (other alpha) gives the same UNet outputs."""
    from mlcm_train.models.student import load_lora_file

    _, _, unet, config, state = trained
    (path,) = export_distilled(lora_state_dict(unet), config, state, tmp_path, formats=["kohya"])
    fresh = build_tiny_sd15().unet
    attach_lora(fresh, rank=RANK, alpha=float(RANK), targets=LORA_TARGET_MODULES)  # scale 1, not 0.5
    assert load_lora_file(fresh, str(path), rank=RANK, alpha=float(RANK)) == len(read_lora(path).modules)
    z, t, text = torch.randn(1, 4, 8, 8), torch.tensor([700]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(z, t, encoder_hidden_states=text).sample,
            unet(z, t, encoder_hidden_states=text).sample,
            atol=1e-3,
            rtol=1e-3,  # the kohya file stores fp16
        )
    other = build_tiny_sd15().unet
    attach_lora(other, rank=2, alpha=2.0, targets=LORA_TARGET_MODULES)
    with pytest.raises(ValueError, match="--lora-rank 4"):
        load_lora_file(other, str(path), rank=2, alpha=2.0)


def test_every_export_has_a_model_card_with_its_sampling_and_training_facts(trained, tmp_path):
    _, _, unet, config, state = trained
    (path,) = export_distilled(lora_state_dict(unet), config, state, tmp_path, formats=["kohya"])
    card = path.with_suffix(".md").read_text(encoding="utf-8")
    assert card.startswith(f"# {path.stem}\n") and "An MLCM LoRA for SD1.5" in card
    assert "| segments | 8 |" in card and "| step counts | 1-8;" in card
    assert "cfg 1.0" in card and "scheduler `mlcm_segments`" in card
    assert f"rank {RANK}, alpha {ALPHA:g} (scale {ALPHA / RANK:g})" in card
    assert "7 optimizer steps" in card and "3 prompts" in card and config.config_hash() in card


def test_progressive_rounds_record_their_sampling_grid_and_step_counts():
    from mlcm_train.distill import build_metadata

    done = TrainState(global_step=3, phase=3, phase_step=0, cursor=0, family="sd15", prompt_count=3)
    nested = DistillConfig(teacher="t", prompts="p", progressive=(8, 4, 2), stages=(1,))
    meta = build_metadata(nested, done)
    assert meta.segments == 8 and meta.supported_steps == (1, 2, 3, 4, 5, 6, 7, 8)
    # 3 segments put boundaries at 666 and 333, off the 8-segment grid: the last round's grid is kept.
    apart = DistillConfig(teacher="t", prompts="p", progressive=(8, 3), stages=(1,))
    meta = build_metadata(apart, TrainState(2, 2, 0, 0, "sd15", 3))
    assert meta.segments == 3 and meta.supported_steps == (1, 2, 3)
    single = build_metadata(DistillConfig(teacher="t", prompts="p", segments=4), done)
    assert single.segments == 4 and single.supported_steps == (1, 2, 3, 4)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_exported_files_follow_the_umask_like_any_new_file(trained, tmp_path, umask, mode):
    import os
    import stat

    _, _, unet, config, state = trained
    previous = os.umask(umask)
    try:
        written = export_distilled(lora_state_dict(unet), config, state, tmp_path, formats=["kohya", "peft"])
    finally:
        os.umask(previous)
    files = [f for path in written for f in (path.rglob("*") if path.is_dir() else [path]) if f.is_file()]
    assert any(f.name == "adapter_model.safetensors" for f in files)
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {mode}


def test_model_card_survives_evaluations_that_differ_between_rows():
    from mlcm.lora import MLCMLoraMetadata
    from mlcm_train.run.export import LoraShape, model_card

    reward = {"evaluations": {"first": {"reward@2": 1.0, "reward@4": 2.0}, "kept": {"reward@4": 3.0}}}
    meta = MLCMLoraMetadata(segments=8, base_family="sd15", training={"config": None, "reward": reward})
    card = model_card("x", LoraShape(4, 8.0, ()), meta)
    assert "| reward@4 | 2 | 3 |" in card and "reward@2" not in card


def test_sampling_grid_of_a_phase_boundary_checkpoint_is_the_round_just_finished():
    off_grid = DistillConfig(teacher="t", prompts="p", progressive=(8, 3), stages=(1, 2))
    assert off_grid.sampling_grid(2, 0) == 8  # round 8 done (both stages), round 3 not started
    assert off_grid.sampling_grid(2, 1) == 3  # round 3 started

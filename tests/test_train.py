"""The distill loop end to end on tiny SD1.5/SDXL teachers: CLI, only-LoRA training, export, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TINY_PROMPTS as PROMPTS
from tiny_models import config_flags, make_tiny_single_file, single_file_config_dir

from mlcm.lora import read_lora
from mlcm_train.cli import main
from mlcm_train.config import DistillConfig
from mlcm_train.distill import train_distill
from mlcm_train.models.embeddings import EmbeddingCache
from mlcm_train.models.teacher import load_teacher
from mlcm_train.run.checkpoint import list_checkpoints, load_checkpoint


def tiny_config(teacher, prompts, out, **changes) -> DistillConfig:
    """A few-step run: rank 4, batch 2, every feature on its cheapest setting."""
    values = dict(
        teacher=str(teacher),
        prompts=str(prompts),
        output_dir=str(out),
        stages=(1, 2),
        stage1_steps=2,
        stage2_steps=1,
        batch_size=2,
        lora_rank=4,
        lora_alpha=4.0,  # scale 1.0, at which these tests' tolerances were set (the default alpha is 8)
        checkpoint_every=100,
        sample_every=0,
        log_every=1,
        stage2_q=2,
        stage2_p=1,
    )
    values.update(changes)
    return DistillConfig(**values)


def _flags(config: DistillConfig) -> list[str]:
    return config_flags(config, skip=("lora_targets",))


def _base_weights_unchanged(unet: torch.nn.Module, folder) -> None:
    """Every non-LoRA weight of the trained UNet equals the teacher's file on disk."""
    saved = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    current = {
        name.replace(".base_layer.", "."): p
        for name, p in unet.state_dict().items()
        if ".lora_A." not in name and ".lora_B." not in name
    }
    assert set(current) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(current[name], tensor, rtol=0, atol=0)


def test_sd15_cli_end_to_end_only_lora_changes(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", sample_every=3, export_formats=("kohya", "peft"))
    assert main(["distill", *_flags(config)]) == 0
    run = tmp_path / "run"
    lora = read_lora(run / "export" / "mlcm_sd15_8seg.safetensors")
    assert lora.metadata.segments == 8 and lora.metadata.base_family == "sd15"
    assert lora.metadata.stages == ("mlcd", "inter_segment")
    assert lora.metadata.training["config_hash"] == config.config_hash()
    assert lora.metadata.training["prompt_count"] == 4 and lora.metadata.training["global_step"] == 3
    assert all(module.alpha == 4.0 for module in lora.modules.values())
    assert any(module.up.abs().max() > 0 for module in lora.modules.values())  # B moved off zero: it trained
    assert (run / "samples" / "step-0000003.png").is_file()
    assert json.loads((run / "config.json").read_text())["lora_rank"] == 4
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 3] and all(r["loss"] >= 0 for r in rows)
    # export from the checkpoint gives the same kohya file
    assert main(["export", str(run), "--out", str(tmp_path / "again")]) == 0
    again = read_lora(tmp_path / "again" / "mlcm_sd15_8seg.safetensors")
    for name, module in lora.modules.items():
        torch.testing.assert_close(again.modules[name].up, module.up)


def test_sd15_only_lora_weights_change_in_memory(sd15, tmp_path):
    teacher, prompts = sd15
    result = train_distill(tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=1))
    _base_weights_unchanged(result.unet, teacher)


def test_sdxl_single_file_teacher_end_to_end(tmp_path):
    checkpoint = make_tiny_single_file(tmp_path, "sdxl")
    (tmp_path / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    config_dir = single_file_config_dir(checkpoint)
    config = tiny_config(
        checkpoint,
        tmp_path / "prompts.txt",
        tmp_path / "run",
        teacher_config=str(config_dir),
        tokenizer_path=str(config_dir),
        segments=4,
        sample_steps=(1, 2, 4),
        resolution=32,  # not the native 16: SDXL time ids and latents must follow it
        sample_every=3,
    )
    assert main(["distill", *_flags(config)]) == 0
    assert (tmp_path / "run" / "samples" / "step-0000003.png").is_file()
    lora = read_lora(tmp_path / "run" / "export" / "mlcm_sdxl_4seg.safetensors")
    assert lora.metadata.segments == 4 and lora.metadata.base_family == "sdxl"
    assert lora.metadata.recommended_steps == (1, 2, 4)
    teacher = load_teacher(config_dir)
    cache = EmbeddingCache(teacher, ["a cat", "a dog"], resolution=32)
    cond = cache.get([1, 0])
    assert cond.time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    targeted = [name for name, _ in teacher.unet.named_modules() if name.endswith(("to_q", "conv1"))]
    assert {f"lora_unet_{n.replace('.', '_')}" for n in targeted} <= set(lora.modules)


def test_resume_continues_exactly(sd15, tmp_path):
    """3 steps straight == 1 step, stop, resume (mid stage 1, then across the stage boundary)."""
    teacher, prompts = sd15
    straight = train_distill(tiny_config(teacher, prompts, tmp_path / "a", stage1_steps=2, stage2_steps=1))
    split_config = tiny_config(teacher, prompts, tmp_path / "b", stage1_steps=2, stage2_steps=1)
    first = train_distill(split_config, stop_after=1)
    assert first.state.global_step == 1 and first.exported == []
    second = train_distill(split_config, resume=tmp_path / "b")
    assert second.state.global_step == 3
    torch.testing.assert_close(straight.losses[1:], second.losses, rtol=1e-5, atol=1e-9)
    a = load_checkpoint(tmp_path / "a").lora
    b = load_checkpoint(tmp_path / "b").lora
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


def test_existing_run_needs_resume(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=1)
    train_distill(config)
    assert list_checkpoints(tmp_path / "run")
    with pytest.raises(ValueError, match="--resume"):
        train_distill(config)


def test_pregenerated_trajectories_feed_stage1(sd15, tmp_path):
    teacher, prompts = sd15
    states = tmp_path / "states"
    flags = ["--teacher", str(teacher), "--prompts", str(prompts), "--batch-size", "2"]
    assert main(["trajectories", str(states), "--samples", "6", "--shard-size", "4", *flags]) == 0
    assert sorted(p.name for p in states.glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    config = tiny_config(
        teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=2, trajectories=str(states)
    )
    result = train_distill(config, profile=True)
    assert result.state.global_step == 2 and all(loss >= 0 for loss in result.losses)
    assert "teacher_trajectory" not in result.timings  # no teacher trajectory ran online
    # a folder made for another run is refused with the differing fields named
    other = tiny_config(teacher, prompts, tmp_path / "run2", stages=(1,), trajectories=str(states), skip=10)
    with pytest.raises(ValueError, match="skip"):
        train_distill(other)


def test_accumulation_and_checkpointing_match_one_big_batch(sd15, tmp_path):
    """batch 4 == batch 2 x 2 micro-steps (with gradient checkpointing on): same samples, same mean gradient."""
    teacher, prompts = sd15
    big = train_distill(
        tiny_config(teacher, prompts, tmp_path / "a", stages=(1,), stage1_steps=2, batch_size=4)
    )
    small = train_distill(
        tiny_config(
            teacher,
            prompts,
            tmp_path / "b",
            stages=(1,),
            stage1_steps=2,
            batch_size=2,
            gradient_accumulation=2,
            gradient_checkpointing=True,
        )
    )
    assert small.unet.is_gradient_checkpointing and not big.unet.is_gradient_checkpointing
    torch.testing.assert_close(small.losses, big.losses, rtol=1e-4, atol=1e-9)
    a, b = load_checkpoint(tmp_path / "a").lora, load_checkpoint(tmp_path / "b").lora
    moved = max(t.abs().max().item() for k, t in a.items() if ".lora_B." in k)
    for name in a:
        assert (a[name] - b[name]).abs().max().item() < 0.05 * moved, name


def test_text_encoders_are_released_after_encoding_unless_kept(sd15):
    from mlcm_train.config import DistillConfig
    from mlcm_train.run.setup import Run

    teacher, prompts = sd15
    released = Run.inputs_only(DistillConfig(teacher=str(teacher), prompts=str(prompts)))
    assert released.teacher.text_encoders == () and len(released.cond([0, 1])) == 2
    kept = Run.inputs_only(DistillConfig(teacher=str(teacher), prompts=str(prompts), keep_text_encoders=True))
    assert len(kept.teacher.text_encoders) == 1

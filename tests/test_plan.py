"""--dry-run's memory plan counts the frozen UNet and the LoRA state exactly, from configs alone."""

from __future__ import annotations

from tiny_models import make_tiny_single_file

from mlcm_train.cli import main
from mlcm_train.config import DistillConfig
from mlcm_train.models.student import attach_lora
from mlcm_train.models.teacher import load_teacher
from mlcm_train.run.plan import plan_weights


def test_counts_match_the_attached_lora_of_the_real_tiny_teacher(sd15):
    teacher, prompts = sd15
    config = DistillConfig(teacher=str(teacher), prompts=str(prompts), lora_rank=4)
    plan = plan_weights(config, "no")
    unet = load_teacher(teacher).unet
    frozen = sum(p.numel() for p in unet.parameters())
    lora = sum(p.numel() for p in attach_lora(unet, rank=4, alpha=8.0, targets=config.lora_targets))
    assert (plan.family, plan.unet_parameters, plan.lora_parameters) == ("sd15", frozen, lora)
    assert plan.frozen_bytes == 4 * frozen and plan.lora_bytes == 16 * lora
    eight_bit = plan_weights(config.replace(optimizer="adamw8bit"), "bf16")
    assert eight_bit.frozen_bytes == 2 * frozen and eight_bit.lora_bytes == 10 * lora


def test_a_single_file_teacher_is_planned_on_the_shipped_full_size_config(tmp_path):
    """The tiny checkpoint says SD1.5; the shipped SD1.5 config gives the full UNet: 859,520,964 parameters,
    and the default rank-64 LoRA on the 14 patterns 67,252,224 (both as attach_lora counted them on a
    full-shape SD1.5 UNet)."""
    checkpoint = make_tiny_single_file(tmp_path)
    plan = plan_weights(DistillConfig(teacher=str(checkpoint), prompts="p"), "bf16")
    assert (plan.unet_parameters, plan.lora_parameters) == (859_520_964, 67_252_224)


def test_the_sdxl_plan_matches_the_official_lora_size(tmp_path):
    """196.75M LoRA parameters at rank 64 on the 14 patterns: the size of the authors' SDXL release."""
    checkpoint = make_tiny_single_file(tmp_path, family="sdxl")
    plan = plan_weights(DistillConfig(teacher=str(checkpoint), prompts="p"), "bf16")
    assert (plan.family, plan.unet_parameters, plan.lora_parameters) == ("sdxl", 2_567_463_684, 196_751_360)
    assert round(plan.frozen_bytes / 2**30, 2) == 4.78 and round(plan.lora_bytes / 2**30, 2) == 2.93


def test_dry_run_logs_the_plan_and_keeps_stdout_json(sd15, capsys):
    teacher, prompts = sd15
    assert main(["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.lstrip().startswith("{") and "plan: sd15 UNet" in err and "plan: LoRA" in err
    assert main(["distill", "--teacher", str(teacher / "missing"), "--prompts", "p", "--dry-run"]) == 0
    assert "no memory plan" in capsys.readouterr().err  # a dry run still prints the config

"""--dry-run's plan: the frozen UNet and the LoRA state counted exactly from configs, activations and FLOPs
from a meta-device trace checked against real tensors, and the estimated peak against a measured one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_sd15, make_tiny_single_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mlcm_train.cli import main
from mlcm_train.config import DistillConfig
from mlcm_train.models.student import attach_lora
from mlcm_train.models.teacher import load_teacher
from mlcm_train.run.plan import _meta_unet, expected_mds_steps, plan_weights, teacher_configs
from mlcm_train.run.trace import _SavedBytes, trace_call


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
    assert "no plan: cannot read" in capsys.readouterr().err  # a dry run still prints the config


# --- activations and time: the meta trace against real tensors, the estimate against a measurement ---------


def _lora_unet(teacher):
    unet = load_teacher(teacher).unet
    attach_lora(unet, rank=4, alpha=8.0, targets=DistillConfig(teacher="t", prompts="p").lora_targets)
    return unet


def test_the_meta_trace_keeps_what_a_real_backward_keeps(sd15):
    """Saved-tensor bytes and FLOPs of the meta trace against the same count on the real tiny UNet on the CPU
    (whose attention runs a fused kernel): the trace's stand-in for fused attention keeps the same bytes."""
    teacher, prompts = sd15
    config = DistillConfig(teacher=str(teacher), prompts=str(prompts), lora_rank=4, batch_size=3)
    meta = _meta_unet(config, teacher_configs(config), 4, 8.0, config.lora_targets, torch.float32)
    traced = trace_call(meta.unet, meta.inputs(3))

    real = _lora_unet(teacher)
    inputs = {k: torch.randn_like(v, device="cpu") if k == "sample" or k == "encoder_hidden_states" else v
              for k, v in meta.inputs(3)().items()}  # fmt: skip
    inputs["timestep"] = torch.full((3,), 500)
    saved = _SavedBytes(real)
    with saved.counting():
        out = real(**inputs)[0]
    # FLOPs with attention as explicit matmuls (the fused CPU kernel has no FLOP formula in torch).
    with FlopCounterMode(display=False) as flops, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        real(**inputs)
    assert traced.forward_flops == flops.get_total_flops()
    assert abs(traced.saved_bytes - saved.total) <= 0.05 * saved.total, (traced.saved_bytes, saved.total)
    out.sum().backward()  # what was counted is a graph that trains the LoRA


def test_a_trace_counts_a_linear_layer_exactly():
    """Independent reference: y = x W^T + LoRA on (B, n) inputs: 2*B*n*m forward FLOPs plus the LoRA's; what
    backward keeps is the input (shared by base and LoRA) and the LoRA's hidden activation."""
    from peft import LoraConfig, inject_adapter_in_model

    batch, n, m, r = 5, 64, 32, 4
    with torch.device("meta"):
        model = torch.nn.Sequential()
        model.add_module("proj", torch.nn.Linear(n, m, bias=False))
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]), model)
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)

    def inputs():
        return {"input": torch.empty(batch, n, device="meta")}

    cost = trace_call(model, inputs)
    assert cost.forward_flops == 2 * batch * (n * m + n * r + r * m)
    assert cost.saved_bytes == 4 * batch * (n + r)


def test_checkpointing_traces_less_than_keeping_everything(sd15):
    teacher, prompts = sd15
    config = DistillConfig(teacher=str(teacher), prompts=str(prompts), lora_rank=4)
    meta = _meta_unet(config, teacher_configs(config), 4, 8.0, config.lora_targets, torch.float32)
    plain = trace_call(meta.unet, meta.inputs(4))
    checkpointed = trace_call(meta.unet, meta.inputs(4), checkpointing=True)
    assert checkpointed.saved_bytes < plain.saved_bytes
    assert checkpointed.backward_flops == plain.backward_flops + plain.forward_flops  # the recompute


def test_expected_teacher_steps_of_the_multistep_strategy():
    """L = M - s with s uniform over 0..M-1: 4.5 steps a sample for M = 8; a batch call serves every
    sample still stepping, so a batch of 4 needs E[max of 4 draws] calls (7.0 for uniform 1..8: the exact
    value is sum over k of 1 - ((k-1)/8)^4 = 6.85, less the rare t_m = T draws that need no step)."""
    config = DistillConfig(teacher="t", prompts="p")
    per_sample, calls = expected_mds_steps(config, 8, 1)
    assert abs(per_sample - 4.5) < 0.1 and abs(calls - per_sample) < 1e-9
    _, calls4 = expected_mds_steps(config, 8, 4)
    exact = sum(1 - ((k - 1) / 8) ** 4 for k in range(1, 9))
    assert abs(calls4 - exact) < 0.15


@pytest.mark.slow
def test_the_estimated_peak_matches_a_measured_one(tmp_path):
    """The plan's peak against the peak resident set of a real one-step run (in a child process whose
    allocator returns freed pages), on the tiny SD1.5 teacher at a resolution where activations dominate."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident set needs Linux /proc")
    teacher = make_tiny_sd15(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog\n", encoding="utf-8")
    config = DistillConfig(
        teacher=str(teacher),
        prompts=str(prompts),
        stages=(1,),
        stage1_steps=1,
        batch_size=4,
        resolution=128,
        lora_rank=4,
        mixed_precision="no",
        sample_every=0,
        export_formats=(),
        output_dir=str(tmp_path / "run"),
    )
    # The child plans first, so that the libraries a run imports are in its baseline as in the benchmark.
    script = (
        "import json, sys; from mlcm_train.config import DistillConfig; from mlcm_train.distill import train_distill;"
        "from mlcm_train.run.plan import plan_distill; from mlcm_train.run.timer import resident_bytes;"
        "c = DistillConfig.from_dict(json.loads(sys.argv[1])); p = plan_distill(c, 'no');"
        "base = resident_bytes(); r = train_distill(c, profile=True);"
        "print(json.dumps([p.peak_bytes(p.phases[0]), p.resident_bytes, p.phases[0].activation_bytes,"
        " r.peak_memory - base]))"
    )
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "1048576",
    }  # freed tensors over 1 MB leave the resident set
    child = subprocess.run(
        [sys.executable, "-c", script, config.to_json()], env=env, capture_output=True, text=True, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    estimated, resident, activations, measured = json.loads(child.stdout.strip().splitlines()[-1])
    assert activations > resident  # the check is about activations
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)


def test_dry_run_estimates_time_and_memory_per_phase(sd15, capsys):
    teacher, prompts = sd15
    argv = [
        "distill",
        "--teacher",
        str(teacher),
        "--prompts",
        str(prompts),
        "--dry-run",
        "--resolution",
        "32",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for phase in ("stage 1 M=8", "stage 2 M=8"):
        assert f"plan: {phase}: peak about" in err
    assert "s per step" in err and "samples/s" in err and "fitted on a CPU" in err


def test_shared_states_and_the_stage1_regulariser_change_the_planned_teacher_work(sd15):
    """Shared trajectories: (M + 1) / M teacher CFG calls a sample, the step to t_n included (Algorithm 1:
    4.5 at M = 8, and the step to t_n apart); the stage-1 regulariser adds a stage-1 step's teacher and
    student work to every stage-2 step."""
    from mlcm_train.run.plan import plan_distill

    teacher, prompts = sd15
    base = DistillConfig(teacher=str(teacher), prompts=str(prompts), resolution=32, batch_size=4)

    def flops(config, phase, part):
        return plan_distill(config, "no").phases[phase].parts[part][0]

    mds = flops(base, 0, "teacher_trajectory")
    shared = flops(
        DistillConfig.from_dict({**base.to_dict(), "stage1_states": "shared"}), 0, "teacher_trajectory"
    )
    per_sample, _ = expected_mds_steps(base, 8, 4)
    assert shared == pytest.approx(mds / per_sample * 9 / 8, rel=1e-6)
    target = flops(base, 0, "teacher_target")
    shared_target = flops(
        DistillConfig.from_dict({**base.to_dict(), "stage1_states": "shared"}), 0, "teacher_target"
    )
    assert shared_target == pytest.approx(target / 3)
    regular = DistillConfig.from_dict({**base.to_dict(), "stage2_stage1_weight": 1.0})
    assert flops(regular, 1, "teacher_trajectory") > flops(base, 1, "teacher_trajectory") + 0.9 * mds
    assert flops(regular, 1, "student_forward_backward") == pytest.approx(
        2 * flops(base, 1, "student_forward_backward")
    )

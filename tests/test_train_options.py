"""Options of the distill loop: progressive rounds, LoRA EMA target, bf16 autocast, TensorBoard, loss decrease."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from test_train import tiny_config

from mlcm.lora import read_lora
from mlcm_train.distill import train_distill
from mlcm_train.run.checkpoint import load_checkpoint


def test_progressive_rounds_run_in_sequence(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(
        teacher,
        prompts,
        tmp_path / "run",
        progressive=(8, 4),
        stages=(1,),
        stage1_steps=1,
        sample_steps=(1, 2),
    )
    result = train_distill(config)
    assert result.state.global_step == 2 and result.state.phase == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["segments"] for r in rows] == [8, 4]
    meta = read_lora(result.exported[0]).metadata
    # The 4-segment boundaries lie on the 8-segment grid: the LoRA is sampled there, at 1 to 8 steps.
    assert meta.segments == 8 and meta.supported_steps == tuple(range(1, 9))
    assert meta.stages == ("mlcd@8", "mlcd@4")
    assert result.exported[0].name == "mlcm_sd15_8seg.safetensors"


def test_stage2_rounds_train_stage_2_at_each_count_after_one_stage_1(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(
        teacher, prompts, tmp_path / "run", stage1_steps=1, stage2_steps=3, stage2_rounds=(8, 4, 2)
    )
    result = train_distill(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["segments"]) for r in rows] == [(1, 8), (2, 8), (2, 4), (2, 2)]
    meta = read_lora(result.exported[0]).metadata
    assert meta.segments == 8
    assert meta.stages == ("mlcd", "inter_segment@8", "inter_segment@4", "inter_segment@2")


def test_ema_target_is_saved_and_lags_the_student(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=2, ema_decay=0.5)
    train_distill(config)
    saved = load_checkpoint(tmp_path / "run")
    assert saved.ema is not None and set(saved.ema) == set(saved.lora)
    name = next(k for k in saved.lora if ".lora_B." in k and saved.lora[k].abs().max() > 0)
    # B starts at 0; after two updates the EMA (decay 0.5) sits strictly between 0 and the student.
    assert 0 < saved.ema[name].abs().max() < saved.lora[name].abs().max()


def test_bf16_autocast_keeps_lora_fp32(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(
        teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=1, mixed_precision="bf16"
    )
    result = train_distill(config)
    assert math.isfinite(result.losses[0])
    lora = [p for n, p in result.unet.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert result.unet.conv_in.weight.dtype == torch.bfloat16


def test_tensorboard_missing_is_explained(sd15, tmp_path, caplog):
    pytest.importorskip("torch")
    try:
        import torch.utils.tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=1, tensorboard=True)
    with caplog.at_level(logging.WARNING):
        train_distill(config)
    assert "pip install tensorboard" in caplog.text


def test_wandb_offline_logs_the_run_without_a_network(sd15, tmp_path, monkeypatch):
    """--wandb offline: W&B records under <run>/wandb with the scalars of metrics.jsonl, no network; a
    resumed run keeps its W&B id (``wandb sync`` uploads both parts as one run)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    teacher, prompts = sd15
    run = tmp_path / "run"
    config = tiny_config(teacher, prompts, run, stages=(1,), stage1_steps=2, log_every=1, wandb="offline")
    train_distill(config, stop_after=1)
    run_id = (run / "wandb-id").read_text().strip()
    train_distill(config.replace(stage1_steps=2), resume=run)
    assert (run / "wandb-id").read_text().strip() == run_id
    offline = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))  # one per process, same id
    records = [(d / f"run-{run_id}.wandb").read_bytes() for d in offline]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(offline) == len(rows) == 2
    # Each process's W&B record holds the loss metrics.jsonl has for its step (values as JSON text).
    for row, record in zip(rows, records):
        assert b"train/loss" in record and json.dumps(row["loss"]).encode() in record


def test_wandb_missing_fails_before_the_teacher_loads(sd15, tmp_path, monkeypatch):
    import mlcm_train.run.log as run_log

    monkeypatch.setattr(run_log, "wandb_available", lambda: False)
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=1, wandb="online")
    with pytest.raises(ValueError, match="pip install wandb"):
        train_distill(config)


@pytest.mark.slow
def test_stage1_loss_falls_on_a_fixed_prompt_set(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(
        teacher,
        prompts,
        tmp_path / "run",
        stages=(1,),
        stage1_steps=40,
        batch_size=4,
        lr_stage1=3e-3,
        segments=2,
    )
    losses = train_distill(config).losses
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)


def test_stage2_run_starts_from_a_stage1_export(sd15, tmp_path):
    teacher, prompts = sd15
    first = train_distill(tiny_config(teacher, prompts, tmp_path / "s1", stages=(1,), stage1_steps=1))
    config = tiny_config(teacher, prompts, tmp_path / "s2", stages=(2,), init_lora=str(first.exported[0]))
    start = train_distill(config, stop_after=0)  # checkpoint before any update: the initial LoRA
    initial = load_checkpoint(start.checkpoint).lora
    trained = load_checkpoint(tmp_path / "s1").lora
    for name, tensor in trained.items():
        torch.testing.assert_close(initial[name], tensor, atol=1e-3, rtol=1e-3)  # via the fp16 kohya file


def test_8bit_adamw_trains_and_resumes_exactly(sd15, tmp_path):
    """--optimizer adamw8bit: 8-bit moments in the optimizer state, the LoRA moves, resume is bit for bit."""
    pytest.importorskip("torchao", reason="adamw8bit falls back to torchao's AdamW8bit on the CPU")
    teacher, prompts = sd15

    def config(name):
        return tiny_config(
            teacher, prompts, tmp_path / name, stages=(1,), stage1_steps=2, optimizer="adamw8bit"
        )

    straight = train_distill(config("straight"))
    assert all(math.isfinite(loss) for loss in straight.losses)
    moved = [p for n, p in straight.unet.named_parameters() if ".lora_B." in n]
    assert any(p.abs().max() > 0 for p in moved)  # B starts at 0
    train_distill(config("split"), stop_after=1)
    train_distill(config("split"), resume=tmp_path / "split")
    a, b = load_checkpoint(tmp_path / "straight").lora, load_checkpoint(tmp_path / "split").lora
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adamw_keeps_8bit_moments_and_follows_adamw():
    """On a tensor large enough to quantise (>= 4096 values, as bitsandbytes and torchao both require)."""
    pytest.importorskip("torchao", reason="adamw8bit falls back to torchao's AdamW8bit on the CPU")
    from mlcm_train.run.loop import adamw_class

    start = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    params = {name: torch.nn.Parameter(start.clone()) for name in ("fp32", "8bit")}
    optimizers = {
        "fp32": torch.optim.AdamW([params["fp32"]], lr=1e-2),
        "8bit": adamw_class("adamw8bit")([params["8bit"]], lr=1e-2),
    }
    for _ in range(3):
        for name, optimizer in optimizers.items():
            (params[name] ** 2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    state = optimizers["8bit"].state[params["8bit"]]
    moment = next(v for k, v in state.items() if k != "step")
    assert moment.dtype != torch.float32 or type(moment) is not torch.Tensor  # quantised storage
    torch.testing.assert_close(params["8bit"].detach(), params["fp32"].detach(), atol=2e-3, rtol=0)


def test_unknown_8bit_backend_names_the_packages(monkeypatch):
    import builtins

    from mlcm_train.run.loop import adamw_class

    real_import = builtins.__import__

    def no_8bit(name, *args, **kwargs):
        if name.startswith(("bitsandbytes", "torchao")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_8bit)
    with pytest.raises(ImportError, match="pip install bitsandbytes.*pip install torchao"):
        adamw_class("adamw8bit")
    assert adamw_class("adamw") is torch.optim.AdamW


def test_stage2_rounds_run_stage_1_once_then_stage_2_at_each_count_sharing_its_steps():
    from mlcm_train.config import DistillConfig

    config = DistillConfig(teacher="t", prompts="p", stage2_rounds=(8, 4, 2), stage2_steps=151)
    assert config.phases() == [(8, 1), (8, 2), (4, 2), (2, 2)]
    assert [config.phase_steps(2, m) for m in (8, 4, 2)] == [51, 50, 50]
    assert config.sampling_grid(3, 10) == 8  # 4 and 2 lie on 8's boundaries: the LoRA samples on 8
    with pytest.raises(ValueError, match="strictly decreasing"):
        DistillConfig(teacher="t", prompts="p", stage2_rounds=(4, 8))
    with pytest.raises(ValueError, match="use progressive for rounds of every stage"):
        DistillConfig(teacher="t", prompts="p", stage2_rounds=(8, 4), progressive=(8, 4))


def test_stage2_rounds_default_to_halving_the_segments_and_drop_rounds_without_steps():
    from mlcm_train.config import DistillConfig

    def phases(**changes):
        return DistillConfig(teacher="t", prompts="p", **changes).phases()

    assert phases() == [(8, 1), (8, 2), (4, 2), (2, 2)]
    assert phases(segments=6) == [(6, 1), (6, 2), (3, 2)]
    assert phases(segments=5) == [(5, 1), (5, 2)]
    assert phases(stage2_steps=2) == [(8, 1), (8, 2), (4, 2)]  # a round with no step is no round
    assert phases(stage2_rounds=(8,)) == [(8, 1), (8, 2)]  # the paper's single stage 2
    assert phases(progressive=(8, 4)) == [(8, 1), (8, 2), (4, 1), (4, 2)]  # every stage per round

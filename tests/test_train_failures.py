"""Bad input and bad runs: no prompts, wrong teacher, NaN losses, a crash while checkpointing, corrupt resume."""

from __future__ import annotations

import math

import pytest
import torch
from test_train import tiny_config

from mlcm_train.cli import main
from mlcm_train.distill import train_distill
from mlcm_train.run import checkpoint as ckpt
from mlcm_train.run.checkpoint import list_checkpoints, load_checkpoint
from mlcm_train.run.loop import NonFiniteLossError


def test_no_prompts(sd15, tmp_path, capsys):
    teacher, _ = sd15
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    code = main(
        ["distill", "--teacher", str(teacher), "--prompts", str(empty), "--output-dir", str(tmp_path / "r")]
    )
    assert code == 2
    assert "no prompts found" in capsys.readouterr().err


def test_wrong_teacher_path(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n", encoding="utf-8")
    missing = tmp_path / "no_such_model.safetensors"
    code = main(
        [
            "distill",
            "--teacher",
            str(missing),
            "--prompts",
            str(tmp_path / "p.txt"),
            "--output-dir",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert str(missing) in capsys.readouterr().err


def test_nan_step_is_skipped_without_an_update(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=3, checkpoint_every=1)

    def nan_at_step_1(step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * math.nan if step == 1 else loss

    result = train_distill(config, loss_hook=nan_at_step_1)
    assert (
        math.isnan(result.losses[1]) and math.isfinite(result.losses[0]) and math.isfinite(result.losses[2])
    )
    after_1 = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000001").lora
    after_2 = load_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000002").lora
    for name in after_1:
        assert torch.equal(after_1[name], after_2[name]), "a skipped step must not move the LoRA"


def test_nan_losses_in_a_row_stop_with_causes(sd15, tmp_path):
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=10, nan_patience=3)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*likely causes.*mixed-precision"):
        train_distill(config, loss_hook=lambda step, loss: loss * math.nan)


def test_killed_mid_checkpoint_keeps_previous_and_resumes(sd15, tmp_path, monkeypatch):
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=3, checkpoint_every=1)
    real_write = ckpt._write_torch
    calls = []

    def dies_on_second_checkpoint(path, obj):
        calls.append(path)
        if len(calls) == 3:  # optimizer.pt of the second checkpoint (each checkpoint writes optimizer + rng)
            path.write_bytes(b"partial")
            raise KeyboardInterrupt("killed")
        real_write(path, obj)

    monkeypatch.setattr(ckpt, "_write_torch", dies_on_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_distill(config)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000001"]
    monkeypatch.setattr(ckpt, "_write_torch", real_write)
    result = train_distill(config, resume=tmp_path / "run")
    assert result.state.global_step == 3 and len(result.losses) == 2


def test_corrupt_checkpoint_resume_fails_clearly(sd15, tmp_path, capsys):
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=1)
    train_distill(config)
    (newest,) = list_checkpoints(tmp_path / "run")
    (newest / "optimizer.pt").write_bytes(b"not a torch file")
    assert main(["distill", "--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "corrupt (optimizer.pt" in err and "earlier checkpoint" in err

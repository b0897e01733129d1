"""What a run spends: teacher and student UNet evaluations (sample rows; CFG counts 2) and wall time, in
every metrics.jsonl row, carried over a resume, and in the model card."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_config

from mlcm_train.distill import train_distill
from mlcm_train.run.checkpoint import load_checkpoint


def rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stage2_spends_what_algorithm_2_says(sd15, tmp_path):
    """Stage 2 per sample: q student steps and the target (no grad) plus the trained call = q + 2 student
    evaluations; p CFG teacher sub-steps = 2p teacher evaluations."""
    teacher, prompts = sd15
    config = tiny_config(
        teacher, prompts, tmp_path / "run", stages=(2,), stage2_steps=3, stage2_q=2, stage2_p=2
    )
    train_distill(config)
    last = rows(tmp_path / "run")[-1]
    samples = 3 * config.batch_size
    assert last["student_evals"] == samples * (config.stage2_q + 2)
    assert last["teacher_evals"] == samples * 2 * config.stage2_p
    assert last["wall_s"] > 0


def test_stage1_online_spends_the_multistep_strategy_and_the_cfg_step(sd15, tmp_path):
    """Stage 1 per sample: 2 L teacher evaluations to reach t_m (Algorithm 1, CFG) and 2 for the teacher
    step; the student trains once and the target is one no-grad call. The count grows step by step."""
    teacher, prompts = sd15
    config = tiny_config(teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=3)
    train_distill(config)
    logged = rows(tmp_path / "run")
    assert [r["student_evals"] for r in logged] == [2 * config.batch_size * (i + 1) for i in range(3)]
    teacher_evals = [r["teacher_evals"] for r in logged]
    assert teacher_evals == sorted(teacher_evals) and all(t % 2 == 0 for t in teacher_evals)
    per_sample = teacher_evals[-1] / (3 * config.batch_size)
    assert 2 < per_sample <= 2 + 2 * config.segments  # at least the CFG step, at most L = M steps more


def test_spending_carries_over_a_resume_and_reaches_the_model_card(sd15, tmp_path):
    teacher, prompts = sd15
    straight = tmp_path / "straight"
    config = tiny_config(teacher, prompts, straight, stages=(2,), stage2_steps=2)
    train_distill(config)
    resumed = tmp_path / "resumed"
    train_distill(config.replace(output_dir=str(resumed)), stop_after=1)
    assert load_checkpoint(resumed).state.student_evaluations == rows(straight)[0]["student_evals"]
    result = train_distill(config.replace(output_dir=str(resumed)), resume=resumed)
    for key in ("teacher_evals", "student_evals"):
        assert rows(resumed)[-1][key] == rows(straight)[-1][key]
    card = result.exported[0].with_suffix(".md").read_text(encoding="utf-8")
    assert f"{rows(straight)[-1]['teacher_evals']} teacher UNet evaluations (CFG counted as 2)" in card


def test_stage1_regulariser_adds_a_stage1_term_to_every_stage2_step(sd15, tmp_path):
    """--stage2-stage1-weight keeps the stage-1 loss beside the stage-2 loss: its monitoring number is logged,
    its states cost the multistep strategy's teacher calls, and its gradient changes the LoRA."""
    teacher, prompts = sd15
    plain = tiny_config(teacher, prompts, tmp_path / "plain", stages=(2,), stage2_steps=2)
    regular = tiny_config(
        teacher, prompts, tmp_path / "reg", stages=(2,), stage2_steps=2, stage2_stage1_weight=1.0
    )
    train_distill(plain)
    train_distill(regular)
    plain_rows, reg_rows = rows(tmp_path / "plain"), rows(tmp_path / "reg")
    assert "stage1_loss" in reg_rows[-1] and "stage1_loss" not in plain_rows[-1]
    samples = 2 * plain.batch_size
    # Stage 1 per sample: 2 student calls, 2 teacher calls for its CFG step and 2 L more for its states.
    assert reg_rows[-1]["student_evals"] - plain_rows[-1]["student_evals"] == 2 * samples
    assert reg_rows[-1]["teacher_evals"] - plain_rows[-1]["teacher_evals"] >= 4 * samples
    lora_plain = load_checkpoint(sorted((tmp_path / "plain" / "checkpoints").iterdir())[-1]).lora
    lora_reg = load_checkpoint(sorted((tmp_path / "reg" / "checkpoints").iterdir())[-1]).lora
    assert any(not torch.equal(lora_plain[k], lora_reg[k]) for k in lora_plain)


def test_stage1_regulariser_weight_must_not_be_negative(sd15, tmp_path):
    teacher, prompts = sd15
    with pytest.raises(ValueError, match="stage2_stage1_weight=-1.0 must be >= 0"):
        tiny_config(teacher, prompts, tmp_path / "run", stage2_stage1_weight=-1.0)


def test_shared_trajectories_spend_m_plus_one_teacher_calls_for_m_states_and_their_targets(sd15, tmp_path):
    """--stage1-states shared: a trajectory of M states costs M + 1 CFG calls, its steps onward and the
    states' steps to t_n sharing them: 2 (M + 1) / M teacher evaluations a sample against Algorithm 1's
    2 (M - s) + 2."""
    teacher, prompts = sd15
    config = tiny_config(
        teacher, prompts, tmp_path / "run", stages=(1,), stage1_steps=3, segments=4, batch_size=8,
        stage1_states="shared",
    )  # fmt: skip
    train_distill(config)
    last = rows(tmp_path / "run")[-1]
    samples = 3 * config.batch_size
    assert last["teacher_evals"] == samples // 4 * 2 * (4 + 1)
    assert last["student_evals"] == 2 * samples

"""SDXL size conditioning follows the run's resolution in both stages: distill and reward tell the student,
its target and the teacher the same image size (time ids), in training, sample grids and evaluation."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from tiny_models import TINY_PROMPTS, make_tiny_sdxl

from mlcm_train.config import DistillConfig, RewardConfig
from mlcm_train.distill import train_distill
from mlcm_train.reward.stage import train_reward

RESOLUTION = 32  # the tiny SDXL teacher's native size is 16


@pytest.fixture
def seen_time_ids(monkeypatch):
    """Every distinct time-ids row any UNet call of the test receives."""
    rows: set[tuple[float, ...]] = set()
    forward = UNet2DConditionModel.forward

    def recording(self, *args, added_cond_kwargs=None, **kwargs):
        if added_cond_kwargs is not None:
            rows.update(tuple(r) for r in added_cond_kwargs["time_ids"].float().tolist())
        return forward(self, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    return rows


def test_distill_and_reward_condition_on_the_run_resolution(tmp_path, seen_time_ids):
    teacher = make_tiny_sdxl(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(TINY_PROMPTS, encoding="utf-8")
    common = dict(teacher=str(teacher), prompts=str(prompts), resolution=RESOLUTION, batch_size=2)
    expected = {(float(RESOLUTION), float(RESOLUTION), 0.0, 0.0, float(RESOLUTION), float(RESOLUTION))}
    distilled = train_distill(
        DistillConfig(
            **common,
            output_dir=str(tmp_path / "distill"),
            segments=4,
            stage1_steps=1,
            stage2_steps=1,
            stage2_q=2,
            stage2_p=1,
            lora_rank=2,
            sample_every=1,  # the sample grids too
            sample_steps=(1, 2),
        )
    )
    assert seen_time_ids == expected
    seen_time_ids.clear()
    train_reward(
        RewardConfig(
            **common,
            lora=str(distilled.exported[0]),
            output_dir=str(tmp_path / "reward"),
            reward="brightness",
            loss="maximise",
            keep_best="reward",
            iterations=1,
            student_steps=(2,),
            anchor_q=2,
            anchor_p=1,
            eval_samples=2,
        )
    )
    assert seen_time_ids == expected


def test_time_ids_are_computed_once_per_run(tmp_path):
    """The cached conditioning already holds the run's size: nothing rebuilds time ids per batch."""
    from mlcm_train.run.setup import Run

    teacher = make_tiny_sdxl(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(TINY_PROMPTS, encoding="utf-8")
    config = DistillConfig(teacher=str(teacher), prompts=str(prompts), resolution=RESOLUTION)
    run = Run.inputs_only(config)
    calls = []
    original = run.teacher.time_ids
    run.teacher.time_ids = lambda *a, **k: calls.append(a) or original(*a, **k)
    cond, uncond = run.cond([0, 1]), run.uncond(2)
    assert not calls
    assert torch.equal(cond.time_ids, uncond.time_ids)
    assert cond.time_ids[0].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]

"""Reward losses, the weighted sum, spec parsing and RewardConfig validation on known inputs."""

from __future__ import annotations

import pytest
import torch

from mlcm_train.config import RewardConfig
from mlcm_train.method.reward_loss import hinge_loss, maximise_loss, other_prompts, reward_loss
from mlcm_train.reward.interface import WeightedReward
from mlcm_train.reward.models import BrightnessReward, parse_reward_specs


class PromptLengthReward:
    """score = mean pixel + number of characters of the prompt (known values for the hinge)."""

    name = "length"

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) + torch.tensor([float(len(p)) for p in prompts])

    def modules(self):
        return []


def test_hinge_matches_the_published_formula():
    positive = torch.tensor([20.0, 10.0, 16.0])
    negative = torch.tensor([-1.0, 2.0, 0.5])
    # max(16 - s, 0) + max(s_other, 0): (0 + 0), (6 + 2), (0 + 0.5) -> mean 8.5 / 3
    assert hinge_loss(positive, negative, 16.0).item() == pytest.approx(8.5 / 3)


def test_maximise_is_negative_mean():
    assert maximise_loss(torch.tensor([1.0, 2.0, 6.0])).item() == pytest.approx(-3.0)


def test_other_prompts_differ_from_the_images_own():
    assert other_prompts(["a", "b", "c"]) == ["b", "c", "a"]  # all differ: the batch rolled by one
    assert other_prompts(["a", "a", "b"]) == ["b", "b", "a"]  # a repeated prompt is never its own "other"
    assert other_prompts(["a", "a"], pool=["a", "z"]) == ["z", "z"]  # else from the run's prompts
    with pytest.raises(ValueError, match="at least two different prompts"):
        other_prompts(["a", "a"], pool=["a"])


def test_reward_loss_hinge_scores_the_rolled_prompt():
    images = torch.zeros(2, 3, 4, 4)
    loss, stats = reward_loss(PromptLengthReward(), images, ["abc", "a"], loss="hinge", margin=2.0)
    # positive scores 3, 1 -> relu(2-3)+relu(2-1) = 0 + 1; negative (rolled "a","abc") = 1, 3 -> 1 + 3
    assert loss.item() == pytest.approx((0 + 1 + 1 + 3) / 2)
    assert stats["reward"] == pytest.approx(2.0)
    assert stats["reward_other_prompt"] == pytest.approx(2.0)


def test_reward_loss_hinge_of_a_single_image_scores_a_prompt_of_the_run():
    loss, stats = reward_loss(
        PromptLengthReward(), torch.zeros(1, 3, 4, 4), ["a"], loss="hinge", margin=2.0, pool=["a", "abc"]
    )
    assert stats["reward_other_prompt"] == pytest.approx(3.0) and loss.item() == pytest.approx(1 + 3)


def test_weighted_sum_of_rewards():
    images = torch.full((2, 3, 4, 4), 0.5)
    images[1] = 1.0
    total = WeightedReward(((2.0, BrightnessReward()), (0.5, PromptLengthReward())))
    scores = total(images, ["ab", "abcd"])
    expected = 2.0 * torch.tensor([0.5, 1.0]) + 0.5 * torch.tensor([0.5 + 2, 1.0 + 4])
    torch.testing.assert_close(scores, expected)
    assert total.name == "brightness*2+length*0.5"


def test_brightness_is_rec601_luma():
    images = torch.zeros(1, 3, 2, 2)
    images[:, 1] = 1.0  # pure green
    assert BrightnessReward()(images, ["x"]).item() == pytest.approx(0.587)


def test_spec_parsing():
    specs = parse_reward_specs("hpsv2=/m/hps, aesthetic*0.5=/m/a,brightness")
    assert [(s.name, s.weight, s.path) for s in specs] == [
        ("hpsv2", 1.0, "/m/hps"),
        ("aesthetic", 0.5, "/m/a"),
        ("brightness", 1.0, None),
    ]
    with pytest.raises(ValueError, match="unknown; choose from"):
        parse_reward_specs("mps=/x")
    with pytest.raises(ValueError, match="not a number"):
        parse_reward_specs("clip*x=/m")
    with pytest.raises(ValueError, match="no reward given"):
        parse_reward_specs(" , ")


def test_config_defaults_and_validation():
    config = RewardConfig(heldout="brightness")
    assert (config.lr, config.iterations, config.batch_size, config.margin) == (1e-5, 500, 8, 16.0)
    assert config.loss == "auto"
    assert config.student_steps == (4,) and config.evaluated_steps == (4,)
    assert RewardConfig.from_dict(config.to_dict()) == config
    assert config.config_hash() == config.replace(output_dir="elsewhere").config_hash()
    assert config.config_hash() != config.replace(margin=2.0).config_hash()
    with pytest.raises(ValueError, match="needs a held-out measure"):
        RewardConfig()
    with pytest.raises(ValueError, match="exceed segments=4"):
        RewardConfig(segments=4, student_steps=(2, 8), keep_best="last")
    with pytest.raises(ValueError, match="unknown reward config keys"):
        RewardConfig.from_dict({"rewards": "x"})


def test_demo_reward_recipe():
    from mlcm_train.demo.recipe import demo_reward_config

    config = demo_reward_config("assets/demo", "p.txt", "lora.safetensors", "out", iterations=10)
    assert config.reward == "classifier=assets/demo" and config.heldout == "fd=assets/demo"
    assert config.evaluated_steps == (2, 4) and config.keep_best == "guarded" and config.iterations == 10


def test_hinge_needs_every_weighted_part_to_read_the_prompt():
    from mlcm_train.reward.models import resolve_loss

    length, brightness = PromptLengthReward(), BrightnessReward()
    assert resolve_loss("hinge", WeightedReward(((1.0, length), (0.0, brightness)))) == "hinge"
    for mixed in (WeightedReward(((1.0, length), (1.0, brightness))), WeightedReward(((0.0, length),))):
        with pytest.raises(ValueError, match="ignores the prompt"):
            resolve_loss("hinge", mixed)

"""Reward losses: the MPS-style hinge of TLCM §4 as published, plain maximisation, and their dispatcher."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .interface import Reward, check_scores

# TLCM trains with the MPS scorer and margin 16 (MLCM_METHOD.md §5); other scorers need their own margin.
PAPER_MARGIN = 16.0


def hinge_loss(positive: Tensor, negative: Tensor, margin: float = PAPER_MARGIN) -> Tensor:
    """``mean(max(margin - score(x, prompt), 0) + max(score(x, other_prompt), 0))`` (TLCM §4, MPS optimisation)."""
    return (torch.relu(margin - positive) + torch.relu(negative)).mean()


def maximise_loss(scores: Tensor) -> Tensor:
    """``-mean(score)``: plain reward maximisation (DRaFT, AlignProp)."""
    return -scores.mean()


def rolled_prompts(prompts: Sequence[str]) -> list[str]:
    """Each image's "other prompt": the batch's prompts rolled by one (the next image's prompt)."""
    prompts = list(prompts)
    return prompts[1:] + prompts[:1]


def reward_loss(
    reward: Reward, images: Tensor, prompts: Sequence[str], *, loss: str, margin: float = PAPER_MARGIN
) -> tuple[Tensor, dict[str, float]]:
    """The reward loss of a batch of images in [0, 1] and its monitoring numbers (mean score, hinge parts)."""
    batch = images.shape[0]
    scores = check_scores(reward.name, reward(images, prompts), batch)
    if loss == "maximise":
        value = maximise_loss(scores)
        return value, {"reward": float(scores.detach().mean()), "reward_loss": float(value.detach())}
    if loss != "hinge":
        raise ValueError(f"loss={loss!r} is unknown; choose hinge or maximise")
    if batch < 2:
        raise ValueError(
            "the hinge loss needs at least 2 images per batch (the other prompt comes from the batch)"
        )
    negative = check_scores(reward.name, reward(images, rolled_prompts(prompts)), batch)
    value = hinge_loss(scores, negative, margin)
    return value, {
        "reward": float(scores.detach().mean()),
        "reward_other_prompt": float(negative.detach().mean()),
        "reward_loss": float(value.detach()),
    }

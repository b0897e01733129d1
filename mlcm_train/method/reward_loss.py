"""Reward losses: the MPS-style hinge of arXiv 2406.05768v6 (Eq. 11) as published, plain maximisation, the dispatcher.

A reward is any ``reward(images, prompts) -> (B,)`` callable with a ``name`` (``mlcm_train.reward.interface``);
see docs/method.md, "The reward stage".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# The paper trains with the MPS scorer and margin 16 (arXiv 2406.05768v6 §4); other scorers need their own margin.
PAPER_MARGIN = 16.0


def check_scores(name: str, scores: Tensor, batch: int) -> Tensor:
    """A reward's output as (B,) float32; a wrong shape is an error naming the reward."""
    scores = scores.float().reshape(-1) if scores.ndim == 2 and scores.shape[1] == 1 else scores.float()
    if tuple(scores.shape) != (batch,):
        raise ValueError(
            f"reward {name!r} returned shape {tuple(scores.shape)}; expected one score per image ({batch},)"
        )
    return scores


def hinge_loss(positive: Tensor, negative: Tensor, margin: float = PAPER_MARGIN) -> Tensor:
    """``mean(max(margin - score(x, prompt), 0) + max(score(x, other_prompt), 0))`` (arXiv 2406.05768v6, Eq. 11)."""
    return (torch.relu(margin - positive) + torch.relu(negative)).mean()


def maximise_loss(scores: Tensor) -> Tensor:
    """``-mean(score)``: plain reward maximisation (DRaFT, AlignProp)."""
    return -scores.mean()


def rolled_prompts(prompts: Sequence[str]) -> list[str]:
    """Each image's "other prompt": the batch's prompts rolled by one (the next image's prompt)."""
    prompts = list(prompts)
    return prompts[1:] + prompts[:1]


def reward_loss(
    reward: Callable[[Tensor, Sequence[str]], Tensor],
    images: Tensor,
    prompts: Sequence[str],
    *,
    loss: str,
    margin: float = PAPER_MARGIN,
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

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


def other_prompts(prompts: Sequence[str], pool: Sequence[str] = ()) -> list[str]:
    """Each image's "other prompt" for the hinge: the next prompt of the batch that differs from its own
    (the batch rolled by one when all differ), else the first differing prompt of ``pool``."""
    prompts = list(prompts)
    count = len(prompts)
    chosen = []
    for i, own in enumerate(prompts):
        candidates = [prompts[(i + k) % count] for k in range(1, count)] + list(pool)
        other = next((p for p in candidates if p != own), None)
        if other is None:
            raise ValueError(
                f"the hinge loss needs a prompt other than {own!r} to score the image against; give the run "
                "at least two different prompts, or use --loss maximise"
            )
        chosen.append(other)
    return chosen


def reward_loss(
    reward: Callable[[Tensor, Sequence[str]], Tensor],
    images: Tensor,
    prompts: Sequence[str],
    *,
    loss: str,
    margin: float = PAPER_MARGIN,
    pool: Sequence[str] = (),
) -> tuple[Tensor, dict[str, float]]:
    """The reward loss of a batch of images in [0, 1] and its monitoring numbers (mean score, hinge parts).

    ``pool``: prompts to draw a hinge's other prompt from when the batch has no prompt but the image's own.
    """
    batch = images.shape[0]
    scores = check_scores(reward.name, reward(images, prompts), batch)
    if loss == "maximise":
        value = maximise_loss(scores)
        return value, {"reward": float(scores.detach().mean()), "reward_loss": float(value.detach())}
    if loss != "hinge":
        raise ValueError(f"loss={loss!r} is unknown; choose hinge or maximise")
    negative = check_scores(reward.name, reward(images, other_prompts(prompts, pool)), batch)
    value = hinge_loss(scores, negative, margin)
    return value, {
        "reward": float(scores.detach().mean()),
        "reward_other_prompt": float(negative.detach().mean()),
        "reward_loss": float(value.detach()),
    }

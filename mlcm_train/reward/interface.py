"""What a reward is: decoded images in [0, 1] plus prompts in, one differentiable score per image out.

Images are (B, 3, H, W) float tensors in **[0, 1]** (the VAE's [-1, 1] output mapped by ``decoded_to_unit``,
as ReFL does before its scorer); each reward resizes, crops and normalises for its own network in torch so
gradients reach the pixels (as ReFL and DRaFT do). Higher scores are better.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from mlcm_train.method.reward_loss import check_scores


@runtime_checkable
class Reward(Protocol):
    """A differentiable preference score: ``reward(images, prompts) -> (B,) float32``."""

    name: str
    prompt_dependent: (
        bool  # False when the score ignores the prompt (then a hinge against another prompt cancels)
    )

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...

    def modules(self) -> list[nn.Module]:
        """The frozen networks the reward runs (for device moves and the no-gradient checks)."""
        ...


def weighted_name(parts: Iterable[tuple[str, float]]) -> str:
    """``clip+aesthetic*0.5``: the parts' names joined by ``+``, each weight other than 1 after a ``*``."""
    return "+".join(name if weight == 1.0 else f"{name}*{weight:g}" for name, weight in parts)


@dataclass(frozen=True)
class WeightedReward:
    """``R = sum_i w_i r_i`` over several rewards (a composite reward)."""

    parts: tuple[tuple[float, Reward], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a weighted reward needs at least one part")

    @property
    def name(self) -> str:
        return weighted_name((r.name, w) for w, r in self.parts)

    @property
    def prompt_dependent(self) -> bool:
        """True when every weighted part reads the prompt: a part that ignores it cancels out of the hinge."""
        weighted = [r for w, r in self.parts if w != 0]
        return bool(weighted) and all(getattr(r, "prompt_dependent", True) for r in weighted)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return sum(w * check_scores(r.name, r(images, prompts), images.shape[0]) for w, r in self.parts)

    def components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Each part's unweighted scores, for logging."""
        return {r.name: check_scores(r.name, r(images, prompts), images.shape[0]) for _, r in self.parts}

    def modules(self) -> list[nn.Module]:
        return [m for _, r in self.parts for m in r.modules()]


def freeze(module: nn.Module, device: str | torch.device) -> nn.Module:
    """A reward network in eval mode with no trainable parameters, on ``device``."""
    return module.to(device).eval().requires_grad_(False)

"""What a reward is: decoded images in [0, 1] plus prompts in, one differentiable score per image out.

Images are (B, 3, H, W) float tensors in **[0, 1]** (the VAE's [-1, 1] output mapped by ``decoded_to_unit``,
as ReFL does before its scorer); each reward resizes, crops and normalises for its own network in torch so
gradients reach the pixels (training_anchors.md §3.7). Higher scores are better.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Reward(Protocol):
    """A differentiable preference score: ``reward(images, prompts) -> (B,) float32``."""

    name: str

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...

    def modules(self) -> list[nn.Module]:
        """The frozen networks the reward runs (for device moves and the no-gradient checks)."""
        ...


def decoded_to_unit(decoded: Tensor) -> Tensor:
    """VAE output in [-1, 1] -> images in [0, 1] (``(x / 2 + 0.5).clamp(0, 1)``, ReFL / diffusers' postprocess)."""
    return (decoded.float() / 2 + 0.5).clamp(0.0, 1.0)


def weighted_name(parts: Iterable[tuple[str, float]]) -> str:
    """``clip+aesthetic*0.5``: the parts' names joined by ``+``, each weight other than 1 after a ``*``."""
    return "+".join(name if weight == 1.0 else f"{name}*{weight:g}" for name, weight in parts)


def check_scores(name: str, scores: Tensor, batch: int) -> Tensor:
    """A reward's output as (B,) float32; a wrong shape is an error naming the reward."""
    scores = scores.float().reshape(-1) if scores.ndim == 2 and scores.shape[1] == 1 else scores.float()
    if tuple(scores.shape) != (batch,):
        raise ValueError(
            f"reward {name!r} returned shape {tuple(scores.shape)}; expected one score per image ({batch},)"
        )
    return scores


@dataclass(frozen=True)
class WeightedReward:
    """``R = sum_i w_i r_i`` over several rewards (training_anchors.md §3.7, composite reward)."""

    parts: tuple[tuple[float, Reward], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("a weighted reward needs at least one part")

    @property
    def name(self) -> str:
        return weighted_name((r.name, w) for w, r in self.parts)

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

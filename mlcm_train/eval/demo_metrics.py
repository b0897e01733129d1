"""The demo's metrics on decoded images: FD to held-out real digits, prompt accuracy, classifier reward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mlcm_train.demo import data
from mlcm_train.demo.classifier import DigitClassifier, classifier_reward, predict

from .frechet import frechet_distance_from_stats, gaussian_stats


@dataclass(frozen=True)
class DemoScores:
    fd: float  # squared Frechet distance in classifier-feature space to held-out real images
    prompt_accuracy: float  # fraction whose predicted digit AND colour match the caption
    digit_accuracy: float
    colour_accuracy: float
    reward: float  # mean classifier_reward: tempered log p(digit|x) + log p(colour|x) of the caption

    def to_dict(self) -> dict[str, float]:
        return {
            "fd": self.fd,
            "prompt_accuracy": self.prompt_accuracy,
            "digit_accuracy": self.digit_accuracy,
            "colour_accuracy": self.colour_accuracy,
            "reward": self.reward,
        }


class DemoEvaluator:
    """Scores generated images against the held-out split shown in every colour (297 x 6 real images)."""

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier
        reference = data.load_split("heldout")
        images = torch.cat(
            [
                data.colourise(reference.masks, torch.full((len(reference),), c, dtype=torch.long))
                for c in range(len(data.COLOUR_NAMES))
            ]
        )
        features, _, _ = predict(classifier, images)
        self.reference_stats = gaussian_stats(features)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> DemoScores:
        """Metrics of images in [0, 1] (N, 3, 32, 32) generated for ``prompts``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images but {len(prompts)} prompts; give one prompt per image"
            )
        labels = torch.tensor([data.parse_caption(p) for p in prompts], dtype=torch.long)
        features, digits, colours = predict(self.classifier, images)
        digit_ok = digits == labels[:, 0]
        colour_ok = colours == labels[:, 1]
        rewards = torch.cat(
            [
                classifier_reward(self.classifier, chunk, list(prompts[i : i + 256]))
                for i, chunk in zip(range(0, len(prompts), 256), images.split(256))
            ]
        )
        return DemoScores(
            fd=frechet_distance_from_stats(*gaussian_stats(features), *self.reference_stats),
            prompt_accuracy=float((digit_ok & colour_ok).float().mean()),
            digit_accuracy=float(digit_ok.float().mean()),
            colour_accuracy=float(colour_ok.float().mean()),
            reward=float(rewards.mean()),
        )

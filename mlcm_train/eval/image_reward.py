"""ImageReward (Xu et al. 2023) from local weights through the ``image-reward`` package, never downloading.

The model is BLIP (ViT-L + BERT cross-attention) with an MLP head; re-implementing it is out of scope, so
this wrapper needs the package and the two published files: ``ImageReward.pt`` and ``med_config.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .weights import require_files

FILES = ("ImageReward.pt", "med_config.json")
_HINT = "Pass --imagereward <folder with ImageReward.pt and med_config.json> (from the THUDM/ImageReward release)."


class ImageRewardScorer:
    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        folder = require_files("ImageReward", folder, FILES, _HINT)
        try:
            import ImageReward as reward_package  # noqa: N813 - the package's own capitalised name
        except ImportError as error:
            raise ImportError(
                "ImageReward needs the `image-reward` package: `pip install image-reward` (the weights in "
                f"{folder} are then loaded locally)"
            ) from error
        self.model = reward_package.load(
            str(folder / FILES[0]), device=str(device), med_config=str(folder / FILES[1])
        )
        self.device = device

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from PIL import Image

        scores = []
        for image, prompt in zip(images, prompts):
            array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            scores.append(float(self.model.score(prompt, [Image.fromarray(array)])))
        return torch.tensor(scores)

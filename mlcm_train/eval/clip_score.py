"""CLIP score (Hessel et al. 2021; the ``100 * max(cos, 0)`` convention of torchmetrics and the MLCM tables).

Any local CLIP model folder that ``transformers.CLIPModel.from_pretrained`` reads (config.json + weights) with
its tokenizer files (vocab.json + merges.txt, or tokenizer.json). Preprocessing is CLIP's own (resize the short
side, centre crop, normalise with CLIP's mean/std), written in torch so the score is differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mlcm_train.eval.weights import MissingWeightsError, require_files

# OpenAI CLIP's image normalisation (CLIP repository, clip/clip.py _transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SCORE_WEIGHT = 100.0
_HINT = "Point --clip-model at a CLIP folder such as a local copy of openai/clip-vit-large-patch14."


def clip_preprocess(images: Tensor, size: int) -> Tensor:
    """Images in [0, 1] (B, 3, H, W) -> CLIP input: bicubic resize of the short side, centre crop, normalise."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    resized = torch.nn.functional.interpolate(
        images.float(),
        size=(max(size, round(h * scale)), max(size, round(w * scale))),
        mode="bicubic",
        align_corners=False,
    )
    top, left = (resized.shape[-2] - size) // 2, (resized.shape[-1] - size) // 2
    cropped = resized[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (cropped - mean) / std


class ClipScorer:
    """Image and text embeddings of a local CLIP model; ``score`` is 100 * max(cos(image, text), 0) per pair."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPTokenizer

        path = require_files("CLIP score", folder, ("config.json",), _HINT)
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise MissingWeightsError(
                f"CLIP score: could not load a CLIP model and tokenizer from {path} ({error}); expected config.json, "
                f"model.safetensors and vocab.json + merges.txt. {_HINT}"
            ) from error
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.image_size = int(self.model.config.vision_config.image_size)

    def image_embeds(self, images: Tensor) -> Tensor:
        """L2-normalised projected image embeddings (differentiable w.r.t. ``images``)."""
        pixels = clip_preprocess(images.to(self.device), self.image_size)
        features = self.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(**tokens)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features, dim=-1)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image CLIP score ``100 * max(cos, 0)``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images but {len(prompts)} prompts; give one prompt per image"
            )
        cosine = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)
        return CLIP_SCORE_WEIGHT * cosine.clamp(min=0.0)

"""LAION aesthetic score: the improved-aesthetic-predictor MLP on L2-normalised CLIP ViT-L/14 image embeddings.

Architecture (christophschuhmann/improved-aesthetic-predictor, ``MLP``): 768 -> 1024 -> 128 -> 64 -> 16 -> 1
linear layers with dropout in between (identity at inference); the published head is
``sac+logos+ava1-l14-linearMSE.pth``, a state dict with keys ``layers.{0,2,4,6,7}.{weight,bias}``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from mlcm_train.eval.clip_score import ClipScorer
from mlcm_train.eval.weights import MissingWeightsError, require_files

HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
_HINT = (
    f"Pass --aesthetic-head <{HEAD_FILE} or a .safetensors of it> and --aesthetic-clip <a local "
    "openai/clip-vit-large-patch14 folder>."
)


class AestheticHead(nn.Module):
    """The predictor's MLP; dropout layers kept so the state-dict indices match the published file."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        return self.layers(embeds)


def load_head(path: str | Path) -> AestheticHead:
    """The MLP head from ``.pth`` (loaded with weights_only=True) or ``.safetensors``."""
    path = require_files("aesthetic score", path, (HEAD_FILE,), _HINT)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    embed_dim = int(state["layers.0.weight"].shape[1]) if "layers.0.weight" in state else 768
    head = AestheticHead(embed_dim)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as error:
        raise MissingWeightsError(
            f"aesthetic score: {path} is not the LAION predictor head ({error}). {_HINT}"
        ) from error
    return head.eval().requires_grad_(False)


class AestheticScorer:
    """Predicted aesthetic rating (about 1..10) per image."""

    def __init__(
        self, head_path: str | Path, clip_folder: str | Path, device: str | torch.device = "cpu"
    ) -> None:
        self.clip = ClipScorer(clip_folder, device)
        self.head = load_head(head_path).to(device)
        width = self.head.layers[0].in_features
        projection = int(self.clip.model.config.projection_dim)
        if width != projection:
            raise ValueError(
                f"the aesthetic head expects {width}-d CLIP embeddings but the CLIP model gives {projection}; "
                "use the ViT-L/14 CLIP the head was trained on"
            )

    def score(self, images: Tensor) -> Tensor:
        return self.head(self.clip.image_embeds(images)).squeeze(-1)

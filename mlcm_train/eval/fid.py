"""FID (Heusel et al. 2017) with an Inception network from a local TorchScript file.

The expected file is clean-fid's / StyleGAN's ``inception-2015-12-05.pt`` (TorchScript port of the TF FID
Inception; called as ``model(x, return_features=True)`` on 299x299 images scaled to 0..255, giving 2048-d
pool features). TorchScript archives hold no pickled Python objects, so loading runs no arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from mlcm_train.eval.frechet import frechet_distance
from mlcm_train.eval.weights import require_files

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299
_HINT = f"Pass --inception <path to {INCEPTION_FILE}> (the TorchScript FID Inception used by clean-fid/StyleGAN3)."


class InceptionFeatures:
    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        path = require_files("FID", path, (INCEPTION_FILE,), _HINT)
        if path.is_dir():
            path = path / INCEPTION_FILE
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """(N, D) features of images in [0, 1]."""
        out = []
        for chunk in images.split(batch_size):
            x = torch.nn.functional.interpolate(
                chunk.float().to(self.device),
                size=(INCEPTION_SIZE, INCEPTION_SIZE),
                mode="bilinear",
                align_corners=False,
            )
            out.append(self.model(x * 255.0, return_features=True).float().cpu())
        return torch.cat(out)


def fid(features: InceptionFeatures, generated: Tensor, reference: Tensor) -> float:
    """FID between generated and reference images in [0, 1]."""
    return frechet_distance(features(generated), features(reference))

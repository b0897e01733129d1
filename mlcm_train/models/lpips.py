"""Latent LPIPS (TLCM §4.3): a 4-channel VGG16 perceptual distance on latents, loaded from a local file.

The network is VGG16's conv stack with 4 input channels and the first 3 max-pools removed (the latent is
already 8x downsampled), tapped after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 like LPIPS
(Zhang et al. 2018), with LPIPS's non-negative 1x1 linear heads. The distance is the sum over taps of the
spatially averaged, head-weighted squared difference of channel-normalised features.

Module names follow the LPIPS reference layout (``net.slice{k}.{i}`` with torchvision's VGG16 layer
indices, ``lin{k}.model.1.weight``), so LPIPS-style and torchvision-style (``features.{i}``) state dicts
load directly; the layout of the released ``latent-lpips.pth`` is not published (arXiv 2406.05768v6 §4.3 describes only the network), so
loading is non-strict and reports missing and unexpected keys.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 4  # SD1.5/SDXL VAE latents
REMOVED_POOLS = 3  # "removing the 3 max-pooling layers" (TLCM §4.3): the first three of VGG16's pools
NORM_EPS = 1e-10  # LPIPS normalize_tensor epsilon

# torchvision VGG16 `features` layout: ("conv", in, out), ("relu",), ("pool",) by index; slices end at the
# LPIPS taps (relu1_2=3, relu2_2=8, relu3_3=15, relu4_3=22, relu5_3=29).
_VGG16_CONVS = {
    0: 64,
    2: 64,
    5: 128,
    7: 128,
    10: 256,
    12: 256,
    14: 256,
    17: 512,
    19: 512,
    21: 512,
    24: 512,
    26: 512,
    28: 512,
}
_VGG16_POOLS = (4, 9, 16, 23)  # the pool at 30 lies after the last tap
_SLICE_ENDS = (4, 9, 16, 23, 30)
TAP_CHANNELS = (64, 128, 256, 512, 512)


@dataclass
class LoadReport:
    """What a non-strict load matched: keys the model wanted but the file lacked, and the reverse."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # same name, different shape (left at init)


class _ScalingLayer(nn.Module):
    """LPIPS input normalisation ``(x - shift) / scale``; identity unless the file provides values."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(1, channels, 1, 1))
        self.register_buffer("scale", torch.ones(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class _LinearHead(nn.Module):
    """LPIPS NetLinLayer: a bias-free 1x1 conv to one channel (index 0 was dropout, a no-op in eval)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))
        nn.init.ones_(self.model[1].weight)  # no file weights = LPIPS's unweighted ("lin=False") variant

    def channel_weights(self) -> Tensor:
        """Per-channel weights, clamped non-negative as LPIPS training keeps them, shape (1, C, 1, 1)."""
        return self.model[1].weight.clamp(min=0).reshape(1, -1, 1, 1)


class _VGG16Slices(nn.Module):
    """VGG16 conv stack cut into the five LPIPS slices, first conv taking ``in_channels``."""

    def __init__(self, in_channels: int, removed_pools: int) -> None:
        super().__init__()
        removed = set(_VGG16_POOLS[:removed_pools])
        channels, start = in_channels, 0
        for k, end in enumerate(_SLICE_ENDS, start=1):
            layers = nn.Sequential()
            for idx in range(start, end):
                if idx in _VGG16_CONVS:
                    layer: nn.Module = nn.Conv2d(channels, _VGG16_CONVS[idx], 3, padding=1)
                    channels = _VGG16_CONVS[idx]
                elif idx in _VGG16_POOLS:
                    layer = nn.Identity() if idx in removed else nn.MaxPool2d(2, 2)
                else:
                    layer = nn.ReLU()
                layers.add_module(str(idx), layer)  # torchvision indices keep state-dict keys compatible
            setattr(self, f"slice{k}", layers)
            start = end

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for k in range(1, len(_SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            taps.append(x)
        return taps


class LatentLPIPS(nn.Module):
    """Latent LPIPS distance; ``features`` embeds latents so that ``||f(a) - f(b)||^2 == forward(a, b)``."""

    def __init__(self, in_channels: int = LATENT_CHANNELS, removed_pools: int = REMOVED_POOLS) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer(in_channels)
        self.net = _VGG16Slices(in_channels, removed_pools)
        for k, channels in enumerate(TAP_CHANNELS):
            setattr(self, f"lin{k}", _LinearHead(channels))

    def _normalised_taps(self, x: Tensor) -> list[Tensor]:
        weight = self.scaling_layer.shift
        taps = self.net(self.scaling_layer(x.to(device=weight.device, dtype=weight.dtype)))
        return [t / (t.square().sum(dim=1, keepdim=True).sqrt() + NORM_EPS) for t in taps]

    def features(self, x: Tensor) -> Tensor:
        """(B, D) embedding: per tap, normalised features times sqrt(head weight / (H W)), flattened."""
        parts = []
        for k, tap in enumerate(self._normalised_taps(x)):
            scale = (getattr(self, f"lin{k}").channel_weights() / (tap.shape[-2] * tap.shape[-1])).sqrt()
            parts.append((tap * scale).flatten(1))
        return torch.cat(parts, dim=1)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample distance (B,): sum over taps of the mean over space of head-weighted squared differences."""
        total = a.new_zeros(a.shape[0], dtype=self.scaling_layer.shift.dtype)
        for k, (ta, tb) in enumerate(zip(self._normalised_taps(a), self._normalised_taps(b))):
            weighted = (ta - tb).square() * getattr(self, f"lin{k}").channel_weights()
            total = total + weighted.sum(dim=1).mean(dim=(1, 2))
        return total


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a weights-only torch pickle (optionally under 'state_dict'/'model')."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} does not hold a state dict (found {type(state).__name__}); save model.state_dict()"
        )
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _canonical_key(key: str) -> str:
    """Map known aliases to our names: DDP 'module.', LPIPS 'lins.k', torchvision 'features.i'."""
    key = key.removeprefix("module.")
    key = re.sub(r"^lins\.(\d+)\.", r"lin\1.", key)
    match = re.match(r"^(?:net\.)?features\.(\d+)\.(.*)$", key)
    if match:
        idx = int(match.group(1))
        k = (
            next(i for i, end in enumerate(_SLICE_ENDS, start=1) if idx < end)
            if idx < _SLICE_ENDS[-1]
            else None
        )
        if k is not None:
            return f"net.slice{k}.{idx}.{match.group(2)}"
    return key


def load_latent_lpips(
    path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LatentLPIPS, LoadReport]:
    """Build ``LatentLPIPS`` and load ``path`` non-strictly; frozen, in eval mode; returns it with the report."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"latent LPIPS weights not found at {path}; pass an existing .pth/.safetensors file"
        )
    model = LatentLPIPS()
    own = model.state_dict()
    found: dict[str, Tensor] = {}
    report = LoadReport()
    for key, tensor in _read_state_dict(path).items():
        name = _canonical_key(key)
        if name not in own:
            report.unexpected.append(key)
        elif own[name].shape != tensor.shape:
            report.mismatched.append(f"{key}: file {tuple(tensor.shape)} vs model {tuple(own[name].shape)}")
        else:
            found[name] = tensor
    report.missing = sorted(set(own) - set(found))
    if not any(name.startswith("net.") for name in found):
        hint = f"; mismatched shapes: {report.mismatched[:2]}" if report.mismatched else ""
        raise ValueError(
            f"no VGG weight in {path} fits a 4-channel latent LPIPS (file keys e.g. {report.unexpected[:3]}{hint}); "
            "use the latent-LPIPS weights (not an image LPIPS) or drop the LPIPS option to train on raw latents"
        )
    model.load_state_dict(found, strict=False)
    if report.missing or report.unexpected or report.mismatched:
        logger.warning(
            "latent LPIPS %s: %d missing keys (e.g. %s), %d unexpected (e.g. %s), %d shape mismatches (e.g. %s)",
            path.name,
            len(report.missing),
            report.missing[:3],
            len(report.unexpected),
            report.unexpected[:3],
            len(report.mismatched),
            report.mismatched[:2],
        )
    model.requires_grad_(False).eval()
    return model.to(device=device, dtype=dtype), report

"""The shapes demo set: procedural geometric shapes in six colours on a light background, with captions.

"a purple star on a light background" (``mlcm_train.data.captioned``). Eight classes, each drawn with a
random position, size and rotation from a seed that depends only on the split and the image index, and
anti-aliased by rendering at 4x and averaging. Unlike the digits set it has hard edges, filled areas, a
light background and a different palette; no files are read, so it needs no package beyond torch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mlcm_train.data.captioned import IMAGE_SIZE, CaptionedSet, MaskSplit

SHAPE_WORDS = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "moon")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "orange": (0.95, 0.55, 0.05),
    "green": (0.1, 0.6, 0.15),
    "blue": (0.1, 0.25, 0.85),
    "purple": (0.5, 0.15, 0.7),
    "black": (0.08, 0.08, 0.08),
}
BACKGROUND = (0.92, 0.92, 0.88)  # "light background"
SPLIT_SIZES = {"train": 1600, "heldout": 320}  # 200 / 40 per class
SPLIT_SEEDS = {"train": 20240606, "heldout": 20240607}
SUPERSAMPLE = 4
RADIUS = 9.0  # pixels, before the random size factor
MAX_SHIFT = 4.0  # pixels of random translation each way
SIZE_RANGE = (0.75, 1.15)
# Rotation range per class in radians: none where the shape is round, small where a larger turn would
# make it another class (a square turned 45 degrees is a diamond), any for the moon.
ROTATION = {
    "circle": 0.0,
    "square": math.radians(20),
    "triangle": math.radians(20),
    "diamond": math.radians(20),
    "cross": math.radians(20),
    "ring": 0.0,
    "star": math.radians(36),
    "moon": math.pi,
}


def _inside(name: str, x: Tensor, y: Tensor) -> Tensor:
    """Boolean mask of points (in units of the shape's radius, shape frame) inside class ``name``."""
    r = torch.sqrt(x * x + y * y)
    if name == "circle":
        return r <= 1.0
    if name == "ring":
        return (r <= 1.0) & (r >= 0.6)
    if name == "square":
        return torch.maximum(x.abs(), y.abs()) <= 0.85
    if name == "diamond":
        return x.abs() + y.abs() <= 1.15
    if name == "triangle":  # equilateral, circumradius 1.15: inside the three edges at inradius 0.575
        inside = torch.ones_like(x, dtype=torch.bool)
        for angle in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            inside &= x * math.cos(angle) + y * math.sin(angle) <= 0.575
        return inside
    if name == "cross":
        return ((x.abs() <= 0.3) & (y.abs() <= 1.0)) | ((y.abs() <= 0.3) & (x.abs() <= 1.0))
    if name == "star":  # five points: the edge radius runs linearly from 0.45 (between points) to 1.15
        sector = torch.remainder(torch.atan2(y, x) * 5 / (2 * math.pi) + 0.25, 1.0)
        tip = 1.0 - (sector - 0.5).abs() * 2  # 1 at a point, 0 halfway between two
        return r <= 0.45 + 0.7 * tip
    if name == "moon":
        return (r <= 1.0) & ((x - 0.45) ** 2 + y * y > 0.85**2)
    raise ValueError(f"shape {name!r} is unknown; choose one of {', '.join(SHAPE_WORDS)}")


def render(labels: Tensor, generator: torch.Generator) -> Tensor:
    """Anti-aliased masks (N, 1, 32, 32) in [0, 1] of the classes ``labels``, random pose from ``generator``."""
    count = len(labels)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * MAX_SHIFT
    size = SIZE_RANGE[0] + torch.rand(count, generator=generator) * (SIZE_RANGE[1] - SIZE_RANGE[0])
    turn = torch.rand(count, generator=generator) * 2 - 1
    side = IMAGE_SIZE * SUPERSAMPLE
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) / SUPERSAMPLE - IMAGE_SIZE / 2
    gy, gx = torch.meshgrid(axis, axis, indexing="ij")
    masks = torch.empty(count, 1, side, side)
    for i in range(count):
        name = SHAPE_WORDS[int(labels[i])]
        angle = float(turn[i]) * ROTATION[name]
        scale = RADIUS * float(size[i])
        px, py = gx - float(shift[i, 0]), gy - float(shift[i, 1])
        # Into the shape's frame: rotate by -angle, then divide by its radius.
        x = (px * math.cos(angle) + py * math.sin(angle)) / scale
        y = (-px * math.sin(angle) + py * math.cos(angle)) / scale
        masks[i, 0] = _inside(name, x, y).float()
    return torch.nn.functional.avg_pool2d(masks, SUPERSAMPLE)


def _load_masks(split: str) -> MaskSplit:
    count = SPLIT_SIZES[split]
    labels = torch.arange(count) % len(SHAPE_WORDS)
    return MaskSplit(render(labels, torch.Generator().manual_seed(SPLIT_SEEDS[split])), labels)


CAPTIONED_SET = CaptionedSet(
    name="shapes",
    noun="shape",
    class_words=SHAPE_WORDS,
    colours=COLOURS,
    background=BACKGROUND,
    background_word="light",
    load_masks=_load_masks,
)

"""The demo's data: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 and coloured, with captions.

The caption names the digit and its colour ("a red seven on a dark background"), so a model that ignores
the text cannot match it: prompt accuracy measures text conditioning, not just image quality. Everything is
deterministic: the train/held-out split is a seeded permutation, and each split's colours are assigned so that
every (digit, colour) pair appears about equally often.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Colour name -> RGB in [0, 1]: saturated, mutually distinct hues so the classifier separates them easily.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.15, 0.15),
    "green": (0.15, 0.85, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.15),
    "cyan": (0.15, 0.9, 0.95),
    "magenta": (0.95, 0.2, 0.9),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND = (0.08, 0.08, 0.1)  # "dark background"
IMAGE_SIZE = 32  # pixels; the 8x8 source upscaled 4x
SOURCE_MAX = 16.0  # load_digits pixel values are integers 0..16
HELD_OUT = 297  # of 1797 images: 1500 for training, 297 held out for FD references
SPLIT_SEED = 20240605


def caption(digit: int, colour: int) -> str:
    """``a <colour> <digit word> on a dark background``."""
    return f"a {COLOUR_NAMES[colour]} {DIGIT_WORDS[digit]} on a dark background"


def all_captions() -> list[str]:
    """Every caption the data can produce, digit-major (60 = 10 digits x 6 colours)."""
    return [caption(d, c) for d in range(len(DIGIT_WORDS)) for c in range(len(COLOUR_NAMES))]


def parse_caption(text: str) -> tuple[int, int]:
    """(digit, colour) named by a demo caption; ValueError when it names none or several."""
    words = text.lower().split()
    digits = [i for i, w in enumerate(DIGIT_WORDS) if w in words]
    colours = [i for i, c in enumerate(COLOUR_NAMES) if c in words]
    if len(digits) != 1 or len(colours) != 1:
        raise ValueError(
            f"prompt {text!r} does not name exactly one digit ({', '.join(DIGIT_WORDS)}) and one colour "
            f"({', '.join(COLOUR_NAMES)}); the demo metrics need captions like {caption(7, 0)!r}"
        )
    return digits[0], colours[0]


@dataclass(frozen=True)
class DigitSplit:
    """Grey 32x32 digit masks in [0, 1] with their labels; colours are applied by ``colourise``."""

    masks: Tensor  # (N, 1, 32, 32) float32
    digits: Tensor  # (N,) long

    def __len__(self) -> int:
        return int(self.digits.shape[0])


def load_split(split: str) -> DigitSplit:
    """The ``train`` (1500) or ``heldout`` (297) images, always the same ones in the same order."""
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is unknown; use 'train' or 'heldout'")
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / SOURCE_MAX
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    chosen = order[:HELD_OUT] if split == "heldout" else order[HELD_OUT:]
    masks = upscale(images[chosen].unsqueeze(1))
    return DigitSplit(masks, labels[chosen])


def upscale(masks: Tensor) -> Tensor:
    """8x8 -> 32x32 with bilinear interpolation (smooth strokes instead of 4x4 blocks)."""
    up = torch.nn.functional.interpolate(
        masks, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    return up.clamp(0.0, 1.0)


def colourise(masks: Tensor, colours: Tensor) -> Tensor:
    """Images in [0, 1], (N, 3, 32, 32): each mask blends the dark background into its colour."""
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[colours]  # (N, 3)
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1)
    return background + masks * (palette.view(-1, 3, 1, 1) - background)


def balanced_colours(digits: Tensor) -> Tensor:
    """Colour of each image: cycle through the colours within each digit, so every (digit, colour) is balanced."""
    colours = torch.empty_like(digits)
    for d in range(len(DIGIT_WORDS)):
        where = (digits == d).nonzero().flatten()
        colours[where] = torch.arange(len(where)) % len(COLOUR_NAMES)
    return colours


def random_colours(count: int, generator: torch.Generator) -> Tensor:
    """Fresh colours for a training batch: the model sees every digit in every colour."""
    return torch.randint(0, len(COLOUR_NAMES), (count,), generator=generator)


@dataclass(frozen=True)
class ColouredSet:
    """A fixed, captioned evaluation set: images in [0, 1] with digit/colour labels and captions."""

    images: Tensor  # (N, 3, 32, 32)
    digits: Tensor
    colours: Tensor
    captions: list[str]


def coloured_split(split: str) -> ColouredSet:
    """A split with its balanced, deterministic colours and captions."""
    data = load_split(split)
    colours = balanced_colours(data.digits)
    captions = [caption(int(d), int(c)) for d, c in zip(data.digits, colours)]
    return ColouredSet(colourise(data.masks, colours), data.digits, colours, captions)

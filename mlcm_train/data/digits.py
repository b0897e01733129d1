"""The digits demo set: scikit-learn's bundled 8x8 handwritten digits, upscaled to 32x32 and coloured, with captions.

"a red seven on a dark background" (``mlcm_train.data.captioned``). The train/held-out split is a seeded
permutation of the 1797 images. The module-level names are this set's ``CaptionedSet`` methods and
constants, kept for callers that only know the digits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mlcm_train.data.captioned import IMAGE_SIZE, CaptionedSet, MaskSplit

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
SOURCE_MAX = 16.0  # load_digits pixel values are integers 0..16
HELD_OUT = 297  # of 1797 images: 1500 for training, 297 held out for FD references
SPLIT_SEED = 20240605
DigitSplit = MaskSplit  # the older name of a set's masks and labels


def _load_masks(split: str) -> MaskSplit:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / SOURCE_MAX
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    chosen = order[:HELD_OUT] if split == "heldout" else order[HELD_OUT:]
    return MaskSplit(upscale(images[chosen].unsqueeze(1)), labels[chosen])


def upscale(masks: Tensor) -> Tensor:
    """8x8 -> 32x32 with bilinear interpolation (smooth strokes instead of 4x4 blocks)."""
    up = torch.nn.functional.interpolate(
        masks, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
    )
    return up.clamp(0.0, 1.0)


CAPTIONED_SET = CaptionedSet(
    name="digits",
    noun="digit",
    class_words=DIGIT_WORDS,
    colours=COLOURS,
    background=BACKGROUND,
    background_word="dark",
    load_masks=_load_masks,
)

caption = CAPTIONED_SET.caption
all_captions = CAPTIONED_SET.all_captions
parse_caption = CAPTIONED_SET.parse_caption
load_split = CAPTIONED_SET.load_split
colourise = CAPTIONED_SET.colourise
balanced_colours = CAPTIONED_SET.balanced_colours
random_colours = CAPTIONED_SET.random_colours
coloured_split = CAPTIONED_SET.coloured_split

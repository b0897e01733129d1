"""A captioned demo image set: grey masks of labelled objects, coloured on a plain background, with captions.

The demo teachers are trained on such sets, and their classifiers score generated images against them.
A caption names the object's class and its colour ("a red seven on a dark background", "a blue star on a
light background"), so a model that ignores the text cannot match it: prompt accuracy measures text
conditioning, not only image quality. Two sets ship: ``digits`` (scikit-learn's handwritten digits,
``mlcm_train.data.digits``) and ``shapes`` (procedural geometric shapes, ``mlcm_train.data.shapes``).
Everything is deterministic: a split is always the same images in the same order, and its evaluation
colours are assigned so that every (class, colour) pair appears about equally often.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

IMAGE_SIZE = 32  # pixels, every set
SPLITS = ("train", "heldout")
# Name -> module that defines it as ``CAPTIONED_SET``; imported on first use (digits needs scikit-learn).
_MODULES = {"digits": "mlcm_train.data.digits", "shapes": "mlcm_train.data.shapes"}
DATASET_NAMES = tuple(_MODULES)
# Words every demo tokenizer knows besides a set's class and colour words (caption glue, common prompt words).
CAPTION_WORDS = ("a", "on", "dark", "background", "digit", "number", "of", "the", "light", "black")


@dataclass(frozen=True)
class MaskSplit:
    """Grey 32x32 masks in [0, 1] with their class labels; colours are applied by ``CaptionedSet.colourise``."""

    masks: Tensor  # (N, 1, 32, 32) float32
    digits: Tensor  # (N,) long: the class index (a digit for the digits set; the name predates other sets)

    @property
    def labels(self) -> Tensor:
        return self.digits

    def __len__(self) -> int:
        return int(self.digits.shape[0])


@dataclass(frozen=True)
class ColouredSet:
    """A fixed, captioned evaluation set: images in [0, 1] with class/colour labels and captions."""

    images: Tensor  # (N, 3, 32, 32)
    digits: Tensor  # class labels (see MaskSplit.digits)
    colours: Tensor
    captions: list[str]


@dataclass(frozen=True)
class CaptionedSet:
    """One demo image set: its class words, palette, background and mask source."""

    name: str
    noun: str  # what a class is, for messages: "digit", "shape"
    class_words: tuple[str, ...]
    colours: dict[str, tuple[float, float, float]]  # colour name -> RGB in [0, 1]
    background: tuple[float, float, float]
    background_word: str  # the caption's "<word> background"
    load_masks: Callable[[str], MaskSplit]  # split name -> masks and labels, deterministic
    image_size: int = IMAGE_SIZE

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(self.colours)

    def caption(self, label: int, colour: int) -> str:
        """``a <colour> <class word> on a <background word> background``."""
        return (
            f"a {self.colour_names[colour]} {self.class_words[label]} on a {self.background_word} background"
        )

    def all_captions(self) -> list[str]:
        """Every caption the set can produce, class-major (classes x colours)."""
        return [self.caption(d, c) for d in range(len(self.class_words)) for c in range(len(self.colours))]

    def parse_caption(self, text: str) -> tuple[int, int]:
        """(class, colour) named by a caption; ValueError when it names none or several."""
        words = text.lower().split()
        labels = [i for i, w in enumerate(self.class_words) if w in words]
        colours = [i for i, c in enumerate(self.colour_names) if c in words]
        if len(labels) != 1 or len(colours) != 1:
            raise ValueError(
                f"prompt {text!r} does not name exactly one {self.noun} ({', '.join(self.class_words)}) and "
                f"one colour ({', '.join(self.colour_names)}); the {self.name} metrics need captions like "
                f"{self.caption(len(self.class_words) - 1, 0)!r}"
            )
        return labels[0], colours[0]

    def load_split(self, split: str) -> MaskSplit:
        """The ``train`` or ``heldout`` masks, always the same ones in the same order."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is unknown; use 'train' or 'heldout'")
        return self.load_masks(split)

    def colourise(self, masks: Tensor, colours: Tensor) -> Tensor:
        """Images in [0, 1], (N, 3, H, W): each mask blends the background into its colour."""
        palette = torch.tensor(list(self.colours.values()), dtype=torch.float32)[colours]  # (N, 3)
        background = torch.tensor(self.background, dtype=torch.float32).view(1, 3, 1, 1)
        return background + masks * (palette.view(-1, 3, 1, 1) - background)

    def balanced_colours(self, labels: Tensor) -> Tensor:
        """Colour of each image: cycle through the colours within each class, so every pair is balanced."""
        colours = torch.empty_like(labels)
        for d in range(len(self.class_words)):
            where = (labels == d).nonzero().flatten()
            colours[where] = torch.arange(len(where)) % len(self.colours)
        return colours

    def random_colours(self, count: int, generator: torch.Generator) -> Tensor:
        """Fresh colours for a training batch: the model sees every class in every colour."""
        return torch.randint(0, len(self.colours), (count,), generator=generator)

    def coloured_split(self, split: str) -> ColouredSet:
        """A split with its balanced, deterministic colours and captions."""
        data = self.load_split(split)
        colours = self.balanced_colours(data.digits)
        captions = [self.caption(int(d), int(c)) for d, c in zip(data.digits, colours)]
        return ColouredSet(self.colourise(data.masks, colours), data.digits, colours, captions)

    def every_colour(self, split: str) -> Tensor:
        """The split shown in every colour, colour-major: (N * colours, 3, H, W), the FD reference set."""
        data = self.load_split(split)
        return torch.cat(
            [
                self.colourise(data.masks, torch.full((len(data),), c, dtype=torch.long))
                for c in range(len(self.colours))
            ]
        )

    def vocabulary(self) -> tuple[str, ...]:
        """Words a tokenizer for this set keeps whole: the caption glue, the classes and the colours."""
        return tuple(dict.fromkeys((*CAPTION_WORDS, *self.class_words, *self.colour_names)))


def get(name: str) -> CaptionedSet:
    """The set called ``name`` (one of ``DATASET_NAMES``)."""
    if name not in _MODULES:
        raise ValueError(f"dataset {name!r} is unknown; choose one of {', '.join(DATASET_NAMES)}")
    return importlib.import_module(_MODULES[name]).CAPTIONED_SET

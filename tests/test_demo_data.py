"""The demo's data and tokenizer: deterministic, balanced captions and a vocabulary that keeps every word whole."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from mlcm_train.data import captioned
from mlcm_train.data import digits as data
from mlcm_train.demo.vocab import CONTEXT_LENGTH, WORDS, bpe, build_merges, write_tokenizer


def test_splits_are_deterministic_disjoint_and_sized():
    train, held = data.load_split("train"), data.load_split("heldout")
    assert len(train) == 1797 - data.HELD_OUT and len(held) == data.HELD_OUT
    again = data.load_split("heldout")
    assert torch.equal(held.masks, again.masks) and torch.equal(held.digits, again.digits)
    # No held-out image is also a training image.
    flat_train = {tuple(m.flatten()[::7].tolist()) for m in train.masks}
    assert not any(tuple(m.flatten()[::7].tolist()) in flat_train for m in held.masks[:50])
    assert held.masks.shape[1:] == (1, data.IMAGE_SIZE, data.IMAGE_SIZE)
    assert 0.0 <= float(held.masks.min()) and float(held.masks.max()) <= 1.0


def test_coloured_split_is_balanced_and_captioned():
    split = data.coloured_split("heldout")
    pairs = Counter(zip(split.digits.tolist(), split.colours.tolist()))
    per_digit = Counter(split.digits.tolist())
    for digit, count in per_digit.items():
        counts = [pairs[(digit, c)] for c in range(len(data.COLOUR_NAMES))]
        assert max(counts) - min(counts) <= 1, (digit, counts)  # colours balanced within each digit
        assert sum(counts) == count
    for text, d, c in zip(split.captions[:20], split.digits, split.colours):
        assert data.parse_caption(text) == (int(d), int(c))
    assert split.captions == data.coloured_split("heldout").captions


def test_colourise_puts_the_colour_where_the_digit_is():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 10:20, 10:20] = 1.0
    image = data.colourise(mask, torch.tensor([0]))
    assert torch.allclose(image[0, :, 15, 15], torch.tensor(data.COLOURS["red"]))
    assert torch.allclose(image[0, :, 0, 0], torch.tensor(data.BACKGROUND))


def test_captions_cover_every_digit_and_colour_once():
    captions = data.all_captions()
    assert len(captions) == len(set(captions)) == 60
    assert data.caption(7, 0) == "a red seven on a dark background"
    with pytest.raises(ValueError, match="exactly one digit"):
        data.parse_caption("a red cat")


def test_merges_make_every_word_one_token():
    merges = build_merges()
    ranks = {pair: i for i, pair in enumerate(merges)}
    for word in WORDS:
        assert bpe(word, ranks) == [word + "</w>"]


def test_clip_tokenizer_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    folder = write_tokenizer(tmp_path / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.model_max_length == CONTEXT_LENGTH
    for text in data.all_captions():
        ids = tokenizer(text, padding="max_length", max_length=CONTEXT_LENGTH).input_ids
        assert len(ids) == CONTEXT_LENGTH
        assert (
            len([i for i in ids if i != tokenizer.eos_token_id]) == len(text.split()) + 1
        )  # BOS + one per word
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Unknown words still tokenize (byte fallback), they just take several tokens.
    assert len(tokenizer("zebra").input_ids) > 3


# --- the shapes set: the second demo teacher's data ------------------------------------------------------


def test_shapes_splits_are_deterministic_balanced_and_disjoint():
    shapes = captioned.get("shapes")
    train, held = shapes.load_split("train"), shapes.load_split("heldout")
    assert len(train) == 1600 and len(held) == 320
    assert train.masks.shape[1:] == (1, 32, 32) and 0.0 <= float(train.masks.min()) <= 1.0
    assert torch.equal(held.masks, shapes.load_split("heldout").masks)
    assert Counter(held.digits.tolist()) == {c: 40 for c in range(len(shapes.class_words))}
    # Random poses: no held-out mask repeats a training one.
    train_keys = {tuple(m.flatten()[::5].round(decimals=3).tolist()) for m in train.masks}
    assert not any(tuple(m.flatten()[::5].round(decimals=3).tolist()) in train_keys for m in held.masks)


def test_shapes_classes_are_the_shapes_their_names_say():
    """Geometry of the rendered masks at a fixed pose: areas against the closed forms, a hole in the ring,
    the moon's bite on its right, anti-aliased edges."""
    from mlcm_train.data import shapes

    r = shapes.RADIUS
    assert set(shapes.ROTATION) == set(shapes.SHAPE_WORDS)  # every class has a rotation range
    labels = torch.arange(len(shapes.SHAPE_WORDS))
    generator = torch.Generator().manual_seed(0)
    masks = shapes.render(labels, generator)
    area = {name: float(masks[i].sum()) for i, name in enumerate(shapes.SHAPE_WORDS)}
    scale = {}  # the random size of each, drawn as render() draws it: shifts first, then sizes
    generator = torch.Generator().manual_seed(0)
    torch.rand(len(labels), 2, generator=generator)
    size = shapes.SIZE_RANGE[0] + torch.rand(len(labels), generator=generator) * (
        shapes.SIZE_RANGE[1] - shapes.SIZE_RANGE[0]
    )
    for i, name in enumerate(shapes.SHAPE_WORDS):
        scale[name] = (r * float(size[i])) ** 2
    expected = {
        "circle": math.pi,
        "ring": math.pi * (1 - 0.6**2),
        "square": 1.7**2,
        "diamond": 2 * 1.15**2,
        "triangle": 3 * math.sqrt(3) / 4 * 1.15**2,
        "cross": 2 * 0.6 * 2.0 - 0.6**2,
    }
    for name, unit_area in expected.items():
        assert area[name] == pytest.approx(unit_area * scale[name], rel=0.05), name
    ring = masks[shapes.SHAPE_WORDS.index("ring"), 0]
    ys, xs = torch.nonzero(ring > 0.5, as_tuple=True)
    cy, cx = int(ys.float().mean().round()), int(xs.float().mean().round())
    assert float(ring[cy, cx]) < 0.05  # the hole
    assert bool(((masks > 0.05) & (masks < 0.95)).any())  # anti-aliased, not binary


def test_shapes_captions_and_vocabulary():
    shapes = captioned.get("shapes")
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == 48
    assert shapes.caption(6, 4) == "a purple star on a light background"
    assert shapes.parse_caption("a purple star on a light background") == (6, 4)
    with pytest.raises(ValueError, match="exactly one shape"):
        shapes.parse_caption("a red seven on a dark background")
    merges = build_merges(shapes.vocabulary())
    ranks = {pair: i for i, pair in enumerate(merges)}
    for word in shapes.vocabulary():
        assert bpe(word, ranks) == [word + "</w>"]
    # The digits set's vocabulary is the one its shipped tokenizer was written from.
    assert captioned.get("digits").vocabulary() == WORDS


def test_unknown_set_names_the_known_ones():
    with pytest.raises(ValueError, match="digits, shapes"):
        captioned.get("faces")

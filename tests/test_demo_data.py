"""The demo's data and tokenizer: deterministic, balanced captions and a vocabulary that keeps every word whole."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

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

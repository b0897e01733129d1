"""A small CLIP BPE tokenizer the project writes itself (vocab.json + merges.txt), for the demo's captions.

CLIP's byte-level BPE (Radford et al. 2021): a word is split into byte symbols, the last one marked with
``</w>``, and the pair of lowest merge rank is merged until none applies. We list every byte symbol (so any
text tokenizes) and, for each demo word, merges that join it into one token. Merges for one word can steal
pairs from another ("r e" of "red" inside "green"), so ``build_merges`` simulates BPE and appends the merges
each word still needs until every word is a single token.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlcm_train.data.captioned import CAPTION_WORDS
from mlcm_train.data.digits import COLOUR_NAMES, DIGIT_WORDS

END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 16  # tokens; the longest demo caption is 8 words + BOS/EOS
EXTRA_WORDS = CAPTION_WORDS
# The digits teacher's words (its shipped tokenizer); another set passes CaptionedSet.vocabulary().
WORDS = tuple(dict.fromkeys((*EXTRA_WORDS, *DIGIT_WORDS, *COLOUR_NAMES)))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one lower-case word: merge the lowest-rank adjacent pair (all occurrences) until none is known."""
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def build_merges(words: tuple[str, ...] = WORDS) -> list[tuple[str, str]]:
    """Merges that make every word in ``words`` a single token (appended until a fixed point)."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for word in words:
            symbols = bpe(word, ranks)
            while len(symbols) > 1:
                # A new merge has the highest rank, so it never changes words that are already whole.
                pair = (symbols[0], symbols[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
                symbols = bpe(word, ranks)
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Bytes, word-final bytes, merged symbols, then BOS and EOS last (CLIP's layout)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def write_tokenizer(directory: str | Path, words: tuple[str, ...] = WORDS) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json loadable by ``CLIPTokenizer.from_pretrained``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = build_merges(words)
    vocab = build_vocab(merges)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CONTEXT_LENGTH,
        "do_lower_case": True,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def vocab_size() -> int:
    return len(build_vocab(build_merges()))

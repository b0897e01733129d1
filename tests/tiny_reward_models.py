"""Tiny random reward networks for the reward tests (no downloads): a CLIP model folder like a hub snapshot."""

from __future__ import annotations

import torch
from tiny_models import make_tiny_tokenizer, tiny_vocab

TINY_PROJECTION = 16
TINY_IMAGE = 32


def make_tiny_clip(folder):
    """A random CLIPModel (text + vision, 1 layer each) with a tiny BPE tokenizer, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel

    vocab = tiny_vocab()
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TINY_IMAGE,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_PROJECTION))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    make_tiny_tokenizer(folder)
    return folder

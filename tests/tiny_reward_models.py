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


def make_tiny_aesthetic(folder, clip_folder):
    """A random LAION aesthetic head beside a link to a tiny CLIP (the ``aesthetic=`` reward's layout)."""
    from safetensors.torch import save_file

    from mlcm_train.eval.aesthetic import AestheticHead

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "clip").symlink_to(clip_folder, target_is_directory=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        head = AestheticHead(TINY_PROJECTION)
    save_file(head.state_dict(), str(folder / "sac+logos+ava1-l14-linearMSE.safetensors"))
    return folder


def build_tiny_classifier():
    """(model, recipe) of a small random coloured-digits classifier, the same on every call."""
    from mlcm_train.demo.classifier_train import ClassifierRecipe
    from mlcm_train.eval.digits import DigitClassifier

    recipe = ClassifierRecipe(channels=(4, 4, 4), features=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = DigitClassifier(recipe.channels, recipe.features)
    return model, recipe


def make_tiny_classifier(folder):
    """``build_tiny_classifier``'s model saved as the demo ships it (the ``classifier=`` reward)."""
    from mlcm_train.demo.classifier_train import save_classifier

    model, recipe = build_tiny_classifier()
    save_classifier(model, folder, recipe)
    return folder

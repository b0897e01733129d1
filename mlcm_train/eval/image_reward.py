"""ImageReward (Xu et al. 2023) from local weights through the ``image-reward`` package, never downloading.

The model is BLIP (ViT-L + BERT cross-attention) with an MLP head; re-implementing it is out of scope, so
this wrapper needs the package and a folder with the two published files, ``ImageReward.pt`` and
``med_config.json``, plus BLIP's text tokenizer (``bert-base-uncased``: ``vocab.txt`` and its
``tokenizer_config.json``) in a ``bert-base-uncased/`` subfolder.

The package's own ``ImageReward.load`` is not used: its BLIP fetches ``bert-base-uncased`` from the hub
whatever one passes, it loads the checkpoint with ``strict=False`` (a wrong file would score with random
weights, silently), and it downloads ``med_config.json`` when not given. ``load_imagereward`` builds the
same model with the local tokenizer and loads the checkpoint strictly, with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mlcm_train.eval.weights import require_files

FILES = ("ImageReward.pt", "med_config.json")
TOKENIZER_DIR = "bert-base-uncased"
TOKENIZER_FILES = ("vocab.txt",)
# Keys the checkpoint may lack or carry beyond the model without changing a score: buffers of position ids,
# which transformers versions keep or drop.
TOLERATED_KEY_SUFFIX = "position_ids"
IMAGEREWARD_SIZE = 224  # BLIP's input side
IMAGEREWARD_MAX_TOKENS = 35  # the package's prompt length (ImageReward.py / ReFL.py)
_HINT = (
    "Pass a folder with ImageReward.pt and med_config.json (from the THUDM/ImageReward release) and BLIP's "
    f"tokenizer in {TOKENIZER_DIR}/ (vocab.txt and tokenizer_config.json of bert-base-uncased)."
)


def _package():
    import importlib

    try:
        # import_module: the package's __init__ rebinds the name ImageReward.ImageReward to the class.
        model_module = importlib.import_module("ImageReward.ImageReward")
        blip_module = importlib.import_module("ImageReward.models.BLIP.blip_pretrain")
    except ImportError as error:
        raise ImportError(
            "ImageReward needs the `image-reward` package: `pip install image-reward openai-clip "
            '"transformers<4.50" "setuptools<81"` (its BLIP code needs transformers before 4.50 and it imports '
            f"OpenAI's clip; better in an environment of its own); the weights are then read locally ({error})"
        ) from error
    return model_module, blip_module


@contextlib.contextmanager
def _local_tokenizer(blip_module, folder: Path) -> Iterator[None]:
    """BLIP's ``init_tokenizer`` with ``bert-base-uncased`` read from ``folder`` instead of the hub."""
    from transformers import BertTokenizer

    def init_tokenizer():
        # The package's init_tokenizer, from a local folder: [DEC] as BOS, [ENC] as the encoder token.
        tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    original = blip_module.init_tokenizer
    blip_module.init_tokenizer = init_tokenizer
    try:
        yield
    finally:
        blip_module.init_tokenizer = original


def load_imagereward(folder: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The package's ``ImageReward`` model with the weights in ``folder``, in eval mode on ``device``."""
    folder = require_files("ImageReward", folder, FILES, _HINT)
    tokenizer = require_files("ImageReward tokenizer", folder / TOKENIZER_DIR, TOKENIZER_FILES, _HINT)
    model_module, blip_module = _package()
    with _local_tokenizer(blip_module, tokenizer):
        model = model_module.ImageReward(med_config=str(folder / FILES[1]), device=str(device))
    state = torch.load(folder / FILES[0], map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(TOLERATED_KEY_SUFFIX)]
    unexpected = [k for k in unexpected if not k.endswith(TOLERATED_KEY_SUFFIX)]
    if missing or unexpected:
        raise ValueError(
            f"{folder / FILES[0]} does not fit the ImageReward model built from {folder / FILES[1]}: "
            f"{len(missing)} weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}). Use the ImageReward-v1.0 checkpoint with its own med_config.json."
        )
    return model.to(device).eval()


def imagereward_scores(model: nn.Module, pixels: Tensor, prompts: Sequence[str]) -> Tensor:
    """Differentiable normalised ImageReward of BLIP-preprocessed ``pixels`` (the package's ``score_gard``)."""
    device = pixels.device
    tokens = model.blip.tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=IMAGEREWARD_MAX_TOKENS,
        return_tensors="pt",
    ).to(device)
    # score_gard already subtracts the package's mean and divides by its std.
    return model.score_gard(tokens.input_ids, tokens.attention_mask, pixels).reshape(-1)


class ImageRewardScorer:
    """The ``eval`` metric: mean ImageReward of generated images and their prompts."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        self.model = load_imagereward(folder, device)
        self.device = torch.device(device)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-image scores of images in [0, 1] (N, 3, H, W), through the package's own ``score`` (PIL path)."""
        from PIL import Image

        scores = []
        for image, prompt in zip(images, prompts):
            array = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
            scores.append(float(self.model.score(prompt, Image.fromarray(array))))
        return torch.tensor(scores)

"""ImageReward through the real `image-reward` package, offline: a BLIP built from a small med_config with
random weights, saved the way the release ships it, loaded by our strict loader, scored and differentiated.

Skipped where the package is not installed: it pins timm 0.6.13, its BLIP code needs transformers < 4.50 and
it imports OpenAI's `clip`, so CI does not install it. In an environment of its own,
`pip install image-reward openai-clip "transformers<4.50" "setuptools<81"` runs it.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("ImageReward", reason="needs the image-reward package")
pytestmark = pytest.mark.slow

from mlcm_train.eval.image_reward import (  # noqa: E402 - after the skip
    FILES,
    TOKENIZER_DIR,
    ImageRewardScorer,
    imagereward_scores,
    load_imagereward,
)
from mlcm_train.reward.models import build_reward  # noqa: E402

WORDS = ["a", "red", "cat", "dog", "on", "the", "grass", "photo", "of", "blue"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A release-shaped folder: ImageReward.pt (random weights), med_config.json, bert-base-uncased/."""
    from mlcm_train.eval.image_reward import _local_tokenizer, _package

    model_module, blip_module = _package()

    root = tmp_path_factory.mktemp("imagereward")
    tokenizer = root / TOKENIZER_DIR
    tokenizer.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (tokenizer / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    # BLIP's text side: hidden 768 (ImageReward's MLP input), one cross-attending layer, our vocabulary + 2.
    med = {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.0,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 256,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 1,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": len(vocab) + 2,
        "encoder_width": 1024,
        "add_cross_attention": True,
    }
    (root / FILES[1]).write_text(json.dumps(med))
    torch.manual_seed(0)
    with _local_tokenizer(blip_module, tokenizer):
        model = model_module.ImageReward(med_config=str(root / FILES[1]), device="cpu")
    torch.save(model.state_dict(), root / FILES[0])
    return root


def test_the_strict_loader_reads_the_saved_model_offline(folder):
    model = load_imagereward(folder)
    saved = torch.load(folder / FILES[0], weights_only=True)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items() if key in saved)
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        scores = imagereward_scores(model, pixels, ["a red cat", "a blue dog on the grass"])
        tokens = model.blip.tokenizer(
            ["a red cat", "a blue dog on the grass"], padding="max_length", max_length=35, return_tensors="pt"
        )
        direct = model.score_gard(tokens.input_ids, tokens.attention_mask, pixels).reshape(-1)
    torch.testing.assert_close(scores, direct)  # normalised once, by the package


def test_the_reward_is_differentiable_into_the_images_only(folder):
    reward = build_reward(f"imagereward={folder}")
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    scores = reward(images, ["a red cat", "a photo of a dog"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for module in reward.modules() for p in module.parameters())


def test_the_eval_metric_uses_the_packages_own_scoring(folder):
    scorer = ImageRewardScorer(folder)
    images = torch.rand(2, 3, 224, 224)
    prompts = ["a red cat", "a blue dog"]
    scores = scorer.score(images, prompts)
    with torch.no_grad():
        differentiable = build_reward(f"imagereward={folder}")(images, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # The package's PIL preprocessing (uint8, bicubic) and ours (float tensors) differ only by rounding here.
    torch.testing.assert_close(scores, differentiable, atol=0.05, rtol=0)


def test_a_checkpoint_of_another_model_is_refused(folder, tmp_path):
    for name in FILES[1:]:
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    (tmp_path / TOKENIZER_DIR).mkdir()
    for path in (folder / TOKENIZER_DIR).iterdir():
        (tmp_path / TOKENIZER_DIR / path.name).write_bytes(path.read_bytes())
    state = torch.load(folder / FILES[0], weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, tmp_path / FILES[0])
    with pytest.raises(ValueError, match="does not fit the ImageReward model"):
        load_imagereward(tmp_path)

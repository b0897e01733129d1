"""Real-model metrics on tiny random models built here: CLIP score, LAION aesthetic head, FID; missing weights."""

from __future__ import annotations

import pytest
import torch

from mlcm_train.demo.vocab import write_tokenizer
from mlcm_train.eval.weights import MissingWeightsError


def _tiny_clip(folder, projection_dim=16):
    from transformers import CLIPConfig, CLIPModel

    vocab_size = len(__import__("json").loads((write_tokenizer(folder) / "vocab.json").read_text()))
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1,
            "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=projection_dim,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    return model


def test_clip_score_matches_the_model_cosine(tmp_path):
    from mlcm_train.eval.clip_score import ClipScorer, clip_preprocess

    model = _tiny_clip(tmp_path / "clip").eval()
    scorer = ClipScorer(tmp_path / "clip")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = ["a red seven on a dark background", "a blue one on a dark background", "a green two"]
    scores = scorer.score(images, prompts)
    # Independent route: CLIPModel's own forward gives logit_scale * cos.
    ids = scorer.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=ids.input_ids,
            attention_mask=ids.attention_mask,
            pixel_values=clip_preprocess(images, 32),
        )
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert torch.allclose(scores, 100 * cosine.clamp(min=0), atol=1e-4)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 100)).all())


def test_clip_image_embeddings_are_differentiable(tmp_path):
    from mlcm_train.eval.clip_score import ClipScorer

    _tiny_clip(tmp_path / "clip")
    images = torch.rand(2, 3, 24, 40, requires_grad=True)  # non-square: resize short side, centre crop
    ClipScorer(tmp_path / "clip").image_embeds(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_aesthetic_head_loads_the_published_layout(tmp_path):
    from mlcm_train.eval.aesthetic import AestheticHead, AestheticScorer

    _tiny_clip(tmp_path / "clip", projection_dim=768)
    head = AestheticHead(768)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    scorer = AestheticScorer(tmp_path / "head.pth", tmp_path / "clip")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = head.eval()(scorer.clip.image_embeds(images)).squeeze(-1)
        assert torch.allclose(scorer.score(images), expected, atol=1e-5)
    assert set(head.state_dict()) == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_aesthetic_head_needs_the_matching_clip(tmp_path):
    from mlcm_train.eval.aesthetic import AestheticHead, AestheticScorer

    _tiny_clip(tmp_path / "clip", projection_dim=16)
    torch.save(AestheticHead(768).state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="ViT-L/14"):
        AestheticScorer(tmp_path / "head.pth", tmp_path / "clip")


def test_fid_with_a_torchscript_feature_network(tmp_path):
    from mlcm_train.eval.fid import INCEPTION_FILE, InceptionFeatures, fid

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) / 255.0

    torch.jit.script(Pool()).save(str(tmp_path / INCEPTION_FILE))
    features = InceptionFeatures(tmp_path)
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(200, 3, 8, 8, generator=g), torch.rand(200, 3, 8, 8, generator=g)
    assert fid(features, a, b) < 0.01
    assert fid(features, a, b * 0.2) > 0.1


def test_missing_weights_name_the_expected_files(tmp_path):
    from mlcm_train.eval.aesthetic import HEAD_FILE, load_head
    from mlcm_train.eval.clip_score import ClipScorer
    from mlcm_train.eval.fid import INCEPTION_FILE, InceptionFeatures
    from mlcm_train.eval.image_reward import ImageRewardScorer

    with pytest.raises(MissingWeightsError, match="config.json"):
        ClipScorer(tmp_path)
    with pytest.raises(MissingWeightsError, match="none were given"):
        ClipScorer(None)
    with pytest.raises(MissingWeightsError, match=HEAD_FILE.replace("+", r"\+")):
        load_head(tmp_path / "absent.pth")
    with pytest.raises(MissingWeightsError, match="ImageReward.pt, med_config.json"):
        ImageRewardScorer(tmp_path)
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILE):
        InceptionFeatures(tmp_path / "nothing.pt")


def test_image_reward_without_its_package_says_what_to_install(tmp_path):
    from mlcm_train.eval.image_reward import FILES, TOKENIZER_DIR, ImageRewardScorer

    for name in FILES:
        (tmp_path / name).write_text("{}")
    with pytest.raises(MissingWeightsError, match="vocab.txt"):
        ImageRewardScorer(tmp_path)  # BLIP's tokenizer is read locally too, never fetched
    (tmp_path / TOKENIZER_DIR).mkdir()
    (tmp_path / TOKENIZER_DIR / "vocab.txt").write_text("[PAD]\n")
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install image-reward"):
            ImageRewardScorer(tmp_path)
    else:
        pytest.skip("image-reward is installed; the placeholder files are not real weights")

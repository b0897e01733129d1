"""Each built-in reward loads from a tiny local model folder made here; parity with its published formula;
gradients reach the images and never the reward network; missing weights name the files expected."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_reward_models import TINY_IMAGE, TINY_PROJECTION, build_tiny_classifier, make_tiny_clip

from mlcm_train.eval.clip_score import ClipScorer, clip_preprocess
from mlcm_train.eval.weights import MissingWeightsError
from mlcm_train.reward.models import build_reward

PROMPTS = ["a red cat", "the dog"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _images(requires_grad: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 24, 20, generator=generator).requires_grad_(requires_grad)


def _check_gradients(reward, images, scores):
    """Scores (B,), finite; d(sum scores)/d(images) nonzero; no reward parameter gets a gradient."""
    assert scores.shape == (images.shape[0],) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    for module in reward.modules():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())


def _clip_logits(folder, images, prompts):
    """Independent reference: CLIPModel's own logits_per_image on CLIP-preprocessed images."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tokens = CLIPTokenizer.from_pretrained(folder)(
        prompts, padding="max_length", max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, pixel_values=clip_preprocess(images, TINY_IMAGE))
    return out.logits_per_image.diagonal(), model.logit_scale.exp()


def test_clip_reward(clip_folder):
    reward = build_reward(f"clip={clip_folder}")
    images = _images()
    scores = reward(images, PROMPTS)
    logits, scale = _clip_logits(clip_folder, images.detach(), PROMPTS)
    torch.testing.assert_close(scores.detach(), (100.0 * logits / scale).clamp(min=0), rtol=1e-4, atol=1e-4)
    _check_gradients(reward, images, scores)


def test_pickscore_is_logit_scale_times_cosine(clip_folder):
    reward = build_reward(f"pickscore={clip_folder}")
    images = _images()
    scores = reward(images, PROMPTS)
    logits, _ = _clip_logits(clip_folder, images.detach(), PROMPTS)
    torch.testing.assert_close(scores.detach(), logits, rtol=1e-4, atol=1e-4)
    _check_gradients(reward, images, scores)


def test_hpsv2_from_a_transformers_clip_folder_is_cosine(clip_folder):
    reward = build_reward(f"hpsv2={clip_folder}")
    images = _images()
    scores = reward(images, PROMPTS)
    logits, scale = _clip_logits(clip_folder, images.detach(), PROMPTS)
    torch.testing.assert_close(scores.detach(), logits / scale, rtol=1e-4, atol=1e-4)
    _check_gradients(reward, images, scores)


def test_hpsv2_openclip_checkpoint_names_the_package(tmp_path):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("open_clip_torch is installed; the missing-package error cannot be shown")
    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"not read")
    with pytest.raises(ImportError, match="open_clip_torch"):
        build_reward(f"hpsv2={tmp_path}")


def test_aesthetic_reward_head_and_clip_subfolder(tmp_path, clip_folder):
    from mlcm_train.eval.aesthetic import AestheticHead

    folder = tmp_path / "aesthetic"
    folder.mkdir()
    (folder / "clip").symlink_to(clip_folder, target_is_directory=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        head = AestheticHead(TINY_PROJECTION)
    save_file(head.state_dict(), str(folder / "sac+logos+ava1-l14-linearMSE.safetensors"))
    reward = build_reward(f"aesthetic={folder}")
    images = _images()
    scores = reward(images, PROMPTS)
    embeds = ClipScorer(clip_folder).image_embeds(images.detach())
    with torch.no_grad():
        expected = head.eval()(embeds).squeeze(-1)
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-4, atol=1e-4)
    _check_gradients(reward, images, scores)


def test_classifier_reward_is_the_demo_log_probability(tmp_path):
    from mlcm_train.data import digits as data
    from mlcm_train.demo.classifier_train import save_classifier
    from mlcm_train.eval.digits import classifier_reward

    model, recipe = build_tiny_classifier()
    save_classifier(model, tmp_path, recipe)
    reward = build_reward(f"classifier={tmp_path}")
    prompts = [data.caption(7, 0), data.caption(1, 2)]
    images = torch.rand(2, 3, data.IMAGE_SIZE, data.IMAGE_SIZE, generator=torch.Generator().manual_seed(4))
    images.requires_grad_(True)
    scores = reward(images, prompts)
    with torch.no_grad():
        half = {k: v.half().float() for k, v in model.state_dict().items()}  # saved in fp16
        model.load_state_dict(half)
        expected = classifier_reward(model.eval(), images.detach(), prompts)
    torch.testing.assert_close(scores.detach(), expected, rtol=1e-5, atol=1e-5)
    assert (scores <= 0).all()
    _check_gradients(reward, images, scores)
    # Images of another size (the tiny test teachers decode 16 px) are resized to the classifier's input.
    assert reward(torch.rand(2, 3, 16, 16), prompts).shape == (2,)


def test_imagereward_needs_its_files_then_its_package(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"ImageReward\.pt.*med_config\.json"):
        build_reward(f"imagereward={tmp_path}")
    (tmp_path / "ImageReward.pt").write_bytes(b"not read")
    (tmp_path / "med_config.json").write_text("{}")
    (tmp_path / "bert-base-uncased").mkdir()
    (tmp_path / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n")
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="image-reward"):
            build_reward(f"imagereward={tmp_path}")
    else:
        pytest.skip("image-reward is installed; the missing-package error cannot be shown")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("clip", "config.json"),
        ("pickscore={missing}", "does not exist"),
        ("clip={empty}", "config.json"),
        ("hpsv2={empty}", "HPS_v2.1_compressed.pt"),
        ("aesthetic={empty}", "sac\\+logos\\+ava1-l14-linearMSE"),
        ("imagereward", "ImageReward.pt"),
    ],
)
def test_missing_weights_name_the_files_expected(tmp_path, spec, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match=expected):
        build_reward(spec.format(missing=tmp_path / "nope", empty=empty))


def test_classifier_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        build_reward(f"classifier={tmp_path}")

"""The shipped demo classifier: accurate on held-out real digits, FD separates real from noise, reward works."""

from __future__ import annotations

import pytest
import torch

from mlcm_train.data import digits as data
from mlcm_train.demo.run import ASSET_DIR
from mlcm_train.eval.digits import (
    REWARD_TEMPERATURE,
    DemoEvaluator,
    classifier_reward,
    load_classifier,
    predict,
)

HELDOUT_ACCURACY = 0.9  # digits and colours of the held-out split (measured: see the shipped config)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(ASSET_DIR)


@pytest.fixture(scope="module")
def heldout():
    return data.coloured_split("heldout")


def test_shipped_classifier_is_accurate_on_heldout_digits(classifier, heldout):
    _, digits, colours = predict(classifier, heldout.images)
    assert float((digits == heldout.digits).float().mean()) > HELDOUT_ACCURACY
    assert float((colours == heldout.colours).float().mean()) > 0.98


def test_fd_real_vs_real_is_small_and_noise_vs_real_is_large(classifier, heldout):
    evaluator = DemoEvaluator(classifier)
    real = evaluator.score(heldout.images, heldout.captions)
    noise = evaluator.score(
        torch.rand(heldout.images.shape, generator=torch.Generator().manual_seed(0)), heldout.captions
    )
    assert real.fd < 0.1 * noise.fd
    assert real.prompt_accuracy > HELDOUT_ACCURACY and noise.prompt_accuracy < 0.3
    assert real.reward > noise.reward


def test_reward_is_differentiable_and_prefers_the_caption(classifier, heldout):
    images = heldout.images[:8].clone().requires_grad_(True)
    right = classifier_reward(classifier, images, heldout.captions[:8])
    right.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    wrong = [data.caption((int(d) + 1) % 10, int(c)) for d, c in zip(heldout.digits[:8], heldout.colours[:8])]
    assert float(right.mean()) > float(classifier_reward(classifier, heldout.images[:8], wrong).mean())
    assert bool((right <= 0).all())  # a sum of log-probabilities


def test_reward_is_the_tempered_log_probability_and_keeps_headroom(classifier, heldout):
    images, captions = heldout.images[:32], heldout.captions[:32]
    labels = torch.tensor([data.parse_caption(c) for c in captions])
    with torch.no_grad():
        digit_logits, colour_logits = classifier(images)
        for temperature in (1.0, REWARD_TEMPERATURE):
            expected = (digit_logits / temperature).log_softmax(-1)[range(32), labels[:, 0]] + (
                colour_logits / temperature
            ).log_softmax(-1)[range(32), labels[:, 1]]
            got = classifier_reward(classifier, images, captions, temperature=temperature)
            torch.testing.assert_close(got, expected)
        plain = classifier_reward(classifier, images, captions, temperature=1.0)
        tempered = classifier_reward(classifier, images, captions)
    # A typical real digit sits at the T=1 ceiling (0); the tempered reward leaves room to improve it.
    assert float(plain.median()) > -0.01 and float(tempered.median()) < -0.05
    with pytest.raises(ValueError, match="temperature"):
        classifier_reward(classifier, images, captions, temperature=0.0)


def test_missing_classifier_names_its_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        load_classifier(tmp_path)

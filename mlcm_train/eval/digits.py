"""A demo set's classifier as a metric and a reward: the demo's FD, prompt accuracy and classifier reward.

A small CNN trained on the real coloured images of a captioned set (``mlcm_train.data.captioned``: the digits
or the shapes), shipped beside the demo teacher of that set; its config names the set.
Three uses: its penultimate features define the demo's Frechet distance (as Inception's do for FID, Heusel
et al. 2017); its argmax says whether an image shows the caption's digit and colour (prompt accuracy); and
the tempered ``log p_T(digit | x) + log p_T(colour | x)`` of the caption's labels is a differentiable reward
of decoded images (what the demo's reward stage maximises). ``mlcm_train.demo.classifier_train`` trains it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mlcm_train.data import captioned
from mlcm_train.data.captioned import CaptionedSet
from mlcm_train.eval.frechet import frechet_distance_from_stats, gaussian_stats

log = logging.getLogger(__name__)

# The shipped demo teachers' folders, by captioned set; each classifier lives beside its pipeline.
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_ASSETS = _ASSETS / "demo_teacher"  # the digits teacher, the demo's default
DEMO_TEACHERS = {"digits": DEMO_ASSETS, "shapes": _ASSETS / "shapes_teacher"}
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier_config.json"
# The reward's softmax temperature. At T=1 it saturates: the demo's stage-2 student at 4 steps scores
# log p = -0.005 (99.9% prompt accuracy, 960 images), so the mean only counts the rare failures and a reward
# stage has nothing to gain. A preference model's score keeps rising as images get better; at T=4 the same
# images score -0.25 and the reward still prefers clearer, more typical digits and colours, while a wrong
# digit or colour still costs the most.
REWARD_TEMPERATURE = 4.0


class DigitClassifier(nn.Module):
    """conv-relu-pool x3 -> linear features (FD space) -> class and colour heads. Input: images in [0, 1].

    ``dataset`` is the captioned set it classifies (its class and colour counts size the heads); the class
    head keeps the name ``digit_head``, which the shipped weights use.
    """

    def __init__(
        self, channels: Sequence[int] = (32, 64, 64), features: int = 64, dataset: str = "digits"
    ) -> None:
        super().__init__()
        self.dataset: CaptionedSet = captioned.get(dataset)
        layers: list[nn.Module] = []
        previous = 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.conv = nn.Sequential(*layers)
        side = self.dataset.image_size // 2 ** len(channels)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(previous * side * side, features), nn.ReLU())
        self.digit_head = nn.Linear(features, len(self.dataset.class_words))
        self.colour_head = nn.Linear(features, len(self.dataset.colours))

    def embed(self, images: Tensor) -> Tensor:
        """Penultimate features (B, features)."""
        return self.features(self.conv(images * 2.0 - 1.0))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(class logits, colour logits)."""
        feats = self.embed(images)
        return self.digit_head(feats), self.colour_head(feats)


def load_classifier(folder: str | Path) -> DigitClassifier:
    """The classifier in ``folder`` (classifier.safetensors + classifier_config.json), fp32, eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}; the demo classifier is shipped in mlcm_train/assets/demo_teacher "
            "(re-create it with `python -m mlcm_train demo --retrain-teacher`)"
        )
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    model = DigitClassifier(config["channels"], config["features"], config.get("dataset", "digits"))
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
    model.requires_grad_(False)
    return model.eval()


def classifier_reward(
    model: DigitClassifier,
    images: Tensor,
    prompts: Sequence[str],
    *,
    temperature: float = REWARD_TEMPERATURE,
) -> Tensor:
    """Differentiable reward per image: ``log p_T(class | x) + log p_T(colour | x)`` of the prompt's labels.

    ``p_T = softmax(logits / temperature)``; the reward is <= 0, and 0 only for infinitely confident images.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    parse = model.dataset.parse_caption
    labels = torch.tensor([parse(p) for p in prompts], dtype=torch.long, device=images.device)
    digit_logits, colour_logits = model(images)
    digit_lp = (digit_logits / temperature).log_softmax(-1).gather(1, labels[:, :1]).squeeze(1)
    colour_lp = (colour_logits / temperature).log_softmax(-1).gather(1, labels[:, 1:]).squeeze(1)
    return digit_lp + colour_lp


@torch.no_grad()
def predict(model: DigitClassifier, images: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(features, digit predictions, colour predictions) for images in [0, 1]."""
    feats, digits, colours = [], [], []
    for chunk in images.split(batch_size):
        f = model.embed(chunk)
        feats.append(f)
        digits.append(model.digit_head(f).argmax(-1))
        colours.append(model.colour_head(f).argmax(-1))
    return torch.cat(feats), torch.cat(digits), torch.cat(colours)


@dataclass(frozen=True)
class DemoScores:
    fd: float  # squared Frechet distance in classifier-feature space to held-out real images
    prompt_accuracy: float  # fraction whose predicted digit AND colour match the caption
    digit_accuracy: float
    colour_accuracy: float
    reward: float  # mean classifier_reward: tempered log p(digit|x) + log p(colour|x) of the caption

    def to_dict(self) -> dict[str, float]:
        return {
            "fd": self.fd,
            "prompt_accuracy": self.prompt_accuracy,
            "digit_accuracy": self.digit_accuracy,
            "colour_accuracy": self.colour_accuracy,
            "reward": self.reward,
        }


class DemoEvaluator:
    """Scores generated images against the classifier's held-out split shown in every colour (digits: 297 x 6)."""

    def __init__(self, classifier: DigitClassifier) -> None:
        self.classifier = classifier
        self.dataset = classifier.dataset
        features, _, _ = predict(classifier, self.dataset.every_colour("heldout"))
        self.reference_stats = gaussian_stats(features)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> DemoScores:
        """Metrics of images in [0, 1] (N, 3, 32, 32) generated for ``prompts``."""
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images but {len(prompts)} prompts; give one prompt per image"
            )
        labels = torch.tensor([self.dataset.parse_caption(p) for p in prompts], dtype=torch.long)
        features, digits, colours = predict(self.classifier, images)
        digit_ok = digits == labels[:, 0]
        colour_ok = colours == labels[:, 1]
        rewards = torch.cat(
            [
                classifier_reward(self.classifier, chunk, list(prompts[i : i + 256]))
                for i, chunk in zip(range(0, len(prompts), 256), images.split(256))
            ]
        )
        return DemoScores(
            fd=frechet_distance_from_stats(*gaussian_stats(features), *self.reference_stats),
            prompt_accuracy=float((digit_ok & colour_ok).float().mean()),
            digit_accuracy=float(digit_ok.float().mean()),
            colour_accuracy=float(colour_ok.float().mean()),
            reward=float(rewards.mean()),
        )

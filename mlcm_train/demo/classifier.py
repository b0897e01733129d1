"""A small CNN trained on the real coloured digits: digit and colour heads, plus the features FD is measured in.

Three uses (issue 4 item 3): its penultimate features define the demo's Frechet distance (as Inception's do
for FID, Heusel et al. 2017); its argmax says whether an image shows the caption's digit and colour (prompt
accuracy); and the tempered ``log p_T(digit | x) + log p_T(colour | x)`` of the caption's labels is a
differentiable reward of decoded images (what the reward stage of issue 5 maximises).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import data

log = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier_config.json"
# The reward's softmax temperature. At T=1 it saturates: the demo's stage-2 student at 4 steps scores
# log p = -0.005 (99.9% prompt accuracy, 960 images), so the mean only counts the rare failures and a reward
# stage has nothing to gain. A preference model's score keeps rising as images get better; at T=4 the same
# images score -0.25 and the reward still prefers clearer, more typical digits and colours, while a wrong
# digit or colour still costs the most.
REWARD_TEMPERATURE = 4.0


@dataclass(frozen=True)
class ClassifierRecipe:
    """Architecture and training of the demo classifier (written next to its weights)."""

    seed: int = 0
    channels: tuple[int, ...] = (32, 64, 64)
    features: int = 64  # dimension of the FD feature space
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    noise_std: float = 0.05  # pixel noise augmentation: robustness to generated images' artefacts
    max_shift: int = 2  # random translation in pixels

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class DigitClassifier(nn.Module):
    """conv-relu-pool x3 -> linear features (FD space) -> digit and colour heads. Input: images in [0, 1]."""

    def __init__(self, channels: Sequence[int] = (32, 64, 64), features: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for width in channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.conv = nn.Sequential(*layers)
        side = data.IMAGE_SIZE // 2 ** len(channels)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(previous * side * side, features), nn.ReLU())
        self.digit_head = nn.Linear(features, len(data.DIGIT_WORDS))
        self.colour_head = nn.Linear(features, len(data.COLOUR_NAMES))

    def embed(self, images: Tensor) -> Tensor:
        """Penultimate features (B, features)."""
        return self.features(self.conv(images * 2.0 - 1.0))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(digit logits, colour logits)."""
        feats = self.embed(images)
        return self.digit_head(feats), self.colour_head(feats)


def _augment(images: Tensor, recipe: ClassifierRecipe, generator: torch.Generator) -> Tensor:
    shift = recipe.max_shift
    dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
    images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    return (images + recipe.noise_std * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)


def train_classifier(recipe: ClassifierRecipe | None = None, *, progress: bool = True) -> DigitClassifier:
    """Cross-entropy on digit and colour over the training split, every digit in random colours."""
    from tqdm.auto import trange

    recipe = recipe or ClassifierRecipe()
    torch.manual_seed(recipe.seed)  # layer initialisation uses the global RNG
    model = DigitClassifier(recipe.channels, recipe.features)
    train = data.load_split("train")
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps)
    bar = trange(recipe.steps, desc="classifier", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(train), (recipe.batch_size,), generator=generator)
        colours = data.random_colours(recipe.batch_size, generator)
        images = _augment(data.colourise(train.masks[index], colours), recipe, generator)
        digit_logits, colour_logits = model(images)
        loss = nn.functional.cross_entropy(digit_logits, train.digits[index]) + nn.functional.cross_entropy(
            colour_logits, colours
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{float(loss):.3f}")
    model.eval()
    return model


def save_classifier(model: DigitClassifier, folder: str | Path, recipe: ClassifierRecipe) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}  # fp16 on disk
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n", encoding="utf-8")
    return folder / WEIGHTS_FILE


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
    model = DigitClassifier(config["channels"], config["features"])
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
    """Differentiable reward per image: ``log p_T(digit | x) + log p_T(colour | x)`` of the prompt's labels.

    ``p_T = softmax(logits / temperature)``; the reward is <= 0, and 0 only for infinitely confident images.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    labels = torch.tensor([data.parse_caption(p) for p in prompts], dtype=torch.long, device=images.device)
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

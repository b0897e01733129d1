"""Training the demo classifier (``mlcm_train.eval.digits``) from its recipe: ``demo --retrain-teacher``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mlcm_train.eval.digits import CONFIG_FILE, WEIGHTS_FILE, DigitClassifier


@dataclass(frozen=True)
class ClassifierRecipe:
    """Architecture and training of the demo classifier (written next to its weights)."""

    seed: int = 0
    dataset: str = "digits"  # the captioned set it classifies (mlcm_train.data.captioned.DATASET_NAMES)
    channels: tuple[int, ...] = (32, 64, 64)
    features: int = 64  # dimension of the FD feature space
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    noise_std: float = 0.05  # pixel noise augmentation: robustness to generated images' artefacts
    max_shift: int = 2  # random translation in pixels

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _augment(images: Tensor, recipe: ClassifierRecipe, generator: torch.Generator) -> Tensor:
    shift = recipe.max_shift
    dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=generator))
    images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    return (images + recipe.noise_std * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)


def train_classifier(recipe: ClassifierRecipe | None = None, *, progress: bool = True) -> DigitClassifier:
    """Cross-entropy on class and colour over the recipe set's training split, every image in random colours."""
    from tqdm.auto import trange

    recipe = recipe or ClassifierRecipe()
    torch.manual_seed(recipe.seed)  # layer initialisation uses the global RNG
    model = DigitClassifier(recipe.channels, recipe.features, recipe.dataset)
    dataset = model.dataset
    train = dataset.load_split("train")
    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps)
    bar = trange(recipe.steps, desc="classifier", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(train), (recipe.batch_size,), generator=generator)
        colours = dataset.random_colours(recipe.batch_size, generator)
        images = _augment(dataset.colourise(train.masks[index], colours), recipe, generator)
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

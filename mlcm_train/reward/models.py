"""Built-in rewards, loaded from local paths only (no reward weights ship in any package).

Spec grammar (``--reward`` / ``--heldout``): ``NAME[*WEIGHT][=PATH]``, comma-separated for a weighted sum,
e.g. ``hpsv2=/models/hps,aesthetic*0.5=/models/aesthetic``. What each PATH must hold:

- ``clip``: any CLIP model folder (``transformers.CLIPModel``: config.json, weights, vocab.json + merges.txt);
  score ``100 * max(cos, 0)`` (``mlcm_train.eval.clip_score``).
- ``pickscore``: the PickScore_v1 CLIP folder; score ``logit_scale.exp() * cos`` (Kirstain et al. 2023).
- ``hpsv2``: a CLIP folder holding HPSv2 weights in transformers layout, or ``HPS_v2_compressed.pt`` /
  ``HPS_v2.1_compressed.pt`` (OpenCLIP ViT-H-14, needs the ``open_clip_torch`` package); score ``cos``
  (hpsv2's ``img_score``).
- ``aesthetic``: a folder with the LAION head ``sac+logos+ava1-l14-linearMSE.pth`` (or ``.safetensors``) and
  its CLIP ViT-L/14 in a ``clip/`` subfolder (or the same folder) (``mlcm_train.eval.aesthetic``).
- ``imagereward``: a folder with ``ImageReward.pt``, ``med_config.json`` and BLIP's tokenizer in
  ``bert-base-uncased/``; needs the ``image-reward`` package (BLIP is not re-implemented here); normalised
  score as the package reports it (``mlcm_train.eval.image_reward``).
- ``classifier``: the demo classifier folder (``classifier.safetensors`` + ``classifier_config.json``);
  score ``log p_T(digit | x) + log p_T(colour | x)`` of the caption at the classifier's temperature
  (``mlcm_train.eval.digits.classifier_reward``).
- ``brightness``: no weights; mean luminance in [0, 1]. A toy for smoke tests, not a preference model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mlcm_train.eval.clip_score import ClipScorer, clip_preprocess
from mlcm_train.eval.weights import MissingWeightsError
from mlcm_train.reward.interface import Reward, WeightedReward, freeze, weighted_name

# Rec. 601 luma weights for the toy brightness reward.
LUMA = (0.299, 0.587, 0.114)
HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
HPS_ARCH = "ViT-H-14"  # the OpenCLIP architecture HPSv2 fine-tunes
CLIP_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class RewardSpec:
    """One parsed ``NAME[*WEIGHT][=PATH]``."""

    name: str
    weight: float = 1.0
    path: str | None = None


def parse_reward_specs(text: str) -> list[RewardSpec]:
    """``"hpsv2=/m/hps,aesthetic*0.5=/m/aes"`` -> specs; unknown names are an error listing the built-ins."""
    specs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        head, _, path = part.partition("=")
        name, _, weight = head.partition("*")
        name = name.strip().lower()
        if name not in REWARD_BUILDERS:
            raise ValueError(f"reward {name!r} is unknown; choose from {', '.join(sorted(REWARD_BUILDERS))}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(
                f"reward weight {weight!r} in {part!r} is not a number; write NAME*0.5=PATH"
            ) from None
        specs.append(RewardSpec(name, value, path.strip() or None))
    if not specs:
        raise ValueError("no reward given; pass --reward NAME=PATH, e.g. --reward hpsv2=/models/hpsv2")
    return specs


def reward_spec_name(text: str) -> str:
    """The name ``build_reward(text).name`` has, without loading any weights (e.g. ``clip+aesthetic*0.5``)."""
    return weighted_name((spec.name, spec.weight) for spec in parse_reward_specs(text))


def resolve_loss(loss: str, reward: Reward) -> str:
    """The reward loss a run uses: ``auto`` is plain maximisation, because no built-in scorer has a
    calibrated hinge margin (the paper's 16 belongs to the MPS scorer, arXiv 2406.05768v6, Eq. 11); the
    hinge is refused for a scorer that ignores the prompt, where its two terms cancel and nothing trains."""
    if loss == "hinge" and not getattr(reward, "prompt_dependent", True):  # a custom reward may not say
        raise ValueError(
            f"--loss hinge scores each image for its own prompt against another prompt, but {reward.name!r} "
            "ignores the prompt (or has a part that does): those terms cancel and their reward gradient is 0 "
            "between 0 and the margin. Use --loss maximise (or auto, the default)"
        )
    return loss_used(loss)


def loss_used(loss: str) -> str:
    """The loss a ``--loss`` value trains with: ``auto`` is plain maximisation."""
    return "maximise" if loss == "auto" else loss


def build_reward(text: str, device: str | torch.device = "cpu") -> Reward:
    """The reward a spec names: a single reward, or a WeightedReward when it has several parts or a weight."""
    specs = parse_reward_specs(text)
    parts = tuple((s.weight, REWARD_BUILDERS[s.name](s.path, device)) for s in specs)
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    return WeightedReward(parts)


# --- CLIP-family rewards -------------------------------------------------------------------------------


class ClipReward:
    """CLIP score ``100 * max(cos(image, prompt), 0)`` of any local CLIP folder."""

    name = "clip"
    prompt_dependent = True

    def __init__(self, path: str | None, device: str | torch.device = "cpu") -> None:
        self.scorer = ClipScorer(_need(self.name, path, CLIP_FILES), device)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.scorer.score(images, prompts)

    def modules(self) -> list[nn.Module]:
        return [self.scorer.model]


class PickScoreReward(ClipReward):
    """PickScore v1: ``logit_scale.exp() * cos(image, prompt)`` of its CLIP-H (Kirstain et al. 2023, README)."""

    name = "pickscore"

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        cosine = (self.scorer.image_embeds(images) * self.scorer.text_embeds(prompts)).sum(-1)
        return self.scorer.model.logit_scale.exp() * cosine


class HPSv2Reward:
    """HPSv2 / v2.1: ``cos(image, prompt)`` of the fine-tuned CLIP (hpsv2 ``img_score``: diag of image @ text)."""

    name = "hpsv2"
    prompt_dependent = True

    def __init__(self, path: str | None, device: str | torch.device = "cpu") -> None:
        expected = (f"{' or '.join(HPS_FILES)} (needs open_clip_torch)", "or a transformers CLIP folder")
        path_ = _need(self.name, path, expected, folder_check=False)
        checkpoint = _find_hps_checkpoint(path_)
        self.scorer: ClipScorer | None = None
        self.open_clip: tuple[nn.Module, Callable] | None = None
        if checkpoint is None:
            if not (path_ / "config.json").is_file():
                raise MissingWeightsError(
                    f"hpsv2: {path_} holds neither {' nor '.join(HPS_FILES)} nor a transformers CLIP folder "
                    f"({', '.join(CLIP_FILES)})"
                )
            self.scorer = ClipScorer(path_, device)
        else:
            self.open_clip = _load_open_clip_hps(checkpoint, device)
        self.device = torch.device(device)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if self.scorer is not None:
            return (self.scorer.image_embeds(images) * self.scorer.text_embeds(prompts)).sum(-1)
        model, tokenizer = self.open_clip
        pixels = clip_preprocess(images.to(self.device), int(model.visual.image_size[0]))
        image = nn.functional.normalize(model.encode_image(pixels), dim=-1)
        with torch.no_grad():
            text = nn.functional.normalize(
                model.encode_text(tokenizer(list(prompts)).to(self.device)), dim=-1
            )
        return (image * text).sum(-1).float()

    def modules(self) -> list[nn.Module]:
        return [self.scorer.model] if self.scorer is not None else [self.open_clip[0]]


def _find_hps_checkpoint(path: Path) -> Path | None:
    if path.is_file():
        return path
    return next((path / name for name in HPS_FILES if (path / name).is_file()), None)


def _load_open_clip_hps(checkpoint: Path, device: str | torch.device) -> tuple[nn.Module, Callable]:
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"hpsv2: {checkpoint.name} is an OpenCLIP {HPS_ARCH} checkpoint and needs the `open_clip_torch` "
            "package (`pip install open_clip_torch`); or convert it to a transformers CLIP folder"
        ) from error
    model = open_clip.create_model(HPS_ARCH, pretrained=None)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    return freeze(model, device), open_clip.get_tokenizer(HPS_ARCH)


class AestheticReward:
    """LAION aesthetic predictor v2 (about 1..10) on CLIP ViT-L/14 image embeddings; prompts are ignored."""

    name = "aesthetic"
    prompt_dependent = False

    def __init__(self, path: str | None, device: str | torch.device = "cpu") -> None:
        from mlcm_train.eval.aesthetic import HEAD_FILE, AestheticScorer

        heads = (HEAD_FILE, Path(HEAD_FILE).with_suffix(".safetensors").name)
        folder = _need(self.name, path, (f"{heads[0]} or {heads[1]}", "clip/ (CLIP ViT-L/14 folder)"))
        head = next((folder / h for h in heads if (folder / h).is_file()), None)
        clip = folder / "clip" if (folder / "clip").is_dir() else folder
        if head is None or not (clip / "config.json").is_file():
            raise MissingWeightsError(
                f"aesthetic: {folder} must hold {heads[0]} (or {heads[1]}) and a CLIP ViT-L/14 folder in "
                f"{folder / 'clip'} ({', '.join(CLIP_FILES)})"
            )
        self.scorer = AestheticScorer(head, clip, device)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.scorer.score(images)

    def modules(self) -> list[nn.Module]:
        return [self.scorer.clip.model, self.scorer.head]


class ImageRewardReward:
    """ImageReward v1.0 through the package's differentiable ``score_gard`` (the ReFL path), normalised."""

    name = "imagereward"
    prompt_dependent = True

    def __init__(self, path: str | None, device: str | torch.device = "cpu") -> None:
        from mlcm_train.eval.image_reward import FILES, load_imagereward

        self.model = freeze(load_imagereward(_need(self.name, path, FILES), device), device)
        self.device = torch.device(device)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from mlcm_train.eval.image_reward import IMAGEREWARD_SIZE, imagereward_scores

        pixels = clip_preprocess(images.to(self.device), IMAGEREWARD_SIZE)  # BLIP uses CLIP's mean/std
        return imagereward_scores(self.model, pixels, prompts)

    def modules(self) -> list[nn.Module]:
        return [self.model]


class ClassifierReward:
    """The demo's tempered ``log p_T(digit | x) + log p_T(colour | x)`` of the caption's labels (<= 0)."""

    name = "classifier"
    prompt_dependent = True

    def __init__(self, path: str | None, device: str | torch.device = "cpu") -> None:
        from mlcm_train.eval.digits import CONFIG_FILE, WEIGHTS_FILE, load_classifier

        folder = _need(self.name, path, (WEIGHTS_FILE, CONFIG_FILE))
        self.model = freeze(load_classifier(folder), device)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from mlcm_train.eval.digits import classifier_reward

        side = self.model.dataset.image_size
        if images.shape[-1] != side or images.shape[-2] != side:
            size = (side, side)
            images = nn.functional.interpolate(
                images.float(), size=size, mode="bilinear", align_corners=False
            )
        return classifier_reward(self.model, images.float(), prompts)

    def modules(self) -> list[nn.Module]:
        return [self.model]


class BrightnessReward:
    """Mean Rec. 601 luminance of each image: a weights-free toy reward for tests and smoke runs."""

    name = "brightness"
    prompt_dependent = False

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu") -> None:
        if path is not None:
            raise ValueError("the brightness reward takes no weights; write --reward brightness")

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        luma = torch.tensor(LUMA, device=images.device, dtype=torch.float32).view(1, 3, 1, 1)
        return (images.float() * luma).sum(1).mean(dim=(1, 2))

    def modules(self) -> list[nn.Module]:
        return []


def _need(
    name: str, path: str | Path | None, expected: tuple[str, ...], *, folder_check: bool = True
) -> Path:
    """The reward's weights path, or a MissingWeightsError naming the files expected there."""
    hint = f"Pass --reward {name}=PATH with PATH holding {', '.join(expected)}."
    if path is None:
        raise MissingWeightsError(
            f"reward {name!r} needs local weights: {', '.join(expected)}; no PATH given. {hint}"
        )
    path = Path(path)
    if not path.exists():
        raise MissingWeightsError(
            f"reward {name!r}: {path} does not exist; expected {', '.join(expected)}. {hint}"
        )
    if (
        folder_check
        and path.is_dir()
        and name in ("clip", "pickscore")
        and not (path / "config.json").is_file()
    ):
        raise MissingWeightsError(
            f"reward {name!r}: {path} lacks config.json (expected {', '.join(expected)}). {hint}"
        )
    return path


REWARD_BUILDERS: dict[str, Callable[[str | None, str | torch.device], Reward]] = {
    "clip": ClipReward,
    "pickscore": PickScoreReward,
    "hpsv2": HPSv2Reward,
    "aesthetic": AestheticReward,
    "imagereward": ImageRewardReward,
    "classifier": ClassifierReward,
    "brightness": BrightnessReward,
}

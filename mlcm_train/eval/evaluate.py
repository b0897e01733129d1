"""``python -m mlcm_train eval``: generate images for a prompt file with a teacher (+ a distilled LoRA) and score them.

Without a LoRA the teacher samples with CFG-DDIM; with one (a ``distill`` run directory or checkpoint) the
student samples with MLCM at ``steps`` steps. Metrics: ``demo`` (FD / prompt accuracy / classifier reward, for
the demo teacher), ``clip``, ``aesthetic``, ``imagereward``, ``fid`` (local weights only).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

METRICS = ("demo", "clip", "aesthetic", "imagereward", "fid")


@dataclass(frozen=True)
class EvalRequest:
    teacher: Path
    prompts: Path
    lora: Path | None = None  # distill run directory or checkpoint folder
    steps: int = 4
    guidance_scale: float = 3.0  # teacher CFG (only without a LoRA)
    metrics: tuple[str, ...] = ("demo",)
    seed: int = 0
    batch_size: int = 32
    classifier: Path | None = None  # demo classifier folder (default: the shipped one)
    clip_model: Path | None = None
    aesthetic_head: Path | None = None
    aesthetic_clip: Path | None = None
    imagereward: Path | None = None
    inception: Path | None = None
    reference_images: Path | None = None  # folder of real images for FID
    out: Path | None = None  # JSON file for the scores


def generate_images(request: EvalRequest, prompts: list[str]) -> tuple[Tensor, float]:
    """Images in [0, 1] for ``prompts`` (one each, seeded) and the seconds per image."""
    from mlcm import segment_timesteps
    from mlcm_train.eval.generate import generate
    from mlcm_train.method.rollout import consistency_sample
    from mlcm_train.method.teacher_ddim import teacher_cfg_ddim
    from mlcm_train.models.teacher import load_teacher

    teacher = load_teacher(request.teacher)
    unet, acp = teacher.unet, teacher.alphas_cumprod
    cond, uncond = teacher.encode_prompts(prompts), teacher.uncond(len(prompts))
    noise = torch.randn(
        teacher.latent_shape(len(prompts)), generator=torch.Generator().manual_seed(request.seed)
    )

    def eps(z, t, c):
        return unet(z, t, **c.unet_kwargs(), return_dict=False)[0].float()

    if request.lora is not None:
        from mlcm_train.config import DistillConfig
        from mlcm_train.models.student import attach_lora, load_lora_state_dict
        from mlcm_train.run.checkpoint import load_checkpoint, resolve_checkpoint

        saved = load_checkpoint(resolve_checkpoint(request.lora))
        config = DistillConfig.from_dict(saved.config)
        attach_lora(unet, rank=config.lora_rank, alpha=config.lora_alpha, targets=config.lora_targets)
        load_lora_state_dict(unet, saved.lora)
        unet.requires_grad_(False)
        timesteps = segment_timesteps(
            request.steps, config.sampling_grid(saved.state.phase, saved.state.phase_step)
        )

        def sampler(z, c, u):
            return consistency_sample(eps, z, c, timesteps=timesteps, alphas_cumprod=acp, seed=request.seed)
    else:

        def sampler(z, c, u):
            return teacher_cfg_ddim(
                eps, z, c, u, steps=request.steps, guidance_scale=request.guidance_scale, alphas_cumprod=acp
            )

    generated = generate(
        sampler,
        teacher.vae,
        noise,
        cond,
        uncond,
        batch_size=request.batch_size,
        select=lambda c, rows: c[rows],
    )
    return generated.images, generated.seconds / len(prompts)


def _reference_images(folder: Path | None, size: int) -> Tensor:
    from PIL import Image

    if folder is None or not Path(folder).is_dir():
        raise FileNotFoundError(
            f"FID needs --reference-images <folder of real .png/.jpg images>; got {folder}"
        )
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        raise FileNotFoundError(f"{folder} holds {len(files)} images; FID needs at least 2 real images")
    images = []
    for path in files:
        with Image.open(path) as image:
            array = torch.tensor(
                list(image.convert("RGB").resize((size, size)).getdata()), dtype=torch.float32
            )
        images.append(array.view(size, size, 3).permute(2, 0, 1) / 255.0)
    return torch.stack(images)


def score_images(request: EvalRequest, images: Tensor, prompts: list[str]) -> dict[str, float]:
    """Every requested metric of ``images`` (each loads its own local weights, or raises naming them)."""
    scores: dict[str, float] = {}
    for metric in request.metrics:
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r} is unknown; choose from {', '.join(METRICS)}")
        if metric == "demo":
            from mlcm_train.eval.digits import DEMO_ASSETS as ASSET_DIR
            from mlcm_train.eval.digits import DemoEvaluator, load_classifier

            evaluator = DemoEvaluator(load_classifier(request.classifier or ASSET_DIR))
            scores.update(evaluator.score(images, prompts).to_dict())
        elif metric == "clip":
            from mlcm_train.eval.clip_score import ClipScorer

            with torch.no_grad():
                scores["clip_score"] = float(ClipScorer(request.clip_model).score(images, prompts).mean())
        elif metric == "aesthetic":
            from mlcm_train.eval.aesthetic import AestheticScorer

            with torch.no_grad():
                scorer = AestheticScorer(request.aesthetic_head, request.aesthetic_clip)
                scores["aesthetic"] = float(scorer.score(images).mean())
        elif metric == "imagereward":
            from mlcm_train.eval.image_reward import ImageRewardScorer

            scores["imagereward"] = float(
                ImageRewardScorer(request.imagereward).score(images, prompts).mean()
            )
        else:
            from mlcm_train.eval.fid import InceptionFeatures, fid

            reference = _reference_images(request.reference_images, images.shape[-1])
            scores["fid"] = fid(InceptionFeatures(request.inception), images, reference)
    return scores


def evaluate(request: EvalRequest) -> dict:
    """Generate, score, and (with ``out``) write the scores as JSON; returns them."""
    from mlcm_train.data.prompts import read_prompts

    prompts = read_prompts(request.prompts)
    start = time.perf_counter()
    images, seconds_per_image = generate_images(request, prompts)
    result = {
        "teacher": str(request.teacher),
        "lora": str(request.lora) if request.lora else None,
        "steps": request.steps,
        "images": len(prompts),
        "seconds_per_image": seconds_per_image,
        **score_images(request, images, prompts),
    }
    result["seconds_total"] = time.perf_counter() - start
    if request.out is not None:
        Path(request.out).parent.mkdir(parents=True, exist_ok=True)
        Path(request.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log.info("eval: %s", json.dumps(result))
    return result

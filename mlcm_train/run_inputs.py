"""What a run is built from: the accelerator, the teacher with prompts and embeddings, cached trajectories,
the optional latent-LPIPS features and TensorBoard writer. Shared by `distill` and `trajectories`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mlcm.segments import segment_boundaries

from .config import DistillConfig
from .distill import DistillSettings

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` = bf16 on a CUDA device that supports it, otherwise fp32 ("no")."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str):
    """An Accelerator for this run (CPU, one GPU, or the processes of torchrun/accelerate launch)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one AcceleratorState per process; forget a previous run's precision so that several
    # runs can share a process (demo, tests). The distributed setup (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision)


def load_inputs(
    config: DistillConfig, device: torch.device, weight_dtype: torch.dtype
) -> tuple[Any, list[str], Any]:
    """The frozen teacher, the prompt list and its text embeddings (encoded once for the run)."""
    from .embeddings import EmbeddingCache
    from .prompts import read_prompts
    from .teacher import load_teacher

    # Prompts first: a bad prompt file should fail before minutes of checkpoint loading.
    prompts = read_prompts(config.prompts)
    teacher = load_teacher(
        config.teacher,
        tokenizer_path=config.tokenizer_path,
        comfyui_root=config.comfyui_root,
        config_dir=config.teacher_config,
        dtype=weight_dtype,
        device=device,
    )
    return teacher, prompts, EmbeddingCache(teacher, prompts)


def load_feature_fn(config: DistillConfig, device: torch.device):
    """Latent-LPIPS features for the loss (paper option), or None to compare raw latents."""
    if config.lpips_path is None:
        return None
    from .lpips import load_latent_lpips

    model, _ = load_latent_lpips(config.lpips_path, device=device)
    return model.features


def trajectory_expectation(
    config: DistillConfig, teacher: Any, prompts: list[str], segments: int
) -> dict[str, Any]:
    """The identity a trajectory folder must have to stand in for this run's online states."""
    from .trajectories import prompts_hash, teacher_fingerprint, trajectory_identity

    settings = DistillSettings(
        segments=segments,
        skip=config.skip,
        guidance_scale=config.guidance_scale,
        num_train_timesteps=len(teacher.alphas_cumprod),
    )
    return trajectory_identity(
        settings=settings,
        boundaries=segment_boundaries(segments, len(teacher.alphas_cumprod)),
        latent_shape=tuple(teacher.latent_shape(1, config.resolution))[1:],
        alphas_cumprod=teacher.alphas_cumprod,
        teacher_hash=teacher_fingerprint(config.teacher),
        prompts_hash=prompts_hash(prompts),
    )


def open_trajectories(config: DistillConfig, teacher: Any, prompts: list[str]):
    """The pre-generated states folder, checked against this run; None for online trajectories."""
    if config.trajectories is None:
        return None
    from .trajectories import TrajectoryDataset

    if 1 not in config.stages:
        raise ValueError(
            "--trajectories feeds stage 1 only, but this run has no stage 1; drop --trajectories"
        )
    dataset = TrajectoryDataset(config.trajectories)
    if dataset.segments not in config.rounds:
        raise ValueError(
            f"{config.trajectories} holds states for {dataset.segments} segments but this run trains "
            f"{list(config.rounds)}; regenerate them with --segments {config.rounds[0]}"
        )
    expected = trajectory_expectation(config, teacher, prompts, dataset.segments)
    dataset = TrajectoryDataset(config.trajectories, expect=expected)
    log.info("stage 1 reads %d pre-generated states from %s", len(dataset), config.trajectories)
    return dataset


def prompt_conditioning(
    teacher: Any, embeddings: Any, indices: Any, resolution: int | None, device: torch.device
):
    """Cached text conditioning for prompt ``indices``; SDXL time ids follow the training resolution."""
    cond = embeddings.get(indices).to(device)
    if cond.time_ids is None or resolution is None:
        return cond
    # The cache encodes at the teacher's native size; SDXL's micro-conditioning must name the size we train at.
    return type(cond)(
        cond.prompt_embeds, cond.pooled_embeds, teacher.time_ids(len(cond), resolution).to(device)
    )

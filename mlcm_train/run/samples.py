"""Sample grids of the student at 1/2/4/8 steps with the node pack's own sampler, saved as PNG (rows: prompts)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from mlcm import segment_timesteps
from mlcm_train.method.rollout import consistency_sample
from mlcm_train.models.vae import decode_latents

log = logging.getLogger(__name__)

EpsFn = Callable[[Tensor, Tensor, object], Tensor]


def save_grid(images: Sequence[Sequence[Tensor]], path: str | Path) -> Path:
    """Tile ``images[row][col]`` (each (3, H, W) in [0, 1]) into one PNG."""
    from PIL import Image

    rows = [torch.cat(list(row), dim=2) for row in images]
    grid = torch.cat(rows, dim=1)
    array = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@torch.no_grad()
def render_sample_grid(
    eps_fn: EpsFn,
    vae: torch.nn.Module,
    cond: object,
    noise: Tensor,
    *,
    step_counts: Sequence[int],
    segments: int,
    alphas_cumprod: Tensor,
    path: str | Path,
    seed: int = 0,
) -> Path:
    """One row per prompt, one column per step count, same noise in every column (compare steps, not seeds)."""
    columns = []
    for steps in step_counts:
        timesteps = segment_timesteps(steps, segments, num_train_timesteps=len(alphas_cumprod))
        latents = consistency_sample(
            eps_fn, noise, cond, timesteps=timesteps, alphas_cumprod=alphas_cumprod, seed=seed
        )
        columns.append(decode_latents(vae, latents).cpu())
    rows = [[column[i] for column in columns] for i in range(noise.shape[0])]
    return save_grid(rows, path)


def write_training_samples(run, eps_fn: EpsFn, *, segments: int, global_step: int) -> Path | None:
    """The periodic grid of a training run: its first prompts, fixed noise, every step count <= segments."""
    config = run.config
    steps = [s for s in config.sample_steps if s <= segments]
    if not steps:
        return None
    count = min(config.sample_prompts, len(run.prompts))
    shape = (count, *run.latent_shape())
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed)).to(run.device)
    path = render_sample_grid(
        eps_fn,
        run.teacher.vae,
        run.cond(list(range(count))),
        noise,
        step_counts=steps,
        segments=segments,
        alphas_cumprod=run.alphas_cumprod,
        path=run.run_dir / "samples" / f"step-{global_step:07d}.png",
        seed=config.seed,
    )
    log.info("sample grid %s (rows: prompts, columns: %s steps)", path, steps)
    return path

"""Inference benchmark: MLCM k-step sampling vs the teacher's 25-step CFG DDIM on one tiny UNet.

Prints, measured side by side in one run (medians over interleaved repeats):
- time per image of MLCM (1/2/4/8 steps, one UNet pass per step, no CFG) and of the teacher's
  25-step CFG DDIM (two UNet passes per step), and their ratio;
- the MLCM sampler's own overhead: wall time spent outside the model call, as a fraction of the
  whole sampling time (goal: under 1%).

The UNet is a small SD1.5-shaped ``UNet2DConditionModel`` with random weights (no downloads), so the
absolute numbers only say something about this machine; the ratios are the point.

    python benchmarks/inference.py [--repeats 5] [--latent 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from mlcm import (
    sample_mlcm,
    scaled_linear_alphas_cumprod,
    segment_timesteps,
    sigmas_from_alphas_cumprod,
)

TEACHER_STEPS = 25  # the paper's teacher baseline (DDIM, 25 steps)
GUIDANCE = 7.5  # SD1.5's usual CFG scale; CFG doubles the UNet work per step


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """A small SD1.5-shaped UNet (cross-attention at both levels) with seeded random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval().requires_grad_(False)


class TimedDenoiser:
    """k-diffusion denoiser around an eps UNet (x = z / a_t, sigma = s_t / a_t); times the UNet calls."""

    def __init__(self, unet: UNet2DConditionModel, alphas_cumprod: torch.Tensor, context: torch.Tensor):
        self.unet, self.context = unet, context
        self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod).sqrt()).log().float()
        self.model_seconds = 0.0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        start = time.perf_counter()
        t = (sigma.log()[:, None] - self.log_sigmas[None]).abs().argmin(dim=1)  # nearest integer timestep
        z = x / (sigma**2 + 1).sqrt()[:, None, None, None]
        eps = self.unet(z, t, encoder_hidden_states=self.context).sample
        out = x - sigma[:, None, None, None] * eps
        self.model_seconds += time.perf_counter() - start
        return out


def run_mlcm(denoiser: TimedDenoiser, noise: torch.Tensor, sigmas: torch.Tensor) -> tuple[float, float]:
    """Seconds for one MLCM run and the share of it spent outside the model."""
    denoiser.model_seconds = 0.0
    start = time.perf_counter()
    sample_mlcm(denoiser, noise * sigmas[0], sigmas, disable=True, extra_args={"seed": 0})
    total = time.perf_counter() - start
    return total, (total - denoiser.model_seconds) / total


def run_teacher(unet: UNet2DConditionModel, noise: torch.Tensor, context: torch.Tensor) -> float:
    """Seconds for one 25-step CFG DDIM run (batched cond + uncond)."""
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    scheduler.set_timesteps(TEACHER_STEPS)
    both = torch.cat([torch.zeros_like(context), context])
    z = noise.clone()
    start = time.perf_counter()
    for t in scheduler.timesteps:
        eps_u, eps_c = unet(torch.cat([z, z]), t, encoder_hidden_states=both).sample.chunk(2)
        z = scheduler.step(eps_u + GUIDANCE * (eps_c - eps_u), t, z).prev_sample
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per method")
    parser.add_argument("--latent", type=int, default=32, help="latent side (32 = a 256 px SD image)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    unet = tiny_unet()
    acp = scaled_linear_alphas_cumprod()
    context = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(2))
    denoiser = TimedDenoiser(unet, acp, context)
    step_counts = (1, 2, 4, 8)
    schedules = {k: sigmas_from_alphas_cumprod(acp, segment_timesteps(k)) for k in step_counts}

    with torch.inference_mode():
        run_teacher(unet, noise, context)  # warm-up
        run_mlcm(denoiser, noise, schedules[4])
        times: dict[str, list[float]] = {"teacher": []} | {f"mlcm{k}": [] for k in step_counts}
        overheads: dict[int, list[float]] = {k: [] for k in step_counts}
        for _ in range(args.repeats):  # interleave methods so drift in machine load hits all alike
            times["teacher"].append(run_teacher(unet, noise, context))
            for k in step_counts:
                seconds, overhead = run_mlcm(denoiser, noise, schedules[k])
                times[f"mlcm{k}"].append(seconds)
                overheads[k].append(overhead)

    teacher = statistics.median(times["teacher"])
    print(
        f"tiny SD1.5-shaped UNet, latent {args.latent}x{args.latent}, batch 1, {args.threads} threads, "
        f"median of {args.repeats}"
    )
    print("| method | steps | UNet evals | s/image | speed-up vs teacher | sampler overhead |")
    print("|---|---|---|---|---|---|")
    print(f"| teacher CFG-DDIM | {TEACHER_STEPS} | {2 * TEACHER_STEPS} | {teacher:.4f} | 1.0x | - |")
    for k in step_counts:
        seconds = statistics.median(times[f"mlcm{k}"])
        overhead = statistics.median(overheads[k])
        print(
            f"| MLCM (official) | {k} | {k} | {seconds:.4f} | {teacher / seconds:.1f}x | {100 * overhead:.2f}% |"
        )


if __name__ == "__main__":
    main()

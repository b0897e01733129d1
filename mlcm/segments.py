"""Segment boundaries and the steps-to-timesteps selection of MLCM (docs/method.md, "Sampling").

The diffusion time range [0, T-1] is split into M segments whose boundaries are
``linspace(T-1, 0, M+1)`` cast to integers. A k-step sampler evaluates the UNet at k of the M upper
boundaries; which ones is the *selection*:

- ``official``: the table in the authors' inference code (exact for M = 8; for other M, where no table
  was published, it falls back to ``uniform``);
- ``uniform``: k boundaries evenly spaced over the M segments;
- ``lcm``: the timesteps diffusers' LCMScheduler uses (50-step skipping grid), which the authors'
  README also suggests. They are not segment boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NUM_TRAIN_TIMESTEPS = 1000  # SD1.5/SDXL DDPM training steps
DEFAULT_SEGMENTS = 8  # the published MLCM/TLCM segment count
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's original_inference_steps default (the LCM skipping grid)
SELECTIONS = ("official", "uniform", "lcm")

# Boundary indices (0 = T-1, M = 0) the official inference code visits for k steps, M = 8
# (OPPO-Mente-Lab/TLCM inference.py). The last index (8, t = 0) is where the final x0 lands.
OFFICIAL_INDICES_M8: dict[int, tuple[int, ...]] = {
    1: (0, 8),
    2: (0, 4, 8),
    3: (0, 4, 7, 8),
    4: (0, 2, 4, 7, 8),
    5: (0, 2, 4, 6, 7, 8),
    6: (0, 2, 4, 5, 6, 7, 8),
    7: (0, 2, 3, 4, 5, 6, 7, 8),
    8: (0, 1, 2, 3, 4, 5, 6, 7, 8),
}


def segment_boundaries(
    segments: int = DEFAULT_SEGMENTS, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> list[int]:
    """Descending segment boundaries ``linspace(T-1, 0, M+1)`` as ints, e.g. [999, 874, ..., 124, 0]."""
    if segments < 1:
        raise ValueError(f"segments={segments} must be at least 1")
    if segments >= num_train_timesteps:
        raise ValueError(
            f"segments={segments} must be smaller than num_train_timesteps={num_train_timesteps}"
        )
    grid = torch.linspace(num_train_timesteps - 1, 0, segments + 1, dtype=torch.float64)
    # torch.linspace(..., dtype=int) truncates toward zero; the official code relies on that.
    return [int(t) for t in grid.to(torch.int64)]


def _uniform_indices(steps: int, first: int, last: int) -> list[int]:
    """``steps`` boundary indices evenly spaced over [first, last), plus ``last``."""
    span = last - first
    # Round half up (Python's round() would round half to even and make the grid lopsided).
    picks = [first + int(span * i / steps + 0.5) for i in range(steps)]
    return picks + [last]


def selection_indices(
    steps: int, segments: int = DEFAULT_SEGMENTS, *, selection: str = "official"
) -> list[int]:
    """Boundary indices (into ``segment_boundaries``) for a full-strength ``steps``-step schedule, ending at M."""
    _check_steps(steps, segments)
    if selection == "official" and segments == DEFAULT_SEGMENTS:
        return list(OFFICIAL_INDICES_M8[steps])
    if selection in ("official", "uniform"):
        return _uniform_indices(steps, 0, segments)
    raise ValueError(f"selection={selection!r} has no boundary indices; choose one of {SELECTIONS[:2]}")


def _tail_indices(steps: int, segments: int, start: int, selection: str) -> list[int]:
    """Indices for img2img starting at boundary ``start``: the tail of a full table when one starts there."""
    if selection == "official":
        for full_steps in range(1, segments + 1):
            tail = [i for i in selection_indices(full_steps, segments, selection="official") if i >= start]
            if len(tail) == steps + 1 and tail[0] == start:
                return tail
        if segments == DEFAULT_SEGMENTS and OFFICIAL_INDICES_M8[steps][-2] == segments - 1:
            # No tail fits. Every official table of 3 or more steps ends at the last non-zero boundary
            # (124), so end there too and space the other steps as evenly as possible between the start
            # boundary and it. The 1- and 2-step tables (999 / 999, 499) do not, so those stay uniform.
            return _uniform_indices(steps - 1, start, segments - 1) + [segments]
    return _uniform_indices(steps, start, segments)


def lcm_timesteps(
    steps: int, *, denoise: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> list[int]:
    """Timesteps of diffusers' LCMScheduler (original_inference_steps=50), e.g. 999/759/499/259 at 4 steps."""
    skip = num_train_timesteps // LCM_ORIGINAL_STEPS
    origin = [skip * (i + 1) - 1 for i in range(int(LCM_ORIGINAL_STEPS * denoise))]
    if steps > len(origin):
        raise ValueError(
            f"steps={steps} exceeds the {len(origin)} LCM grid points available at denoise={denoise}; "
            "use fewer steps or a higher denoise"
        )
    origin = origin[::-1]
    picks = torch.linspace(0, len(origin), steps + 1, dtype=torch.float64)[:-1].floor().to(torch.int64)
    return [origin[int(i)] for i in picks]


def start_boundary(segments: int, denoise: float) -> int:
    """Index of the boundary an img2img run with strength ``denoise`` starts from (0 = pure noise)."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise={denoise} must be in (0, 1]")
    covered = max(1, int(denoise * segments + 0.5))
    return segments - covered


def segment_timesteps(
    steps: int,
    segments: int = DEFAULT_SEGMENTS,
    *,
    selection: str = "official",
    denoise: float = 1.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> list[int]:
    """The descending timesteps the model is evaluated at for a ``steps``-step MLCM run.

    With ``denoise < 1`` (img2img) the run starts at the boundary matching the strength and keeps the
    tail of the schedule, so every evaluated timestep is still a trained segment boundary. Where no
    official (M = 8) table has such a tail, a run of 3 or more steps still ends at 124, as those tables do.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r} is unknown; choose one of {', '.join(SELECTIONS)}")
    if selection == "lcm":
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        return lcm_timesteps(steps, denoise=denoise, num_train_timesteps=num_train_timesteps)
    _check_steps(steps, segments)
    boundaries = segment_boundaries(segments, num_train_timesteps)
    start = start_boundary(segments, denoise)
    available = segments - start
    if steps > available:
        raise ValueError(
            f"steps={steps} needs {steps} segments but denoise={denoise:g} leaves only {available} of {segments}; "
            f"use at most {available} steps or raise denoise"
        )
    indices = (
        _tail_indices(steps, segments, start, selection)
        if start
        else selection_indices(steps, segments, selection=selection)
    )
    return [boundaries[i] for i in indices[:-1]]


def requested_timesteps(
    count: int, segments: int = DEFAULT_SEGMENTS, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> list[int]:
    """``count`` descending timesteps for a sampler that asks for a schedule and keeps only its tail.

    ComfyUI's KSampler runs img2img (denoise d < 1) by asking the scheduler for ``int(steps / d)`` steps
    and keeping the last ``steps + 1`` sigmas, so the scheduler never sees ``steps`` or ``d``. Up to
    ``segments`` this is the official table for ``count`` steps. Beyond it, the entry ``j`` places from the
    end is the boundary that an img2img run of strength ``j / count`` starts from (``start_boundary``): any
    tail KSampler keeps then starts where the project's img2img rule starts for that strength and visits
    trained boundaries only. A tail with more steps than boundaries below its start repeats a boundary
    (a second consistency step at the same noise level) rather than leaving the trained grid.
    """
    if count <= segments:
        return segment_timesteps(count, segments, num_train_timesteps=num_train_timesteps)
    boundaries = segment_boundaries(segments, num_train_timesteps)
    return [boundaries[start_boundary(segments, j / count)] for j in range(count, 0, -1)]


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """SD1.5/SDXL ``scaled_linear`` DDPM schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2 (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    """k-diffusion sigmas ``sqrt((1 - acp) / acp)`` at ``timesteps``, with the trailing 0 that ends a run."""
    acp = alphas_cumprod.to(torch.float64)[torch.as_tensor(list(timesteps), dtype=torch.long)]
    sigmas = ((1.0 - acp) / acp).sqrt()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def _check_steps(steps: int, segments: int) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    if steps > segments:
        raise ValueError(
            f"steps={steps} exceeds segments={segments}; use at most {segments} steps "
            "or a LoRA trained with more segments"
        )

"""Where MLCM trains: segment bounds, stage-1 times (arXiv 2406.05768v6, Eq. 6), the multistep-denoising grid
(Algorithm 1) and the stage-2 boundaries (Algorithm 2). See docs/method.md, "Stage 1" and "Stage 2".

Timesteps are discrete DDPM indices; ``boundaries`` are the descending segment edges of
``mlcm.segments.segment_boundaries`` (e.g. [999, 874, ..., 124, 0]); segment ``s`` (0 = lowest noise)
spans ``[boundaries[M - s], boundaries[M - s - 1]]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mlcm.segments import segment_boundaries

# Randomness of a batch: one generator for the whole batch, or one per sample. Per-sample generators make
# a sample's draws depend only on its own seed, so any split over processes gives the same samples.
Generators = torch.Generator | Sequence[torch.Generator] | None


def check_boundaries(boundaries: Sequence[int], segments: int) -> int:
    """Number of segments M of a descending boundary list; it must match ``segments``."""
    found = len(boundaries) - 1
    if found != segments:
        raise ValueError(
            f"{len(boundaries)} boundaries make {found} segments but settings.segments={segments}; "
            "pass segment_boundaries(settings.segments) or fix the settings"
        )
    if any(b <= a for b, a in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries {list(boundaries)} must be strictly descending")
    return found


def segment_bounds(segment: Tensor, boundaries: Sequence[int]) -> tuple[Tensor, Tensor]:
    """(lo, hi) timesteps of each segment (0 = lowest noise): ``boundaries[M - s]``, ``boundaries[M - s - 1]``."""
    edges = torch.as_tensor(list(boundaries), dtype=torch.long, device=segment.device)
    segments = len(boundaries) - 1
    return edges[segments - segment], edges[segments - segment - 1]


def sample_stage1_timesteps(
    batch_size: int, boundaries: Sequence[int], skip: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage-1 times: segment s ~ U{0..M-1}, ``t_m ~ U{lo+skip..hi}``, ``t_n = t_m - skip`` (TLCM Eq. 6).

    Returns LongTensors (segment, t_m, t_n, lo) of shape (batch_size,) on the generator's device.
    Drawing t_m at least ``skip`` above ``lo`` keeps t_n inside the segment, as Eq. 6 requires.
    """
    segments = _check_skip(boundaries, skip)
    device = generator.device if generator is not None else torch.device("cpu")
    segment = torch.randint(0, segments, (batch_size,), generator=generator, device=device)
    return _inside_segments(segment, boundaries, skip, generator)


def _check_skip(boundaries: Sequence[int], skip: int) -> int:
    narrowest = min(hi - lo for hi, lo in zip(boundaries, boundaries[1:]))
    if narrowest < skip:
        raise ValueError(
            f"skip={skip} exceeds the narrowest segment ({narrowest} timesteps); use skip <= {narrowest} "
            "or fewer segments"
        )
    return len(boundaries) - 1


def _inside_segments(
    segment: Tensor, boundaries: Sequence[int], skip: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(segment, t_m, t_n, lo) with t_m integer-uniform on [lo + skip, hi] of each sample's segment."""
    lo, hi = segment_bounds(segment, boundaries)
    # floor(u * width) with u ~ U[0, 1).
    u = torch.rand(segment.shape[0], generator=generator, device=segment.device, dtype=torch.float64)
    width = (hi - lo - skip + 1).to(torch.float64)
    t_m = lo + skip + (u * width).floor().to(torch.long).clamp(max=(hi - lo - skip))
    return segment, t_m, t_m - skip, lo


def mds_timesteps(t_m: Tensor, segment: Tensor, boundaries: Sequence[int]) -> list[Tensor]:
    """The Algorithm 1 grid per sample: ``L = M - s`` steps of ``(T - t_m) / L`` from ``T`` down to t_m.

    Returns L_max + 1 LongTensors of shape (B,); sample b uses entries 0..L_b (later entries repeat t_m).
    """
    segments = len(boundaries) - 1
    top = boundaries[0]
    steps = (segments - segment).to(torch.long)
    grid = [torch.full_like(t_m, top)]
    delta = (top - t_m).to(torch.float64) / steps.to(torch.float64)
    for i in range(1, int(steps.max()) + 1):
        t_i = torch.round(top - i * delta).to(torch.long)
        grid.append(torch.where(i >= steps, t_m, t_i))  # land exactly on t_m, then stay there
    return grid


def stage2_student_timesteps(q: int, num_train_timesteps: int) -> list[int]:
    """The q uniform student timesteps of TLCM Algorithm 2 (``T - T/q * i``), e.g. 999, 749, 499, 249 for q=4."""
    return segment_boundaries(q, num_train_timesteps)[:-1]


def stage2_timesteps(
    batch_size: int, boundaries: Sequence[int], generator: Generators = None
) -> tuple[Tensor, Tensor]:
    """Stage-2 (t_m, t_n): t_m a random upper boundary ``{t_s}_{s=1..M}``, t_n the next lower one."""
    segments = len(boundaries) - 1
    if isinstance(generator, Sequence):
        if len(generator) != batch_size:
            raise ValueError(f"{len(generator)} generators for {batch_size} samples; give one per sample")
        segment = torch.cat(
            [torch.randint(0, segments, (1,), generator=g, device=g.device) for g in generator]
        )
    else:
        device = generator.device if generator is not None else torch.device("cpu")
        segment = torch.randint(0, segments, (batch_size,), generator=generator, device=device)
    lo, hi = segment_bounds(segment, boundaries)
    return hi, lo


def shared_stage1_timesteps(
    boundaries: Sequence[int], skip: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stage-1 times of one shared trajectory: one state per segment, from the top segment down.

    Column j is segment ``M - 1 - j``, with ``t_m ~ U{lo+skip..hi}`` of that segment and ``t_n = t_m - skip``
    as in ``sample_stage1_timesteps``, so t_m descends along the columns and one teacher trajectory from T
    passes every column's t_m in order. Returns (segment, t_m, t_n, lo), LongTensors of shape (M,).
    """
    segments = _check_skip(boundaries, skip)
    device = generator.device if generator is not None else torch.device("cpu")
    segment = torch.arange(segments - 1, -1, -1, device=device)
    return _inside_segments(segment, boundaries, skip, generator)

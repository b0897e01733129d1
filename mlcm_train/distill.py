"""The distillation maths of MLCM/TLCM: teacher CFG-DDIM, multistep denoising, stage 1 and stage 2 losses.

Pure functions, no I/O (MLCM_METHOD.md §2 and §5; mlcm_paper.md §3.3-3.4, Algorithms 1 and 2 of
TLCM arXiv 2406.05768v6). Models enter as *eps functions*: any callable ``eps_fn(z, t, cond) -> eps``
with ``t`` a LongTensor of shape (B,) and ``cond`` an opaque, batch-first conditioning object
(a tensor, a mapping/tuple of tensors, or a dataclass of them, such as ``Conditioning``).

Timesteps are discrete DDPM indices; ``boundaries`` are the descending segment edges of
``mlcm.segments.segment_boundaries`` (e.g. [999, 874, ..., 124, 0]); segment ``s`` (0 = lowest noise)
spans ``[boundaries[M - s], boundaries[M - s - 1]]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mlcm.segments import segment_boundaries
from mlcm.vp import add_noise, ddim_to, x0_from_eps
from mlcm_train.cond_batch import cat_cond, select_cond

logger = logging.getLogger(__name__)

EpsFn = Callable[[Tensor, Tensor, Any], Tensor]
# Randomness of a batch: one generator for the whole batch, or one per sample. Per-sample generators make
# a sample's draws depend only on its own seed, so any split over processes gives the same samples.
Generators = torch.Generator | Sequence[torch.Generator] | None
FeatureFn = Callable[[Tensor], Tensor]

LOSS_TYPES = ("l2", "huber")
RENOISE_MODES = ("same", "fresh")


@dataclass(frozen=True)
class DistillSettings:
    """Plain method values the training loop fills from its config (defaults: MLCM_METHOD.md §5)."""

    segments: int = 8  # M, the paper's segment count
    skip: int = 20  # t_n = t_m - skip in stage 1 (paper: 20; the parent method MCM used 1)
    guidance_scale: float = 8.0  # teacher CFG w, fixed and baked into the student (paper, SDXL)
    loss_type: str = "l2"  # "l2" (paper, Eq. 7/10) or "huber" (LCM's pseudo-Huber)
    huber_c: float = 0.001  # pseudo-Huber constant, LCM/diffusers convention
    num_train_timesteps: int = 1000  # T of the teacher's DDPM schedule (SD1.5/SDXL)

    def __post_init__(self) -> None:
        if self.segments < 1:
            raise ValueError(f"segments={self.segments} must be at least 1")
        if self.skip < 1:
            raise ValueError(f"skip={self.skip} must be at least 1 (the paper uses 20)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}"
            )
        if self.huber_c <= 0:
            raise ValueError(f"huber_c={self.huber_c} must be positive (LCM uses 0.001)")
        if self.num_train_timesteps <= self.segments:
            raise ValueError(
                f"num_train_timesteps={self.num_train_timesteps} must exceed segments={self.segments}"
            )


def cfg_eps(eps_fn: EpsFn, z: Tensor, t: Tensor, cond: Any, uncond: Any, guidance_scale: float) -> Tensor:
    """Teacher CFG ``eps_u + w (eps_c - eps_u)`` (TLCM Eq. 8), as one 2B-batch call when cond can be joined."""
    if guidance_scale == 1.0 or uncond is None:
        return eps_fn(z, t, cond).float()
    batch = z.shape[0]
    try:
        both = cat_cond(cond, uncond, batch)
    except (TypeError, ValueError):
        # Opaque or mismatched conditioning: two calls give the same result, only slower.
        eps_c, eps_u = eps_fn(z, t, cond).float(), eps_fn(z, t, uncond).float()
    else:
        eps_c, eps_u = eps_fn(torch.cat([z, z]), torch.cat([t, t]), both).float().chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def teacher_ddim_step(
    teacher_eps_fn: EpsFn,
    z: Tensor,
    t: Tensor,
    s: Tensor,
    cond: Any,
    uncond: Any,
    *,
    guidance_scale: float,
    alphas_cumprod: Tensor,
) -> Tensor:
    """One teacher CFG-DDIM step t -> s (TLCM Eq. 8: ``z_s = Psi(eps_hat(z_t, c, w, t), t, s)``)."""
    eps = cfg_eps(teacher_eps_fn, z, t, cond, uncond, guidance_scale)
    return ddim_to(z, x0_from_eps(z, eps, t, alphas_cumprod), t, s, alphas_cumprod)


# --- timesteps --------------------------------------------------------------------------------------


def _check_boundaries(boundaries: Sequence[int], settings: DistillSettings) -> int:
    """Number of segments M of a descending boundary list; it must match ``settings.segments``."""
    segments = len(boundaries) - 1
    if segments != settings.segments:
        raise ValueError(
            f"{len(boundaries)} boundaries make {segments} segments but settings.segments={settings.segments}; "
            "pass segment_boundaries(settings.segments) or fix the settings"
        )
    if any(b <= a for b, a in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries {list(boundaries)} must be strictly descending")
    return segments


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
    Drawing t_m at least ``skip`` above ``lo`` keeps t_n inside the segment (mlcm_paper.md §10 item 2).
    """
    segments = len(boundaries) - 1
    narrowest = min(hi - lo for hi, lo in zip(boundaries, boundaries[1:]))
    if narrowest < skip:
        raise ValueError(
            f"skip={skip} exceeds the narrowest segment ({narrowest} timesteps); use skip <= {narrowest} "
            "or fewer segments"
        )
    device = generator.device if generator is not None else torch.device("cpu")
    segment = torch.randint(0, segments, (batch_size,), generator=generator, device=device)
    lo, hi = segment_bounds(segment, boundaries)
    # Integer uniform on [lo + skip, hi] per sample: floor(u * width) with u ~ U[0, 1).
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)
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


@torch.no_grad()
def mds_states(
    teacher_eps_fn: EpsFn,
    noise: Tensor,
    t_m: Tensor,
    segment: Tensor,
    cond: Any,
    uncond: Any,
    *,
    settings: DistillSettings,
    alphas_cumprod: Tensor,
    boundaries: Sequence[int],
) -> Tensor:
    """Multistep denoising strategy (TLCM Algorithm 1): z_{t_m} from pure noise at T via L = M - s CFG-DDIM steps.

    Mixed-segment batches step every sample on its own grid; at each iteration only samples that still
    have a step to take are sent to the teacher, so the teacher sees sum(L) samples in max(L) calls.
    Steps that would not move (t == t_next, e.g. t_m = T) are skipped.
    """
    _check_boundaries(boundaries, settings)
    device = noise.device
    t_m, segment = t_m.to(device), segment.to(device)
    grid = [g.to(device) for g in mds_timesteps(t_m, segment, boundaries)]
    batch = noise.shape[0]
    z = noise.float().clone()
    for t_cur, t_next in zip(grid, grid[1:]):
        active = (t_next < t_cur).nonzero().flatten()
        if active.numel() == 0:
            continue
        rows = active if active.numel() < batch else slice(None)
        sub_cond = cond if active.numel() == batch else select_cond(cond, active, batch)
        sub_uncond = uncond if active.numel() == batch else select_cond(uncond, active, batch)
        z[rows] = teacher_ddim_step(
            teacher_eps_fn,
            z[rows],
            t_cur[rows],
            t_next[rows],
            sub_cond,
            sub_uncond,
            guidance_scale=settings.guidance_scale,
            alphas_cumprod=alphas_cumprod,
        )
    return z


# --- losses -----------------------------------------------------------------------------------------


def consistency_distance(
    pred: Tensor,
    target: Tensor,
    *,
    loss_type: str = "l2",
    huber_c: float = 0.001,
    feature_fn: FeatureFn | None = None,
) -> Tensor:
    """Scalar loss between prediction and (no-grad) target: squared L2 (TLCM Eq. 7/10) or pseudo-Huber.

    On raw latents the loss is a mean over all elements (MSE; Huber as in LCM: ``sqrt(d^2 + c^2) - c``).
    With ``feature_fn`` (e.g. latent LPIPS features, shape (B, D)) it is a per-sample *sum* over features,
    averaged over the batch, so that L2 equals the LPIPS distance itself.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}")
    if feature_fn is not None:
        pred = feature_fn(pred).flatten(1)
        with torch.no_grad():
            target = feature_fn(target).flatten(1)
    diff = pred.float() - target.float().detach()
    per_element = diff.square() if loss_type == "l2" else (diff.square() + huber_c**2).sqrt() - huber_c
    if feature_fn is not None:
        return per_element.sum(dim=1).mean()
    return per_element.mean()


def _stats(loss: Tensor, pred: Tensor, target: Tensor, **extra: Tensor) -> dict[str, float]:
    """Detached monitoring numbers, fetched with one device sync."""
    names = ["loss", "latent_mse", *extra]
    values = torch.stack(
        [
            loss.detach().float(),
            (pred.detach() - target).float().square().mean(),
            *(v.float().mean() for v in extra.values()),
        ]
    )
    return dict(zip(names, values.tolist()))


def stage1_loss(
    student_eps_fn: EpsFn,
    target_eps_fn: EpsFn,
    teacher_eps_fn: EpsFn,
    z_tm: Tensor,
    t_m: Tensor,
    t_n: Tensor,
    lo: Tensor,
    cond: Any,
    uncond: Any,
    *,
    settings: DistillSettings,
    alphas_cumprod: Tensor,
    feature_fn: FeatureFn | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Multistep latent consistency loss (TLCM Eq. 7) with the teacher step of Eq. 8.

    pred   = DDIM(z_tm, x0_student(z_tm, t_m), t_m -> lo)
    target = DDIM(z_tn, x0_target(z_tn, t_n), t_n -> lo), no grad, z_tn = teacher CFG-DDIM(z_tm, t_m -> t_n).
    Gradients reach only what ``student_eps_fn`` computes; the student sees ``cond`` only (CFG is baked in).
    """
    device = z_tm.device
    t_m, t_n, lo = t_m.to(device), t_n.to(device), lo.to(device)
    if bool((t_n > t_m).any()) or bool((lo > t_n).any()):
        raise ValueError(
            "stage-1 timesteps must satisfy lo <= t_n <= t_m; draw them with sample_stage1_timesteps"
        )
    with torch.no_grad():
        z_tn = teacher_ddim_step(
            teacher_eps_fn,
            z_tm,
            t_m,
            t_n,
            cond,
            uncond,
            guidance_scale=settings.guidance_scale,
            alphas_cumprod=alphas_cumprod,
        )
        x0_target = x0_from_eps(z_tn, target_eps_fn(z_tn, t_n, cond), t_n, alphas_cumprod)
        target = ddim_to(z_tn, x0_target, t_n, lo, alphas_cumprod)
    x0_pred = x0_from_eps(z_tm, student_eps_fn(z_tm, t_m, cond), t_m, alphas_cumprod)
    pred = ddim_to(z_tm, x0_pred, t_m, lo, alphas_cumprod)
    loss = consistency_distance(
        pred, target, loss_type=settings.loss_type, huber_c=settings.huber_c, feature_fn=feature_fn
    )
    return loss, _stats(loss, pred, target, teacher_step_mse=(z_tn - z_tm.float()).square().mean())


def stage2_student_timesteps(q: int, num_train_timesteps: int) -> list[int]:
    """The q uniform student timesteps of TLCM Algorithm 2 (``T - T/q * i``), e.g. 999, 749, 499, 249 for q=4."""
    return segment_boundaries(q, num_train_timesteps)[:-1]


@torch.no_grad()
def student_sample(
    eps_fn: EpsFn,
    noise: Tensor,
    cond: Any,
    *,
    timesteps: Sequence[int],
    alphas_cumprod: Tensor,
    renoise: str = "same",
    generator: Generators = None,
) -> Tensor:
    """Multistep consistency sample (TLCM Algorithm 2, first loop): x0, then re-noise to the next timestep.

    ``renoise="same"`` reuses ``noise`` for every re-noise (Algorithm 2 literally); ``"fresh"`` draws new
    noise each time like the official inference code, from ``generator`` (see ``Generators``). Returns the
    last x0 (float32).
    """
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise={renoise!r} is unknown; choose one of {', '.join(RENOISE_MODES)}")
    batch = noise.shape[0]
    z = noise.float().clone()
    x0 = z
    for i, t in enumerate(timesteps):
        t_vec = torch.full((batch,), int(t), dtype=torch.long, device=noise.device)
        x0 = x0_from_eps(z, eps_fn(z, t_vec, cond), t_vec, alphas_cumprod)
        if i + 1 < len(timesteps):
            t_next = torch.full_like(t_vec, int(timesteps[i + 1]))
            z = add_noise(x0, _renoise_draw(noise, renoise, generator), t_next, alphas_cumprod)
    return x0


def _renoise_draw(noise: Tensor, renoise: str, generator: Generators) -> Tensor:
    if renoise == "same":
        return noise
    if isinstance(generator, Sequence):  # one draw per sample from its own generator, then to the device
        return torch.stack(
            [torch.randn(noise.shape[1:], generator=g, dtype=torch.float32) for g in generator]
        ).to(noise.device)
    return torch.randn(noise.shape, generator=generator, device=noise.device, dtype=torch.float32)


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


def stage2_loss(
    student_eps_fn: EpsFn,
    target_eps_fn: EpsFn,
    teacher_eps_fn: EpsFn,
    noise: Tensor,
    cond: Any,
    uncond: Any,
    *,
    settings: DistillSettings,
    alphas_cumprod: Tensor,
    boundaries: Sequence[int],
    q: int = 4,
    p: int = 3,
    renoise: str = "same",
    generator: Generators = None,
    feature_fn: FeatureFn | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Inter-segment consistency loss (TLCM Eq. 9-10, Algorithm 2) over the sparse segment boundaries.

    A q-step student sample (no grad) is forward-diffused (Eq. 9) to a random boundary t_m; p teacher
    CFG-DDIM sub-steps bring it to the next lower boundary t_n; the loss is between the student's x0 at
    t_m and the no-grad target x0 at t_n. ``generator`` draws t_m (and fresh noise with renoise="fresh"):
    one generator on ``noise``'s device for the batch, or one per sample (``Generators``).
    """
    _check_boundaries(boundaries, settings)
    if q < 1 or p < 1:
        raise ValueError(f"q={q} and p={p} must both be at least 1 (the paper uses q=4, p=3)")
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise={renoise!r} is unknown; choose one of {', '.join(RENOISE_MODES)}")
    batch, device = noise.shape[0], noise.device
    with torch.no_grad():
        x0_sample = student_sample(
            student_eps_fn,
            noise,
            cond,
            timesteps=stage2_student_timesteps(q, settings.num_train_timesteps),
            alphas_cumprod=alphas_cumprod,
            renoise=renoise,
            generator=generator,
        )
        t_m, t_n = (t.to(device) for t in stage2_timesteps(batch, boundaries, generator))
        z_tm = add_noise(x0_sample, _renoise_draw(noise, renoise, generator), t_m, alphas_cumprod)
        z, t_cur = z_tm, t_m
        for i in range(1, p + 1):
            # p uniform sub-steps of the segment, rounded to integer timesteps (Algorithm 2, second loop).
            t_next = torch.round(t_m - (t_m - t_n).to(torch.float64) * i / p).to(torch.long)
            z = teacher_ddim_step(
                teacher_eps_fn,
                z,
                t_cur,
                t_next,
                cond,
                uncond,
                guidance_scale=settings.guidance_scale,
                alphas_cumprod=alphas_cumprod,
            )
            t_cur = t_next
        target = x0_from_eps(z, target_eps_fn(z, t_n, cond), t_n, alphas_cumprod)
    pred = x0_from_eps(z_tm, student_eps_fn(z_tm, t_m, cond), t_m, alphas_cumprod)
    loss = consistency_distance(
        pred, target, loss_type=settings.loss_type, huber_c=settings.huber_c, feature_fn=feature_fn
    )
    return loss, _stats(loss, pred, target, t_m=t_m)

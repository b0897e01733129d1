"""The distillation losses of MLCM: stage 1 (arXiv 2406.05768v6, Eq. 7) and stage 2 (Eq. 9-10, Algorithm 2).

Pure functions, no I/O; the method is described in docs/method.md. Models enter as eps functions
(``mlcm_train.method.teacher_ddim.EpsFn``): the student (with gradients), the target (the same student, no
gradients) and the frozen teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mlcm.vp import add_noise, ddim_to, x0_from_eps
from mlcm_train.method.rollout import student_rollout
from mlcm_train.method.settings import LOSS_TYPES, RENOISE_MODES, DistillSettings
from mlcm_train.method.teacher_ddim import EpsFn, teacher_ddim_step
from mlcm_train.method.timesteps import (
    Generators,
    check_boundaries,
    stage2_student_timesteps,
    stage2_timesteps,
)

FeatureFn = Callable[[Tensor], Tensor]


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
    z_tn: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Multistep latent consistency loss (TLCM Eq. 7) with the teacher step of Eq. 8.

    pred   = DDIM(z_tm, x0_student(z_tm, t_m), t_m -> lo)
    target = DDIM(z_tn, x0_target(z_tn, t_n), t_n -> lo), no grad, z_tn = teacher CFG-DDIM(z_tm, t_m -> t_n).
    Gradients reach only what ``student_eps_fn`` computes; the student sees ``cond`` only (CFG is baked in).
    ``z_tn`` given: that teacher step, already taken by the caller (shared trajectories reuse the eps).
    """
    device = z_tm.device
    t_m, t_n, lo = t_m.to(device), t_n.to(device), lo.to(device)
    if bool((t_n > t_m).any()) or bool((lo > t_n).any()):
        raise ValueError(
            "stage-1 timesteps must satisfy lo <= t_n <= t_m; draw them with sample_stage1_timesteps"
        )
    with torch.no_grad():
        if z_tn is None:  # else the caller took this teacher step already (shared trajectories)
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
        z_tn = z_tn.float()
        x0_target = x0_from_eps(z_tn, target_eps_fn(z_tn, t_n, cond), t_n, alphas_cumprod)
        target = ddim_to(z_tn, x0_target, t_n, lo, alphas_cumprod)
    x0_pred = x0_from_eps(z_tm, student_eps_fn(z_tm, t_m, cond), t_m, alphas_cumprod)
    pred = ddim_to(z_tm, x0_pred, t_m, lo, alphas_cumprod)
    loss = consistency_distance(
        pred, target, loss_type=settings.loss_type, huber_c=settings.huber_c, feature_fn=feature_fn
    )
    return loss, _stats(loss, pred, target, teacher_step_mse=(z_tn - z_tm.float()).square().mean())


def _renoise_draw(noise: Tensor, renoise: str, generator: Generators) -> Tensor:
    if renoise == "same":
        return noise
    if isinstance(generator, Sequence):  # one draw per sample from its own generator, then to the device
        return torch.stack(
            [torch.randn(noise.shape[1:], generator=g, dtype=torch.float32) for g in generator]
        ).to(noise.device)
    return torch.randn(noise.shape, generator=generator, device=noise.device, dtype=torch.float32)


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
    check_boundaries(boundaries, settings.segments)
    if q < 1 or p < 1:
        raise ValueError(f"q={q} and p={p} must both be at least 1 (the paper uses q=4, p=3)")
    if renoise not in RENOISE_MODES:
        raise ValueError(f"renoise={renoise!r} is unknown; choose one of {', '.join(RENOISE_MODES)}")
    batch, device = noise.shape[0], noise.device
    with torch.no_grad():
        timesteps = stage2_student_timesteps(q, settings.num_train_timesteps)
        # Algorithm 2's first loop; "same" re-noises with the starting noise, "fresh" draws per step.
        renoise_draws = [_renoise_draw(noise, renoise, generator) for _ in timesteps[1:]]
        x0_sample = student_rollout(
            student_eps_fn, noise, renoise_draws, cond, timesteps=timesteps, alphas_cumprod=alphas_cumprod
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

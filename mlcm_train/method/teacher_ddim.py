"""The teacher's side of MLCM: CFG, one CFG-DDIM step (arXiv 2406.05768v6, Eq. 8), the multistep denoising
strategy that makes stage 1's data-free states (Algorithm 1), and the teacher's own CFG-DDIM sampler.

Models enter as *eps functions*: any callable ``eps_fn(z, t, cond) -> eps`` with ``t`` a LongTensor of shape
(B,) and ``cond`` an opaque, batch-first conditioning object (see docs/method.md, "Shared maths").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from mlcm.vp import ddim_to, x0_from_eps
from mlcm_train.method.cond_batch import cat_cond, select_cond
from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.timesteps import check_boundaries, mds_timesteps

EpsFn = Callable[[Tensor, Tensor, Any], Tensor]


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
    check_boundaries(boundaries, settings.segments)
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


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Evenly spaced DDIM timesteps from the top, e.g. 999, 749, 499, 249 for 4 steps (last step lands on x0)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    stride = num_train_timesteps / steps
    return [round(num_train_timesteps - 1 - i * stride) for i in range(steps)]


@torch.no_grad()
def teacher_cfg_ddim(
    eps_fn: EpsFn,
    noise: Tensor,
    cond: object,
    uncond: object,
    *,
    steps: int,
    guidance_scale: float,
    alphas_cumprod: Tensor,
) -> Tensor:
    """Deterministic CFG-DDIM (Song et al. 2021) over ``ddim_timesteps(steps)``; returns z0."""
    timesteps = ddim_timesteps(steps, len(alphas_cumprod))
    z = noise.float().clone()
    batch = z.shape[0]
    for i, t in enumerate(timesteps):
        t_vec = torch.full((batch,), t, dtype=torch.long)
        eps = cfg_eps(eps_fn, z, t_vec, cond, uncond, guidance_scale)
        x0 = x0_from_eps(z, eps, t_vec, alphas_cumprod)
        if i + 1 == len(timesteps):
            return x0
        z = ddim_to(z, x0, t_vec, torch.full_like(t_vec, timesteps[i + 1]), alphas_cumprod)
    return z


@torch.no_grad()
def shared_trajectory_states(
    teacher_eps_fn: EpsFn,
    noise: Tensor,
    t_m: Tensor,
    cond: Any,
    uncond: Any,
    *,
    settings: DistillSettings,
    alphas_cumprod: Tensor,
    top: int,
    t_n: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """States of shared trajectories: each row of ``noise`` runs one CFG-DDIM chain from ``top`` through its
    row of descending ``t_m`` (N, K), one teacher step per column (ours; see docs/method.md, "Shared
    trajectories"). Returns (N, K, C, H, W): the state at every column's t_m.

    With ``t_n`` (N, K), also returns stage 1's teacher step of every state, ``z_tn`` (TLCM Eq. 8). A DDIM
    step from t_m uses only the teacher's eps at (z_tm, t_m), and the chain's step onward from that column
    needs the same eps, so one CFG call serves both: K + 1 calls for K states and their targets, where
    Algorithm 1 spends ``M - s`` calls on one state and one more on its target.
    """
    if t_m.dim() != 2 or t_m.shape[0] != noise.shape[0]:
        raise ValueError(
            f"t_m must be (trajectories, columns) for {noise.shape[0]} noises, got {tuple(t_m.shape)}"
        )
    device = noise.device
    t_m = t_m.to(device)
    if bool((t_m[:, 1:] > t_m[:, :-1]).any()) or bool((t_m > top).any()):
        raise ValueError(
            "shared trajectory times must descend from the top; draw them with shared_stage1_timesteps"
        )
    if t_n is not None and (t_n.shape != t_m.shape or bool((t_n.to(device) > t_m).any())):
        raise ValueError("t_n must be (trajectories, columns) like t_m and at most t_m")

    def teacher_x0(z: Tensor, t: Tensor) -> Tensor:
        eps = cfg_eps(teacher_eps_fn, z, t, cond, uncond, settings.guidance_scale)
        return x0_from_eps(z, eps, t, alphas_cumprod)

    columns = t_m.shape[1]
    z = noise.float()
    t_cur = torch.full_like(t_m[:, 0], top)
    x0 = teacher_x0(z, t_cur)
    states, targets = [], []
    for column in range(columns):
        t_next = t_m[:, column]
        z = ddim_to(z, x0, t_cur, t_next, alphas_cumprod)  # the identity where t_next = t_cur (t_m = T)
        states.append(z)
        if t_n is not None or column + 1 < columns:
            x0 = teacher_x0(z, t_next)
            if t_n is not None:
                targets.append(ddim_to(z, x0, t_next, t_n[:, column].to(device), alphas_cumprod))
        t_cur = t_next
    states_out = torch.stack(states, dim=1)
    return states_out if t_n is None else (states_out, torch.stack(targets, dim=1))

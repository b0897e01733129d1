"""Parity of the batched distillation code with a literal, per-sample transcription of TLCM Algorithms 1-2.

The references below use plain Python floats for the schedule and loop over samples one at a time,
exactly as the paper's pseudo-code reads (arXiv 2406.05768v6, Algorithms 1 and 2), with a nonlinear fake teacher and
student so that no step is exact by accident.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlcm.segments import scaled_linear_alphas_cumprod, segment_boundaries
from mlcm_train.method.consistency import stage1_loss, stage2_loss
from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.teacher_ddim import mds_states
from mlcm_train.method.timesteps import sample_stage1_timesteps

ACP = scaled_linear_alphas_cumprod()
M = 8
BOUNDARIES = segment_boundaries(M)
W = 3.0


def teacher(z, t, cond):
    return torch.tanh(0.7 * z + cond) * (1 + t.float().view(-1, 1, 1, 1) / 2000)


def student(z, t, cond):
    return torch.sin(z - 0.3 * cond) + 0.1 * z * (t.float().view(-1, 1, 1, 1) / 1000)


def alpha(t: int) -> float:
    return math.sqrt(float(ACP[t]))


def sigma(t: int) -> float:
    return math.sqrt(1.0 - float(ACP[t]))


def ref_cfg(fn, z, t: int, c, u):
    tt = torch.tensor([t])
    e_c, e_u = fn(z[None], tt, c[None])[0], fn(z[None], tt, u[None])[0]
    return e_u + W * (e_c - e_u)


def ref_ddim(z, eps, t: int, s: int):
    x0 = (z - sigma(t) * eps) / alpha(t)
    return alpha(s) * x0 + sigma(s) * (z - alpha(t) * x0) / sigma(t)


def ref_x0(fn, z, t: int, c):
    return (z - sigma(t) * fn(z[None], torch.tensor([t]), c[None])[0]) / alpha(t)


def ref_mds(z, t_m: int, s: int, c, u):
    """Algorithm 1: L = M - s; dT = (T - t_m) / L; t = T - i dT; t' = t - dT (rounded to integer steps)."""
    top, steps = BOUNDARIES[0], M - s
    delta = (top - t_m) / steps
    for i in range(steps):
        t, t_next = round(top - i * delta), round(top - (i + 1) * delta)
        if t_next != t:
            z = ref_ddim(z, ref_cfg(teacher, z, t, c, u), t, t_next)
    return z


def inputs(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 4, 4, 4)
    return (
        torch.randn(shape, generator=gen),
        torch.randn(shape, generator=gen),
        torch.randn(shape, generator=gen),
    )


def test_mds_states_matches_algorithm_1_per_sample():
    noise, cond, uncond = inputs(6, 0)
    segment, t_m, _, _ = sample_stage1_timesteps(6, BOUNDARIES, 20, torch.Generator().manual_seed(1))
    got = mds_states(
        teacher, noise, t_m, segment, cond, uncond,
        settings=DistillSettings(guidance_scale=W), alphas_cumprod=ACP, boundaries=BOUNDARIES,
    )  # fmt: skip
    for b in range(6):
        expected = ref_mds(noise[b], int(t_m[b]), int(segment[b]), cond[b], uncond[b])
        torch.testing.assert_close(got[b], expected, atol=1e-4, rtol=1e-4)


def test_stage1_loss_matches_eq_7_and_8_per_sample():
    z_tm, cond, uncond = inputs(5, 2)
    segment, t_m, t_n, lo = sample_stage1_timesteps(5, BOUNDARIES, 20, torch.Generator().manual_seed(3))
    loss, _ = stage1_loss(
        student, student, teacher, z_tm, t_m, t_n, lo, cond, uncond,
        settings=DistillSettings(guidance_scale=W), alphas_cumprod=ACP,
    )  # fmt: skip
    total = 0.0
    for b in range(5):
        m, n, s = int(t_m[b]), int(t_n[b]), int(lo[b])
        z_tn = ref_ddim(z_tm[b], ref_cfg(teacher, z_tm[b], m, cond[b], uncond[b]), m, n)  # Eq. 8
        pred = ref_ddim(z_tm[b], (z_tm[b] - alpha(m) * ref_x0(student, z_tm[b], m, cond[b])) / sigma(m), m, s)
        target = ref_ddim(z_tn, (z_tn - alpha(n) * ref_x0(student, z_tn, n, cond[b])) / sigma(n), n, s)
        total += float((pred - target).square().mean())
    assert float(loss) == pytest.approx(total / 5, rel=1e-4, abs=1e-7)


def test_stage2_loss_matches_algorithm_2_per_sample():
    noise, cond, uncond = inputs(4, 4)
    q, p = 4, 3
    loss, _ = stage2_loss(
        student, student, teacher, noise, cond, uncond,
        settings=DistillSettings(guidance_scale=W), alphas_cumprod=ACP, boundaries=BOUNDARIES,
        q=q, p=p, renoise="same", generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    # Same draw as the code: one boundary index per sample from the generator.
    segment = torch.randint(0, M, (4,), generator=torch.Generator().manual_seed(5))
    total = 0.0
    for b in range(4):
        eps = noise[b]
        z, grid = eps, [999, 749, 499, 249]  # T - T/q (i+1) on the integer grid
        for i, t in enumerate(grid):
            x0 = ref_x0(student, z, t, cond[b])
            if i + 1 < q:
                z = alpha(grid[i + 1]) * x0 + sigma(grid[i + 1]) * eps  # the same eps (Algorithm 2)
        s = int(segment[b])
        t_m, t_n = BOUNDARIES[M - s - 1], BOUNDARIES[M - s]
        z_tm = alpha(t_m) * x0 + sigma(t_m) * eps
        z1 = z_tm
        for i in range(p):
            t1, t2 = round(t_m - (t_m - t_n) * i / p), round(t_m - (t_m - t_n) * (i + 1) / p)
            z1 = ref_ddim(z1, ref_cfg(teacher, z1, t1, cond[b], uncond[b]), t1, t2)
        pred, target = ref_x0(student, z_tm, t_m, cond[b]), ref_x0(student, z1, t_n, cond[b])
        total += float((pred - target).square().mean())
    assert float(loss) == pytest.approx(total / 4, rel=1e-4, abs=1e-7)

"""Analytic checks of the distillation maths (mlcm_train/distill.py) with exactly consistent eps functions.

If all data is one point x*, the true noise prediction is ``eps(z, t) = (z - a_t x*) / s_t``: every DDIM
step is exact, every x0 prediction is x*, and every consistency loss of a student equal to it is zero.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from mlcm.segments import scaled_linear_alphas_cumprod, segment_boundaries
from mlcm.vp import add_noise, ddim_to, x0_from_eps
from mlcm_train.method.cond_batch import cat_cond, select_cond
from mlcm_train.method.consistency import consistency_distance, stage1_loss, stage2_loss
from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.teacher_ddim import cfg_eps, mds_states
from mlcm_train.method.timesteps import sample_stage1_timesteps, stage2_student_timesteps, stage2_timesteps

ACP = scaled_linear_alphas_cumprod()
BOUNDARIES = segment_boundaries(8)
SHAPE = (4, 8, 8)


def consistent_eps(x_star: torch.Tensor):
    """Exact eps of a point mass at x_star (per sample), ignoring the conditioning."""

    def eps_fn(z, t, cond):
        a = ACP[t].sqrt().float().view(-1, 1, 1, 1)
        s = (1 - ACP[t]).sqrt().float().view(-1, 1, 1, 1)
        return (z - a * x_star) / s

    return eps_fn


def cond_eps(z, t, cond):
    """Exact eps of a point mass at x* = cond (a batch-first latent tensor): CFG then moves x*."""
    return consistent_eps(cond)(z, t, None)


def guided_point(x_c, x_u, w):
    """The point whose exact eps equals CFG of the exact eps of x_c and x_u: x_u + w (x_c - x_u)."""
    return x_u + w * (x_c - x_u)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ddim_and_x0_helpers_are_exact_on_a_point_mass():
    x_star, noise = randn(3, *SHAPE), randn(3, *SHAPE, seed=1)
    t, s = torch.tensor([999, 500, 40]), torch.tensor([700, 124, 0])
    z_t = add_noise(x_star, noise, t, ACP)
    eps = consistent_eps(x_star)(z_t, t, None)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_from_eps(z_t, eps, t, ACP), x_star, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        ddim_to(z_t, x_star, t, s, ACP), add_noise(x_star, noise, s, ACP), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(
        ddim_to(z_t, randn(3, *SHAPE, seed=2), t, t, ACP), z_t
    )  # t -> t is the identity


@dataclasses.dataclass(frozen=True)
class Cond:
    hidden: torch.Tensor
    pooled: torch.Tensor
    family: str = "sd15"


def test_cfg_eps_is_one_batched_call_equal_to_two_calls():
    calls = []

    def eps_fn(z, t, cond):
        calls.append(z.shape[0])
        return z * cond.hidden.mean(dim=(1, 2)).view(-1, 1, 1, 1) + cond.pooled.view(-1, 1, 1, 1)

    z, t = randn(3, *SHAPE), torch.tensor([10, 20, 30])
    cond = Cond(randn(3, 5, 7, seed=1), randn(3, 1, seed=2))
    uncond = Cond(randn(1, 5, 7, seed=3), randn(1, 1, seed=4))  # batch 1 broadcasts
    got = cfg_eps(eps_fn, z, t, cond, uncond, 7.5)
    assert calls == [6]
    full_uncond = Cond(uncond.hidden.expand(3, 5, 7), uncond.pooled.expand(3, 1))
    eps_c, eps_u = eps_fn(z, t, cond), eps_fn(z, t, full_uncond)
    torch.testing.assert_close(got, eps_u + 7.5 * (eps_c - eps_u))
    assert cfg_eps(eps_fn, z, t, cond, uncond, 1.0).shape == z.shape  # w = 1: the conditional eps only


def test_cfg_eps_falls_back_to_two_calls_for_opaque_conditioning():
    calls = []

    class Opaque:
        def __init__(self, scale):
            self.scale = scale

    def eps_fn(z, t, cond):
        calls.append(z.shape[0])
        return z * cond.scale

    z = randn(2, *SHAPE)
    got = cfg_eps(eps_fn, z, torch.tensor([5, 6]), Opaque(3.0), Opaque(1.0), 2.0)
    assert calls == [2, 2]
    torch.testing.assert_close(got, z * (1.0 + 2.0 * (3.0 - 1.0)))


def test_select_and_cat_cond_keep_structure_and_leave_input_untouched():
    cond = {"hidden": randn(4, 3), "extra": {"ids": torch.arange(4)}, "scale": 2}
    before = cond["hidden"].clone()
    picked = select_cond(cond, torch.tensor([3, 1]), 4)
    torch.testing.assert_close(picked["hidden"], before[[3, 1]])
    assert picked["extra"]["ids"].tolist() == [3, 1] and picked["scale"] == 2
    joined = cat_cond(
        cond, {"hidden": randn(1, 3), "extra": {"ids": torch.zeros(1, dtype=torch.long)}, "scale": 2}, 4
    )
    assert joined["hidden"].shape == (8, 3) and joined["extra"]["ids"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    torch.testing.assert_close(cond["hidden"], before)


def test_sample_stage1_timesteps_stay_inside_their_segment_and_cover_all():
    gen = torch.Generator().manual_seed(0)
    segment, t_m, t_n, lo = sample_stage1_timesteps(4000, BOUNDARIES, 20, gen)
    hi = torch.tensor(BOUNDARIES)[8 - segment - 1]
    assert torch.equal(lo, torch.tensor(BOUNDARIES)[8 - segment])
    assert (
        bool((t_n >= lo).all())
        and bool((t_m <= hi).all())
        and torch.equal(t_m - t_n, torch.full_like(t_m, 20))
    )
    assert set(segment.tolist()) == set(range(8))
    assert bool((t_m[segment == 7] == 999).any()) and bool(
        (t_n[segment == 0] == 0).any()
    )  # both ends reachable
    again = sample_stage1_timesteps(4000, BOUNDARIES, 20, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip((segment, t_m, t_n, lo), again))
    with pytest.raises(ValueError, match="skip=200 exceeds"):
        sample_stage1_timesteps(2, BOUNDARIES, 200, gen)


def test_mds_states_takes_m_minus_s_teacher_steps_and_lands_on_t_m():
    settings = DistillSettings(guidance_scale=3.0)
    visits: dict[int, list[int]] = {}
    x_c, x_u = randn(8, *SHAPE, seed=1), randn(8, *SHAPE, seed=2)
    row_of = {}

    def recording(z, t, cond):
        for row, time in zip(cond[:, 0, 0, 0].tolist(), t.tolist()):
            visits.setdefault(row_of[row], []).append(time)
        return cond_eps(z, t, cond)

    # Tag each sample by a unique value in its conditioning so the fake teacher knows which row it sees.
    for b in range(8):
        x_c[b, 0, 0, 0] = 100.0 + b
        x_u[b, 0, 0, 0] = -100.0 - b
        row_of[100.0 + b] = row_of[-100.0 - b] = b
    segment = torch.tensor([0, 7, 3, 0, 5, 1, 6, 2])
    t_m = torch.tensor([20, 950, 500, 124, 700, 140, 830, 380])
    noise = randn(8, *SHAPE, seed=3)
    z = mds_states(
        recording, noise, t_m, segment, x_c, x_u, settings=settings, alphas_cumprod=ACP, boundaries=BOUNDARIES
    )
    for b in range(8):
        steps = 8 - int(segment[b])
        times = visits[b]
        assert len(times) == 2 * steps  # one cond and one uncond pass per CFG-DDIM step
        grid = sorted(set(times), reverse=True)
        assert grid[0] == 999 and len(grid) == steps and all(t > int(t_m[b]) for t in grid)
    # Exact landing: DDIM on a point mass keeps the initial noise direction (z_T - a_T x_g) / s_T.
    x_g = guided_point(x_c, x_u, 3.0)
    expected = add_noise(x_g, consistent_eps(x_g)(noise, torch.full((8,), 999), None), t_m, ACP)
    torch.testing.assert_close(z, expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(noise, randn(8, *SHAPE, seed=3))  # input untouched


def test_mds_states_mixed_batch_equals_per_sample_runs_with_sum_l_teacher_rows():
    settings = DistillSettings()
    rows = Counter()

    def teacher(z, t, cond):
        rows["n"] += z.shape[0]
        return torch.tanh(z * cond[:, :1, None, None]) + 0.01 * t.float().view(-1, 1, 1, 1) / 1000

    gen = torch.Generator().manual_seed(5)
    segment, t_m, _, _ = sample_stage1_timesteps(6, BOUNDARIES, 20, gen)
    noise, cond, uncond = randn(6, *SHAPE, seed=6), randn(6, 3, seed=7), randn(1, 3, seed=8)
    batched = mds_states(
        teacher,
        noise,
        t_m,
        segment,
        cond,
        uncond,
        settings=settings,
        alphas_cumprod=ACP,
        boundaries=BOUNDARIES,
    )
    assert rows["n"] == 2 * int((8 - segment).sum())
    for b in range(6):
        alone = mds_states(
            teacher, noise[b : b + 1], t_m[b : b + 1], segment[b : b + 1], cond[b : b + 1], uncond,
            settings=settings, alphas_cumprod=ACP, boundaries=BOUNDARIES,
        )  # fmt: skip
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_mds_states_rejects_boundaries_that_do_not_match_the_settings():
    with pytest.raises(ValueError, match="settings.segments=8"):
        mds_states(
            cond_eps, randn(1, *SHAPE), torch.tensor([500]), torch.tensor([1]), randn(1, *SHAPE), None,
            settings=DistillSettings(), alphas_cumprod=ACP, boundaries=segment_boundaries(4),
        )  # fmt: skip


def _stage1_inputs(w):
    gen = torch.Generator().manual_seed(3)
    segment, t_m, t_n, lo = sample_stage1_timesteps(8, BOUNDARIES, 20, gen)
    x_c, x_u = randn(8, *SHAPE, seed=1), randn(8, *SHAPE, seed=2)
    z_tm = add_noise(guided_point(x_c, x_u, w), randn(8, *SHAPE, seed=4), t_m, ACP)
    return z_tm, t_m, t_n, lo, x_c, x_u


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_stage1_loss_is_zero_exactly_for_the_guided_consistent_student(loss_type):
    settings = DistillSettings(guidance_scale=4.0, loss_type=loss_type)
    z_tm, t_m, t_n, lo, x_c, x_u = _stage1_inputs(4.0)
    student = consistent_eps(guided_point(x_c, x_u, 4.0))
    loss, stats = stage1_loss(
        student, student, cond_eps, z_tm, t_m, t_n, lo, x_c, x_u, settings=settings, alphas_cumprod=ACP
    )
    assert float(loss) < 1e-6 and stats["latent_mse"] < 1e-9 and stats["teacher_step_mse"] > 0
    # The unguided conditional point is a different trajectory: the loss sees it.
    wrong = consistent_eps(x_c)
    loss_wrong, _ = stage1_loss(
        wrong, wrong, cond_eps, z_tm, t_m, t_n, lo, x_c, x_u, settings=settings, alphas_cumprod=ACP
    )
    assert float(loss_wrong) > 1e3 * max(float(loss), 1e-9)


def test_stage1_pred_and_target_are_taken_to_the_segment_lower_boundary():
    """A student predicting x0 = 0 gives pred = s_lo/s_tm z_tm; the target uses the teacher's z_tn."""
    settings = DistillSettings(guidance_scale=1.0)
    z_tm, t_m, t_n, lo, x_c, _ = _stage1_inputs(1.0)

    def zero_x0(z, t, cond):  # eps = z / s_t  <=>  x0 = 0
        return z / (1 - ACP[t]).sqrt().float().view(-1, 1, 1, 1)

    loss, _ = stage1_loss(
        zero_x0, zero_x0, cond_eps, z_tm, t_m, t_n, lo, x_c, None, settings=settings, alphas_cumprod=ACP
    )
    s = (1 - ACP).sqrt().float()
    pred = s[lo].view(-1, 1, 1, 1) / s[t_m].view(-1, 1, 1, 1) * z_tm
    x0_teacher = x0_from_eps(z_tm, cond_eps(z_tm, t_m, x_c), t_m, ACP)
    z_tn = ddim_to(z_tm, x0_teacher, t_m, t_n, ACP)
    target = s[lo].view(-1, 1, 1, 1) / s[t_n].view(-1, 1, 1, 1) * z_tn
    torch.testing.assert_close(loss, (pred - target).square().mean(), rtol=1e-4, atol=1e-7)


def test_stage1_rejects_timesteps_outside_the_segment():
    z_tm, t_m, t_n, lo, x_c, x_u = _stage1_inputs(1.0)
    with pytest.raises(ValueError, match="lo <= t_n <= t_m"):
        stage1_loss(
            cond_eps,
            cond_eps,
            cond_eps,
            z_tm,
            t_n,
            t_m,
            lo,
            x_c,
            x_u,
            settings=DistillSettings(),
            alphas_cumprod=ACP,
        )


@pytest.mark.parametrize("renoise", ["same", "fresh"])
def test_stage2_loss_is_zero_for_the_guided_consistent_student(renoise):
    settings = DistillSettings(guidance_scale=2.0)
    x_c, x_u = randn(5, *SHAPE, seed=1), randn(5, *SHAPE, seed=2)
    student = consistent_eps(guided_point(x_c, x_u, 2.0))
    loss, stats = stage2_loss(
        student, student, cond_eps, randn(5, *SHAPE, seed=3), x_c, x_u,
        settings=settings, alphas_cumprod=ACP, boundaries=BOUNDARIES, renoise=renoise,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert float(loss) < 1e-6 and stats["latent_mse"] < 1e-9

    # A point-mass student predicts a constant x0 and is trivially self-consistent; one whose x0 moves
    # with z is not, unless it follows the guided teacher's trajectory.
    def wrong(z, t, cond):
        return 0.5 * student(z, t, cond)

    loss_wrong, _ = stage2_loss(
        wrong, wrong, cond_eps, randn(5, *SHAPE, seed=3), x_c, x_u,
        settings=settings, alphas_cumprod=ACP, boundaries=BOUNDARIES, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert float(loss_wrong) > 1e-2


def test_stage2_with_per_sample_generators_does_not_depend_on_the_batch_split():
    # What two processes see: halves of the global batch, each sample with its own generator.
    settings = DistillSettings(guidance_scale=2.0)
    noise, x_c, x_u = randn(4, *SHAPE, seed=3), randn(4, *SHAPE, seed=1), randn(4, *SHAPE, seed=2)

    def student(z, t, cond):
        return 0.7 * cond_eps(z, t, cond) + 0.01 * t.view(-1, 1, 1, 1)

    def loss(rows):
        generators = [torch.Generator().manual_seed(100 + i) for i in rows]
        value, stats = stage2_loss(
            student, student, cond_eps, noise[rows], x_c[rows], x_u[rows], settings=settings,
            alphas_cumprod=ACP, boundaries=BOUNDARIES, renoise="fresh", generator=generators,
        )  # fmt: skip
        return value

    whole = loss([0, 1, 2, 3])
    halves = (loss([0, 1]) + loss([2, 3])) / 2
    torch.testing.assert_close(whole, halves, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one per sample"):
        stage2_timesteps(3, BOUNDARIES, [torch.Generator()])


def test_stage2_visits_q_student_steps_then_p_teacher_substeps_between_boundaries():
    settings = DistillSettings(segments=4, guidance_scale=1.0)
    boundaries = segment_boundaries(4)
    student_times, teacher_times, target_times = [], [], []

    def student(z, t, cond):
        student_times.append(t.tolist())
        return torch.zeros_like(z)

    def teacher(z, t, cond):
        teacher_times.append(t.tolist())
        return torch.zeros_like(z)

    def target(z, t, cond):
        target_times.append(t.tolist())
        return torch.zeros_like(z)

    stage2_loss(
        student, target, teacher, randn(64, *SHAPE), None, None, settings=settings, alphas_cumprod=ACP,
        boundaries=boundaries, q=4, p=3, generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert [ts[0] for ts in student_times[:4]] == stage2_student_timesteps(4, 1000) == [999, 749, 499, 249]
    t_m, t_n = torch.tensor(student_times[4]), torch.tensor(target_times[0])
    assert set(t_m.tolist()) == set(boundaries[:-1])  # every upper boundary drawn
    pairs = {hi: lo for hi, lo in zip(boundaries, boundaries[1:])}
    assert all(pairs[m] == n for m, n in zip(t_m.tolist(), t_n.tolist()))
    assert len(teacher_times) == 3 and teacher_times[0] == t_m.tolist()
    assert all(hi > sub > lo for hi, sub, lo in zip(t_m.tolist(), teacher_times[1], t_n.tolist()))


def test_l2_and_huber_values_on_known_differences():
    pred, target = torch.tensor([[0.0, 0.3], [-0.4, 0.0]]), torch.zeros(2, 2)
    assert consistency_distance(pred, target).item() == pytest.approx((0.09 + 0.16) / 4)
    c = 0.001
    huber = ((0.3**2 + c**2) ** 0.5 - c + (0.4**2 + c**2) ** 0.5 - c) / 4
    assert consistency_distance(pred, target, loss_type="huber", huber_c=c).item() == pytest.approx(huber)
    # With features the loss sums over feature dimensions per sample and averages over the batch.
    feats = consistency_distance(pred, target, feature_fn=lambda x: 2 * x)
    assert feats.item() == pytest.approx((4 * 0.09 + 4 * 0.16) / 2)
    with pytest.raises(ValueError, match="loss_type='l1'"):
        consistency_distance(pred, target, loss_type="l1")


def test_settings_validation_says_what_to_change():
    with pytest.raises(ValueError, match="loss_type"):
        DistillSettings(loss_type="mse")
    with pytest.raises(ValueError, match="skip=0"):
        DistillSettings(skip=0)

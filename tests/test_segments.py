"""Schedule tests: the official table, invariants, img2img tails, and parity with diffusers' LCMScheduler."""

from __future__ import annotations

import pytest
import torch

from mlcm.segments import (
    SELECTIONS,
    lcm_timesteps,
    requested_timesteps,
    scaled_linear_alphas_cumprod,
    segment_boundaries,
    segment_timesteps,
    sigmas_from_alphas_cumprod,
)

# docs/method.md, "Sampling": the table transcribed from the authors' inference code.
OFFICIAL_TABLE = {
    1: [999],
    2: [999, 499],
    3: [999, 499, 124],
    4: [999, 749, 499, 124],
    5: [999, 749, 499, 249, 124],
    6: [999, 749, 499, 374, 249, 124],
    7: [999, 749, 624, 499, 374, 249, 124],
    8: [999, 874, 749, 624, 499, 374, 249, 124],
}
# docs/method.md, "Sigmas in ComfyUI": the sigmas at the 8 boundaries for the SD/SDXL schedule.
BOUNDARY_SIGMAS = [14.6146, 7.2974, 4.0817, 2.4925, 1.6129, 1.0690, 0.6932, 0.3977]


def test_boundaries_match_official_linspace():
    assert segment_boundaries() == [999, 874, 749, 624, 499, 374, 249, 124, 0]
    # the official code: torch.linspace(1000 - 1, 0, 9, dtype=int)
    assert segment_boundaries(8) == torch.linspace(999, 0, 9, dtype=torch.int64).tolist()


@pytest.mark.parametrize("steps", range(1, 9))
def test_official_table_m8(steps):
    assert segment_timesteps(steps) == OFFICIAL_TABLE[steps]


@pytest.mark.parametrize("segments", [1, 2, 3, 4, 6, 8, 12, 16])
@pytest.mark.parametrize("selection", ["official", "uniform"])
def test_invariants_every_segment_count(segments, selection):
    boundaries = segment_boundaries(segments)
    assert boundaries[0] == 999 and boundaries[-1] == 0 and len(boundaries) == segments + 1
    assert all(a > b for a, b in zip(boundaries, boundaries[1:]))
    for steps in range(1, segments + 1):
        ts = segment_timesteps(steps, segments, selection=selection)
        assert len(ts) == steps
        assert ts[0] == 999
        assert all(a > b for a, b in zip(ts, ts[1:])), ts
        assert set(ts) <= set(boundaries[:-1])
    assert segment_timesteps(segments, segments, selection=selection) == boundaries[:-1]


def test_uniform_selection_is_evenly_spaced():
    assert segment_timesteps(4, 8, selection="uniform") == [999, 749, 499, 249]
    assert segment_timesteps(2, 8, selection="uniform") == [999, 499]


def test_steps_beyond_segments_is_a_clear_error():
    with pytest.raises(ValueError, match="steps=9 exceeds segments=8"):
        segment_timesteps(9, 8)
    with pytest.raises(ValueError, match="at least 1"):
        segment_timesteps(0, 8)
    with pytest.raises(ValueError, match="unknown"):
        segment_timesteps(4, 8, selection="karras")


def test_img2img_keeps_the_tail_of_the_official_table():
    # half strength starts at boundary 4 (t=499) and follows the official tails
    assert segment_timesteps(1, denoise=0.5) == [499]
    assert segment_timesteps(2, denoise=0.5) == [499, 124]
    assert segment_timesteps(3, denoise=0.5) == [499, 249, 124]
    assert segment_timesteps(4, denoise=0.5) == [499, 374, 249, 124]
    with pytest.raises(ValueError, match="leaves only 4 of 8"):
        segment_timesteps(5, denoise=0.5)
    # every img2img schedule starts at the strength boundary and stays on the grid
    boundaries = segment_boundaries(8)
    for denoise in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0):
        start = boundaries[8 - round(denoise * 8)]
        for steps in range(1, round(denoise * 8) + 1):
            ts = segment_timesteps(steps, denoise=denoise)
            assert ts[0] == start and len(ts) == steps and set(ts) <= set(boundaries)
            assert all(a > b for a, b in zip(ts, ts[1:]))


def test_img2img_without_an_official_tail_still_ends_at_124():
    # 4 steps from boundary 1 (t=874): no official table has such a tail; 874, 624, 374, 249 would skip
    # the 124 every official table of 3+ steps ends at.
    assert segment_timesteps(4, 8, denoise=0.875) == [874, 624, 374, 124]
    assert segment_timesteps(3, 8, denoise=0.875) == [874, 499, 124]
    assert segment_timesteps(3, 8, denoise=0.625) == [624, 374, 124]
    # 1 and 2 steps keep the uniform fallback: the 1- and 2-step tables do not end at 124 either
    assert segment_timesteps(2, 8, denoise=0.875) == [874, 374]


# (0, 1] densely, plus the round-half-up edges of the strength-to-boundary rule and a tiny strength.
DENOISE_GRID = sorted({i / 200 for i in range(1, 201)} | {(2 * k + 1) / 16 for k in range(8)} | {1e-6})


@pytest.mark.parametrize("steps", range(1, 9))
def test_img2img_schedules_stay_on_the_boundaries_down_to_124(steps):
    boundaries = segment_boundaries(8)
    for denoise in DENOISE_GRID:
        covered = max(1, int(denoise * 8 + 0.5))  # docs/method.md: start at index M - round(denoise * M)
        if steps > covered:
            with pytest.raises(ValueError, match="raise denoise"):
                segment_timesteps(steps, 8, denoise=denoise)
            continue
        ts = segment_timesteps(steps, 8, denoise=denoise)
        assert len(ts) == steps and set(ts) <= set(boundaries[:-1]), (denoise, ts)
        assert all(a > b for a, b in zip(ts, ts[1:])), (denoise, ts)
        assert ts[0] == boundaries[8 - covered], (denoise, ts)
        if steps >= 3:
            assert ts[-1] == 124, (denoise, ts)


def test_lcm_selection_matches_diffusers_lcm_scheduler():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    for steps in range(1, 9):
        scheduler.set_timesteps(steps)
        assert lcm_timesteps(steps) == scheduler.timesteps.tolist()
        assert segment_timesteps(steps, selection="lcm") == scheduler.timesteps.tolist()
    assert lcm_timesteps(4) == [999, 759, 499, 259]


def test_alphas_cumprod_and_sigmas_match_diffusers_and_published_values():
    acp = scaled_linear_alphas_cumprod()
    diffusers = pytest.importorskip("diffusers")
    ddpm = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(acp.float(), ddpm.alphas_cumprod, rtol=1e-6, atol=1e-7)
    sigmas = sigmas_from_alphas_cumprod(acp, segment_timesteps(8))
    assert sigmas[-1] == 0 and len(sigmas) == 9
    torch.testing.assert_close(sigmas[:-1], torch.tensor(BOUNDARY_SIGMAS), atol=1e-4, rtol=0)


def test_selections_listed():
    assert SELECTIONS == ("official", "uniform", "lcm")


def test_requested_timesteps_up_to_the_segments_are_the_official_tables():
    for count in range(1, 9):
        assert requested_timesteps(count) == segment_timesteps(count)


def test_every_tail_ksampler_keeps_starts_at_its_strength_on_trained_boundaries():
    """KSampler's img2img asks for int(steps / denoise) and keeps the last steps: each such tail must be the
    img2img schedule the segment rule gives wherever that rule has one, and trained boundaries otherwise."""
    boundaries = set(segment_boundaries(8)) - {0}
    compared = 0
    for steps in range(1, 9):
        for percent in range(1, 100):
            denoise = percent / 100
            count = int(steps / denoise)
            if count <= 8:
                continue
            full = requested_timesteps(count)
            assert len(full) == count and full[0] == 999 and set(full) <= boundaries
            assert all(a >= b for a, b in zip(full, full[1:]))
            try:
                expected = segment_timesteps(steps, denoise=denoise)
            except ValueError:  # more steps than boundaries below the start: a boundary repeats
                continue
            assert full[-steps:] == expected, (steps, denoise)
            compared += 1
    assert compared >= 15
    assert requested_timesteps(13)[-4:] == [249, 249, 124, 124]  # 4 steps at denoise 0.3

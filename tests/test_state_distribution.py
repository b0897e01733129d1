"""Every way of reaching stage-1 states keeps the distribution the method trains on (docs/method.md, "Stage 1"):
every segment equally likely, ``t_m`` uniform on ``[lo + skip, hi]`` of its segment, ``t_n = t_m - skip``.

Checked on the draws themselves (thousands of them) and on what a real training loop hands to the stage-1
loss, for online Algorithm 1 states, shared trajectories and pre-generated shards.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from scipy import stats
from test_distill import ACP, BOUNDARIES, SHAPE, consistent_eps, guided_point, randn
from test_train import tiny_config

import mlcm_train.distill as distill
from mlcm.segments import segment_boundaries
from mlcm.vp import add_noise
from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.teacher_ddim import shared_trajectory_states, teacher_ddim_step
from mlcm_train.method.timesteps import sample_stage1_timesteps, segment_bounds, shared_stage1_timesteps

SKIP = 20


def check_distribution(segment, t_m, t_n, lo, *, segments=8, exact_counts=False, alpha=1e-3):
    """The method's state distribution: inside the segment, skip apart, segments and positions uniform."""
    lo_ref, hi = segment_bounds(segment, segment_boundaries(segments))
    assert torch.equal(lo, lo_ref)
    assert bool((t_m >= lo + SKIP).all()) and bool((t_m <= hi).all())
    assert torch.equal(t_m - t_n, torch.full_like(t_m, SKIP))
    counts = Counter(segment.tolist())
    assert set(counts) == set(range(segments))
    if exact_counts:
        assert len(set(counts.values())) == 1, counts
    else:
        assert stats.chisquare([counts[s] for s in range(segments)]).pvalue > alpha, counts
    # Position inside the segment, uniform on [0, 1): the discrete uniform's rank over its width.
    width = (hi - lo - SKIP + 1).double()
    u = (t_m - lo - SKIP).double() + torch.rand(len(t_m), generator=torch.Generator().manual_seed(1)).double()
    assert stats.kstest((u / width).numpy(), "uniform").pvalue > alpha


def test_algorithm1_draws_have_the_method_distribution():
    draws = sample_stage1_timesteps(8000, BOUNDARIES, SKIP, torch.Generator().manual_seed(0))
    check_distribution(*draws)


def test_shared_trajectory_draws_have_the_method_distribution_and_descend():
    generator = torch.Generator().manual_seed(0)
    draws = [shared_stage1_timesteps(BOUNDARIES, SKIP, generator) for _ in range(1000)]
    segment, t_m, t_n, lo = (torch.stack(parts) for parts in zip(*draws))
    assert torch.equal(segment[0], torch.arange(7, -1, -1))  # column j is segment M - 1 - j
    assert bool((t_m[:, 1:] < t_m[:, :-1]).all())  # one chain from T passes them in order
    check_distribution(*(x.flatten() for x in (segment, t_m, t_n, lo)), exact_counts=True)
    # The columns are independent draws: a segment's position says nothing about its neighbour's.
    position = (t_m - lo - SKIP).double()
    assert abs(float(torch.corrcoef(position[:, 3:5].T)[0, 1])) < 0.1


def test_shared_trajectory_states_land_exactly_and_spend_one_step_per_state():
    """On a point mass every DDIM step is exact, so each column's state is the forward diffusion of the
    guided point along the starting noise; the chain costs one CFG call (2 teacher rows) per column, and
    one more gives every state its stage-1 teacher step to t_n, equal to a separate teacher step."""
    settings = DistillSettings(guidance_scale=3.0)
    x_c, x_u = randn(3, *SHAPE, seed=1), randn(3, *SHAPE, seed=2)
    rows = Counter()

    def teacher(z, t, cond):
        rows["n"] += z.shape[0]
        return consistent_eps(cond)(z, t, None)

    generator = torch.Generator().manual_seed(4)
    t_m = torch.stack([shared_stage1_timesteps(BOUNDARIES, SKIP, generator)[1] for _ in range(3)])
    noise = randn(3, *SHAPE, seed=3)
    states = shared_trajectory_states(
        teacher, noise, t_m, x_c, x_u, settings=settings, alphas_cumprod=ACP, top=999
    )
    assert states.shape == (3, 8, *SHAPE)
    assert rows["n"] == 2 * 3 * 8  # the calls at T and at the first 7 columns
    rows["n"] = 0
    t_n = t_m - SKIP
    again, z_tn = shared_trajectory_states(
        teacher, noise, t_m, x_c, x_u, settings=settings, alphas_cumprod=ACP, top=999, t_n=t_n
    )
    assert rows["n"] == 2 * 3 * 9  # and the last column's: its x0 gives the step to its t_n
    torch.testing.assert_close(again, states)
    for column in range(8):
        alone = teacher_ddim_step(
            teacher, states[:, column], t_m[:, column], t_n[:, column], x_c, x_u,
            guidance_scale=3.0, alphas_cumprod=ACP,
        )  # fmt: skip
        torch.testing.assert_close(z_tn[:, column], alone, atol=1e-5, rtol=1e-5)
    x_g = guided_point(x_c, x_u, 3.0)
    direction = consistent_eps(x_g)(noise, torch.full((3,), 999), None)
    for column in range(8):
        expected = add_noise(x_g, direction, t_m[:, column], ACP)
        torch.testing.assert_close(states[:, column], expected, atol=3e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="must descend"):
        shared_trajectory_states(
            teacher, noise, t_m.flip(1), x_c, x_u, settings=settings, alphas_cumprod=ACP, top=999
        )


def _recorded_stage1_draws(monkeypatch, config) -> tuple[torch.Tensor, ...]:
    """(segment, t_m, t_n, lo) of every sample the loop gave the stage-1 loss, and the loss's z_tm."""
    seen = []
    original = distill.stage1_loss

    def recording(student, target, teacher, z_tm, t_m, t_n, lo, *args, **kwargs):
        seen.append((t_m.cpu(), t_n.cpu(), lo.cpu(), z_tm.detach().cpu()))
        return original(student, target, teacher, z_tm, t_m, t_n, lo, *args, **kwargs)

    monkeypatch.setattr(distill, "stage1_loss", recording)
    distill.train_distill(config)
    t_m, t_n, lo, z = (torch.cat(parts) for parts in zip(*seen))
    edges = torch.tensor(segment_boundaries(config.segments))
    segment = config.segments - 1 - (edges[1:].view(1, -1) == lo.view(-1, 1)).long().argmax(1)
    return segment, t_m, t_n, lo, z


@pytest.mark.parametrize("states", ["mds", "shared", "cached", "cached + online"])
def test_the_training_loop_trains_on_the_method_distribution(states, sd15, tmp_path, monkeypatch):
    teacher, prompts = sd15
    changes = dict(stages=(1,), stage1_steps=12, batch_size=8, segments=4, skip=SKIP)
    if states.startswith("cached"):
        cache = tmp_path / "states"
        distill.generate_trajectories(
            tiny_config(teacher, prompts, tmp_path / "gen", **changes), cache, samples=96, shard_size=32
        )
        changes["trajectories"] = str(cache)
        if states == "cached + online":
            changes["trajectory_fresh_fraction"] = 0.5
    else:
        changes["stage1_states"] = states
    config = tiny_config(teacher, prompts, tmp_path / "run", **changes)
    segment, t_m, t_n, lo, _ = _recorded_stage1_draws(monkeypatch, config)
    assert len(t_m) == 96
    if states.startswith("cached"):  # the online share costs the multistep strategy's teacher calls
        rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        teacher_evals = json.loads(rows[-1])["teacher_evals"]
        cfg_step_only = 2 * 96  # every sample's CFG step to t_n
        assert (teacher_evals > cfg_step_only + 2 * 30) == (states == "cached + online"), teacher_evals
    check_distribution(segment, t_m, t_n, lo, segments=4, exact_counts=states == "shared", alpha=1e-4)


def test_shared_states_do_not_depend_on_the_micro_batch_split(sd15, tmp_path, monkeypatch):
    """A trajectory cut by a micro-batch boundary is stepped again: the same samples get the same states."""
    teacher, prompts = sd15
    common = dict(stages=(1,), stage1_steps=2, segments=4, stage1_states="shared")
    whole = tiny_config(teacher, prompts, tmp_path / "whole", batch_size=6, **common)
    split = tiny_config(teacher, prompts, tmp_path / "split", batch_size=3, gradient_accumulation=2, **common)
    _, t_whole, _, _, z_whole = _recorded_stage1_draws(monkeypatch, whole)
    monkeypatch.undo()
    _, t_split, _, _, z_split = _recorded_stage1_draws(monkeypatch, split)
    assert torch.equal(t_whole[:6], t_split[:6])
    # Equal up to float rounding: a UNet call over 2 trajectories sums in another order than over 1.
    torch.testing.assert_close(z_whole[:6], z_split[:6], atol=3e-4, rtol=1e-4)


def test_a_mix_of_online_and_cached_states_needs_the_cache(sd15, tmp_path):
    teacher, prompts = sd15
    with pytest.raises(ValueError, match="give --trajectories DIR"):
        tiny_config(teacher, prompts, tmp_path / "run", trajectory_fresh_fraction=0.25)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        tiny_config(teacher, prompts, tmp_path / "run", trajectories="x", trajectory_fresh_fraction=1.5)

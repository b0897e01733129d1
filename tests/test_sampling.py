"""Sampling-rule tests: analytic denoisers, the three update rules, and the k-diffusion contract."""

from __future__ import annotations

import pytest
import torch

from mlcm import (
    default_noise_sampler,
    fresh_noise_seed,
    rule_eta,
    sample_mlcm,
    scaled_linear_alphas_cumprod,
    segment_timesteps,
    sigmas_from_alphas_cumprod,
)


def _sigmas(steps: int) -> torch.Tensor:
    return sigmas_from_alphas_cumprod(scaled_linear_alphas_cumprod(), segment_timesteps(steps))


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_fixed_x0_denoiser_returns_exactly_that_x0(eta, steps):
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, 8) * 14.6

    def model(x, sigma, **_):
        return target.clone()

    out = sample_mlcm(model, x, _sigmas(steps), disable=True, eta=eta, extra_args={"seed": 3})
    assert torch.equal(out, target)


def test_official_rule_renoises_with_fresh_noise_from_the_seed():
    sigmas = _sigmas(4)
    x0 = torch.full((1, 4, 4, 4), 0.5)
    seen = []

    def model(x, sigma, **_):
        seen.append((x.clone(), sigma.clone()))
        return x0

    sample_mlcm(model, torch.zeros(1, 4, 4, 4), sigmas, disable=True, eta=1.0, extra_args={"seed": 7})
    generator = torch.Generator().manual_seed(fresh_noise_seed(7))
    for i in range(1, 4):  # every later input is x0 + sigma_i * (the i-th draw of the fresh-noise stream)
        expected = x0 + sigmas[i] * torch.randn(1, 4, 4, 4, generator=generator)
        torch.testing.assert_close(seen[i][0], expected)
        assert seen[i][1].item() == pytest.approx(sigmas[i].item())


def test_fresh_noise_is_independent_of_comfyuis_starting_noise():
    # ComfyUI draws the starting noise with torch.manual_seed(seed) on the CPU (comfy.sample.prepare_noise);
    # a fresh-noise generator seeded with the same number would repeat it as the first re-noise draw.
    seed, shape = 42, (1, 4, 64, 64)
    start = torch.randn(shape, generator=torch.manual_seed(seed))
    first_fresh = default_noise_sampler(start, seed)(torch.tensor(1.0), torch.tensor(0.5))
    correlation = torch.corrcoef(torch.stack([start.flatten(), first_fresh.flatten()]))[0, 1]
    assert abs(float(correlation)) < 0.05
    seeds = {fresh_noise_seed(s) for s in (0, 1, 2, 2**32, 2**63 - 1, 2**64 - 1)}
    assert len(seeds) == 6 and all(0 <= s < 2**63 for s in seeds)
    assert fresh_noise_seed(7) == fresh_noise_seed(7)


def test_deterministic_rule_is_ddim_and_draws_no_noise():
    sigmas = _sigmas(4)
    x0 = torch.randn(1, 4, 4, 4)
    eps = torch.randn(1, 4, 4, 4)
    seen = []

    def model(x, sigma, **_):
        seen.append(x.clone())
        return x0

    def no_noise(*_):
        raise AssertionError("deterministic sampling must not draw noise")

    start = x0 + sigmas[0] * eps
    sample_mlcm(model, start, sigmas, disable=True, eta=0.0, noise_sampler=no_noise)
    for i in range(1, 4):  # DDIM keeps the noise direction: x_i = x0 + sigma_i * eps
        torch.testing.assert_close(seen[i], x0 + sigmas[i] * eps)


def test_blend_keeps_the_marginal_noise_level():
    """With a denoiser that predicts x0 = 0, x_next / sigma_next must stay unit-variance for every eta."""
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    x = torch.randn(4096, 4, 4, generator=torch.Generator().manual_seed(1)) * 10.0
    seen = []

    def model(x, sigma, **_):
        seen.append(x.clone())
        return torch.zeros_like(x)

    for eta in (0.0, 0.25, 0.5, 0.75, 1.0):
        seen.clear()
        sample_mlcm(model, x, sigmas, disable=True, eta=eta, extra_args={"seed": 0})
        assert (seen[1] / 2.0).std().item() == pytest.approx(1.0, abs=0.02)


def test_callback_sees_every_step_and_inputs_are_not_mutated():
    sigmas = _sigmas(3)
    sigmas_before = sigmas.clone()
    x = torch.randn(1, 4, 4, 4)
    x_before = x.clone()
    calls = []
    sample_mlcm(
        lambda x, s, **_: x * 0.5,
        x,
        sigmas,
        disable=True,
        callback=lambda d: calls.append(d["i"]),
        extra_args={"seed": 1},
    )
    assert calls == [0, 1, 2]
    assert torch.equal(x, x_before) and torch.equal(sigmas, sigmas_before)


def test_extra_args_reach_the_model():
    received = []

    def model(x, sigma, **kwargs):
        received.append(kwargs)
        return torch.zeros_like(x)

    sample_mlcm(
        model, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), extra_args={"seed": 5, "cond": "c"}, disable=True
    )
    assert received == [{"seed": 5, "cond": "c"}]


def test_bad_eta_and_rule_names():
    with pytest.raises(ValueError, match="eta=1.5"):
        sample_mlcm(lambda x, s: x, torch.zeros(1), torch.tensor([1.0, 0.0]), eta=1.5)
    assert rule_eta("official") == 1.0 and rule_eta("deterministic") == 0.0 and rule_eta("blend", 0.3) == 0.3
    with pytest.raises(ValueError, match="unknown"):
        rule_eta("euler")

"""MLCMSampler and the KSampler route, run through ComfyUI's own sampling entry points on tiny models."""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_tiny import conditioning, noise_and_latent, tiny_model

SEED = 7


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(family: str, comfyui) -> object:
    return tiny_model(family, seed=1)


def mlcm_sigmas(
    node_classes: dict[str, type], model: object, steps: int, denoise: float = 1.0
) -> torch.Tensor:
    schedule = node_classes["MLCMSegmentSchedule"]
    return schedule.execute(model=model, steps=steps, segments=0, selection="official", denoise=denoise).args[
        0
    ]


def mlcm_sampler(node_classes: dict[str, type], update_rule: str = "official", eta: float = 0.5) -> object:
    return node_classes["MLCMSampler"].execute(update_rule=update_rule, eta=eta).args[0]


def sample_custom(
    model, family, sampler, sigmas, *, seed=SEED, noise_seed=SEED, callback=None, cfg=1.0
) -> torch.Tensor:
    import comfy.sample

    noise, latent = noise_and_latent(noise_seed)
    cond = conditioning(family)
    return comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        sampler,
        sigmas,
        cond,
        cond,
        latent,
        callback=callback,
        disable_pbar=True,
        seed=seed,
    )


def seeded_noise(seed: int):
    """A fresh-noise sampler (ComfyUI's ``noise_sampler`` option) drawing from its own CPU generator."""
    from comfy_tiny import LATENT_SIZE

    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(1, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)


def test_official_rule_equals_comfyui_lcm_sampler_given_the_same_fresh_noise(
    node_classes, model, family
) -> None:
    import comfy.samplers

    sigmas = mlcm_sigmas(node_classes, model, 4)
    node = mlcm_sampler(node_classes)
    ours = comfy.samplers.KSAMPLER(
        node.sampler_function, {**node.extra_options, "noise_sampler": seeded_noise(3)}
    )
    builtin = comfy.samplers.ksampler("lcm", {"noise_sampler": seeded_noise(3)})
    ours, builtin = sample_custom(model, family, ours, sigmas), sample_custom(model, family, builtin, sigmas)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    torch.testing.assert_close(ours, builtin, atol=1e-6, rtol=0)


def test_fresh_noise_does_not_repeat_the_starting_noise_on_cpu(node_classes, model, family) -> None:
    # On the CPU ComfyUI's lcm seeds its fresh noise exactly as prepare_noise seeded the starting noise, so its
    # first re-noise reuses the starting noise; ours draws from a separate stream (mlcm.fresh_noise_seed).
    import comfy.samplers

    sigmas = mlcm_sigmas(node_classes, model, 2)
    ours = sample_custom(model, family, mlcm_sampler(node_classes), sigmas)
    builtin = sample_custom(model, family, comfy.samplers.ksampler("lcm"), sigmas)
    repeated = sample_custom(
        model, family, comfy.samplers.ksampler("lcm", {"noise_sampler": seeded_noise(SEED)}), sigmas
    )
    torch.testing.assert_close(builtin, repeated, atol=1e-6, rtol=0)  # lcm's fresh noise = prepare_noise's
    assert (ours - builtin).abs().max() > 1e-3


def test_deterministic_rule_ignores_the_noise_seed(node_classes, model, family) -> None:
    sigmas = mlcm_sigmas(node_classes, model, 4)
    deterministic = mlcm_sampler(node_classes, "deterministic")
    first = sample_custom(model, family, deterministic, sigmas, seed=1)
    second = sample_custom(model, family, deterministic, sigmas, seed=2)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    official = mlcm_sampler(node_classes, "official")
    assert not torch.equal(
        sample_custom(model, family, official, sigmas, seed=1),
        sample_custom(model, family, official, sigmas, seed=2),
    ), "the official rule draws fresh noise from the seed"


def test_blend_lies_between_the_rules(node_classes, model, family) -> None:
    sigmas = mlcm_sigmas(node_classes, model, 4)
    results = {
        eta: sample_custom(model, family, mlcm_sampler(node_classes, "blend", eta), sigmas)
        for eta in (0.0, 1.0)
    }
    torch.testing.assert_close(
        results[0.0], sample_custom(model, family, mlcm_sampler(node_classes, "deterministic"), sigmas)
    )
    torch.testing.assert_close(
        results[1.0], sample_custom(model, family, mlcm_sampler(node_classes, "official"), sigmas)
    )


def test_callback_fires_once_per_step(node_classes, model, family) -> None:
    calls = []
    sigmas = mlcm_sigmas(node_classes, model, 4)
    sample_custom(
        model, family, mlcm_sampler(node_classes), sigmas, callback=lambda *args: calls.append(args)
    )
    assert [call[0] for call in calls] == [0, 1, 2, 3]
    assert all(call[3] == 4 for call in calls), "total steps passed to the progress bar"
    assert all(call[1].shape == (1, 4, 8, 8) for call in calls), "x0 preview latent"


def test_interrupt_stops_sampling_midway(node_classes, model, family) -> None:
    import comfy.model_management as mm
    import comfy.utils
    import latent_preview

    steps = 4
    seen = []

    def callback(step, x0, x, total):
        seen.append(step)
        if step == 1:
            mm.interrupt_current_processing(True)  # what POST /interrupt does
        progress(step, x0, x, total)

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        mm.throw_exception_if_processing_interrupted()  # as main.py's progress hook does

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        progress = latent_preview.prepare_callback(model, steps)  # ComfyUI's progress bar + previews
        with pytest.raises(mm.InterruptProcessingException):
            sample_custom(
                model,
                family,
                mlcm_sampler(node_classes),
                mlcm_sigmas(node_classes, model, steps),
                callback=callback,
            )
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)
    assert seen == [0, 1]


@pytest.mark.parametrize(("steps", "denoise"), [(4, 1.0), (2, 1.0), (4, 0.5), (3, 0.75)])
def test_ksampler_route_matches_the_nodes(node_classes, model, family, steps, denoise) -> None:
    import comfy.sample

    noise, latent = noise_and_latent(SEED)
    cond = conditioning(family)
    via_ksampler = comfy.sample.sample(
        model,
        noise,
        steps,
        1.0,
        "mlcm",
        "mlcm_segments",
        cond,
        cond,
        latent,
        denoise=denoise,
        disable_pbar=True,
        seed=SEED,
    )
    sigmas = mlcm_sigmas(node_classes, model, steps, denoise)
    via_nodes = sample_custom(model, family, mlcm_sampler(node_classes), sigmas)
    assert torch.isfinite(via_ksampler).all()
    torch.testing.assert_close(via_ksampler, via_nodes, atol=1e-6, rtol=0)


def ksample(model, family, steps, denoise, *, cfg=1.0, scheduler="mlcm_segments") -> torch.Tensor:
    import comfy.sample

    noise, latent = noise_and_latent(SEED)
    cond = conditioning(family)
    return comfy.sample.sample(
        model, noise, steps, cfg, "mlcm", scheduler, cond, cond, latent, denoise=denoise, disable_pbar=True, seed=SEED
    )


# (steps, denoise) -> the timesteps KSampler keeps from the mlcm_segments scheduler: int(steps / denoise)
# requested, the last steps + 1 sigmas kept; beyond 8 a boundary repeats rather than leaving the grid.
KSAMPLER_IMG2IMG = {
    (4, 0.3): [249, 249, 124, 124],
    (2, 0.2): [249, 124],
    (6, 0.6): [624, 499, 374, 249, 249, 124],
    (3, 0.4): [374, 249, 124],
    (1, 0.1): [124],
}


@pytest.mark.parametrize(("steps", "denoise"), sorted(KSAMPLER_IMG2IMG))
def test_ksampler_img2img_at_low_denoise_stays_on_the_boundaries(
    pack, model, family, steps, denoise, caplog
) -> None:
    pack.module("nodes.sampler")._logged_schedules.clear()
    with caplog.at_level(logging.INFO):
        out = ksample(model, family, steps, denoise)
    assert torch.isfinite(out).all()
    assert f"MLCM: sampling at timesteps {KSAMPLER_IMG2IMG[steps, denoise]}" in caplog.text
    assert "not among" not in caplog.text


def test_cfg_above_one_is_reported_on_both_routes(node_classes, model, family, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        ksample(model, family, 2, 1.0, cfg=3.0)
    assert "cfg is 3" in caplog.text and "Set cfg to 1.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample_custom(model, family, mlcm_sampler(node_classes), mlcm_sigmas(node_classes, model, 2), cfg=2.5)
    assert "cfg is 2.5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ksample(model, family, 2, 1.0, cfg=1.0)
    assert "cfg is" not in caplog.text


def test_other_schedulers_work_and_are_reported_once(pack, model, family, caplog) -> None:
    pack.module("nodes.sampler")._logged_schedules.clear()
    with caplog.at_level(logging.WARNING):
        first = ksample(model, family, 4, 1.0, scheduler="normal")
        ksample(model, family, 4, 1.0, scheduler="normal")
    assert torch.isfinite(first).all()
    assert caplog.text.count("not the schedule it was trained for") == 1

"""MLCMSegmentSchedule on tiny SD1.5/SDXL models built with ComfyUI's classes."""

from __future__ import annotations

import pytest
import torch
from comfy_tiny import tiny_model

# docs/method.md, "Sampling": the official table and the SD/SDXL sigmas at the 8 boundaries.
OFFICIAL = {
    1: [999],
    2: [999, 499],
    3: [999, 499, 124],
    4: [999, 749, 499, 124],
    5: [999, 749, 499, 249, 124],
    6: [999, 749, 499, 374, 249, 124],
    7: [999, 749, 624, 499, 374, 249, 124],
    8: [999, 874, 749, 624, 499, 374, 249, 124],
}
PUBLISHED_SIGMAS_8 = [14.6146, 7.2974, 4.0817, 2.4925, 1.6129, 1.0690, 0.6932, 0.3977]


@pytest.fixture(scope="module")
def schedule(node_classes: dict[str, type]) -> type:
    return node_classes["MLCMSegmentSchedule"]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model(request: pytest.FixtureRequest, comfyui) -> object:
    return tiny_model(request.param, init=False)  # the schedule never runs the UNet


def run(schedule: type, model: object, steps: int, **options) -> tuple[torch.Tensor, str]:
    inputs = {"segments": 0, "selection": "official", "denoise": 1.0} | options
    return tuple(schedule.execute(model=model, steps=steps, **inputs).args)


@pytest.mark.parametrize("steps", range(1, 9))
def test_sigmas_round_trip_to_the_official_timesteps(schedule: type, model: object, steps: int) -> None:
    sigmas, text = run(schedule, model, steps)
    model_sampling = model.get_model_object("model_sampling")
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1
    assert sigmas[-1].item() == 0.0
    assert torch.all(sigmas[:-1] > sigmas[1:]), "sigmas must strictly decrease"
    assert model_sampling.timestep(sigmas[:-1]).tolist() == OFFICIAL[steps]
    assert text == ", ".join(str(t) for t in OFFICIAL[steps])


def test_eight_steps_equal_the_published_sigmas(schedule: type, model: object) -> None:
    sigmas, _ = run(schedule, model, 8)
    torch.testing.assert_close(sigmas[:-1], torch.tensor(PUBLISHED_SIGMAS_8), atol=1e-4, rtol=0)


def test_img2img_keeps_the_tail_and_zero_denoise_is_empty(schedule: type, model: object) -> None:
    sigmas, text = run(schedule, model, 4, denoise=0.5)
    assert text == "499, 374, 249, 124"
    assert model.get_model_object("model_sampling").timestep(sigmas[:-1]).tolist() == [499, 374, 249, 124]
    sigmas, text = run(schedule, model, 4, denoise=0.0)
    assert sigmas.numel() == 0 and text == ""


def test_other_selections(schedule: type, model: object) -> None:
    assert run(schedule, model, 4, selection="lcm")[1] == "999, 759, 499, 259"
    assert run(schedule, model, 2, selection="uniform", segments=8)[1] == "999, 499"


def test_validate_inputs_says_what_to_do(schedule: type) -> None:
    message = schedule.validate_inputs(steps=12, segments=8, selection="official", denoise=1.0)
    assert isinstance(message, str) and "exceeds segments=8" in message and "at most 8 steps" in message
    message = schedule.validate_inputs(steps=4, segments=8, selection="official", denoise=0.25)
    assert isinstance(message, str) and "raise denoise" in message
    assert "between" in schedule.validate_inputs(steps=0, segments=8, selection="official", denoise=1.0)
    assert "unknown" in schedule.validate_inputs(steps=4, segments=0, selection="bogus", denoise=1.0)
    assert schedule.validate_inputs(steps=4, segments=8, selection="official", denoise=1.0) is True
    assert schedule.validate_inputs(steps=40, segments=0, selection="official", denoise=1.0) is True  # auto
    assert (
        schedule.validate_inputs(steps=None, segments=8, selection="official", denoise=1.0) is True
    )  # linked


def test_auto_segments_come_from_the_lora_metadata(schedule: type, model: object, pack) -> None:
    segment_timesteps = pack.module("mlcm").segment_timesteps
    patched = model.clone()
    patched.model_options["mlcm"] = {"segments": 4}
    assert run(schedule, patched, 4)[1] == ", ".join(str(t) for t in segment_timesteps(4, 4))
    assert run(schedule, patched, 4, segments=8)[1] == "999, 749, 499, 124"  # explicit wins
    with pytest.raises(ValueError, match="exceeds segments=4"):
        run(schedule, patched, 5)
    with pytest.raises(ValueError, match="exceeds segments=8"):
        run(schedule, model, 9)  # auto without metadata = 8
    assert "mlcm" not in model.model_options, "clone() must not leak the metadata into the original"


def test_the_lora_supported_steps_limit_auto_segments(schedule: type, model: object) -> None:
    patched = model.clone()
    patched.model_options["mlcm"] = {"segments": 8, "supported_steps": [1, 2, 3, 4]}
    assert run(schedule, patched, 4)[1] == "999, 749, 499, 124"
    with pytest.raises(ValueError, match=r"this LoRA supports 1-4 steps; use at most 4 steps"):
        run(schedule, patched, 5)
    assert run(schedule, patched, 5, segments=8)[1] == "999, 749, 499, 249, 124"  # explicit segments win
    assert run(schedule, patched, 6, selection="lcm")[1].count(",") == 5  # lcm has no boundary limit
    patched.model_options["mlcm"] = {"segments": None, "supported_steps": [2, 4, 6]}
    assert run(schedule, patched, 6)[1] == "999, 749, 499, 374, 249, 124"
    with pytest.raises(ValueError, match=r"this LoRA supports 2, 4, 6 steps"):
        run(schedule, patched, 8)


@pytest.mark.parametrize(
    ("sampling", "message"),
    [("lcm", "sampling='lcm'"), ("x0", "discrete-time eps or v-prediction")],
)
def test_refuses_incompatible_model_sampling(
    schedule: type, model: object, sampling: str, message: str
) -> None:
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    (patched,) = ModelSamplingDiscrete().patch(model, sampling, False)
    with pytest.raises(ValueError, match=message):
        run(schedule, patched, 4)


def test_refuses_flow_models(schedule: type, model: object) -> None:
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    (patched,) = ModelSamplingSD3().patch(model, 3.0)
    with pytest.raises(ValueError, match="ModelSampling"):
        run(schedule, patched, 4)


def test_accepts_v_prediction(schedule: type, model: object) -> None:
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    (patched,) = ModelSamplingDiscrete().patch(model, "v_prediction", False)
    sigmas, _ = run(schedule, patched, 4)
    assert patched.get_model_object("model_sampling").timestep(sigmas[:-1]).tolist() == OFFICIAL[4]

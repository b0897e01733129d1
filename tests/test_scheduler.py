"""MLCMScheduler: parity with an independent official loop, diffusers pipelines, configs, update rules."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from reference_loop import official_boundaries, official_loop, official_tail  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from mlcm.scheduler import MLCMScheduler, MLCMSchedulerOutput  # noqa: E402

SEED = 0
PROMPT = "a red dog"
LATENT_SHAPE = (1, 4, 8, 8)  # tiny UNet sample_size 8
OFFICIAL = {k: official_boundaries(k)[:-1] for k in range(1, 9)}

# Published scheduler configs (scheduler/scheduler_config.json) of the two base models.
SD15_PNDM_CONFIG = {  # runwayml/stable-diffusion-v1-5
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD15_DDIM_CONFIG = {  # the DDIM variant many SD1.5 fine-tunes ship
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
}
SDXL_EULER_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# A tiny CLIP BPE vocabulary: the letters alone and word-final, a few merges, then bos/eos.
_LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_MERGES = ["r e", "re d</w>", "d o", "do g</w>"]
_VOCAB_TOKENS = _LETTERS + [c + "</w>" for c in _LETTERS] + ["re", "red</w>", "do", "dog</w>"]
_VOCAB_TOKENS += ["<|startoftext|>", "<|endoftext|>"]
TEXT_HIDDEN = 32
TEXT_VOCAB = 100  # > len(_VOCAB_TOKENS)


# ---------------------------------------------------------------- tiny components (random, seeded)


def _seeded(build):
    """Run ``build`` with a fixed global seed without disturbing the caller's RNG (deterministic init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def _tokenizer() -> CLIPTokenizer:
    vocab = {token: i for i, token in enumerate(_VOCAB_TOKENS)}
    merges = [tuple(m.split()) for m in _MERGES]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config() -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=len(_VOCAB_TOKENS) - 2,
        eos_token_id=len(_VOCAB_TOKENS) - 1,
        pad_token_id=len(_VOCAB_TOKENS) - 1,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=TEXT_VOCAB,
        projection_dim=TEXT_HIDDEN,
    )


def _unet(cross_attention_dim: int = TEXT_HIDDEN, **extra) -> UNet2DConditionModel:
    return _seeded(
        lambda: UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=LATENT_SHAPE[-1],
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            **extra,
        ).eval()
    )


def _vae() -> AutoencoderKL:
    return _seeded(
        lambda: AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
        ).eval()
    )


@pytest.fixture(scope="module")
def eps_fn():
    """eps of a tiny random SD1.5-shaped UNet under a fixed random text conditioning."""
    unet = _unet()
    embeds = torch.randn(1, 5, TEXT_HIDDEN, generator=torch.Generator().manual_seed(3))

    def predict(z: torch.Tensor, t: int) -> torch.Tensor:
        return unet(z, t, encoder_hidden_states=embeds).sample

    return predict


@pytest.fixture(scope="module")
def sd15_pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=_seeded(lambda: CLIPTextModel(_text_config()).eval()),
        tokenizer=_tokenizer(),
        unet=_unet(),
        scheduler=MLCMScheduler.from_config(SD15_PNDM_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe() -> StableDiffusionXLPipeline:
    time_embed_dim = 8
    unet = _unet(
        cross_attention_dim=2 * TEXT_HIDDEN,  # both text encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,  # 6 time ids + pooled
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_seeded(lambda: CLIPTextModel(_text_config()).eval()),
        text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(_text_config()).eval()),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=MLCMScheduler.from_config(SDXL_EULER_CONFIG),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _record_timesteps(unet: UNet2DConditionModel) -> tuple[list[int], object]:
    """Record the timestep of every UNet call; returns the list and the hook handle."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        seen.append(int(args[1] if len(args) > 1 else kwargs["timestep"]))

    return seen, unet.register_forward_pre_hook(hook, with_kwargs=True)


def _ddpm_alphas_cumprod() -> torch.Tensor:
    return DDPMScheduler.from_config(SD15_PNDM_CONFIG).alphas_cumprod


def _sd15_eps_fn(pipe: StableDiffusionPipeline):
    embeds = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]

    def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
        return pipe.unet(z, t, encoder_hidden_states=embeds).sample

    return eps_fn


def _sdxl_eps_fn(pipe: StableDiffusionXLPipeline):
    embeds, _, pooled, _ = pipe.encode_prompt(
        PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    size = LATENT_SHAPE[-1] * pipe.vae_scale_factor
    time_ids = torch.tensor(
        [[size, size, 0, 0, size, size]], dtype=embeds.dtype
    )  # official [H, W, 0, 0, H, W]
    cond = {"text_embeds": pooled, "time_ids": time_ids}

    def eps_fn(z: torch.Tensor, t: int) -> torch.Tensor:
        return pipe.unet(z, t, encoder_hidden_states=embeds, added_cond_kwargs=cond).sample

    return eps_fn


def _scheduler_loop(scheduler: MLCMScheduler, eps_fn, steps: int, generator: torch.Generator) -> torch.Tensor:
    """A minimal diffusers-style loop: initial noise, then ``step`` with the same generator."""
    scheduler.set_timesteps(steps)
    z = torch.randn(LATENT_SHAPE, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        z = scheduler.step(
            eps_fn(scheduler.scale_model_input(z, t), int(t)), t, z, generator=generator
        ).prev_sample
    return z


# ---------------------------------------------------------------- import hygiene


def test_import_mlcm_is_lazy_about_diffusers() -> None:
    code = textwrap.dedent(
        """
        import sys
        import mlcm
        assert "diffusers" not in sys.modules, "import mlcm loaded diffusers"
        cls = mlcm.MLCMScheduler
        assert "diffusers" in sys.modules and cls.__module__ == "mlcm.scheduler"
        assert mlcm.MLCMSchedulerOutput.__module__ == "mlcm.scheduler"
        """
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ---------------------------------------------------------------- schedule and config


def test_alphas_match_ddpm_scheduler() -> None:
    ours = MLCMScheduler().alphas_cumprod
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-6, atol=0)
    for schedule in ("linear", "squaredcos_cap_v2"):
        ours = MLCMScheduler(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02).alphas_cumprod
        theirs = DDPMScheduler(beta_schedule=schedule, beta_start=0.0001, beta_end=0.02).alphas_cumprod
        torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps", range(1, 9))
def test_set_timesteps_follows_official_table(steps: int) -> None:
    scheduler = MLCMScheduler()
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.dtype == torch.long
    assert scheduler.timesteps.tolist() == OFFICIAL[steps]
    assert scheduler.num_inference_steps == steps


def test_steps_beyond_segments_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(ValueError, match="use at most 8 steps"):
        MLCMScheduler().set_timesteps(9)
    with pytest.raises(ValueError, match="use at most 4 steps"):
        MLCMScheduler(segments=4).set_timesteps(5)


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="eta"):
        MLCMScheduler(eta=1.5)
    with pytest.raises(ValueError, match="selection"):
        MLCMScheduler(selection="nearest")
    with pytest.raises(ValueError, match="prediction_type"):
        MLCMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="set_timesteps"):
        MLCMScheduler().step(torch.zeros(LATENT_SHAPE), 999, torch.zeros(LATENT_SHAPE))
    with pytest.raises(ValueError, match="strictly decreasing"):
        MLCMScheduler().set_timesteps(timesteps=[499, 999])


def test_strength_and_custom_timesteps() -> None:
    scheduler = MLCMScheduler()
    scheduler.set_timesteps(2, strength=0.5)
    assert scheduler.timesteps.tolist() == [499, 124]  # the tail of the 3-step table
    scheduler.set_timesteps(4, strength=0.875)
    assert scheduler.timesteps.tolist() == [874, 624, 374, 124]  # no table's tail: still ends at 124
    scheduler.set_timesteps(timesteps=[999, 499])
    assert scheduler.num_inference_steps == 2
    scheduler = MLCMScheduler(selection="lcm")
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize(
    ("config", "source"),
    [
        (SD15_PNDM_CONFIG, PNDMScheduler),
        (SD15_DDIM_CONFIG, DDIMScheduler),
        (SDXL_EULER_CONFIG, EulerDiscreteScheduler),
    ],
)
def test_from_config_of_base_model_schedulers(config: dict, source: type) -> None:
    collector = _WarningCollector()
    config_logger = logging.getLogger("diffusers.configuration_utils")
    config_logger.addHandler(collector)
    try:
        from_dict = MLCMScheduler.from_config(config)
        from_pipeline = MLCMScheduler.from_config(source.from_config(config).config)
    finally:
        config_logger.removeHandler(collector)
    assert not [m for m in collector.messages if "MLCMScheduler" in m], collector.messages
    for scheduler in (from_dict, from_pipeline):
        assert scheduler.config.steps_offset == 1
        assert scheduler.config.segments == 8 and scheduler.config.eta == 1.0
        torch.testing.assert_close(scheduler.alphas_cumprod, MLCMScheduler().alphas_cumprod)
        scheduler.set_timesteps(4)  # the segment table regardless of the source's timestep_spacing
        assert scheduler.timesteps.tolist() == OFFICIAL[4]
    assert source.__name__ in MLCMScheduler._compatibles


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    scheduler = MLCMScheduler.from_config(SDXL_EULER_CONFIG, segments=4, selection="uniform", eta=0.25)
    scheduler.save_pretrained(tmp_path)
    loaded = MLCMScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(scheduler.config)
    assert loaded.config.segments == 4 and loaded.config.eta == 0.25 and loaded.config.selection == "uniform"


def test_pipeline_save_and_load_keeps_the_scheduler(
    sd15_pipe: StableDiffusionPipeline, tmp_path: Path
) -> None:
    """A saved pipeline names mlcm.scheduler in model_index.json and loads back with MLCMScheduler."""
    sd15_pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, MLCMScheduler)
    public = {k: v for k, v in sd15_pipe.scheduler.config.items() if not k.startswith("_")}
    assert {k: loaded.scheduler.config[k] for k in public} == public


# ---------------------------------------------------------------- update rules (analytic)


def _vp_point(scheduler: MLCMScheduler, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    acp = scheduler.alphas_cumprod[t].item()
    return acp**0.5 * x0 + (1 - acp) ** 0.5 * eps


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_lands_where_the_rule_says(prediction_type: str, eta: float) -> None:
    """From z_t = a_t x0 + s_t eps, x0 is recovered and the next latent is a_n x0 + s_n (keep eps + ... noise)."""
    gen = torch.Generator().manual_seed(SEED)
    x0, eps = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    scheduler = MLCMScheduler(prediction_type=prediction_type, eta=eta)
    scheduler.set_timesteps(4)
    t, t_next = OFFICIAL[4][1], OFFICIAL[4][2]
    z = _vp_point(scheduler, x0, eps, t)
    acp = scheduler.alphas_cumprod[t].item()
    output = {"epsilon": eps, "sample": x0, "v_prediction": acp**0.5 * eps - (1 - acp) ** 0.5 * x0}[
        prediction_type
    ]
    scheduler.set_begin_index(1)
    step_gen = torch.Generator().manual_seed(7)
    result = scheduler.step(output, t, z, generator=step_gen)
    assert isinstance(result, MLCMSchedulerOutput)
    torch.testing.assert_close(result.denoised, x0, rtol=1e-4, atol=1e-4)
    fresh = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(7)) if eta > 0 else 0.0
    keep = 1.0 - eta
    expected = _vp_point(scheduler, x0, keep * eps + (1 - keep**2) ** 0.5 * fresh, t_next)
    torch.testing.assert_close(result.prev_sample, expected, rtol=1e-4, atol=1e-4)
    assert scheduler.step_index == 2


def test_last_step_returns_denoised_and_still_draws_noise() -> None:
    """The final output is x0 itself, and the generator advances as in the official loop (one draw per step)."""
    x0 = torch.full(LATENT_SHAPE, 0.25)
    scheduler = MLCMScheduler(prediction_type="sample")
    gen, twin = torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED)
    out = _scheduler_loop(scheduler, lambda z, t: x0, 3, gen)
    assert torch.equal(out, x0)
    for _ in range(1 + 3):  # initial latents + one draw per step
        torch.randn(LATENT_SHAPE, generator=twin)
    assert torch.equal(gen.get_state(), twin.get_state())


def test_add_noise_matches_ddpm_scheduler() -> None:
    gen = torch.Generator().manual_seed(SEED)
    x0, noise = torch.randn((3, 4, 8, 8), generator=gen), torch.randn((3, 4, 8, 8), generator=gen)
    timesteps = torch.tensor([999, 499, 0])
    ddpm = DDPMScheduler.from_config(SD15_PNDM_CONFIG)
    expected = ddpm.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(
        MLCMScheduler().add_noise(x0, noise, timesteps), expected, rtol=1e-5, atol=1e-6
    )


def test_half_precision_keeps_the_dtype_and_the_result() -> None:
    """bf16 in, bf16 out (the official code runs in bf16); maths in float32 keeps it close to float32."""
    gen = torch.Generator().manual_seed(SEED)
    z, eps = torch.randn(LATENT_SHAPE, generator=gen), torch.randn(LATENT_SHAPE, generator=gen)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        scheduler = MLCMScheduler(eta=0.0)
        scheduler.set_timesteps(2)
        out = scheduler.step(eps.to(dtype), 999, z.to(dtype))
        assert out.prev_sample.dtype == dtype and out.denoised.dtype == dtype
        results[dtype] = out.denoised.float()
    scale = results[torch.float32].abs().max()
    assert (results[torch.bfloat16] - results[torch.float32]).abs().max() < 0.02 * scale


def test_eta_zero_is_deterministic_and_eta_one_is_not(eps_fn) -> None:
    def run(eta: float, step_seed: int) -> torch.Tensor:
        scheduler = MLCMScheduler(eta=eta)
        scheduler.set_timesteps(4)
        z = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(SEED))
        gen = torch.Generator().manual_seed(step_seed)
        with torch.no_grad():
            for t in scheduler.timesteps:
                z = scheduler.step(eps_fn(z, int(t)), t, z, generator=gen).prev_sample
        return z

    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
    assert not torch.allclose(run(0.5, 1), run(0.5, 2))


# ---------------------------------------------------------------- parity with the official loop


@pytest.mark.parametrize("steps", range(1, 9))
def test_parity_with_official_loop_on_tiny_unet(eps_fn, steps: int) -> None:
    with torch.no_grad():
        ours = _scheduler_loop(MLCMScheduler(), eps_fn, steps, torch.Generator().manual_seed(SEED))
        reference = official_loop(
            eps_fn, LATENT_SHAPE, steps, torch.Generator().manual_seed(SEED), _ddpm_alphas_cumprod()
        )
    assert torch.isfinite(ours).all()
    assert (ours - reference).abs().max().item() < 1e-4


# ---------------------------------------------------------------- diffusers pipelines


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sd15_pipeline_matches_official_loop(sd15_pipe: StableDiffusionPipeline, steps: int) -> None:
    seen, handle = _record_timesteps(sd15_pipe.unet)
    try:
        latents = sd15_pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
        ).images
    finally:
        handle.remove()
    assert seen == OFFICIAL[steps]
    assert torch.isfinite(latents).all()
    with torch.no_grad():
        reference = official_loop(
            _sd15_eps_fn(sd15_pipe),
            LATENT_SHAPE,
            steps,
            torch.Generator().manual_seed(SEED),
            _ddpm_alphas_cumprod(),
        )
    assert (latents - reference).abs().max().item() < 1e-4


def test_sd15_pipeline_decoded_image_matches_official_loop(sd15_pipe: StableDiffusionPipeline) -> None:
    image = sd15_pipe(
        PROMPT,
        num_inference_steps=4,
        guidance_scale=0.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="pt",
    ).images
    with torch.no_grad():
        x0 = official_loop(
            _sd15_eps_fn(sd15_pipe),
            LATENT_SHAPE,
            4,
            torch.Generator().manual_seed(SEED),
            _ddpm_alphas_cumprod(),
        )
        decoded = sd15_pipe.vae.decode(x0 / sd15_pipe.vae.config.scaling_factor).sample
    reference = (decoded / 2 + 0.5).clamp(0, 1)
    assert image.shape == (1, 3, 16, 16)
    assert (image - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_sdxl_pipeline_matches_official_loop(sdxl_pipe: StableDiffusionXLPipeline, steps: int) -> None:
    seen, handle = _record_timesteps(sdxl_pipe.unet)
    try:
        latents = sdxl_pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
        ).images
    finally:
        handle.remove()
    assert seen == OFFICIAL[steps]
    assert torch.isfinite(latents).all()
    with torch.no_grad():
        reference = official_loop(
            _sdxl_eps_fn(sdxl_pipe),
            LATENT_SHAPE,
            steps,
            torch.Generator().manual_seed(SEED),
            _ddpm_alphas_cumprod(),
        )
    assert (latents - reference).abs().max().item() < 1e-4


def _init_latents() -> torch.Tensor:
    return torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_img2img_pipeline_keeps_the_tail_of_the_table(
    family: str, sd15_pipe: StableDiffusionPipeline, sdxl_pipe: StableDiffusionXLPipeline
) -> None:
    """Strength 0.5 at 4 steps evaluates 499 and 124 (the tail of 999/749/499/124), as the official update."""
    if family == "sd15":
        pipe = StableDiffusionImg2ImgPipeline(**sd15_pipe.components)
        eps_fn = _sd15_eps_fn(sd15_pipe)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**sdxl_pipe.components)
        eps_fn = _sdxl_eps_fn(sdxl_pipe)
    pipe.set_progress_bar_config(disable=True)
    init = _init_latents()  # 4-channel images are taken as latents by the img2img pipelines
    seen, handle = _record_timesteps(pipe.unet)
    try:
        latents = pipe(
            PROMPT,
            image=init,
            strength=0.5,
            num_inference_steps=4,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(SEED),
            output_type="latent",
        ).images
    finally:
        handle.remove()
    tail = OFFICIAL[4][2:]
    assert seen == tail == [499, 124]
    assert torch.isfinite(latents).all()
    gen = torch.Generator().manual_seed(SEED)
    acp = _ddpm_alphas_cumprod()
    noise = torch.randn(LATENT_SHAPE, generator=gen)
    z = acp[tail[0]].sqrt() * init + (1 - acp[tail[0]]).sqrt() * noise
    with torch.no_grad():
        reference = official_tail(eps_fn, z, tail + [0], gen, acp)
    assert (latents - reference).abs().max().item() < 1e-4

"""``MLCMScheduler``: the official MLCM/TLCM sampling loop as a diffusers scheduler (docs/method.md, "Sampling").

Each step turns the UNet's output into ``x0 = (z - s_t * eps) / a_t`` and moves to the next segment
boundary with the rule chosen by ``eta`` (the same rules as ``mlcm.sampling``):

- ``eta = 1`` (official): ``z = a_next * x0 + s_next * fresh_noise``;
- ``eta = 0``: deterministic DDIM to the next boundary;
- in between: DDIM to an intermediate level, then forward noise to the next boundary.

The last step returns ``x0`` itself. For seed-for-seed parity with the authors' ``inference.py`` a step
with ``eta > 0`` draws its fresh noise on every step, the last one included, although the last draw is
not used: a pipeline that draws its initial latents from the same ``torch.Generator`` then reproduces the
official images exactly.

This is the only module of ``mlcm`` that imports diffusers; ``mlcm`` loads it lazily.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from .sampling import renoise
from .segments import SELECTIONS, scaled_linear_alphas_cumprod, segment_timesteps

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
CLIP_SAMPLE_RANGE = 1.0  # DDPMScheduler's clip_sample_range default
COSINE_MAX_BETA = 0.999  # diffusers' betas_for_alpha_bar cap for squaredcos_cap_v2


@dataclass
class MLCMSchedulerOutput(BaseOutput):
    """``prev_sample``: the latent for the next UNet call (``x0`` after the last step); ``denoised``: ``x0``."""

    prev_sample: Tensor
    denoised: Tensor | None = None


def _alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: list[float] | None,
) -> Tensor:
    """Cumulative products of ``1 - beta`` (float64) for the DDPM beta schedules diffusers names."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    if beta_schedule == "scaled_linear":
        return scaled_linear_alphas_cumprod(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17
        steps = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=COSINE_MAX_BETA)
        return torch.cumprod(1.0 - betas, dim=0)
    raise ValueError(
        f"beta_schedule={beta_schedule!r} is not supported; choose one of {', '.join(BETA_SCHEDULES)}"
    )


class MLCMScheduler(SchedulerMixin, ConfigMixin):
    """Multistep latent consistency sampling over MLCM segment boundaries (official TLCM ``inference.py``).

    ``MLCMScheduler.from_config(pipe.scheduler.config)`` works for SD1.5 and SDXL pipelines; run them with
    ``guidance_scale=0`` (CFG is distilled into the LoRA). ``timestep_spacing``, ``steps_offset`` and
    ``set_alpha_to_one`` are accepted for config compatibility only: the timesteps are segment boundaries.
    """

    # Configs of these schedulers load without warnings (their extra keys are dropped silently).
    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["LCMScheduler", "TCDScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        segments: int = 8,
        selection: str = "official",
        eta: float = 1.0,
        timestep_spacing: str = "trailing",
        steps_offset: int = 1,  # unused; 1 keeps SD pipelines from warning about an "outdated" config
        clip_sample: bool = False,
        set_alpha_to_one: bool = False,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is not supported; choose one of {', '.join(PREDICTION_TYPES)}"
            )
        if selection not in SELECTIONS:
            raise ValueError(f"selection={selection!r} is unknown; choose one of {', '.join(SELECTIONS)}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(
                f"eta={eta} must be in [0, 1] (1 = official fresh-noise update, 0 = deterministic)"
            )
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(trained_betas)} entries but num_train_timesteps={num_train_timesteps}; "
                "give one beta per training timestep"
            )
        self.alphas_cumprod = _alphas_cumprod(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.init_noise_sigma = 1.0  # VP latents start as N(0, I)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0, dtype=torch.long)
        self._timesteps: list[int] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next ``step`` call (None before the first)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """First index into ``timesteps`` the run uses; img2img pipelines set it via ``set_begin_index``."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at ``timesteps[begin_index]`` (diffusers' img2img pipelines keep the table's tail)."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """The UNet takes the VP latent unscaled."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
        strength: float = 1.0,
    ) -> None:
        """Select the segment boundaries a ``num_inference_steps`` run evaluates (``mlcm.segment_timesteps``).

        ``strength < 1`` spends all steps in the lower ``strength`` part of the range (img2img by hand);
        diffusers' img2img pipelines instead slice the full table and call ``set_begin_index``.
        Custom ``timesteps`` (descending) replace the selection.
        """
        if timesteps is not None:
            if num_inference_steps is not None and num_inference_steps != len(timesteps):
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} disagrees with {len(timesteps)} custom timesteps; "
                    "pass only one of them"
                )
            chosen = [int(t) for t in timesteps]
            self._check_custom_timesteps(chosen)
        elif num_inference_steps is not None:
            chosen = segment_timesteps(
                num_inference_steps,
                self.config.segments,
                selection=self.config.selection,
                denoise=strength,
                num_train_timesteps=self.config.num_train_timesteps,
            )
        else:
            raise ValueError("set_timesteps needs num_inference_steps (1 to segments) or a list of timesteps")
        self._timesteps = chosen
        self.num_inference_steps = len(chosen)
        self.timesteps = torch.tensor(chosen, dtype=torch.long, device=device)
        self._step_index = None
        self._begin_index = None

    def _check_custom_timesteps(self, timesteps: list[int]) -> None:
        last = self.config.num_train_timesteps - 1
        if not timesteps:
            raise ValueError("timesteps is empty; give at least one timestep")
        if any(t < 0 or t > last for t in timesteps):
            raise ValueError(f"timesteps={timesteps} must lie in [0, {last}]")
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
            raise ValueError(f"timesteps={timesteps} must be strictly decreasing")

    def _init_step_index(self, timestep: int | Tensor) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        t = int(timestep)
        if t not in self._timesteps:
            raise ValueError(
                f"timestep={t} is not in this run's timesteps {self._timesteps}; call set_timesteps first"
            )
        self._step_index = self._timesteps.index(t)

    def _coefficients(self, t: int) -> tuple[float, float]:
        """``(a_t, s_t) = (sqrt(acp[t]), sqrt(1 - acp[t]))`` in float64."""
        acp = float(self.alphas_cumprod[t])
        return math.sqrt(acp), math.sqrt(1.0 - acp)

    def _x0_and_eps(self, model_output: Tensor, sample: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """``x0`` (docs/method.md, "Shared maths") and the matching noise estimate from the model's parameterisation."""
        a, s = self._coefficients(t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (sample - s * eps) / a
        elif kind == "v_prediction":  # v = a * eps - s * x0 (Salimans & Ho 2022)
            x0 = a * sample - s * model_output
            eps = a * model_output + s * sample
        else:
            x0 = model_output
            eps = (sample - a * x0) / s
        if self.config.clip_sample:
            x0 = x0.clamp(-CLIP_SAMPLE_RANGE, CLIP_SAMPLE_RANGE)
            eps = (sample - a * x0) / s
        return x0, eps

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> MLCMSchedulerOutput | tuple[Tensor, Tensor]:
        """One MLCM step: ``x0`` from the model output, then the ``eta`` rule to the next boundary."""
        if self.num_inference_steps is None:
            raise ValueError("num_inference_steps is unset; call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if index >= len(self._timesteps):
            raise ValueError(
                f"step called {index + 1} times for a {len(self._timesteps)}-step run; call set_timesteps again"
            )
        t = self._timesteps[index]
        # x0 = (z - s * eps) / a cancels badly in half precision at high t: compute in at least float32.
        compute = torch.promote_types(sample.dtype, torch.float32)
        x0, eps = self._x0_and_eps(model_output.to(compute), sample.to(compute), t)

        eta = self.config.eta
        # Draw before knowing whether it is the last step: the official loop draws there too (RNG parity).
        noise = None
        if eta > 0.0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )

        if index + 1 == len(self._timesteps):
            prev_sample = x0
        else:
            prev_sample = self._to_next_boundary(x0, eps, t, self._timesteps[index + 1], noise)

        self._step_index = index + 1
        prev_sample = prev_sample.to(sample.dtype)
        denoised = x0.to(sample.dtype)
        if not return_dict:
            return prev_sample, denoised
        return MLCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def _to_next_boundary(self, x0: Tensor, eps: Tensor, t: int, t_next: int, noise: Tensor | None) -> Tensor:
        """Apply ``mlcm.sampling.renoise`` in VP terms: ``x = z / a`` and ``sigma = s / a`` (k-diffusion)."""
        a, s = self._coefficients(t)
        a_next, s_next = self._coefficients(t_next)
        # 0-d CPU tensors act as scalars on any device.
        sigma = torch.tensor(s / a, dtype=x0.dtype)
        sigma_next = torch.tensor(s_next / a_next, dtype=x0.dtype)
        fresh = None if noise is None else noise.to(x0.dtype)
        # The VE point x0 + sigma * eps equals z / a, and stays consistent when x0 was clipped.
        x = x0 + (s / a) * eps

        def noise_sampler(_sigma: Tensor, _sigma_next: Tensor) -> Tensor:
            return fresh

        return a_next * renoise(x, x0, sigma, sigma_next, self.config.eta, noise_sampler)

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """Forward diffusion ``a_t * x0 + s_t * noise`` (DDPMScheduler.add_noise)."""
        t = torch.as_tensor(timesteps).to(device="cpu", dtype=torch.long).flatten()
        acp = self.alphas_cumprod[t]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        # Cast on the CPU before moving: some devices (MPS) have no float64.
        a = acp.sqrt().to(original_samples.dtype).to(original_samples.device).view(shape)
        s = (1.0 - acp).sqrt().to(original_samples.dtype).to(original_samples.device).view(shape)
        return a * original_samples + s * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps

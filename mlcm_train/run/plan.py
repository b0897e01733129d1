"""What a run costs before it starts: peak memory per device and time per optimizer step, without weights.

The teacher's UNet is built on the meta device from its own config (a diffusers folder's, or the shipped
SD1.5/SDXL config for a single-file checkpoint). Weights and the LoRA are counted exactly: the LoRA module
by module as PEFT places it, the bytes from the run's precision and optimizer. Activations and FLOPs come
from a meta-device trace of the calls a step makes (``mlcm_train.run.trace``) at the run's resolution,
batch, precision and gradient checkpointing. Time is those FLOPs over a matmul rate probed on the device
for a third of a second, times the fraction of it a UNet reaches (fitted on a CPU). ``--dry-run`` prints
the plan; ``benchmarks/train_step.py --full`` measures the same figures on a full-shape UNet beside it.
How it works and how close it comes: docs/planning.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlcm.segments import segment_boundaries
from mlcm_train.config import TRAIN_TIMESTEPS, DistillConfig, RewardConfig, RunConfig
from mlcm_train.models.single_file import config_folder, detect_family, read_keys
from mlcm_train.models.teacher import folder_unet_config, unet_config_family
from mlcm_train.run.setup import WEIGHT_DTYPES
from mlcm_train.run.trace import trace_call

# Per trainable parameter: the fp32 weight and its fp32 gradient; AdamW's two moments in fp32 or 8 bits.
LORA_BYTES = 4 + 4
MOMENT_BYTES = {"adamw": 8, "adamw8bit": 2}


@dataclass(frozen=True)
class WeightPlan:
    family: str
    unet_parameters: int
    lora_parameters: int
    frozen_bytes: int  # the UNet's frozen weights at the run's precision
    lora_bytes: int  # LoRA weights + gradients + optimizer moments

    def lines(self) -> list[str]:
        gb = 2**30
        return [
            f"{self.family} UNet: {self.unet_parameters / 1e6:.1f}M parameters, {self.frozen_bytes / gb:.2f} GB frozen",
            f"LoRA: {self.lora_parameters / 1e6:.2f}M parameters, {self.lora_bytes / gb:.2f} GB with gradients "
            "and optimizer moments",
        ]


@dataclass(frozen=True)
class TeacherConfigs:
    """What the plan reads of a teacher: its family, the diffusers folder of configs that describes it (its
    own, or for a single file ``--teacher-config`` or the shipped one), and its UNet config."""

    family: str
    folder: Path
    unet: dict


def teacher_configs(config: RunConfig) -> TeacherConfigs:
    """The teacher's configs, reading only a safetensors header or JSON files."""
    path = Path(config.teacher)
    if path.is_dir():
        unet = folder_unet_config(path)
        return TeacherConfigs(unet_config_family(unet), path, unet)
    family = detect_family(read_keys(path))
    folder = config_folder(family, config.teacher_config)
    return TeacherConfigs(family, folder, folder_unet_config(folder))


def lora_parameter_count(unet: nn.Module, targets: tuple[str, ...], rank: int) -> int:
    """Trainable parameters of a rank-``rank`` LoRA on the Linear/Conv2d modules whose name ends in a target
    (PEFT's rule for a list of names): r * (in + out) for a Linear, r * (in * k * k + out) for a Conv2d."""
    total = 0
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total += rank * (module.in_channels * kernel // module.groups + module.out_channels)
    return total


def plan_weights(
    config: RunConfig,
    mixed_precision: str,
    *,
    rank: int | None = None,
    targets: tuple[str, ...] | None = None,
) -> WeightPlan:
    """The frozen UNet and the LoRA state at ``mixed_precision`` ("no", "fp16", "bf16"); the LoRA's rank and
    targets default to a distill config's own."""
    from diffusers import UNet2DConditionModel

    rank = rank if rank is not None else config.lora_rank
    targets = targets if targets is not None else tuple(config.lora_targets)
    teacher = teacher_configs(config)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(teacher.unet)
    unet_parameters = sum(p.numel() for p in unet.parameters())
    lora = lora_parameter_count(unet, targets, rank)
    return WeightPlan(
        family=teacher.family,
        unet_parameters=unet_parameters,
        lora_parameters=lora,
        frozen_bytes=unet_parameters * WEIGHT_DTYPES[mixed_precision].itemsize,
        lora_bytes=lora * (LORA_BYTES + MOMENT_BYTES[config.optimizer]),
    )


# --- activations and time ------------------------------------------------------------------------------------

# Backward frees saved tensors as it goes but holds gradients of the current activations and its kernels'
# scratch at the same time: about this many of the largest saved tensors beyond the saved set.
BACKWARD_WORKSPACE = 2.0
MDS_DRAWS = 4096  # Monte Carlo draws of stage-1 times, for the expected teacher steps per sample


# What a UNet call reaches of a plain matmul's rate: less on small feature maps, which leave the cores idle,
# and less in the trained call, whose backward runs through frozen convolutions. Fitted on 2 CPU threads to
# the parts of full-shape SD1.5 distill steps (fp32, batch 1): no-grad calls reached 0.20 of the matmul
# rate at 128 px (latent side 16) and 0.45 at 256 px (side 32), the student's forward + backward 0.16 and
# 0.35. Flat beyond side 32 (unmeasured there), and not fitted on a GPU: there the plan's time is a first
# guess until benchmarks/train_step.py --full measures it.
FORWARD_EFFICIENCY = 0.45
TRAINED_EFFICIENCY = 0.35
FULL_SPEED_SIDE = 32


def unet_efficiency(latent_side: int, trained: bool) -> float:
    scale = min(1.0, latent_side / FULL_SPEED_SIDE)
    return (TRAINED_EFFICIENCY if trained else FORWARD_EFFICIENCY) * scale


@dataclass(frozen=True)
class DeviceSpeed:
    flops_per_s: float  # a square matmul in the run's dtype, probed on the device
    latent_side: int
    label: str

    def seconds(self, flops: float, trained: bool) -> float:
        return flops / (unet_efficiency(self.latent_side, trained) * self.flops_per_s)


def probe_device(
    device: torch.device, dtype: torch.dtype, latent_side: int, seconds: float = 0.3
) -> DeviceSpeed:
    """Measure matmul throughput on ``device`` in ``dtype`` for about ``seconds``."""
    import time

    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        a @ b
        count += 1
    _sync(device)
    rate = 2.0 * n**3 * count / (time.perf_counter() - start)
    label = (
        f"CPU, {torch.get_num_threads()} threads"
        if device.type == "cpu"
        else torch.cuda.get_device_name(device)
    )
    return DeviceSpeed(rate, latent_side, label)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class PhasePlan:
    label: str
    activation_bytes: int  # what one optimizer step adds to the resident bytes at its peak
    # FLOPs per optimizer step and device by part (the StepTimer's categories); True = a trained call
    parts: dict[str, tuple[float, bool]]
    samples: int  # per optimizer step and device
    unet_calls: dict[str, float]  # expected UNet calls per optimizer step by role
    uncounted: str = ""

    @property
    def flops(self) -> float:
        return sum(flops for flops, _ in self.parts.values())


@dataclass(frozen=True)
class RunPlan:
    weights: WeightPlan
    resident_bytes: int  # frozen UNet + VAE + LoRA state (+ text encoders when kept)
    phases: list[PhasePlan]
    speed: DeviceSpeed | None

    def peak_bytes(self, phase: PhasePlan) -> int:
        return self.resident_bytes + phase.activation_bytes

    def seconds_per_step(self, phase: PhasePlan) -> float | None:
        parts = self.part_seconds(phase)
        return None if parts is None else sum(parts.values())

    def part_seconds(self, phase: PhasePlan) -> dict[str, float] | None:
        if self.speed is None:
            return None
        return {name: self.speed.seconds(flops, trained) for name, (flops, trained) in phase.parts.items()}

    def lines(self) -> list[str]:
        gb = 2**30
        lines = self.weights.lines()
        for phase in self.phases:
            text = (
                f"{phase.label}: peak about {self.peak_bytes(phase) / gb:.2f} GB per device "
                f"({phase.activation_bytes / gb:.2f} GB activations), "
                f"{phase.flops / 1e12:.2f} TFLOP per step"
            )
            seconds = self.seconds_per_step(phase)
            if seconds is not None:
                text += f", about {seconds:.3g} s per step ({phase.samples / seconds:.3g} samples/s)"
            lines.append(text + (f"; not counted: {phase.uncounted}" if phase.uncounted else ""))
        if self.speed is not None:
            lines.append(
                f"time: FLOPs at {unet_efficiency(self.speed.latent_side, False):.2f} (no-grad calls) and "
                f"{unet_efficiency(self.speed.latent_side, True):.2f} (the trained call) of the "
                f"{self.speed.flops_per_s / 1e12:.3g} TFLOP/s a matmul reached on {self.speed.label}; "
                "the fractions are fitted on a CPU (docs/planning.md)"
            )
        return lines


@dataclass(frozen=True)
class _Unet:
    """A meta-device UNet with the run's LoRA, and the latent side and dtype its calls run at."""

    unet: nn.Module
    config: dict
    latent: int
    dtype: torch.dtype

    def inputs(self, batch: int) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            meta = {"device": "meta", "dtype": self.dtype}
            kwargs: dict[str, Any] = {
                "sample": torch.empty(batch, self.config["in_channels"], self.latent, self.latent, **meta),
                "timestep": torch.full((batch,), 500, device="meta"),
                "encoder_hidden_states": torch.empty(batch, 77, self.config["cross_attention_dim"], **meta),
                "return_dict": False,
            }
            if self.config.get("addition_embed_type") == "text_time":
                time_ids = 6 * self.config["addition_time_embed_dim"]
                pooled = self.config["projection_class_embeddings_input_dim"] - time_ids
                kwargs["added_cond_kwargs"] = {
                    "text_embeds": torch.empty(batch, pooled, **meta),
                    "time_ids": torch.empty(batch, 6, **meta),
                }
            return kwargs

        return make


def _meta_unet(
    config: RunConfig,
    teacher: TeacherConfigs,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    dtype: torch.dtype,
) -> _Unet:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        unet = nn.Module.to(UNet2DConditionModel.from_config(teacher.unet), dtype)
        lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
        inject_adapter_in_model(lora, unet, adapter_name="plan")
    unet.requires_grad_(False)
    for name, param in unet.named_parameters():
        if ".lora_" in name:
            param.data = param.data.float()  # the trainer keeps the LoRA in fp32
            param.requires_grad_(True)
    vae_config = AutoencoderKL.load_config(teacher.folder / "vae")
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    latent = config.resolution // factor if config.resolution else int(teacher.unet.get("sample_size") or 64)
    return _Unet(unet, teacher.unet, latent, dtype)


def expected_mds_steps(config: DistillConfig, segments: int, batch: int) -> tuple[float, float]:
    """(teacher steps per sample, teacher calls per batch) of the multistep denoising strategy, averaged
    over stage-1 draws: a call serves every sample that still has a step to take."""
    from mlcm_train.method.timesteps import mds_timesteps, sample_stage1_timesteps

    boundaries = segment_boundaries(segments, TRAIN_TIMESTEPS)
    generator = torch.Generator().manual_seed(0)
    rows = max(MDS_DRAWS // batch, 1)
    segment, t_m, _, _ = sample_stage1_timesteps(rows * batch, boundaries, config.skip, generator)
    grid = torch.stack(mds_timesteps(t_m, segment, boundaries))  # (L_max + 1, draws)
    moves = (grid[1:] < grid[:-1]).to(torch.float64)
    per_sample = moves.sum(0).mean().item()
    calls = moves.view(moves.shape[0], rows, batch).amax(2).sum(0).mean().item()
    return per_sample, calls


def _stage1_state_steps(config: DistillConfig, segments: int, batch: int) -> tuple[float, float]:
    """(teacher steps per sample, teacher calls per batch) that make online stage-1 states: Algorithm 1's,
    or a shared chain's (M + 1 calls for every M samples, which also take each state's step to t_n)."""
    if config.stage1_states == "shared":
        return (segments + 1) / segments, float(segments + 1)
    return expected_mds_steps(config, segments, batch)


def plan_distill(config: DistillConfig, mixed_precision: str, device: torch.device | None = None) -> RunPlan:
    """Peak memory and time per optimizer step of each distill phase; ``device`` set = probe it for time."""
    dtype = WEIGHT_DTYPES[mixed_precision]
    weights = plan_weights(config, mixed_precision)
    teacher = teacher_configs(config)
    meta = _meta_unet(config, teacher, config.lora_rank, config.lora_alpha, tuple(config.lora_targets), dtype)
    b, accumulation = config.batch_size, config.gradient_accumulation
    student = trace_call(meta.unet, meta.inputs(b), checkpointing=config.gradient_checkpointing)
    forward = student.forward_flops / b  # per sample
    activations = int(student.saved_bytes + BACKWARD_WORKSPACE * student.largest_saved_bytes)
    phases = []
    trained = student.forward_flops + student.backward_flops
    for segments, stage in config.phases():
        calls: dict[str, float] = {}
        parts: dict[str, tuple[float, bool]] = {}
        cached = stage == 1 and config.trajectories is not None and segments == config.segments
        if stage == 1 and not cached:
            steps, batch_calls = _stage1_state_steps(config, segments, b)
            calls["teacher trajectory"] = batch_calls
            parts["teacher_trajectory"] = (2 * steps * b * forward, False)  # CFG: both halves
        elif stage == 2:
            calls["student start sample"] = config.stage2_q
            calls["teacher sub-steps"] = config.stage2_p
            parts["teacher_trajectory"] = ((config.stage2_q + 2 * config.stage2_p) * b * forward, False)
        shared = stage == 1 and not cached and config.stage1_states == "shared"
        calls["teacher target"] = 1.0 if shared else 2.0
        calls["student forward + backward"] = 2.0
        # A CFG step and the target's call; a shared chain took the CFG step already.
        parts["teacher_target"] = ((1 if shared else 3) * b * forward, False)
        parts["student_forward_backward"] = (trained, True)
        if stage == 2 and config.stage2_stage1_weight > 0:  # the stage-1 regulariser: a stage-1 step more
            steps, batch_calls = _stage1_state_steps(config, segments, b)
            calls["teacher trajectory"] = batch_calls + 2.0
            trajectory = parts["teacher_trajectory"][0] + (2 * steps + 3) * b * forward
            parts["teacher_trajectory"] = (trajectory, False)
            parts["student_forward_backward"] = (2 * trained, True)
        label = f"stage {stage} M={segments}" + (" (pre-generated states)" if cached else "")
        phases.append(
            PhasePlan(
                label=label,
                activation_bytes=activations,
                parts={k: (accumulation * f, t) for k, (f, t) in parts.items()},
                samples=accumulation * b,
                unet_calls={k: accumulation * v for k, v in calls.items()},
            )
        )
    return RunPlan(weights, _resident_bytes(config, teacher, weights, dtype), phases, _speed(meta, device))


def plan_reward(
    config: RewardConfig,
    mixed_precision: str,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    segments: int,
    device: torch.device | None = None,
) -> RunPlan:
    """Peak memory and time per optimizer step of a reward run whose starting LoRA has ``rank``/``targets``.

    The reward term rolls the student out over the mean of ``student_steps`` (the last ``grad_steps`` with
    gradients), decodes with the VAE (with gradients) and scores; the anchor term is a stage-2 step. Each
    term has its own backward, so the peak is the larger one's. The scorer is not counted.
    """
    from diffusers import AutoencoderKL

    dtype = WEIGHT_DTYPES[mixed_precision]
    weights = plan_weights(config, mixed_precision, rank=rank, targets=targets)
    teacher = teacher_configs(config)
    meta = _meta_unet(config, teacher, rank, alpha, targets, dtype)
    b, accumulation = config.batch_size, config.gradient_accumulation
    student = trace_call(meta.unet, meta.inputs(b), checkpointing=config.gradient_checkpointing)
    forward = student.forward_flops / b
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(teacher.folder / "vae"))
        vae = nn.Module.to(vae, dtype)
    vae.requires_grad_(False)
    latents = torch.empty(b, vae.config.latent_channels, meta.latent, meta.latent, device="meta", dtype=dtype)
    latents.requires_grad_(True)
    decode = trace_call(_Decoder(vae), lambda: {"latents": latents}, checkpointing=config.vae_checkpointing)
    steps = sum(config.student_steps) / len(config.student_steps)
    grad_steps = min(config.grad_steps, steps)
    workspace = BACKWARD_WORKSPACE * max(student.largest_saved_bytes, decode.largest_saved_bytes)
    reward_activations = grad_steps * student.saved_bytes + decode.saved_bytes + workspace
    anchor_activations = student.saved_bytes + BACKWARD_WORKSPACE * student.largest_saved_bytes
    calls = {
        "student rollout": steps - grad_steps,
        "student with gradients (forward + backward)": 2 * grad_steps,
    }
    parts = {
        "student_rollout": ((steps - grad_steps) * b * forward, False),
        "student_forward_backward": (grad_steps * (student.forward_flops + student.backward_flops), True),
        "vae_decode": (decode.forward_flops + decode.backward_flops, True),
    }
    if config.anchor_weight > 0:
        calls.update({"anchor start sample": config.anchor_q, "anchor teacher": config.anchor_p + 1})
        calls["anchor student (forward + backward)"] = 2.0
        parts["anchor_teacher"] = ((config.anchor_q + 2 * config.anchor_p + 1) * b * forward, False)
        parts["anchor_student"] = (student.forward_flops + student.backward_flops, True)
    phase = PhasePlan(
        label=f"reward M={segments}",
        activation_bytes=int(max(reward_activations, anchor_activations)),
        parts={k: (accumulation * f, t) for k, (f, t) in parts.items()},
        samples=accumulation * b,
        unet_calls={k: accumulation * v for k, v in calls.items()},
        uncounted="the reward model (its weights and its pass), the held-out scorer",
    )
    return RunPlan(weights, _resident_bytes(config, teacher, weights, dtype), [phase], _speed(meta, device))


class _Decoder(nn.Module):
    """The VAE decode the reward stage runs, as a module for the trace."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents, return_dict=False)[0]

    def enable_gradient_checkpointing(self, function: Callable) -> None:
        self.vae.enable_gradient_checkpointing(function)

    def disable_gradient_checkpointing(self) -> None:
        self.vae.disable_gradient_checkpointing()


def _resident_bytes(
    config: RunConfig, teacher: TeacherConfigs, weights: WeightPlan, dtype: torch.dtype
) -> int:
    vae = _module_parameters(teacher.folder, "vae")
    kept = _module_parameters(teacher.folder, "text_encoders") if config.keep_text_encoders else 0
    return weights.frozen_bytes + weights.lora_bytes + (vae + kept) * dtype.itemsize


def _module_parameters(folder: Path, which: str) -> int:
    """Parameters of the teacher's VAE or text encoders, counted on the meta device from their configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        if which == "vae":
            module = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            return sum(p.numel() for p in module.parameters())
        total = 0
        for name in ("text_encoder", "text_encoder_2"):
            if (folder / name / "config.json").is_file():
                text_config = CLIPTextConfig.from_json_file(folder / name / "config.json")
                total += sum(p.numel() for p in CLIPTextModel(text_config).parameters())
        return total


def _speed(meta: _Unet, device: torch.device | None) -> DeviceSpeed | None:
    return None if device is None else probe_device(device, meta.dtype, meta.latent)

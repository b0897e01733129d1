"""What a training run is built from: the accelerator, the run directory, the teacher with its prompts and
text conditioning (computed once, at the run's resolution), and the one UNet in its three roles.

Both stages (``mlcm_train.distill``, ``mlcm_train.reward.stage``) open a run here and hand it to the loop of
``mlcm_train.run.loop``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlcm_train.config import RunConfig
from mlcm_train.data.prompts import read_prompts
from mlcm_train.models.conditioning import Conditioning
from mlcm_train.models.embeddings import EmbeddingCache
from mlcm_train.models.student import LoraEMA, adapters_disabled, load_lora_state_dict
from mlcm_train.models.teacher import Teacher, load_teacher
from mlcm_train.run.checkpoint import Checkpoint, TrainState, list_checkpoints, load_checkpoint, restore_rng
from mlcm_train.run.log import RunLog

log = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` = bf16 on a CUDA device that supports it, otherwise fp32 ("no")."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str, timeout_s: int):
    """An Accelerator for this run (CPU, one GPU, or the processes of torchrun/accelerate launch) whose process
    group waits up to ``timeout_s`` seconds at a collective (set by a process's first Accelerator)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate keeps one AcceleratorState per process; forget a previous run's precision so that several
    # runs can share a process (demo, tests). The distributed setup (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # The main process alone writes sample grids, evaluations and exports while the others wait at the next
    # collective; NCCL's default 10 minutes can be shorter than an SDXL grid or a long evaluation.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))
    return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[timeout])


def _accelerator(config: RunConfig) -> tuple[Any, torch.dtype]:
    """The run's Accelerator and the dtype its frozen weights are kept in (that of the mixed precision)."""
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    return make_accelerator(mixed_precision, config.ddp_timeout), WEIGHT_DTYPES[mixed_precision]


def changed_recipe(config: RunConfig, saved: dict[str, Any]) -> list[str]:
    """The weight-changing fields whose value differs from a saved config's; a field the saved config
    predates counts as changed only when it is set to something other than its default."""
    now = config.to_dict()
    changed = []
    for f in dataclasses.fields(config):
        if f.metadata.get("bookkeeping"):
            continue
        if f.name in saved:
            differs = saved[f.name] != now[f.name]
        else:
            differs = getattr(config, f.name) != f.default
        if differs:
            changed.append(f.name)
    return changed


def load_inputs(
    config: RunConfig, device: torch.device, weight_dtype: torch.dtype
) -> tuple[Teacher, list[str], EmbeddingCache]:
    """The frozen teacher, the prompt list and its text conditioning (encoded once, at ``config.resolution``)."""
    # Prompts first: a bad prompt file should fail before minutes of checkpoint loading.
    prompts = read_prompts(config.prompts)
    teacher = load_teacher(
        config.teacher,
        tokenizer_path=config.tokenizer_path,
        comfyui_root=config.comfyui_root,
        config_dir=config.teacher_config,
        dtype=weight_dtype,
        device=device,
    )
    return teacher, prompts, EmbeddingCache(teacher, prompts, resolution=config.resolution)


@dataclass
class Run:
    """One training run: its config, accelerator, directory, the checkpoint it resumes from and its inputs."""

    config: RunConfig
    accelerator: Any
    run_dir: Path
    saved: Checkpoint | None
    weight_dtype: torch.dtype
    teacher: Teacher | None = None
    prompts: list[str] = field(default_factory=list)
    embeddings: EmbeddingCache | None = None
    log: RunLog | None = None  # metrics.jsonl (+ TensorBoard), main process only
    extra_embeddings: EmbeddingCache | None = None  # conditioning of prompts beside the training ones
    _uncond: Conditioning | None = None

    @classmethod
    def open(cls, config: RunConfig, resume: str | Path | None) -> Run:
        """The cheap part: accelerator, run directory and resume checks; no model is loaded yet."""
        accelerator, weight_dtype = _accelerator(config)
        run_dir = Path(config.output_dir)
        saved = load_checkpoint(resume) if resume is not None else None
        if saved is None and list_checkpoints(run_dir):
            raise ValueError(
                f"{run_dir} already holds checkpoints; pass --resume {run_dir} to continue that run "
                "or choose another --output-dir"
            )
        if saved is not None and saved.state.config_hash != config.config_hash():
            changed = changed_recipe(config, saved.config)
            log.warning(
                "resuming with a changed recipe (%s); the continuation will differ from an uninterrupted run",
                ", ".join(changed),
            )
        return cls(config, accelerator, run_dir, saved, weight_dtype)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def alphas_cumprod(self) -> Tensor:
        return self.teacher.alphas_cumprod.to(self.device)

    @classmethod
    def inputs_only(cls, config: RunConfig) -> Run:
        """The teacher, prompts and conditioning of ``config`` without a run directory (e.g. ``trajectories``)."""
        accelerator, weight_dtype = _accelerator(config)
        run = cls(config, accelerator, Path(config.output_dir), None, weight_dtype)
        run.load_inputs()
        return run

    def load(self, extra_prompts: list[str] | None = None) -> None:
        """Write config.json, open the metrics log, then load the inputs (see ``load_inputs``)."""
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(self.config.to_json() + "\n", encoding="utf-8")
            self.log = RunLog(
                self.run_dir,
                tensorboard=self.config.tensorboard,
                wandb=self.config.wandb,
                config=self.config.to_dict(),
            )
        self.load_inputs(extra_prompts)

    def load_inputs(self, extra_prompts: list[str] | None = None) -> None:
        """The teacher, the prompts and their text conditioning (``extra_prompts``' too, e.g. an evaluation
        set, in ``extra_embeddings``) and the CFG null condition; then the text encoders are released."""
        self.teacher, self.prompts, self.embeddings = load_inputs(self.config, self.device, self.weight_dtype)
        resolution = self.config.resolution
        if extra_prompts:
            self.extra_embeddings = EmbeddingCache(self.teacher, extra_prompts, resolution=resolution)
        # SDXL's size conditioning names the run's resolution in the student, target and teacher alike.
        self._uncond = self.teacher.uncond(1, resolution).to(self.device)
        if not self.config.keep_text_encoders:  # every prompt is encoded: the encoders' memory is the UNet's
            released = self.teacher.release_text_encoders()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log.info("released the text encoders (%.2f GB) after encoding the prompts", released / 2**30)

    def cond(self, indices: Any) -> Conditioning:
        """The cached text conditioning of prompts ``indices``, on the run's device."""
        return self.embeddings.get(indices).to(self.device)

    def uncond(self, batch_size: int) -> Conditioning:
        """The CFG null condition for ``batch_size`` samples."""
        return self._uncond.repeat(batch_size)

    def latent_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one training latent at the run's resolution."""
        return tuple(self.teacher.latent_shape(1, self.config.resolution))[1:]

    def noise(self, generators: list[torch.Generator]) -> Tensor:
        """One unit-variance latent per generator (drawn on the CPU, so any device draws the same)."""
        shape = self.latent_shape()
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    def start_state(self, unet: nn.Module, ema: LoraEMA | None = None) -> TrainState:
        """A fresh TrainState, or the resumed checkpoint's with its LoRA, EMA and RNG states put back."""
        state = TrainState(0, 0, 0, 0, self.teacher.family, len(self.prompts), 0, self.config.config_hash())
        if self.saved is None:
            return state
        load_lora_state_dict(unet, self.saved.lora)
        if ema is not None and self.saved.ema is not None:
            ema.load_state_dict(self.saved.ema)
        state = self.saved.state
        state.config_hash = self.config.config_hash()
        restore_rng(self.saved.rng)
        log.info("resuming from %s at global step %d", self.saved.path, state.global_step)
        return state


class UnetRoles:
    """One UNet, three eps functions: the student (with gradients), its no-grad target (EMA weights when
    enabled) and the frozen teacher (adapters off). ``model`` is the accelerate-prepared (DDP) wrapper."""

    def __init__(self, accelerator: Any, unet: nn.Module, model: nn.Module, ema: LoraEMA | None = None):
        self.accelerator, self.unet, self.model, self.ema = accelerator, unet, model, ema
        # UNet evaluations on this process, as sample rows: a CFG call on B samples counts 2B.
        self.evaluations = {"teacher": 0, "student": 0}

    def _call(self, module: nn.Module, z: Tensor, t: Tensor, cond: Any, role: str) -> Tensor:
        self.evaluations[role] += z.shape[0]
        with self.accelerator.autocast():
            return module(z, t, **cond.unet_kwargs(), return_dict=False)[0].float()

    def student(self, z: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self._call(self.model, z, t, cond, "student")

    def target(self, z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.no_grad(), self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            return self._call(self.unet, z, t, cond, "student")

    def teacher(self, z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.no_grad(), adapters_disabled(self.unet):
            return self._call(self.unet, z, t, cond, "teacher")

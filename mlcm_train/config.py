"""The trainer's one configuration object: every choice of a `distill` run, with its default and source.

The resolved config is written to the run directory, next to every checkpoint and into the exported
LoRA's metadata; ``config_hash()`` names the recipe (fields that cannot change the weights, such as
where logs go, are left out of the hash).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlcm.lora import TARGET_MODULE_PATTERNS

from .config_record import BOOKKEEPING, ConfigRecord, check_choice

# The 14 UNet module patterns of the official MLCM/TLCM LoRA (MLCM_METHOD.md §4), defined once in mlcm.lora.
LORA_TARGET_MODULES = TARGET_MODULE_PATTERNS
LOSS_TYPES = ("l2", "huber")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
EXPORT_FORMATS = ("kohya", "peft", "diffusers")
RENOISE_MODES = ("same", "fresh")


@dataclass(frozen=True)
class DistillConfig(ConfigRecord):
    """One `python -m mlcm_train distill` run (defaults: MLCM_METHOD.md §5 unless marked ours)."""

    # --- inputs ---
    teacher: str = ""  # diffusers folder or single-file .safetensors checkpoint (SD1.5 or SDXL)
    prompts: str = ""  # text file, one prompt a line, or a folder of caption .txt files
    teacher_config: str | None = None  # diffusers folder describing a single-file teacher (default: shipped)
    tokenizer_path: str | None = None  # local tokenizer folder for single-file teachers
    comfyui_root: str | None = None  # ComfyUI installation to search for tokenizers/configs
    resolution: int | None = None  # pixels; None = the teacher's native size (512 SD1.5, 1024 SDXL)
    trajectories: str | None = None  # folder of pre-generated trajectory shards; None = online

    # --- the method ---
    segments: int = 8  # M, the paper's segment count
    skip: int = 20  # t_n = t_m - skip (paper: 20; the parent method used 1)
    guidance_scale: float = 8.0  # teacher CFG w, fixed (paper, SDXL)
    loss_type: str = "l2"  # "l2" (paper) or "huber"
    huber_c: float = 0.001  # Huber constant, LCM/diffusers convention
    lpips_path: str | None = None  # optional latent-LPIPS weights (.safetensors); None = raw latents
    stages: tuple[int, ...] = (1, 2)  # stage 1 (multistep LCD) then stage 2 (inter-segment)
    progressive: tuple[int, ...] = ()  # rounds' segment counts, e.g. 8,4,2; replaces segments (ours)
    stage1_steps: int = 12000  # optimizer steps of stage 1 (paper, SDXL)
    stage2_steps: int = 2000  # optimizer steps of stage 2 (paper)
    lr_stage1: float = 1e-4  # AdamW learning rate, stage 1 (paper)
    lr_stage2: float = 1e-5  # AdamW learning rate, stage 2 (paper)
    stage2_q: int = 4  # student steps that make stage 2's start sample (paper)
    stage2_p: int = 3  # teacher CFG-DDIM sub-steps of stage 2's target (paper)
    stage2_renoise: str = "same"  # forward-diffusion noise for stage 2 start states: "same" or "fresh"
    ema_decay: float | None = None  # EMA of the LoRA weights as the target; None = online student (paper)

    # --- LoRA ---
    lora_rank: int = 64  # official rank
    lora_alpha: float | None = None  # None = rank (scale 1.0); always recorded explicitly (ours)
    lora_targets: tuple[str, ...] = LORA_TARGET_MODULES  # the official 14 UNet module patterns
    init_lora: str | None = (
        None  # start from this LoRA (kohya/PEFT/diffusers, same rank), e.g. a stage-1 run's
    )

    # --- optimisation ---
    batch_size: int = 4  # per device and per micro-step (ours: the paper does not state it)
    gradient_accumulation: int = 1  # micro-steps per optimizer step
    adam_beta1: float = 0.9  # AdamW (paper optimizer), torch defaults
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_weight_decay: float = 0.0  # diffusers LCM-LoRA README value
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # diffusers LCM scripts
    mixed_precision: str = "auto"  # "auto" = bf16 on CUDA when supported, else fp32
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    seed: int = 0  # every random draw (LoRA init, prompts order, noise, timesteps) derives from it
    nan_patience: int = 5  # stop after this many non-finite losses in a row (ours)

    # --- run directory and bookkeeping (not part of config_hash) ---
    output_dir: str = field(default="runs/mlcm", metadata=BOOKKEEPING)  # the run directory
    checkpoint_every: int = field(default=500, metadata=BOOKKEEPING)  # optimizer steps
    checkpoints_keep: int = field(default=3, metadata=BOOKKEEPING)  # newest kept; 0 = keep all
    log_every: int = field(default=10, metadata=BOOKKEEPING)  # steps between metrics.jsonl rows
    tensorboard: bool = field(default=False, metadata=BOOKKEEPING)  # also log to <run>/tensorboard
    sample_every: int = field(default=1000, metadata=BOOKKEEPING)  # 0 = no sample grids
    sample_steps: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata=BOOKKEEPING)  # > segments: skipped
    sample_prompts: int = field(default=4, metadata=BOOKKEEPING)  # rows of each grid
    export_formats: tuple[str, ...] = field(default=("kohya",), metadata=BOOKKEEPING)  # kohya/peft/diffusers

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            # Frozen dataclass: resolve the default once here so alpha is explicit everywhere after.
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        for name in ("stages", "progressive", "lora_targets", "sample_steps", "export_formats"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        positive = (
            "segments",
            "skip",
            "stage1_steps",
            "stage2_steps",
            "stage2_q",
            "stage2_p",
            "lora_rank",
            "batch_size",
            "gradient_accumulation",
            "nan_patience",
            "checkpoint_every",
            "log_every",
            "sample_prompts",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("lr_stage1", "lr_stage2", "lora_alpha", "huber_c", "adam_eps", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be at least 1 (1 = no CFG)")
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("stage2_renoise", self.stage2_renoise, RENOISE_MODES)
        if (
            not self.stages
            or any(s not in (1, 2) for s in self.stages)
            or list(self.stages) != sorted(set(self.stages))
        ):
            raise ValueError(f"stages={self.stages} must be 1, 2 or 1,2 (in that order)")
        rounds = self.progressive or (self.segments,)
        if list(rounds) != sorted(set(rounds), reverse=True) or rounds[-1] < 1:
            raise ValueError(
                f"progressive={self.progressive} must be strictly decreasing segment counts, e.g. 8,4,2"
            )
        for segments in rounds:
            # Each segment must hold t_m in [lo + skip, hi], so it must be wider than skip.
            width = 999 // segments
            if width <= self.skip:
                raise ValueError(
                    f"segments={segments} gives segments {width} timesteps wide, not wider than skip={self.skip}; "
                    "use fewer segments or a smaller skip"
                )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1), or unset for no EMA")
        if not 0.0 <= self.adam_weight_decay < 1.0:
            raise ValueError(f"adam_weight_decay={self.adam_weight_decay} must be in [0, 1)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if not self.lora_targets:
            raise ValueError("lora_targets is empty; give at least one module pattern such as to_q")
        if not self.sample_steps or any(steps < 1 for steps in self.sample_steps):
            raise ValueError(
                f"sample_steps={self.sample_steps} must be step counts of at least 1, e.g. 1,2,4,8"
            )
        for fmt in self.export_formats:
            check_choice("export_formats", fmt, EXPORT_FORMATS)
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(
                f"resolution={self.resolution} must be a positive multiple of 8 (the VAE factor)"
            )
        if self.checkpoints_keep < 0 or self.sample_every < 0:
            raise ValueError(
                "checkpoints_keep and sample_every must be 0 or more (0 = keep all / no samples)"
            )

    @property
    def rounds(self) -> tuple[int, ...]:
        """Segment counts of the training rounds: the progressive list, or just ``segments``."""
        return self.progressive or (self.segments,)

    @property
    def final_segments(self) -> int:
        return self.rounds[-1]

    def phases(self) -> list[tuple[int, int]]:
        """(segments, stage) of every training phase in order: each round runs the configured stages."""
        return [(segments, stage) for segments in self.rounds for stage in self.stages]

    def phase_steps(self, stage: int) -> int:
        return self.stage1_steps if stage == 1 else self.stage2_steps

    def phase_lr(self, stage: int) -> float:
        return self.lr_stage1 if stage == 1 else self.lr_stage2

"""The configuration of a `reward` run: preference tuning of a distilled MLCM LoRA (MLCM_METHOD.md §5).

Like ``DistillConfig``: one frozen dataclass with commented defaults, written to the run directory, next to
every checkpoint and into the exported LoRA's metadata; ``config_hash()`` leaves bookkeeping fields out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import EXPORT_FORMATS, MIXED_PRECISIONS
from .config_record import BOOKKEEPING, ConfigRecord, check_choice

REWARD_LOSSES = ("hinge", "maximise")
KEEP_BEST_RULES = ("guarded", "heldout", "reward", "last")
HELDOUT_FD = "fd"  # the held-out spec prefix that selects the demo's Frechet distance


@dataclass(frozen=True)
class RewardConfig(ConfigRecord):
    """One `python -m mlcm_train reward` run (defaults: MLCM_METHOD.md §5 / TLCM §4 unless marked ours)."""

    _KIND = "reward config"
    _KNOWN_BY = "the reward stage"

    # --- inputs ---
    teacher: str = ""  # the teacher the LoRA was distilled from (diffusers folder or single-file checkpoint)
    prompts: str = ""  # text file, one prompt a line, or a folder of caption .txt files
    lora: str = ""  # LoRA from `distill`: an exported file/PEFT folder, or a checkpoint / run directory
    teacher_config: str | None = None  # diffusers folder describing a single-file teacher (default: shipped)
    tokenizer_path: str | None = None  # local tokenizer folder for single-file teachers
    comfyui_root: str | None = None  # ComfyUI installation to search for tokenizers/configs
    resolution: int | None = None  # pixels; None = the teacher's native size

    # --- the reward ---
    reward: str = ""  # NAME[*WEIGHT][=PATH], comma-separated for a weighted sum, e.g. hpsv2=/m/hps
    loss: str = "hinge"  # "hinge" (MPS-style, paper) or "maximise" (plain -score, DRaFT/AlignProp)
    margin: float = 16.0  # hinge margin on the positive score (paper, with the MPS scorer)
    reward_weight: float = 1.0  # multiplier of the reward loss (ReFL uses 1e-3 with its relu(2 - r))
    student_steps: tuple[int, ...] = (4,)  # student step counts, one drawn per iteration (ours; paper q=4)
    grad_steps: int = 1  # the last K sampling steps carry gradients (DRaFT-K; K=1 is ReFL-style)
    segments: int | None = None  # None = the LoRA's segment count from its metadata (else 8)
    vae_checkpointing: bool = True  # gradient-checkpoint the VAE decoder (memory; the values are equal)

    # --- the anchor: a consistency term that keeps the distillation (paper: "keep a consistency term") ---
    anchor_weight: float = 1.0  # weight of the stage-2 inter-segment loss against the frozen teacher; 0 = off
    guidance_scale: float | None = None  # teacher CFG of the anchor; None = the LoRA's training value, else 8
    anchor_q: int = 4  # student steps of the anchor's start sample (stage 2 q, paper)
    anchor_p: int = 3  # teacher sub-steps of the anchor's target (stage 2 p, paper)

    # --- optimisation ---
    iterations: int = 500  # optimizer steps (paper)
    batch_size: int = 8  # per device and micro-step (paper: batch 8)
    gradient_accumulation: int = 1  # micro-steps per optimizer step
    lr: float = 1e-5  # AdamW learning rate (paper)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # ReFL scripts
    mixed_precision: str = "auto"  # "auto" = bf16 on CUDA when supported, else fp32
    gradient_checkpointing: bool = False  # UNet gradient checkpointing
    seed: int = 0
    nan_patience: int = 5  # stop after this many non-finite losses in a row (ours)

    # --- guarding against reward hacking ---
    heldout: str | None = None  # a second reward spec, or fd=<demo classifier folder>; None = no held-out
    heldout_prompts: str | None = None  # prompts of the evaluation set; None = the training prompts
    eval_every: int = 50  # optimizer steps between evaluations (and one before training, one at the end)
    eval_samples: int = 16  # images per evaluation and step count (fixed prompts and seeds)
    eval_steps: tuple[int, ...] = ()  # student step counts evaluated; () = student_steps
    keep_best: str = (
        "guarded"  # exported LoRA: "guarded", best "heldout", best "reward", or "last" (see guard.py)
    )
    heldout_tolerance: float = (
        0.1  # "guarded": held-out may be this much worse than at the start (issue 5: 10%)
    )

    # --- run directory and bookkeeping (not part of config_hash) ---
    output_dir: str = field(default="runs/mlcm_reward", metadata=BOOKKEEPING)
    checkpoint_every: int = field(default=100, metadata=BOOKKEEPING)  # optimizer steps
    checkpoints_keep: int = field(default=3, metadata=BOOKKEEPING)  # newest kept; 0 = keep all
    log_every: int = field(default=10, metadata=BOOKKEEPING)
    tensorboard: bool = field(default=False, metadata=BOOKKEEPING)
    export_formats: tuple[str, ...] = field(default=("kohya",), metadata=BOOKKEEPING)

    def __post_init__(self) -> None:
        for name in ("student_steps", "eval_steps", "export_formats"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        for name in (
            "grad_steps",
            "anchor_q",
            "anchor_p",
            "iterations",
            "batch_size",
            "gradient_accumulation",
            "nan_patience",
            "eval_every",
            "eval_samples",
            "checkpoint_every",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("lr", "adam_eps", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("anchor_weight", "reward_weight", "adam_weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be 0 or more")
        check_choice("loss", self.loss, REWARD_LOSSES)
        check_choice("keep_best", self.keep_best, KEEP_BEST_RULES)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        for fmt in self.export_formats:
            check_choice("export_formats", fmt, EXPORT_FORMATS)
        if not self.student_steps or any(s < 1 for s in self.student_steps):
            raise ValueError(
                f"student_steps={self.student_steps} must be step counts of at least 1, e.g. 2,4"
            )
        if any(s < 1 for s in self.eval_steps):
            raise ValueError(f"eval_steps={self.eval_steps} must be step counts of at least 1")
        if self.segments is not None:
            too_many = [s for s in (*self.student_steps, *self.eval_steps) if s > self.segments]
            if too_many:
                raise ValueError(
                    f"step counts {too_many} exceed segments={self.segments}; use at most {self.segments} steps"
                )
        if self.loss == "hinge" and self.batch_size < 2:
            raise ValueError(
                "loss='hinge' scores each image against another prompt of its batch; use batch_size >= 2 "
                "or loss='maximise'"
            )
        if self.keep_best in ("guarded", "heldout") and self.heldout is None:
            raise ValueError(
                f"keep_best={self.keep_best!r} needs a held-out measure; pass --heldout (a second reward or "
                "fd=<demo classifier folder>) or --keep-best reward|last"
            )
        if self.heldout_tolerance < 0:
            raise ValueError(
                f"heldout_tolerance={self.heldout_tolerance} must be 0 or more (0.1 = 10% worse)"
            )
        if self.guidance_scale is not None and self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be at least 1 (1 = no CFG)")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(
                f"resolution={self.resolution} must be a positive multiple of 8 (the VAE factor)"
            )
        if self.checkpoints_keep < 0:
            raise ValueError("checkpoints_keep must be 0 or more (0 = keep all)")

    @property
    def evaluated_steps(self) -> tuple[int, ...]:
        """The step counts every evaluation samples at."""
        return self.eval_steps or tuple(sorted(set(self.student_steps)))

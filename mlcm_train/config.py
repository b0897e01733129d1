"""The trainer's configuration: the parts every stage shares, composed by ``DistillConfig`` and ``RewardConfig``.

One frozen dataclass per stage, with commented defaults (the published recipe unless marked "ours"; see
docs/method.md). Each field carries its own help text and metavar in its metadata: the command line is
generated from them, so a setting, its default and its documentation live in one place. The resolved config
is written to the run directory, next to every checkpoint and into the exported LoRA's metadata;
``config_hash()`` names the recipe (bookkeeping fields, which cannot change the weights, are left out).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from mlcm.lora import TARGET_MODULE_PATTERNS
from mlcm.segments import segment_boundaries
from mlcm_train.method.settings import LOSS_TYPES, RENOISE_MODES, STAGE1_STATES, DistillSettings

# The 14 UNet module patterns of the official MLCM/TLCM LoRA (docs/method.md, "The LoRA"), defined in mlcm.lora.
LORA_TARGET_MODULES = TARGET_MODULE_PATTERNS
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
WANDB_MODES = ("off", "offline", "online")
EXPORT_FORMATS = ("kohya", "peft", "diffusers")
REWARD_LOSSES = ("auto", "hinge", "maximise")
KEEP_BEST_RULES = ("guarded", "heldout", "reward", "last")
HELDOUT_FD = "fd"  # the held-out spec prefix that selects the demo's Frechet distance
# The official LoRA never sets lora_alpha, so PEFT's default 8 applies: scale 8 / 64 = 0.125 at rank 64
# (docs/method.md, "The LoRA and its scale").
OFFICIAL_LORA_ALPHA = 8.0
# T of the SD1.5/SDXL DDPM schedule, for checks made before the teacher is loaded; the losses re-check the
# segment widths against the teacher's own schedule.
TRAIN_TIMESTEPS = 1000


def option(
    default: Any, help: str, metavar: str | None = None, *, bookkeeping: bool = False, added: bool = False
) -> Any:
    """A config field with its flag's help text and metavar; ``bookkeeping`` fields stay out of the hash, and
    ``added`` ones (introduced after runs were made without them) enter it only when set to a non-default
    value, so an older run's recipe hash still matches when it resumes."""
    metadata = {"help": help, "metavar": metavar, "bookkeeping": bookkeeping, "added": added}
    return field(default=default, metadata=metadata)


C = TypeVar("C", bound="ConfigRecord")


class ConfigRecord:
    """JSON round trip, a recipe hash and checked choices for the frozen config dataclasses."""

    _KIND: ClassVar[str] = "config"  # how errors name this kind of config
    _KNOWN_BY: ClassVar[str] = "this trainer"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def config_hash(self) -> str:
        """Stable 16-hex-digit hash of every field that can change the trained weights."""
        recipe = {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("bookkeeping")
            and not (f.metadata.get("added") and getattr(self, f.name) == f.default)
        }
        payload = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown {cls._KIND} keys {unknown}; {cls._KNOWN_BY} knows {sorted(names)}")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming the allowed values when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _check_at_least(config: Any, minimum: int | float, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"{name}={getattr(config, name)} must be at least {minimum}")


def _check_positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name}={getattr(config, name)} must be positive")


@dataclass(frozen=True)
class RunConfig(ConfigRecord):
    """What every training stage shares: its inputs, the optimizer and the run directory."""

    # --- inputs ---
    teacher: str = option(
        "", "diffusers folder or single-file .safetensors checkpoint (SD1.5 or SDXL)", "PATH"
    )
    prompts: str = option("", "text file, one prompt a line, or a folder of caption .txt files", "PATH")
    teacher_config: str | None = option(
        None, "diffusers folder describing a single-file teacher (default: the shipped configs)", "PATH"
    )
    tokenizer_path: str | None = option(None, "local tokenizer folder for single-file teachers", "PATH")
    comfyui_root: str | None = option(None, "ComfyUI installation to search for tokenizers", "PATH")
    resolution: int | None = option(
        None,
        "image side in pixels; also SDXL's size conditioning (default: native, 512 SD1.5 / 1024 SDXL)",
        "N",
    )

    # --- optimisation ---
    batch_size: int = option(4, "samples per device and micro-step (ours: the paper does not state it)", "N")
    gradient_accumulation: int = option(1, "micro-steps per optimizer step", "N")
    adam_beta1: float = option(0.9, "AdamW first-moment decay (torch default)", "F")
    adam_beta2: float = option(0.999, "AdamW second-moment decay (torch default)", "F")
    adam_weight_decay: float = option(0.0, "AdamW weight decay (diffusers LCM-LoRA value)", "F")
    adam_eps: float = option(1e-8, "AdamW epsilon", "F")
    max_grad_norm: float = option(1.0, "gradient-norm clip (diffusers LCM scripts)", "F")
    optimizer: str = option(
        "adamw",
        "adamw (torch) or adamw8bit: AdamW with 8-bit moments, a quarter of the optimizer memory "
        "(bitsandbytes when installed, else torchao)",
        "{adamw,adamw8bit}",
        added=True,
    )
    mixed_precision: str = option(
        "auto", "auto (bf16 on CUDA when supported, else fp32), no, fp16 or bf16", "{auto,no,fp16,bf16}"
    )
    gradient_checkpointing: bool = option(
        False, "recompute UNet activations in backward: less memory, about 30% slower"
    )
    seed: int = option(
        0, "every random draw (LoRA init, prompt order, noise, timesteps) derives from it", "N"
    )
    nan_patience: int = option(5, "stop after this many non-finite losses in a row (ours)", "N")
    ddp_timeout: int = option(
        3600,
        "seconds a process waits for the others at a collective; covers the main process's sample grids, "
        "evaluation and export (ours; torch's NCCL default is 600)",
        "N",
        bookkeeping=True,
    )

    # --- run directory and bookkeeping (not part of config_hash) ---
    output_dir: str = option("runs/mlcm", "the run directory", "PATH", bookkeeping=True)
    checkpoint_every: int = option(500, "optimizer steps between checkpoints", "N", bookkeeping=True)
    checkpoints_keep: int = option(3, "newest checkpoints kept; 0 keeps all", "N", bookkeeping=True)
    log_every: int = option(10, "optimizer steps between metrics.jsonl rows", "N", bookkeeping=True)
    tensorboard: bool = option(False, "also log to <run>/tensorboard", bookkeeping=True)
    wandb: str = option(
        "off",
        "also log to Weights & Biases (needs `pip install wandb`): offline writes <run>/wandb without a network "
        "(upload later with `wandb sync`), online logs live; project from WANDB_PROJECT, default mlcm",
        "{off,offline,online}",
        bookkeeping=True,
    )
    keep_text_encoders: bool = option(
        False,
        "keep the text encoders in memory after every prompt is encoded (by default they are freed then)",
        bookkeeping=True,
    )
    sample_every: int = option(
        1000, "optimizer steps between sample grids in <run>/samples; 0 = none", "N", bookkeeping=True
    )
    sample_steps: tuple[int, ...] = option(
        (1, 2, 4, 8),
        "step counts of the grids' columns (those above the segments are skipped)",
        "LIST",
        bookkeeping=True,
    )
    sample_prompts: int = option(4, "rows (prompts) of each sample grid", "N", bookkeeping=True)
    export_formats: tuple[str, ...] = option(
        ("kohya",), "files written at the end: kohya, peft, diffusers (comma list)", "LIST", bookkeeping=True
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        _check_at_least(
            self,
            1,
            (
                "batch_size",
                "gradient_accumulation",
                "nan_patience",
                "checkpoint_every",
                "log_every",
                "ddp_timeout",
                "sample_prompts",
            ),
        )
        _check_positive(self, ("adam_eps", "max_grad_norm"))
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("wandb", self.wandb, WANDB_MODES)
        if not 0.0 <= self.adam_weight_decay < 1.0:
            raise ValueError(f"adam_weight_decay={self.adam_weight_decay} must be in [0, 1)")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
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
        if not self.sample_steps or any(steps < 1 for steps in self.sample_steps):
            raise ValueError(
                f"sample_steps={self.sample_steps} must be step counts of at least 1, e.g. 1,2,4,8"
            )


@dataclass(frozen=True)
class DistillConfig(RunConfig):
    """One `python -m mlcm_train distill` run: stage 1 and stage 2 of docs/method.md."""

    trajectories: str | None = option(
        None, "folder of pre-generated trajectory shards for stage 1 (default: online)", "PATH"
    )
    trajectory_fresh_fraction: float = option(
        0.0,
        "with --trajectories: the fraction of stage-1 samples made online instead of read from the cache, a "
        "mix of fresh and reused states (ours; 0 = all cached)",
        "F",
    )
    stage1_states: str = option(
        "mds",
        "how online stage 1 reaches its states: mds (Algorithm 1, one teacher trajectory per sample) or "
        "shared (one trajectory per M samples, one state per segment: fewer teacher calls; ours)",
        "{mds,shared}",
    )

    # --- the method ---
    segments: int = option(8, "M, the paper's segment count", "N")
    skip: int = option(20, "t_n = t_m - skip (paper: 20; the parent method used 1)", "N")
    guidance_scale: float = option(8.0, "teacher CFG w, fixed and baked into the student (paper, SDXL)", "F")
    loss_type: str = option("l2", "l2 (paper) or huber", "{l2,huber}")
    huber_c: float = option(0.001, "Huber constant (LCM/diffusers convention)", "F")
    lpips_path: str | None = option(
        None, "latent-LPIPS weights (.safetensors) for the loss (default: raw latents)", "PATH"
    )
    stages: tuple[int, ...] = option((1, 2), "1 (multistep LCD), 2 (inter-segment) or 1,2", "LIST")
    progressive: tuple[int, ...] = option(
        (), "segment counts of successive rounds, e.g. 8,4,2; replaces --segments (ours)", "LIST"
    )
    stage2_rounds: tuple[int, ...] = option(
        (),
        "segment counts stage 2 runs at in turn after stage 1, its steps split evenly between them. Default: "
        "halve --segments down to 2 (8,4,2 at M = 8), which the stage study measured better than the "
        "paper's single round at 2-8 steps on both demo teachers at the same cost; --stage2-rounds 8 is "
        "the paper's (ours)",
        "LIST",
    )
    stage1_steps: int = option(12000, "optimizer steps of stage 1 (paper, SDXL)", "N")
    stage2_steps: int = option(2000, "optimizer steps of stage 2 (paper)", "N")
    lr_stage1: float = option(1e-4, "AdamW learning rate of stage 1 (paper)", "F")
    lr_stage2: float = option(1e-5, "AdamW learning rate of stage 2 (paper)", "F")
    stage2_q: int = option(4, "student steps that make stage 2's start sample (paper)", "N")
    stage2_p: int = option(3, "teacher CFG-DDIM sub-steps of stage 2's target (paper)", "N")
    stage2_renoise: str = option(
        "same", "stage-2 forward-diffusion noise: the starting noise again, or fresh draws", "{same,fresh}"
    )
    stage2_stage1_weight: float = option(
        0.0,
        "weight of the stage-1 loss kept beside the stage-2 loss during stage 2, as a regulariser of the "
        "segment-wise consistency that 4-8 step sampling relies on (ours; 0 = off, as the paper)",
        "F",
    )
    ema_decay: float | None = option(
        None, "EMA of the LoRA weights as the target (default: the online student, as the paper)", "F"
    )

    # --- LoRA ---
    lora_rank: int = option(64, "LoRA rank (official: 64)", "N")
    lora_alpha: float | None = option(
        OFFICIAL_LORA_ALPHA,
        "LoRA alpha; the applied weight is (alpha / rank) * B @ A. 8 at rank 64 is the official scale 0.125, "
        "the scale the paper's learning rates belong to: with AdamW the step of the applied weight grows "
        "with the scale, so a larger scale wants a proportionally smaller lr. none = rank (scale 1.0)",
        "F",
    )
    lora_targets: tuple[str, ...] = option(
        LORA_TARGET_MODULES, "UNet module patterns (the official 14)", "LIST"
    )
    init_lora: str | None = option(
        None,
        "start from this LoRA (kohya, PEFT or diffusers file of the same rank), e.g. a stage-1 export",
        "PATH",
    )

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            # Frozen dataclass: resolve "none" (= rank) once here so alpha is explicit everywhere after.
            object.__setattr__(self, "lora_alpha", float(self.lora_rank))
        super().__post_init__()

    def _validate(self) -> None:
        super()._validate()
        _check_at_least(
            self, 1, ("segments", "skip", "stage1_steps", "stage2_steps", "stage2_q", "stage2_p", "lora_rank")
        )
        _check_positive(self, ("lr_stage1", "lr_stage2", "lora_alpha", "huber_c"))
        if not 0.0 <= self.trajectory_fresh_fraction <= 1.0:
            raise ValueError(
                f"trajectory_fresh_fraction={self.trajectory_fresh_fraction} must be in [0, 1] (0 = all cached)"
            )
        if self.trajectory_fresh_fraction > 0 and self.trajectories is None:
            raise ValueError(
                "trajectory_fresh_fraction mixes online states into cached ones; give --trajectories DIR"
            )
        if self.stage2_stage1_weight < 0:
            raise ValueError(
                f"stage2_stage1_weight={self.stage2_stage1_weight} must be >= 0 (0 turns the regulariser off)"
            )
        if self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale} must be at least 1 (1 = no CFG)")
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("stage2_renoise", self.stage2_renoise, RENOISE_MODES)
        check_choice("stage1_states", self.stage1_states, STAGE1_STATES)
        if (
            not self.stages
            or any(s not in (1, 2) for s in self.stages)
            or list(self.stages) != sorted(set(self.stages))
        ):
            raise ValueError(f"stages={self.stages} must be 1, 2 or 1,2 (in that order)")
        rounds = self.rounds
        if list(rounds) != sorted(set(rounds), reverse=True) or rounds[-1] < 1:
            raise ValueError(
                f"progressive={self.progressive} must be strictly decreasing segment counts, e.g. 8,4,2"
            )
        if self.stage2_rounds:
            stage2 = list(self.stage2_rounds)
            if self.progressive:
                raise ValueError(
                    "stage2_rounds and progressive both set the rounds; use progressive for rounds of every "
                    "stage, or stage2_rounds for rounds of stage 2 after one stage 1"
                )
            if stage2 != sorted(set(stage2), reverse=True) or stage2[-1] < 1:
                raise ValueError(
                    f"stage2_rounds={self.stage2_rounds} must be strictly decreasing segment counts, e.g. 8,4,2"
                )
        for segments in rounds:
            # Each segment must hold t_m in [lo + skip, hi], so it must be wider than skip.
            edges = segment_boundaries(segments, TRAIN_TIMESTEPS)
            width = min(hi - lo for hi, lo in zip(edges, edges[1:]))
            if width <= self.skip:
                raise ValueError(
                    f"segments={segments} gives segments {width} timesteps wide, not wider than skip={self.skip}; "
                    "use fewer segments or a smaller skip"
                )
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay} must be in (0, 1), or unset for no EMA")
        if not self.lora_targets:
            raise ValueError("lora_targets is empty; give at least one module pattern such as to_q")

    @property
    def rounds(self) -> tuple[int, ...]:
        """Segment counts of the training rounds: the progressive list, or just ``segments``."""
        return self.progressive or (self.segments,)

    @property
    def final_segments(self) -> int:
        return self.rounds[-1]

    @property
    def stage2_round_counts(self) -> tuple[int, ...]:
        """Segment counts of stage 2's rounds after one stage 1: ``stage2_rounds``, or by default --segments
        halved while it stays even, down to 2 (8 -> 8, 4, 2). Rounds that get no step of ``stage2_steps``
        are dropped. Empty with --progressive, whose rounds repeat every stage."""
        if self.progressive:
            return ()
        counts = list(self.stage2_rounds)
        if not counts:
            counts = [self.segments]
            while counts[-1] % 2 == 0 and counts[-1] // 2 >= 2:
                counts.append(counts[-1] // 2)
        return tuple(counts[: max(1, min(len(counts), self.stage2_steps))])

    def phases(self) -> list[tuple[int, int]]:
        """(segments, stage) of every training phase in order: stage 1 at ``segments``, then stage 2 at each
        of ``stage2_round_counts``; with --progressive, each round runs the configured stages."""
        if self.progressive:
            return [(segments, stage) for segments in self.rounds for stage in self.stages]
        first = [(self.segments, 1)] if 1 in self.stages else []
        return first + ([(m, 2) for m in self.stage2_round_counts] if 2 in self.stages else [])

    def phase_steps(self, stage: int, segments: int | None = None) -> int:
        """Optimizer steps of a phase; stage-2 rounds share ``stage2_steps``, the first ones one more each
        when it does not divide evenly."""
        if stage == 1:
            return self.stage1_steps
        rounds = self.stage2_round_counts
        if len(rounds) <= 1 or segments is None:
            return self.stage2_steps
        share, extra = divmod(self.stage2_steps, len(rounds))
        return share + (1 if rounds.index(segments) < extra else 0)

    def phase_lr(self, stage: int) -> float:
        return self.lr_stage1 if stage == 1 else self.lr_stage2

    def sampling_grid(self, phase: int, phase_step: int) -> int:
        """The segment count a LoRA of this run, at (phase, phase_step), is sampled on: the last started
        phase's round; for progressive rounds whose boundaries all lie on the first round's (8, 4, 2), that
        first, finest grid: every round trained consistency between some of its boundaries."""
        plan = self.phases()
        last = min(phase if phase_step > 0 else phase - 1, len(plan) - 1)
        started = [segments for segments, _ in plan[: max(last, 0) + 1]]
        grid = set(segment_boundaries(self.rounds[0], TRAIN_TIMESTEPS))
        nested = all(set(segment_boundaries(m, TRAIN_TIMESTEPS)) <= grid for m in started)
        return self.rounds[0] if nested else started[-1]

    def settings(self, segments: int, num_train_timesteps: int) -> DistillSettings:
        """The method values the losses take, for one round's segment count and the teacher's T."""
        return DistillSettings(
            segments=segments,
            skip=self.skip,
            guidance_scale=self.guidance_scale,
            loss_type=self.loss_type,
            huber_c=self.huber_c,
            num_train_timesteps=num_train_timesteps,
        )


@dataclass(frozen=True)
class RewardConfig(RunConfig):
    """One `python -m mlcm_train reward` run: preference tuning of a distilled LoRA (docs/method.md)."""

    _KIND: ClassVar[str] = "reward config"
    _KNOWN_BY: ClassVar[str] = "the reward stage"

    lora: str = option(
        "",
        "the distilled LoRA: a `distill` export (file or PEFT folder), checkpoint or run directory",
        "PATH",
    )

    # --- the reward ---
    reward: str = option(
        "", "NAME[*WEIGHT][=PATH], comma-separated for a weighted sum, e.g. hpsv2=/models/hps", "SPEC"
    )
    loss: str = option(
        "auto",
        "auto = maximise (no built-in scorer has a calibrated hinge margin), maximise (plain -score, "
        "DRaFT/AlignProp), or hinge (the paper's, against another prompt; needs a scorer that reads the prompt)",
        "{auto,hinge,maximise}",
    )
    margin: float = option(
        16.0, "hinge margin on the own-prompt score (the paper's 16 is calibrated to the MPS scorer)", "F"
    )
    reward_weight: float = option(1.0, "multiplier of the reward loss (ReFL uses 1e-3)", "F")
    student_steps: tuple[int, ...] = option(
        (4,), "student step counts, one drawn per iteration (ours; paper q=4)", "LIST"
    )
    grad_steps: int = option(1, "the last K sampling steps carry gradients (DRaFT-K; 1 is ReFL-style)", "N")
    segments: int | None = option(None, "segment count (default: the LoRA's metadata, else 8)", "N")
    vae_checkpointing: bool = option(True, "gradient-checkpoint the VAE decoder (less memory, same values)")

    # --- the anchor: a consistency term that keeps the distillation ---
    anchor_weight: float = option(
        1.0, "weight of the stage-2 loss against the frozen teacher as an anchor; 0 = off", "F"
    )
    guidance_scale: float | None = option(
        None, "teacher CFG of the anchor (default: the LoRA's training value, else 8)", "F"
    )
    anchor_q: int = option(4, "student steps of the anchor's start sample (stage 2 q, paper)", "N")
    anchor_p: int = option(3, "teacher sub-steps of the anchor's target (stage 2 p, paper)", "N")

    # --- optimisation (the shared fields above, with the reward stage's defaults) ---
    iterations: int = option(500, "optimizer steps (paper)", "N")
    batch_size: int = option(8, "samples per device and micro-step (paper: 8)", "N")
    lr: float = option(1e-5, "AdamW learning rate (paper)", "F")

    # --- guarding against reward hacking ---
    heldout: str | None = option(
        None, "a second reward spec, or fd=<demo classifier folder> (default: no held-out measure)", "SPEC"
    )
    heldout_prompts: str | None = option(
        None, "prompts of the evaluation set (default: the training prompts)", "PATH"
    )
    eval_every: int = option(
        50, "optimizer steps between evaluations (also one before training and one at the end)", "N"
    )
    eval_samples: int = option(16, "images per evaluation and step count (fixed prompts and seeds)", "N")
    eval_steps: tuple[int, ...] = option(
        (), "student step counts evaluated (default: --student-steps)", "LIST"
    )
    keep_best: str = option(
        "guarded",
        "exported LoRA: guarded (best reward whose held-out measure stays within the tolerance), "
        "heldout, reward or last",
        "{guarded,heldout,reward,last}",
    )
    heldout_tolerance: float = option(
        0.1, "guarded: how much worse than at the start the held-out measure may get (0.1 = 10%)", "F"
    )

    output_dir: str = option("runs/mlcm_reward", "the run directory", "PATH", bookkeeping=True)
    checkpoint_every: int = option(100, "optimizer steps between checkpoints", "N", bookkeeping=True)

    def _validate(self) -> None:
        super()._validate()
        _check_at_least(
            self, 1, ("grad_steps", "anchor_q", "anchor_p", "iterations", "eval_every", "eval_samples")
        )
        _check_positive(self, ("lr",))
        _check_at_least(self, 0, ("anchor_weight", "reward_weight"))
        check_choice("loss", self.loss, REWARD_LOSSES)
        check_choice("keep_best", self.keep_best, KEEP_BEST_RULES)
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

    @property
    def evaluated_steps(self) -> tuple[int, ...]:
        """The step counts every evaluation samples at."""
        return self.eval_steps or tuple(sorted(set(self.student_steps)))

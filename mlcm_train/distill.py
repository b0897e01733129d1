"""The distill stage: stage 1 (multistep latent consistency) and stage 2 (inter-segment consistency), in rounds.

``train_distill(config)`` is ``python -m mlcm_train distill``: it opens the run, attaches the LoRA student and
hands ``DistillStage`` to the loop of ``mlcm_train.run.loop``. The stage supplies one phase per
(round's segment count, stage) and the loss of a micro-batch: stage 1 on states from the multistep
denoising strategy (online, or from pre-generated trajectory shards), stage 2 on q-step student samples
(docs/method.md, "Stage 1" and "Stage 2"). It also owns the exported LoRA's metadata and the
``trajectories`` command that pre-generates stage 1's states.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlcm.lora import MLCMLoraMetadata
from mlcm.segments import segment_boundaries
from mlcm_train.config import DistillConfig
from mlcm_train.data.order import EpochOrder, derive_seed, sample_generator
from mlcm_train.data.trajectories import (
    TrajectoryDataset,
    generate_trajectory_shards,
    prompts_hash,
    teacher_fingerprint,
    trajectory_identity,
)
from mlcm_train.method.consistency import stage1_loss, stage2_loss
from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.teacher_ddim import mds_states, shared_trajectory_states
from mlcm_train.method.timesteps import sample_stage1_timesteps, shared_stage1_timesteps
from mlcm_train.models.lpips import load_latent_lpips
from mlcm_train.models.student import LoraEMA, attach_lora, load_lora_file, lora_state_dict
from mlcm_train.run.checkpoint import Checkpoint, TrainState
from mlcm_train.run.export import LoraShape, write_lora
from mlcm_train.run.loop import LoopResult, LossHook, LossTerm, Phase, train_loop
from mlcm_train.run.setup import Run, UnetRoles
from mlcm_train.run.timer import StepTimer, timed

log = logging.getLogger(__name__)

STAGE_NAMES = {1: "mlcd", 2: "inter_segment"}  # names MLCMLoraMetadata.stages uses for our two stages
TRAINER_NAME = "mlcm_train"


def train_distill(
    config: DistillConfig,
    *,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    loss_hook: LossHook | None = None,
    profile: bool = False,
) -> LoopResult:
    """Run (or continue) a distillation; ``stop_after`` ends after that many global steps with a checkpoint."""
    run = Run.open(config, resume)
    run.load()
    unet = run.teacher.unet
    params = attach_lora(
        unet,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        targets=config.lora_targets,
        weight_dtype=run.weight_dtype,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=derive_seed(config.seed, "lora_init"),
    )
    if config.init_lora is not None and run.saved is None:
        count = load_lora_file(unet, config.init_lora, rank=config.lora_rank, alpha=config.lora_alpha)
        log.info("LoRA initialised from %s (%d modules)", config.init_lora, count)
    ema = LoraEMA(unet, config.ema_decay) if config.ema_decay is not None else None
    state = run.start_state(unet, ema)
    roles = UnetRoles(run.accelerator, unet, run.accelerator.prepare_model(unet), ema)
    log.info(
        "teacher %s (%s), %d prompts, LoRA rank %d alpha %g (scale %g), %d trainable parameters, %s weights",
        config.teacher,
        run.teacher.family,
        len(run.prompts),
        config.lora_rank,
        config.lora_alpha,
        config.lora_alpha / config.lora_rank,
        sum(p.numel() for p in params),
        run.weight_dtype,
    )
    timer = StepTimer(profile, run.device)
    stage = DistillStage(run, roles, timer)
    return train_loop(
        run, roles, params, stage, state, timer=timer, stop_after=stop_after, loss_hook=loss_hook
    )


@dataclass(frozen=True)
class _PhasePlan:
    """What a distill phase draws from: its method values, boundaries and sample orders."""

    stage: int
    settings: DistillSettings
    boundaries: list[int]
    order: EpochOrder  # sample -> prompt
    cache_order: EpochOrder | None  # sample -> pre-generated state, when the cache serves this phase


class DistillStage:
    """The distill stage for the loop: one phase per (segments, stage), the loss of TLCM Eq. 7 or Eq. 9-10."""

    extendable = False  # phase-boundary checkpoints hold each stage's LoRA (the demo reads them)

    def __init__(self, run: Run, roles: UnetRoles, timer: StepTimer) -> None:
        self.run, self.roles, self.config = run, roles, run.config
        self.student = timed(timer, "student_forward_backward", roles.student)
        self.target = timed(timer, "teacher_target", roles.target)
        self.teacher_step = timed(timer, "teacher_target", roles.teacher)
        self.timer = timer
        self.feature_fn = _feature_fn(self.config, run.device)
        self.trajectories = _open_trajectories(run)
        num_steps = len(run.teacher.alphas_cumprod)
        self.alphas_cumprod = run.alphas_cumprod
        self.phases, self._plans = [], []
        for index, (segments, stage) in enumerate(self.config.phases()):
            cached = self.trajectories is not None and self.trajectories.segments == segments and stage == 1
            self._plans.append(
                _PhasePlan(
                    stage=stage,
                    settings=self.config.settings(segments, num_steps),
                    boundaries=segment_boundaries(segments, num_steps),
                    order=EpochOrder(len(run.prompts), self.config.seed, index),
                    cache_order=EpochOrder(len(self.trajectories), self.config.seed, index)
                    if cached
                    else None,
                )
            )
            self.phases.append(
                Phase(
                    index=index,
                    steps=self.config.phase_steps(stage, segments),
                    lr=self.config.phase_lr(stage),
                    segments=segments,
                    label=f"stage {stage} M={segments}",
                    log={"stage": stage, "segments": segments},
                )
            )

    def terms(self, phase: Phase, samples: range, step: int) -> list[LossTerm]:
        plan = self._plans[phase.index]
        if plan.stage == 1:
            return [lambda: self.stage1(phase.index, plan, samples)]
        terms = [lambda: self.stage2(phase.index, plan, samples)]
        weight = self.config.stage2_stage1_weight
        if weight > 0:
            terms.append(lambda: self.stage1_regulariser(phase.index, plan, samples, weight))
        return terms

    def stage1_regulariser(
        self, index: int, plan: _PhasePlan, samples: range, weight: float
    ) -> tuple[Tensor, dict[str, float]]:
        """The stage-1 loss on fresh online states during stage 2, times ``weight`` (its own random stream)."""
        regulariser = replace(plan, stage=1, cache_order=None)
        loss, stats = self.stage1(index, regulariser, samples, stream="stage1_regulariser")
        return weight * loss, {"stage1_loss": stats["loss"]}

    def stage1(
        self, index: int, plan: _PhasePlan, samples: range, stream: str | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """TLCM Eq. 7 on states at t_m: pre-generated (with ``--trajectory-fresh-fraction``, some made online
        instead), from shared trajectories, or from the multistep denoising strategy (Algorithm 1)."""
        phase_key = index if stream is None else f"{index}:{stream}"
        uncond = self.run.uncond(len(samples))
        z_tn = None  # the teacher step to t_n, when the states came with it
        if plan.cache_order is None and self.config.stage1_states == "shared":
            prompts, (z_tm, t_m, t_n, lo), z_tn = self._shared_states(phase_key, plan, samples)
        elif plan.cache_order is None:
            prompts, (z_tm, t_m, t_n, lo) = self._online_states(phase_key, plan, samples)
        else:
            fraction = self.config.trajectory_fresh_fraction
            fresh = [i for i in samples if fraction > 0 and self._made_online(index, i, fraction)]
            chosen = set(fresh)
            cached = [i for i in samples if i not in chosen]
            # Cached samples first, then the online ones: the loss is a batch mean, so the order is free.
            parts = [self._cached_states(plan, cached)] if cached else []
            parts += [self._online_states(phase_key, plan, fresh)] if fresh else []
            prompts = [p for part, _ in parts for p in part]
            z_tm, t_m, t_n, lo = (torch.cat(column) for column in zip(*(states for _, states in parts)))
        cond = self.run.cond(prompts)
        return stage1_loss(
            self.student,
            self.target,
            self.teacher_step,
            z_tm,
            t_m,
            t_n,
            lo,
            cond,
            uncond,
            settings=plan.settings,
            alphas_cumprod=self.alphas_cumprod,
            feature_fn=self.feature_fn,
            z_tn=z_tn,
        )

    def _made_online(self, index: int, sample: int, fraction: float) -> bool:
        """Whether ``sample`` of phase ``index`` is made online instead of read from the cache (its own draw)."""
        draw = torch.rand(1, generator=sample_generator(self.config.seed, f"{index}:online", sample))
        return bool(draw < fraction)

    def _cached_states(self, plan: _PhasePlan, samples: Sequence[int]) -> tuple[list[int], tuple]:
        """(prompt indices, (z_tm, t_m, t_n, lo)) of ``samples`` pre-generated, in the cache's epoch order."""
        device = self.run.device
        cached = self.trajectories.batch([plan.cache_order(i) for i in samples])
        z_tm, t_m, t_n, lo = (cached[k].to(device) for k in ("z_tm", "t_m", "t_n", "lo"))
        return [int(p) for p in cached["prompt_index"]], (z_tm.float(), t_m, t_n, lo)

    def _online_states(
        self, phase_key: int | str, plan: _PhasePlan, samples: Sequence[int]
    ) -> tuple[list[int], tuple]:
        """(prompt indices, (z_tm, t_m, t_n, lo)) made online: shared trajectories, or Algorithm 1 per sample."""
        if self.config.stage1_states == "shared":
            return self._shared_states(phase_key, plan, samples)[:2]
        run = self.run
        generators = [sample_generator(self.config.seed, phase_key, i) for i in samples]
        prompts = [plan.order(i) for i in samples]
        cond = run.cond(prompts)
        draws = [sample_stage1_timesteps(1, plan.boundaries, self.config.skip, g) for g in generators]
        segment, t_m, t_n, lo = (torch.cat(parts).to(run.device) for parts in zip(*draws))
        with self.timer.charge("teacher_trajectory"):
            z_tm = mds_states(
                self.roles.teacher,
                run.noise(generators),
                t_m,
                segment,
                cond,
                run.uncond(len(samples)),
                settings=plan.settings,
                alphas_cumprod=self.alphas_cumprod,
                boundaries=plan.boundaries,
            )
        return prompts, (z_tm, t_m, t_n, lo)

    def _shared_states(
        self, phase_key: int | str, plan: _PhasePlan, samples: Sequence[int]
    ) -> tuple[list[int], tuple, Tensor]:
        """Stage-1 states from shared trajectories: sample i is column i mod M of trajectory i // M.
        Returns (prompt indices, (z_tm, t_m, t_n, lo), z_tn): the chain's teacher calls also give each
        state's teacher step to t_n.

        A trajectory's noise, prompt and times depend only on its own index, so any split of the samples
        over micro-batches and processes gives the same states; a trajectory cut by a split is stepped
        again as far as its samples here need.
        """
        run, segments = self.run, plan.settings.segments
        trajectories = sorted({i // segments for i in samples})
        generators = [sample_generator(self.config.seed, f"{phase_key}:shared", j) for j in trajectories]
        draws = [shared_stage1_timesteps(plan.boundaries, self.config.skip, g) for g in generators]
        noise = run.noise(generators)
        segment, t_m, t_n, lo = (torch.stack(parts).to(run.device) for parts in zip(*draws))
        columns = max(i % segments for i in samples) + 1
        prompts = [plan.order(j) for j in trajectories]
        with self.timer.charge("teacher_trajectory"):
            states, steps = shared_trajectory_states(
                self.roles.teacher,
                noise,
                t_m[:, :columns],
                run.cond(prompts),
                run.uncond(len(trajectories)),
                settings=plan.settings,
                alphas_cumprod=self.alphas_cumprod,
                top=plan.boundaries[0],
                t_n=t_n[:, :columns],
            )
        row = {j: r for r, j in enumerate(trajectories)}
        rows = torch.tensor([row[i // segments] for i in samples], device=run.device)
        cols = torch.tensor([i % segments for i in samples], device=run.device)
        picked = (states[rows, cols], t_m[rows, cols], t_n[rows, cols], lo[rows, cols])
        return [plan.order(i // segments) for i in samples], picked, steps[rows, cols]

    def stage2(self, index: int, plan: _PhasePlan, samples: range) -> tuple[Tensor, dict[str, float]]:
        """TLCM Eq. 9-10 (Algorithm 2) between adjacent segment boundaries."""
        generators = [sample_generator(self.config.seed, index, i) for i in samples]
        return stage2_loss(
            self.student,
            self.target,
            self.teacher_step,
            self.run.noise(generators),
            self.run.cond([plan.order(i) for i in samples]),
            self.run.uncond(len(samples)),
            settings=plan.settings,
            alphas_cumprod=self.alphas_cumprod,
            boundaries=plan.boundaries,
            q=self.config.stage2_q,
            p=self.config.stage2_p,
            renoise=self.config.stage2_renoise,
            generator=generators,  # per sample: t_m and fresh noise follow the sample, not the batch
            feature_fn=self.feature_fn,
        )

    def before_step(self, phase: Phase, step: int) -> None:
        pass

    def after_phase(self, phase: Phase) -> None:
        pass

    def nan_hint(self, phase: Phase) -> str:
        return (
            "likely causes: fp16 overflow (use --mixed-precision bf16 or no), a learning rate too high "
            f"(now {phase.lr:g}), a teacher checkpoint with NaN weights, or an SDXL VAE/teacher run in fp16"
        )

    def export(self, state: TrainState) -> list[Path]:
        return export_distilled(
            lora_state_dict(self.roles.unet), self.config, state, self.run.run_dir / "export"
        )


# --- the exported LoRA ----------------------------------------------------------------------------------------


def completed_stages(config: DistillConfig, state: TrainState) -> tuple[str, ...]:
    """Stage names of the phases that have run (fully or partly), in order; rounds add their segments."""
    names = []
    for index, (segments, stage) in enumerate(config.phases()):
        if index < state.phase or (index == state.phase and state.phase_step > 0):
            name = STAGE_NAMES[stage]
            # Rounds name their segment count: every phase of --progressive, stage 2's when it has several.
            rounds = config.progressive or (stage == 2 and len(config.stage2_round_counts) > 1)
            names.append(f"{name}@{segments}" if rounds else name)
    return tuple(names)


def build_metadata(config: DistillConfig, state: TrainState) -> MLCMLoraMetadata:
    """Our safetensors metadata: segments, step counts, family, stages, prompt count, config hash, config."""
    segments = config.sampling_grid(state.phase, state.phase_step)
    return MLCMLoraMetadata(
        segments=segments,
        base_family=state.family,
        recommended_steps=tuple(s for s in config.sample_steps if s <= segments) or None,
        supported_steps=tuple(range(1, segments + 1)),
        stages=completed_stages(config, state),
        training={
            "trainer": TRAINER_NAME,
            "config_hash": config.config_hash(),
            "global_step": state.global_step,
            "prompt_count": state.prompt_count,
            **state.spending(),
            "lora_rank": config.lora_rank,
            "lora_alpha": config.lora_alpha,
            "guidance_scale": config.guidance_scale,
            "config": config.to_dict(),
        },
    )


def export_distilled(
    lora_state: dict[str, Tensor],
    config: DistillConfig,
    state: TrainState,
    out_dir: str | Path,
    *,
    formats: tuple[str, ...] | None = None,
    name: str | None = None,
) -> list[Path]:
    """Write the distilled LoRA in each format (default: the config's); returns the written paths."""
    meta = build_metadata(config, state)
    return write_lora(
        lora_state,
        LoraShape(config.lora_rank, float(config.lora_alpha), tuple(config.lora_targets)),
        meta,
        out_dir,
        stem=name or f"mlcm_{state.family}_{meta.segments}seg",
        formats=formats or config.export_formats,
        source=f"trained with lora_alpha={config.lora_alpha:g}, r={config.lora_rank}",
        record={"config": config.to_dict(), "config_hash": config.config_hash()},
    )


def export_distill_checkpoint(
    saved: Checkpoint, *, out_dir: str | Path | None = None, formats=None, name: str | None = None
) -> list[Path]:
    """``python -m mlcm_train export`` of a distill checkpoint: its LoRA, without the teacher."""
    config = DistillConfig.from_dict(saved.config)
    target = Path(out_dir) if out_dir is not None else saved.path.parent.parent / "export"
    return export_distilled(saved.lora, config, saved.state, target, formats=formats, name=name)


# --- inputs of stage 1 ------------------------------------------------------------------------------------------


def _feature_fn(config: DistillConfig, device: torch.device):
    """Latent-LPIPS features for the loss (paper option), or None to compare raw latents."""
    if config.lpips_path is None:
        return None
    model, _ = load_latent_lpips(config.lpips_path, device=device)
    return model.features


def trajectory_expectation(run: Run, segments: int) -> dict[str, Any]:
    """The identity a trajectory folder must have to stand in for this run's online states."""
    config, teacher = run.config, run.teacher
    num_steps = len(teacher.alphas_cumprod)
    return trajectory_identity(
        settings=config.settings(segments, num_steps),
        boundaries=segment_boundaries(segments, num_steps),
        latent_shape=run.latent_shape(),
        alphas_cumprod=teacher.alphas_cumprod,
        teacher_hash=teacher_fingerprint(config.teacher),
        prompts_hash=prompts_hash(run.prompts),
    )


def _open_trajectories(run: Run) -> TrajectoryDataset | None:
    """The pre-generated states folder, checked against this run; None for online trajectories."""
    config = run.config
    if config.trajectories is None:
        return None
    if 1 not in config.stages:
        raise ValueError(
            "--trajectories feeds stage 1 only, but this run has no stage 1; drop --trajectories"
        )
    dataset = TrajectoryDataset(config.trajectories)
    if dataset.segments not in config.rounds:
        raise ValueError(
            f"{config.trajectories} holds states for {dataset.segments} segments but this run trains "
            f"{list(config.rounds)}; regenerate them with --segments {config.rounds[0]}"
        )
    dataset = TrajectoryDataset(config.trajectories, expect=trajectory_expectation(run, dataset.segments))
    log.info("stage 1 reads %d pre-generated states from %s", len(dataset), config.trajectories)
    return dataset


def generate_trajectories(config: DistillConfig, out: Path, *, samples: int, shard_size: int) -> None:
    """``python -m mlcm_train trajectories``: stage-1 teacher states for the first round, shared by the ranks."""
    run = Run.inputs_only(config)
    segments = config.rounds[0]
    identity = trajectory_expectation(run, segments)

    @torch.no_grad()
    def teacher_eps(z, t, cond):
        with run.accelerator.autocast():
            return run.teacher.unet(z, t, **cond.unet_kwargs(), return_dict=False)[0].float()

    generate_trajectory_shards(
        teacher_eps,
        lambda index: (run.cond(index), run.uncond(len(index))),
        out,
        num_samples=samples,
        shard_size=shard_size,
        num_prompts=len(run.prompts),
        settings=config.settings(segments, len(run.teacher.alphas_cumprod)),
        alphas_cumprod=run.alphas_cumprod,
        boundaries=identity["boundaries"],
        latent_shape=identity["latent_shape"],
        seed=config.seed,
        teacher_hash=identity["teacher_hash"],
        prompts_hash=identity["prompts_hash"],
        batch_size=config.batch_size,
        device=run.device,
        rank=run.accelerator.process_index,
        world_size=run.accelerator.num_processes,
        progress=run.is_main,
    )
    run.accelerator.wait_for_everyone()
    log.info("trajectory states for %d segments in %s; train with --trajectories %s", segments, out, out)

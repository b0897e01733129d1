"""The `distill` training loop: teacher + LoRA student on one UNet, stage 1 then stage 2, through accelerate.

Read top to bottom: set up (accelerator, run directory, teacher, prompts, LoRA), then for every phase
(a round's segment count x a stage) an optimizer-step loop: build the batch, compute the loss of
``mlcm_train.distill``, skip non-finite steps, update, log, checkpoint, sample; export at the end.

Exact resume: every random draw of the data (prompt order, noise, timesteps) comes from a generator seeded
by (seed, phase, sample index), so the data of step k is a pure function of k. A checkpoint therefore
needs only the LoRA, optimizer, EMA, step counters and global RNG states to continue bit-for-bit; and the
same global batch gives the same samples whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlcm.segments import segment_boundaries

from .checkpoint import (
    TrainState,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from .config import DistillConfig
from .data_order import EpochOrder, derive_seed, sample_generator
from .distill import DistillSettings, mds_states, sample_stage1_timesteps, stage1_loss, stage2_loss
from .export import export_lora
from .run_inputs import (
    WEIGHT_DTYPES,
    load_feature_fn,
    load_inputs,
    make_accelerator,
    open_trajectories,
    prompt_conditioning,
    resolve_mixed_precision,
)
from .run_log import RunLog
from .sample_grid import write_training_samples
from .step_timer import StepTimer, timed
from .student import (
    LoraEMA,
    adapters_disabled,
    attach_lora,
    load_lora_file,
    load_lora_state_dict,
    lora_state_dict,
)

log = logging.getLogger(__name__)

LossHook = Callable[[int, Tensor], Tensor]  # (global_step, loss) -> loss; tests inject NaN through it


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for ``nan_patience`` optimizer steps in a row."""


@dataclass(frozen=True)
class Phase:
    """One training phase: a stage at a segment count, with its sample order."""

    index: int
    stage: int
    settings: DistillSettings
    boundaries: list[int]
    order: EpochOrder  # sample -> prompt
    cache_order: EpochOrder | None  # sample -> pre-generated state, when the cache serves this phase


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainState
    checkpoint: Path | None
    exported: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer step (NaN where skipped)
    # Seconds per category and the number of timed steps ("steps"); with profile=True the first step is
    # left out and CUDA is synchronised around each category.
    timings: dict[str, float] = field(default_factory=dict)
    unet: torch.nn.Module | None = None  # the UNet with the trained LoRA attached (this process's copy)


def train(
    config: DistillConfig,
    *,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    loss_hook: LossHook | None = None,
    profile: bool = False,
) -> TrainResult:
    """Run (or continue) a distillation; ``stop_after`` ends after that many global steps with a checkpoint."""
    # --- devices and the run directory -------------------------------------------------------------
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    accelerator = make_accelerator(mixed_precision)
    is_main = accelerator.is_main_process
    run_dir = Path(config.output_dir)
    saved = load_checkpoint(resume) if resume is not None else None
    if saved is None and list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already holds checkpoints; pass --resume {run_dir} to continue that run "
            "or choose another --output-dir"
        )
    if saved is not None and saved.state.config_hash != config.config_hash():
        changed = sorted(k for k, v in config.to_dict().items() if saved.config.get(k) != v)
        log.warning(
            "resuming with a changed recipe (%s); the continuation will differ from an uninterrupted run",
            ", ".join(changed),
        )
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json() + "\n", encoding="utf-8")

    # --- teacher, prompts, embeddings, the LoRA student --------------------------------------------
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    teacher, prompts, embeddings = load_inputs(config, accelerator.device, weight_dtype)
    unet = teacher.unet
    params = attach_lora(
        unet,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        targets=config.lora_targets,
        weight_dtype=weight_dtype,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=derive_seed(config.seed, "lora_init"),
    )
    if config.init_lora is not None and saved is None:
        count = load_lora_file(unet, config.init_lora, rank=config.lora_rank, alpha=config.lora_alpha)
        log.info("LoRA initialised from %s (%d modules)", config.init_lora, count)
    ema = LoraEMA(unet, config.ema_decay) if config.ema_decay is not None else None
    state = TrainState(0, 0, 0, 0, teacher.family, len(prompts), 0, config.config_hash())
    if saved is not None:
        load_lora_state_dict(unet, saved.lora)
        if ema is not None and saved.ema is not None:
            ema.load_state_dict(saved.ema)
        state = saved.state
        state.config_hash = config.config_hash()
        restore_rng(saved.rng)
        log.info("resuming from %s at global step %d", saved.path, state.global_step)
    model = accelerator.prepare_model(unet)
    batch, processes, accumulation = (
        config.batch_size,
        accelerator.num_processes,
        config.gradient_accumulation,
    )
    global_batch = batch * processes * accumulation
    log.info(
        "teacher %s (%s), %d prompts, LoRA rank %d alpha %g (scale %g), %d trainable parameters, %s precision",
        config.teacher,
        teacher.family,
        len(prompts),
        config.lora_rank,
        config.lora_alpha,
        config.lora_alpha / config.lora_rank,
        sum(p.numel() for p in params),
        mixed_precision,
    )
    log.info(
        "effective batch = %d per device x %d processes x %d accumulation = %d samples per optimizer step",
        batch,
        processes,
        accumulation,
        global_batch,
    )

    # --- eps functions: one UNet, three roles -------------------------------------------------------
    timer = StepTimer(profile, accelerator.device)
    alphas_cumprod = teacher.alphas_cumprod.to(accelerator.device)

    def call_unet(module: torch.nn.Module, z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with accelerator.autocast():
            return module(z, t, **cond.unet_kwargs(), return_dict=False)[0].float()

    def student_eps(z: Tensor, t: Tensor, cond: Any) -> Tensor:
        return call_unet(model, z, t, cond)

    def target_eps(z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.no_grad(), ema.applied() if ema is not None else contextlib.nullcontext():
            return call_unet(unet, z, t, cond)

    def teacher_eps(z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.no_grad(), adapters_disabled(unet):
            return call_unet(unet, z, t, cond)

    uncond_one = teacher.uncond(1, config.resolution).to(accelerator.device)

    def conditioning(prompt_ids: Any) -> Any:
        return prompt_conditioning(teacher, embeddings, prompt_ids, config.resolution, accelerator.device)

    latent_shape = tuple(teacher.latent_shape(1, config.resolution))[1:]
    feature_fn = load_feature_fn(config, accelerator.device)
    trajectories = open_trajectories(config, teacher, prompts)

    def batch_loss(phase: Phase, samples: range) -> tuple[Tensor, dict[str, float]]:
        """The phase's loss on these global sample indices (stage 1: TLCM Eq. 7; stage 2: Eq. 10)."""
        generators = [sample_generator(config.seed, phase.index, i) for i in samples]
        uncond = uncond_one.repeat(len(samples))
        if phase.stage == 1 and phase.cache_order is not None:
            cached = trajectories.batch([phase.cache_order(i) for i in samples])
            cond = conditioning(cached["prompt_index"])
            z_tm, t_m, t_n, lo = (cached[k].to(accelerator.device) for k in ("z_tm", "t_m", "t_n", "lo"))
            z_tm = z_tm.float()
        elif phase.stage == 1:
            cond = conditioning([phase.order(i) for i in samples])
            segment, t_m, t_n, lo = (
                torch.cat(parts).to(accelerator.device)
                for parts in zip(
                    *(sample_stage1_timesteps(1, phase.boundaries, config.skip, g) for g in generators)
                )
            )
            noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
            with timer.charge("teacher_trajectory"):
                z_tm = mds_states(
                    teacher_eps,
                    noise.to(accelerator.device),
                    t_m,
                    segment,
                    cond,
                    uncond,
                    settings=phase.settings,
                    alphas_cumprod=alphas_cumprod,
                    boundaries=phase.boundaries,
                )
        if phase.stage == 1:
            loss, stats = stage1_loss(
                timed(timer, "student_forward_backward", student_eps),
                timed(timer, "teacher_target", target_eps),
                timed(timer, "teacher_target", teacher_eps),
                z_tm,
                t_m,
                t_n,
                lo,
                cond,
                uncond,
                settings=phase.settings,
                alphas_cumprod=alphas_cumprod,
                feature_fn=feature_fn,
            )
        else:
            cond = conditioning([phase.order(i) for i in samples])
            noise = torch.stack([torch.randn(latent_shape, generator=g) for g in generators])
            loss, stats = stage2_loss(
                timed(timer, "student_forward_backward", student_eps),
                timed(timer, "teacher_target", target_eps),
                timed(timer, "teacher_target", teacher_eps),
                noise.to(accelerator.device),
                cond,
                uncond,
                settings=phase.settings,
                alphas_cumprod=alphas_cumprod,
                boundaries=phase.boundaries,
                q=config.stage2_q,
                p=config.stage2_p,
                renoise=config.stage2_renoise,
                generator=generators,  # per sample: t_m and fresh noise follow the sample, not the batch
                feature_fn=feature_fn,
            )
        return loss, stats

    # --- the phases ------------------------------------------------------------------------------------
    losses: list[float] = []
    warmed_up = False
    last_checkpoint = saved.path if saved is not None else None

    def checkpoint(optimizer: torch.optim.Optimizer | None) -> None:
        nonlocal last_checkpoint
        if is_main:
            last_checkpoint = save_checkpoint(
                run_dir,
                state=state,
                config=config.to_dict(),
                lora=lora_state_dict(unet),
                optimizer=optimizer.state_dict() if optimizer is not None else {},
                rng=capture_rng(),
                ema=ema.state_dict() if ema is not None else None,
            )
            prune_checkpoints(run_dir, config.checkpoints_keep)
            log.info("checkpoint %s", last_checkpoint)
        accelerator.wait_for_everyone()

    run_log = RunLog(run_dir, tensorboard=config.tensorboard) if is_main else None
    phases = config.phases()
    for phase_index, (segments, stage) in enumerate(phases):
        if phase_index < state.phase:
            continue
        steps = config.phase_steps(stage)
        settings = DistillSettings(
            segments=segments,
            skip=config.skip,
            guidance_scale=config.guidance_scale,
            loss_type=config.loss_type,
            huber_c=config.huber_c,
            num_train_timesteps=len(alphas_cumprod),
        )
        boundaries = segment_boundaries(segments, len(alphas_cumprod))
        optimizer = torch.optim.AdamW(
            params,
            lr=config.phase_lr(stage),
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            eps=config.adam_eps,
        )
        if saved is not None and saved.state.phase == phase_index and saved.state.phase_step > 0:
            optimizer.load_state_dict(saved.optimizer)
        optimizer = accelerator.prepare_optimizer(optimizer)
        use_cache = trajectories is not None and trajectories.segments == segments and stage == 1
        phase = Phase(
            index=phase_index,
            stage=stage,
            settings=settings,
            boundaries=boundaries,
            order=EpochOrder(len(prompts), config.seed, phase_index),
            cache_order=EpochOrder(len(trajectories), config.seed, phase_index) if use_cache else None,
        )
        log.info(
            "phase %d/%d: stage %d, %d segments, %d steps",
            phase_index + 1,
            len(phases),
            stage,
            segments,
            steps,
        )

        progress = _progress(steps, state.phase_step, f"stage {stage} M={segments}", disable=not is_main)

        while state.phase_step < steps:
            if stop_after is not None and state.global_step >= stop_after:
                checkpoint(optimizer)
                progress.close()
                return TrainResult(run_dir, state, last_checkpoint, [], losses, dict(timer.seconds), unet)
            step_start = time.perf_counter()
            loss_sum = torch.zeros((), device=accelerator.device)
            skipped = False
            step_stats: dict[str, float] = {}
            for micro in range(accumulation):
                first = (
                    state.phase_step * global_batch
                    + micro * batch * processes
                    + accelerator.process_index * batch
                )
                samples = range(first, first + batch)
                sync = micro == accumulation - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    loss, stats = batch_loss(phase, samples)
                    if loss_hook is not None:
                        loss = loss_hook(state.global_step, loss)
                    # All processes must agree to skip, or DDP would wait forever for the others' gradients.
                    bad = accelerator.reduce(
                        torch.isfinite(loss.detach()).logical_not().float().reshape(1), "sum"
                    )
                    if bad.item() > 0:
                        skipped = True
                        break
                    loss_sum += loss.detach().float()
                    step_stats = stats
                    with timer.charge("student_forward_backward"):
                        accelerator.backward(loss / accumulation)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                state.nan_streak += 1
                losses.append(math.nan)
                log.warning(
                    "non-finite loss at global step %d; skipped the update (%d in a row)",
                    state.global_step,
                    state.nan_streak,
                )
                if state.nan_streak >= config.nan_patience:
                    raise NonFiniteLossError(
                        f"the loss was NaN/inf for {state.nan_streak} steps in a row (up to global step "
                        f"{state.global_step}); likely causes: fp16 overflow (use --mixed-precision bf16 or no), "
                        f"a learning rate too high (now {config.phase_lr(stage):g}), a teacher checkpoint with "
                        "NaN weights, or an SDXL VAE/teacher run in fp16. The last good checkpoint is in "
                        f"{run_dir / 'checkpoints'}"
                    )
            else:
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
                state.nan_streak = 0
                losses.append(accelerator.reduce(loss_sum, "mean").item() / accumulation)
            timer.seconds["total"] += time.perf_counter() - step_start
            timer.seconds["steps"] += 1
            if profile and not warmed_up:  # the first step pays one-off costs (allocations, lazy init)
                timer.seconds.clear()
                warmed_up = True
            state.phase_step += 1
            state.global_step += 1
            state.cursor = state.phase_step * global_batch
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4g}")
            if run_log is not None and (
                state.global_step % config.log_every == 0 or state.phase_step == steps
            ):
                row = {
                    "global_step": state.global_step,
                    "phase": phase_index,
                    "stage": stage,
                    "segments": segments,
                    "loss": losses[-1],
                    "lr": config.phase_lr(stage),
                    **{k: v for k, v in step_stats.items() if k != "loss"},
                }
                run_log.write(row)
            if state.global_step % config.checkpoint_every == 0 and state.phase_step < steps:
                checkpoint(optimizer)
            if is_main and config.sample_every and state.global_step % config.sample_every == 0:
                write_training_samples(
                    target_eps,
                    teacher,
                    embeddings,
                    prompt_count=state.prompt_count,
                    rows=config.sample_prompts,
                    step_counts=config.sample_steps,
                    segments=segments,
                    resolution=config.resolution,
                    alphas_cumprod=alphas_cumprod,
                    path=run_dir / "samples" / f"step-{state.global_step:07d}.png",
                    seed=config.seed,
                )
        progress.close()
        state.phase += 1
        state.phase_step = 0
        state.cursor = 0
        checkpoint(None)  # phase boundary: the next phase starts with a fresh optimizer

    exported: list[Path] = []
    if is_main:
        exported = export_lora(lora_state_dict(unet), config, state, run_dir / "export")
        for path in exported:
            log.info("exported %s", path)
        run_log.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, state, last_checkpoint, exported, losses, dict(timer.seconds), unet)


def _progress(total: int, initial: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    # tqdm shows it/s and the ETA itself; the loss goes in the postfix.
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)

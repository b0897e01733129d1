"""The reward stage: tune a distilled MLCM LoRA toward a preference model, anchored by the consistency loss.

Read top to bottom: set up (accelerator, run directory, the start LoRA and reward weights, teacher, prompts),
then one optimizer-step loop: a student rollout of 1..q steps with gradients through its last step(s) and the
VAE decoder into the LoRA (ReFL / DRaFT-K), the reward loss (MPS-style hinge or maximisation, TLCM §4), plus
the stage-2 inter-segment loss against the frozen teacher as an anchor; evaluate, keep the best, checkpoint;
export at the end. Like `distill`, the data of step k is a pure function of (seed, k), so resume is exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlcm.segments import segment_boundaries, segment_timesteps

from ..checkpoint import (
    TrainState,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from ..data_order import EpochOrder, derive_seed, sample_generator
from ..distill import stage2_loss
from ..reward_config import RewardConfig
from ..run_inputs import (
    WEIGHT_DTYPES,
    load_inputs,
    make_accelerator,
    resolve_mixed_precision,
)
from ..run_log import RunLog
from ..student import adapters_disabled, load_lora_state_dict, lora_state_dict
from ..train import NonFiniteLossError
from .export import export_kept_lora, kept_lora
from .guard import RewardGuard, build_heldout
from .losses import reward_loss
from .models import build_reward
from .recipe import anchor_settings, distill_view, resolve_segments
from .rollout import decode_latents, student_rollout
from .start import attach_start_lora, read_start_lora

log = logging.getLogger(__name__)

# Phase indices for the seeded data streams (distinct from distill's phases by the "reward" tag below).
ROLLOUT_STREAM, ANCHOR_STREAM, EVAL_STREAM = 0, 1, 2


@dataclass
class RewardResult:
    run_dir: Path
    state: TrainState
    checkpoint: Path | None
    exported: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer step (NaN where skipped)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    unet: torch.nn.Module | None = None  # the UNet with the tuned LoRA attached (this process's copy)
    kept: dict[str, Tensor] | None = None  # the exported weights (PEFT names) the keep-best rule chose


def train_reward(
    config: RewardConfig, *, resume: str | Path | None = None, stop_after: int | None = None
) -> RewardResult:
    """Run (or continue) a reward stage; ``stop_after`` ends after that many steps with a checkpoint."""
    # --- devices, the run directory, and everything that can fail cheaply -----------------------------
    if not config.teacher or not config.prompts or not config.lora or not config.reward:
        raise ValueError(
            "the reward stage needs --teacher, --prompts, --lora (a distilled LoRA) and --reward"
        )
    mixed_precision = resolve_mixed_precision(config.mixed_precision)
    accelerator = make_accelerator(mixed_precision)
    is_main, device = accelerator.is_main_process, accelerator.device
    run_dir = Path(config.output_dir)
    saved = load_checkpoint(resume) if resume is not None else None
    if saved is None and list_checkpoints(run_dir):
        raise ValueError(
            f"{run_dir} already holds checkpoints; pass --resume {run_dir} to continue that run "
            "or choose another --output-dir"
        )
    if saved is not None and saved.state.config_hash != config.config_hash():
        changed = sorted(k for k, v in config.to_dict().items() if saved.config.get(k) != v)
        log.warning("resuming with a changed recipe (%s); the continuation will differ", ", ".join(changed))
    start = read_start_lora(config.lora)
    reward = build_reward(config.reward, device)
    heldout = build_heldout(config.heldout, device) if config.heldout else None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json() + "\n", encoding="utf-8")

    # --- teacher, prompts, the LoRA student ---------------------------------------------------------------
    weight_dtype = WEIGHT_DTYPES[mixed_precision]
    teacher, prompts, embeddings = load_inputs(distill_view(config), device, weight_dtype)
    unet, vae = teacher.unet, teacher.vae
    params = attach_start_lora(
        unet,
        start,
        family=teacher.family,
        weight_dtype=weight_dtype,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    if config.vae_checkpointing and hasattr(vae, "enable_gradient_checkpointing"):
        vae.enable_gradient_checkpointing()
    num_steps = len(teacher.alphas_cumprod)
    segments = resolve_segments(config, start)
    settings = anchor_settings(config, start.distill_config, segments, num_steps)
    boundaries = segment_boundaries(segments, num_steps)
    renoise_mode = (start.distill_config or {}).get("stage2_renoise", "same")
    state = TrainState(0, 0, 0, 0, teacher.family, len(prompts), 0, config.config_hash())
    guard = RewardGuard(config.keep_best, heldout, run_dir, tolerance=config.heldout_tolerance)
    if saved is not None:
        load_lora_state_dict(unet, saved.lora)
        state = saved.state
        state.config_hash = config.config_hash()
        restore_rng(saved.rng)
        guard.restore(state.global_step)
        log.info("resuming from %s at step %d", saved.path, state.global_step)
    model = accelerator.prepare_model(unet)
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_eps,
    )
    if saved is not None and saved.optimizer:
        optimizer.load_state_dict(saved.optimizer)
    optimizer = accelerator.prepare_optimizer(optimizer)
    batch, processes, accumulation = (
        config.batch_size,
        accelerator.num_processes,
        config.gradient_accumulation,
    )
    global_batch = batch * processes * accumulation
    log.info(
        "reward %s (%s loss), student steps %s with gradients through the last %d, anchor weight %g; "
        "effective batch = %d per device x %d processes x %d accumulation = %d",
        reward.name,
        config.loss,
        list(config.student_steps),
        config.grad_steps,
        config.anchor_weight,
        batch,
        processes,
        accumulation,
        global_batch,
    )

    # --- eps functions: one UNet, three roles (as in distill) -------------------------------------------
    alphas_cumprod = teacher.alphas_cumprod.to(device)
    latent_shape = tuple(teacher.latent_shape(1, config.resolution))[1:]
    uncond_one = teacher.uncond(1).to(device)

    def call_unet(module: torch.nn.Module, z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with accelerator.autocast():
            return module(z, t, **cond.unet_kwargs(), return_dict=False)[0].float()

    def student_eps(z: Tensor, t: Tensor, cond: Any) -> Tensor:
        return call_unet(model, z, t, cond)

    def frozen_student_eps(z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.no_grad():
            return call_unet(unet, z, t, cond)

    def teacher_eps(z: Tensor, t: Tensor, cond: Any) -> Tensor:
        with torch.no_grad(), adapters_disabled(unet):
            return call_unet(unet, z, t, cond)

    def draw(generators: list[torch.Generator]) -> Tensor:
        return torch.stack([torch.randn(latent_shape, generator=g) for g in generators]).to(device)

    def rollout_images(eps_fn: Any, steps: int, generators: list[torch.Generator], cond: Any) -> Tensor:
        """Images in [0, 1] of a ``steps``-step student sample (gradients as eps_fn and grad mode allow)."""
        noise = draw(generators)
        renoise = [draw(generators) for _ in range(steps - 1)]
        x0 = student_rollout(
            eps_fn,
            noise,
            renoise,
            cond,
            timesteps=segment_timesteps(steps, segments, num_train_timesteps=num_steps),
            alphas_cumprod=alphas_cumprod,
            grad_steps=config.grad_steps,
            no_grad_eps_fn=frozen_student_eps,
        )
        with accelerator.autocast():
            return decode_latents(vae, x0, teacher.scaling_factor)

    order = EpochOrder(len(prompts), config.seed, ROLLOUT_STREAM)

    def step_count(step: int) -> int:
        generator = torch.Generator().manual_seed(derive_seed(config.seed, "reward_steps", step))
        return config.student_steps[int(torch.randint(len(config.student_steps), (1,), generator=generator))]

    def reward_term(samples: range, steps: int) -> tuple[Tensor, dict[str, float]]:
        indices = [order(i) for i in samples]
        generators = [sample_generator(config.seed, ROLLOUT_STREAM, i) for i in samples]
        cond = embeddings.get(indices).to(device)
        images = rollout_images(student_eps, steps, generators, cond)
        loss, stats = reward_loss(
            reward, images, [prompts[i] for i in indices], loss=config.loss, margin=config.margin
        )
        return config.reward_weight * loss, stats

    def anchor_term(samples: range) -> tuple[Tensor, dict[str, float]]:
        indices = [order(i) for i in samples]
        generators = [sample_generator(config.seed, ANCHOR_STREAM, i) for i in samples]
        loss, stats = stage2_loss(
            student_eps,
            frozen_student_eps,
            teacher_eps,
            draw(generators),
            embeddings.get(indices).to(device),
            uncond_one.repeat(len(samples)),
            settings=settings,
            alphas_cumprod=alphas_cumprod,
            boundaries=boundaries,
            q=config.anchor_q,
            p=config.anchor_p,
            renoise=renoise_mode,
            generator=generators,  # per sample, as in distill: any process split draws the same
        )
        return config.anchor_weight * loss, {"anchor_loss": stats["loss"]}

    # --- evaluation set: fixed prompts and seeds -----------------------------------------------------------
    eval_prompts, eval_embeddings = prompts, embeddings
    if config.heldout_prompts:
        from ..embeddings import EmbeddingCache
        from ..prompts import read_prompts

        eval_prompts = read_prompts(config.heldout_prompts)
        eval_embeddings = EmbeddingCache(teacher, eval_prompts)
    eval_index = [i % len(eval_prompts) for i in range(config.eval_samples)]

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, Any]:
        row: dict[str, Any] = {"step": step}
        texts = [eval_prompts[i] for i in eval_index]
        for steps in config.evaluated_steps:
            images, scores = [], []
            for first in range(0, len(eval_index), batch):
                chunk = eval_index[first : first + batch]
                generators = [
                    sample_generator(config.seed, EVAL_STREAM, first + j) for j in range(len(chunk))
                ]
                cond = eval_embeddings.get(chunk).to(device)
                chunk_images = rollout_images(frozen_student_eps, steps, generators, cond).float()
                scores.append(reward(chunk_images, texts[first : first + batch]).float().cpu())
                images.append(chunk_images.cpu())  # the held-out measure sees the whole set, kept off the GPU
            row[f"reward@{steps}"] = float(torch.cat(scores).mean())
            if heldout is not None:
                row[f"heldout@{steps}"] = heldout.measure(torch.cat(images), texts)
        row["reward"] = sum(row[f"reward@{s}"] for s in config.evaluated_steps) / len(config.evaluated_steps)
        if heldout is not None:
            row["heldout"] = sum(row[f"heldout@{s}"] for s in config.evaluated_steps) / len(
                config.evaluated_steps
            )
        return row

    def run_evaluation() -> None:
        if is_main and guard.last_step() != state.global_step:
            row = evaluate(state.global_step)
            guard.record(row, lora_state_dict(unet))
            log.info("evaluation %s", json.dumps(row))
            run_log.write(
                {"global_step": row["step"], **{f"eval_{k}": v for k, v in row.items() if k != "step"}}
            )
        accelerator.wait_for_everyone()

    # --- the loop ----------------------------------------------------------------------------------------------
    losses: list[float] = []
    last_checkpoint = saved.path if saved is not None else None
    run_log = RunLog(run_dir, tensorboard=config.tensorboard) if is_main else None

    def checkpoint() -> None:
        nonlocal last_checkpoint
        if is_main:
            last_checkpoint = save_checkpoint(
                run_dir,
                state=state,
                config=config.to_dict(),
                lora=lora_state_dict(unet),
                optimizer=optimizer.state_dict(),
                rng=capture_rng(),
            )
            prune_checkpoints(run_dir, config.checkpoints_keep)
        accelerator.wait_for_everyone()

    def all_finite(value: Tensor) -> bool:
        # Every process must agree to skip, or DDP would wait forever for the others' gradients.
        bad = accelerator.reduce(torch.isfinite(value.detach()).logical_not().float().reshape(1), "sum")
        return bad.item() == 0

    from tqdm.auto import tqdm

    progress = tqdm(
        total=config.iterations, initial=state.global_step, desc=f"reward {reward.name}", disable=not is_main
    )
    while state.global_step < config.iterations:
        if stop_after is not None and state.global_step >= stop_after:
            checkpoint()
            progress.close()
            return RewardResult(run_dir, state, last_checkpoint, [], losses, guard.history, unet)
        if state.global_step % config.eval_every == 0:
            run_evaluation()
        steps = step_count(state.global_step)
        total = torch.zeros((), device=device)
        skipped = False
        stats: dict[str, float] = {}
        for micro in range(accumulation):
            first = (
                state.global_step * global_batch
                + micro * batch * processes
                + accelerator.process_index * batch
            )
            samples = range(first, first + batch)
            last = micro == accumulation - 1
            # Two backward passes per micro-step (reward, then anchor) so DDP sees each parameter once per
            # synchronised backward; gradients accumulate, only the last backward of the step syncs.
            with (
                contextlib.nullcontext() if last and config.anchor_weight == 0 else accelerator.no_sync(model)
            ):
                loss, stats = reward_term(samples, steps)
                if not all_finite(loss):
                    skipped = True
                    break
                accelerator.backward(loss / accumulation)
            total += loss.detach()
            if config.anchor_weight > 0:
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    anchor, anchor_stats = anchor_term(samples)
                    if not all_finite(anchor):
                        skipped = True
                        break
                    accelerator.backward(anchor / accumulation)
                total += anchor.detach()
                stats.update(anchor_stats)
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            state.nan_streak += 1
            losses.append(math.nan)
            log.warning(
                "non-finite loss at step %d; skipped the update (%d in a row)",
                state.global_step,
                state.nan_streak,
            )
            if state.nan_streak >= config.nan_patience:
                raise NonFiniteLossError(
                    f"the loss was NaN/inf for {state.nan_streak} steps in a row (up to step {state.global_step}); "
                    f"lower --lr (now {config.lr:g}) or --reward-weight, or use --mixed-precision bf16/no. "
                    f"The last good checkpoint is in {run_dir / 'checkpoints'}"
                )
        else:
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.nan_streak = 0
            losses.append(accelerator.reduce(total, "mean").item() / accumulation)
        state.global_step += 1
        state.phase_step = state.global_step
        state.cursor = state.global_step * global_batch
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4g}", reward=f"{stats.get('reward', math.nan):.4g}")
        if is_main and (state.global_step % config.log_every == 0 or state.global_step == config.iterations):
            row = {
                "global_step": state.global_step,
                "steps": steps,
                "loss": losses[-1],
                "lr": config.lr,
                **stats,
            }
            run_log.write(row)
        if state.global_step % config.checkpoint_every == 0 and state.global_step < config.iterations:
            checkpoint()
    progress.close()
    run_evaluation()
    checkpoint()

    # --- export: the LoRA the keep-best rule chose ---------------------------------------------------------------
    exported: list[Path] = []
    kept = None
    if is_main:
        kept = kept_lora(guard, lora_state_dict(unet))
        exported = export_kept_lora(
            guard,
            kept,
            start,
            config,
            reward_name=reward.name,
            segments=segments,
            family=teacher.family,
            global_step=state.global_step,
            out_dir=run_dir / "export",
        )
        run_log.close()
    accelerator.wait_for_everyone()
    return RewardResult(run_dir, state, last_checkpoint, exported, losses, guard.history, unet, kept)

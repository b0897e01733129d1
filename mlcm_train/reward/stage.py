"""The reward stage: tune a distilled MLCM LoRA toward a preference model, anchored by the stage-2 loss.

``train_reward(config)`` is ``python -m mlcm_train reward``: it checks what can fail cheaply (the start LoRA,
the reward weights), opens the run, attaches the start LoRA at its trained scale and hands ``RewardStage``
to the loop of ``mlcm_train.run.loop``. The stage supplies one phase and, per micro-batch, two loss terms:
the reward of a student rollout of 1..q steps with gradients through its last step(s) and the VAE decoder
into the LoRA (DRaFT-K / ReFL), and the stage-2 inter-segment loss against the frozen teacher as an anchor.
It evaluates on fixed prompts and seeds, keeps the best LoRA by its rule, and exports that one
(docs/method.md, "The reward stage"). Like distill, the data of step k is a pure function of (seed, k).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mlcm.segments import segment_boundaries, segment_timesteps
from mlcm_train.config import RewardConfig
from mlcm_train.data.order import EpochOrder, derive_seed, sample_generator
from mlcm_train.data.prompts import read_prompts
from mlcm_train.method.consistency import stage2_loss
from mlcm_train.method.reward_loss import reward_loss
from mlcm_train.method.rollout import student_rollout
from mlcm_train.models.student import lora_state_dict
from mlcm_train.models.vae import decode_latents
from mlcm_train.reward.export import export_kept_lora, kept_lora
from mlcm_train.reward.guard import RewardGuard, build_heldout
from mlcm_train.reward.models import build_reward, resolve_loss
from mlcm_train.reward.recipe import anchor_settings, resolve_segments
from mlcm_train.reward.start import StartLora, attach_start_lora, read_start_lora
from mlcm_train.run.checkpoint import TrainState
from mlcm_train.run.loop import LoopResult, LossTerm, Phase, train_loop
from mlcm_train.run.setup import Run, UnetRoles
from mlcm_train.run.timer import StepTimer

log = logging.getLogger(__name__)

# Phase indices for the seeded data streams (distinct from distill's phases by the "reward" tag below).
ROLLOUT_STREAM, ANCHOR_STREAM, EVAL_STREAM = 0, 1, 2


@dataclass
class RewardResult(LoopResult):
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    kept: dict[str, Tensor] | None = None  # the exported weights (PEFT names) the keep-best rule chose


def train_reward(
    config: RewardConfig, *, resume: str | Path | None = None, stop_after: int | None = None
) -> RewardResult:
    """Run (or continue) a reward stage; ``stop_after`` ends after that many steps with a checkpoint."""
    if not config.teacher or not config.prompts or not config.lora or not config.reward:
        raise ValueError(
            "the reward stage needs --teacher, --prompts, --lora (a distilled LoRA) and --reward"
        )
    run = Run.open(config, resume)
    start = read_start_lora(config.lora)
    reward = build_reward(config.reward, run.device)
    loss = resolve_loss(config.loss, reward)  # a hinge that cannot train fails here, before the teacher loads
    heldout = build_heldout(config.heldout, run.device) if config.heldout else None
    run.load(extra_prompts=read_prompts(config.heldout_prompts) if config.heldout_prompts else None)
    unet, vae = run.teacher.unet, run.teacher.vae
    params = attach_start_lora(
        unet,
        start,
        family=run.teacher.family,
        weight_dtype=run.weight_dtype,
        gradient_checkpointing=config.gradient_checkpointing,
    )
    if config.vae_checkpointing and hasattr(vae, "enable_gradient_checkpointing"):
        vae.enable_gradient_checkpointing()
    state = run.start_state(unet)
    roles = UnetRoles(run.accelerator, unet, run.accelerator.prepare_model(unet))
    guard = RewardGuard(config.keep_best, heldout, run.run_dir, tolerance=config.heldout_tolerance)
    if run.saved is not None:
        guard.restore(state.global_step)
    stage = RewardStage(run, roles, start, reward, loss, guard)
    log.info(
        "reward %s (%s loss), student steps %s with gradients through the last %d, anchor weight %g",
        reward.name,
        stage.loss,
        list(config.student_steps),
        config.grad_steps,
        config.anchor_weight,
    )
    result = train_loop(
        run, roles, params, stage, state, timer=StepTimer(False, run.device), stop_after=stop_after
    )
    return RewardResult(**vars(result), evaluations=guard.history, kept=stage.kept)


class RewardStage:
    """The reward stage for the loop: one phase; per micro-batch the reward term, then the anchor term."""

    extendable = True  # resuming a finished run with more --iterations continues it, moments included

    def __init__(
        self, run: Run, roles: UnetRoles, start: StartLora, reward: Any, loss: str, guard: RewardGuard
    ) -> None:
        config = run.config
        self.run, self.roles, self.config, self.start = run, roles, config, start
        self.reward, self.guard = reward, guard
        self.loss = loss  # from resolve_loss: "maximise" or "hinge"
        self.num_steps = len(run.teacher.alphas_cumprod)
        self.alphas_cumprod = run.alphas_cumprod
        self.segments = resolve_segments(config, start)
        self.settings = anchor_settings(config, start.distill_config, self.segments, self.num_steps)
        self.boundaries = segment_boundaries(self.segments, self.num_steps)
        self.renoise_mode = (start.distill_config or {}).get("stage2_renoise", "same")
        self.order = EpochOrder(len(run.prompts), config.seed, ROLLOUT_STREAM)
        self.phases = [Phase(0, config.iterations, config.lr, self.segments, f"reward {reward.name}")]
        self.eval_prompts, self.eval_embeddings = run.prompts, run.embeddings
        if run.extra_embeddings is not None:  # --heldout-prompts, encoded with the training prompts
            self.eval_prompts, self.eval_embeddings = run.extra_embeddings.prompts, run.extra_embeddings
        self.eval_index = [i % len(self.eval_prompts) for i in range(config.eval_samples)]
        self.kept: dict[str, Tensor] | None = None

    # --- the loss terms -----------------------------------------------------------------------------------

    def terms(self, phase: Phase, samples: range, step: int) -> list[LossTerm]:
        steps = self._step_count(step)
        terms = [lambda: self._reward_term(samples, steps)]
        if self.config.anchor_weight > 0:
            terms.append(lambda: self._anchor_term(samples))
        return terms

    def _step_count(self, step: int) -> int:
        """The student step count of optimizer step ``step``, drawn from ``student_steps``."""
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, "reward_steps", step))
        choices = self.config.student_steps
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    def _rollout_images(
        self, eps_fn: Any, steps: int, generators: list[torch.Generator], cond: Any
    ) -> Tensor:
        """Images in [0, 1] of a ``steps``-step student sample (gradients as eps_fn and grad mode allow)."""
        noise = self.run.noise(generators)
        renoise = [self.run.noise(generators) for _ in range(steps - 1)]
        x0 = student_rollout(
            eps_fn,
            noise,
            renoise,
            cond,
            timesteps=segment_timesteps(steps, self.segments, num_train_timesteps=self.num_steps),
            alphas_cumprod=self.alphas_cumprod,
            grad_steps=self.config.grad_steps,
            no_grad_eps_fn=self.roles.target,
        )
        with self.run.accelerator.autocast():
            return decode_latents(self.run.teacher.vae, x0)

    def _reward_term(self, samples: range, steps: int) -> tuple[Tensor, dict[str, float]]:
        indices = [self.order(i) for i in samples]
        generators = [sample_generator(self.config.seed, ROLLOUT_STREAM, i) for i in samples]
        images = self._rollout_images(self.roles.student, steps, generators, self.run.cond(indices))
        prompts = [self.run.prompts[i] for i in indices]
        loss, stats = reward_loss(
            self.reward, images, prompts, loss=self.loss, margin=self.config.margin, pool=self.run.prompts
        )
        return self.config.reward_weight * loss, {"steps": steps, **stats}

    def _anchor_term(self, samples: range) -> tuple[Tensor, dict[str, float]]:
        indices = [self.order(i) for i in samples]
        generators = [sample_generator(self.config.seed, ANCHOR_STREAM, i) for i in samples]
        loss, stats = stage2_loss(
            self.roles.student,
            self.roles.target,
            self.roles.teacher,
            self.run.noise(generators),
            self.run.cond(indices),
            self.run.uncond(len(samples)),
            settings=self.settings,
            alphas_cumprod=self.alphas_cumprod,
            boundaries=self.boundaries,
            q=self.config.anchor_q,
            p=self.config.anchor_p,
            renoise=self.renoise_mode,
            generator=generators,  # per sample, as in distill: any process split draws the same
        )
        return self.config.anchor_weight * loss, {"anchor_loss": stats["loss"]}

    # --- evaluation and keep-best ---------------------------------------------------------------------------

    def before_step(self, phase: Phase, step: int) -> None:
        if step % self.config.eval_every == 0:
            self._evaluate_and_keep(step)

    def after_phase(self, phase: Phase) -> None:
        self._evaluate_and_keep(phase.steps)

    def _evaluate_and_keep(self, step: int) -> None:
        if self.run.is_main and self.guard.last_step() != step:
            row = self.evaluate(step)
            self.guard.record(row, lora_state_dict(self.roles.unet))
            log.info("evaluation %s", json.dumps(row))
            self.run.log.write(
                {"global_step": row["step"], **{f"eval_{k}": v for k, v in row.items() if k != "step"}}
            )
        self.run.accelerator.wait_for_everyone()

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Mean reward (and held-out measure) of fixed-seed samples at every evaluated step count."""
        config, heldout, batch = self.config, self.guard.heldout, self.config.batch_size
        row: dict[str, Any] = {"step": step}
        texts = [self.eval_prompts[i] for i in self.eval_index]
        for steps in config.evaluated_steps:
            images, scores = [], []
            for first in range(0, len(self.eval_index), batch):
                chunk = self.eval_index[first : first + batch]
                generators = [
                    sample_generator(config.seed, EVAL_STREAM, first + j) for j in range(len(chunk))
                ]
                cond = self.eval_embeddings.get(chunk).to(self.run.device)
                chunk_images = self._rollout_images(self.roles.target, steps, generators, cond).float()
                scores.append(self.reward(chunk_images, texts[first : first + batch]).float().cpu())
                images.append(chunk_images.cpu())  # the held-out measure sees the whole set, kept off the GPU
            row[f"reward@{steps}"] = float(torch.cat(scores).mean())
            if heldout is not None:
                row[f"heldout@{steps}"] = heldout.measure(torch.cat(images), texts)
        counts = len(config.evaluated_steps)
        row["reward"] = sum(row[f"reward@{s}"] for s in config.evaluated_steps) / counts
        if heldout is not None:
            row["heldout"] = sum(row[f"heldout@{s}"] for s in config.evaluated_steps) / counts
        return row

    def nan_hint(self, phase: Phase) -> str:
        return f"lower --lr (now {phase.lr:g}) or --reward-weight, or use --mixed-precision bf16/no"

    def export(self, state: TrainState) -> list[Path]:
        self.kept = kept_lora(self.guard, lora_state_dict(self.roles.unet))
        return export_kept_lora(
            self.guard,
            self.kept,
            self.start,
            self.config,
            reward_name=self.reward.name,
            segments=self.segments,
            family=self.run.teacher.family,
            state=state,
            out_dir=self.run.run_dir / "export",
            loss=self.loss,
        )

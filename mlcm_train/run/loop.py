"""The one training loop: the distill stages (stage 1, stage 2, progressive rounds) and the reward stage run it.

A stage (``mlcm_train.distill.DistillStage``, ``mlcm_train.reward.stage.RewardStage``) supplies its phases,
the loss terms of a micro-batch, and hooks for evaluation and export; the loop does everything else, top to
bottom: for every phase a fresh AdamW, then per optimizer step the micro-batches with gradient accumulation,
the non-finite-loss skip that all processes agree on, the update, metrics, checkpoints and sample grids.

Exact resume: every random draw of the data comes from a generator seeded by (seed, phase, sample index),
so the data of step k is a pure function of k. A checkpoint therefore needs only the LoRA, optimizer, EMA,
step counters and global RNG states to continue bit for bit, and the same global batch gives the same
samples whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from mlcm_train.models.student import lora_state_dict
from mlcm_train.run.checkpoint import TrainState, capture_rng, prune_checkpoints, save_checkpoint
from mlcm_train.run.samples import write_training_samples
from mlcm_train.run.setup import Run, UnetRoles
from mlcm_train.run.timer import StepTimer

log = logging.getLogger(__name__)

LossHook = Callable[[int, Tensor], Tensor]  # (global_step, loss) -> loss; tests inject NaN through it
LossTerm = Callable[[], tuple[Tensor, dict[str, float]]]  # one backward pass: its loss and monitoring numbers


class NonFiniteLossError(RuntimeError):
    """The loss was NaN/inf for ``nan_patience`` optimizer steps in a row."""


@dataclass(frozen=True)
class Phase:
    """A stretch of optimizer steps with one optimizer: a distill stage at a segment count, or the reward stage."""

    index: int
    steps: int
    lr: float
    segments: int  # of the LoRA being trained (sample grids)
    label: str  # the progress bar's name
    log: dict[str, Any] = field(default_factory=dict)  # constant columns of this phase's metrics rows


class Stage(Protocol):
    """What a training stage supplies to the loop."""

    phases: list[Phase]
    # True: the last phase stays open at the end (checkpointed with its optimizer), so a resume with more
    # steps continues it; False: every phase ends at a boundary (the distill stages' rounds).
    extendable: bool

    def terms(self, phase: Phase, samples: range, step: int) -> list[LossTerm]:
        """The loss terms of the micro-batch ``samples`` (global sample indices), one backward pass each."""
        ...

    def before_step(self, phase: Phase, step: int) -> None:
        """Called before every optimizer step (the reward stage evaluates here)."""
        ...

    def after_phase(self, phase: Phase) -> None: ...

    def nan_hint(self, phase: Phase) -> str:
        """What to change when the loss keeps being non-finite."""
        ...

    def export(self, state: TrainState) -> list[Path]:
        """Write the trained LoRA at the end of the run (main process)."""
        ...


@dataclass
class LoopResult:
    run_dir: Path
    state: TrainState
    checkpoint: Path | None
    exported: list[Path] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer step (NaN where skipped)
    # Seconds per category and the number of timed steps ("steps"); with profile=True the first step is
    # left out and CUDA is synchronised around each category.
    timings: dict[str, float] = field(default_factory=dict)
    unet: torch.nn.Module | None = None  # the UNet with the trained LoRA attached (this process's copy)
    peak_memory: int | None = None  # with profile=True: the device's peak bytes during training (PeakMemory)


class _Checkpointer:
    """Writes the run's checkpoints (main process) and keeps the newest path."""

    def __init__(self, run: Run, roles: UnetRoles, state: TrainState) -> None:
        self.run, self.roles, self.state = run, roles, state
        self.last = run.saved.path if run.saved is not None else None

    def __call__(self, optimizer: torch.optim.Optimizer | None) -> None:
        run, ema = self.run, self.roles.ema
        if run.is_main:
            self.last = save_checkpoint(
                run.run_dir,
                state=self.state,
                config=run.config.to_dict(),
                lora=lora_state_dict(self.roles.unet),
                optimizer=optimizer.state_dict() if optimizer is not None else {},
                rng=capture_rng(),
                ema=ema.state_dict() if ema is not None else None,
            )
            prune_checkpoints(run.run_dir, run.config.checkpoints_keep)
            log.info("checkpoint %s", self.last)
        run.accelerator.wait_for_everyone()


def train_loop(
    run: Run,
    roles: UnetRoles,
    params: Sequence[torch.nn.Parameter],
    stage: Stage,
    state: TrainState,
    *,
    timer: StepTimer,
    stop_after: int | None = None,
    loss_hook: LossHook | None = None,
) -> LoopResult:
    """Run ``stage``'s phases from ``state`` on; ``stop_after`` ends after that many global steps with a checkpoint.

    The metrics log is closed however the loop ends (a W&B run is finished with it)."""
    try:
        return _phases(run, roles, params, stage, state, timer, stop_after, loss_hook)
    finally:
        if run.log is not None:
            run.log.close()


def _phases(
    run: Run,
    roles: UnetRoles,
    params: Sequence[torch.nn.Parameter],
    stage: Stage,
    state: TrainState,
    timer: StepTimer,
    stop_after: int | None,
    loss_hook: LossHook | None,
) -> LoopResult:
    config = run.config
    checkpoint = _Checkpointer(run, roles, state)
    losses: list[float] = []
    spending = _Spending(run, roles, state)
    _log_batch(run)

    def result(exported: list[Path]) -> LoopResult:
        return LoopResult(
            run.run_dir,
            state,
            checkpoint.last,
            exported,
            losses,
            dict(timer.seconds),
            roles.unet,
            timer.peak_bytes,
        )

    for phase in stage.phases:
        if phase.index < state.phase:
            continue
        # 1. A fresh AdamW per phase; a run resumed inside this phase gets its saved moments back.
        optimizer = _phase_optimizer(run, params, phase)
        log.info("phase %d/%d: %s, %d steps", phase.index + 1, len(stage.phases), phase.label, phase.steps)
        progress = _progress(phase.steps, state.phase_step, phase.label, disable=not run.is_main)
        while state.phase_step < phase.steps:
            if stop_after is not None and state.global_step >= stop_after:
                checkpoint(optimizer)
                progress.close()
                return result([])
            stage.before_step(phase, state.global_step)
            started = time.perf_counter()
            # 2. Micro-batches: forward and backward of every loss term, gradients accumulating (synced once).
            micro_batches = _micro_batches(run, state.phase_step)
            loss_sum, stats = _accumulate(run, roles, stage, phase, micro_batches, state, timer, loss_hook)
            # 3. Update; a step non-finite on any process is skipped on all, too many in a row stop the run.
            losses.append(_update(run, roles, params, optimizer, loss_sum))
            if loss_sum is None:
                _count_non_finite(run, stage, phase, state)
            else:
                state.nan_streak = 0
            timer.step_done(time.perf_counter() - started)
            # 4. Count, report, checkpoint, sample.
            spending.update()
            state.phase_step += 1
            state.global_step += 1
            state.cursor = state.phase_step * _global_batch(run)  # samples of the phase consumed
            progress.update(1)
            progress.set_postfix(_postfix(losses[-1], stats))
            if state.global_step % config.log_every == 0 or state.phase_step == phase.steps:
                _report(run, phase, state, losses[-1], stats)
            if state.global_step % config.checkpoint_every == 0 and state.phase_step < phase.steps:
                checkpoint(optimizer)
            if run.is_main and config.sample_every and state.global_step % config.sample_every == 0:
                write_training_samples(
                    run, roles.target, segments=phase.segments, global_step=state.global_step
                )
        progress.close()
        stage.after_phase(phase)
        if stage.extendable and phase is stage.phases[-1]:
            # The run can be resumed with more steps: keep the phase open, with its optimizer.
            checkpoint(optimizer)
            break
        # 5. Phase boundary: the next phase starts with a fresh optimizer, so none is saved.
        state.phase += 1
        state.phase_step = 0
        state.cursor = 0
        checkpoint(None)

    # 6. Export (main process), then every process leaves together.
    spending.update()  # what the phase-end hooks (a reward stage's last evaluation) spent counts too
    log.info("%s", spending.summary())
    exported = stage.export(state) if run.is_main else []
    for path in exported:
        log.info("exported %s", path)
    run.accelerator.wait_for_everyone()
    return result(exported)


def _global_batch(run: Run) -> int:
    """Samples per optimizer step: batch x processes x accumulation."""
    return run.config.batch_size * run.accelerator.num_processes * run.config.gradient_accumulation


def _log_batch(run: Run) -> None:
    log.info(
        "effective batch = %d per device x %d processes x %d accumulation = %d samples per optimizer step",
        run.config.batch_size,
        run.accelerator.num_processes,
        run.config.gradient_accumulation,
        _global_batch(run),
    )


def _phase_optimizer(run: Run, params: Sequence[torch.nn.Parameter], phase: Phase) -> Any:
    config, saved = run.config, run.saved
    betas = (config.adam_beta1, config.adam_beta2)
    optimizer = adamw_class(config.optimizer)(
        params, lr=phase.lr, betas=betas, weight_decay=config.adam_weight_decay, eps=config.adam_eps
    )
    if saved is not None and saved.state.phase == phase.index and saved.state.phase_step > 0:
        optimizer.load_state_dict(saved.optimizer)
    return run.accelerator.prepare_optimizer(optimizer)


def adamw_class(name: str) -> type[torch.optim.Optimizer]:
    """torch's AdamW, or an AdamW with 8-bit moments: bitsandbytes' when installed (the usual one on CUDA),
    else torchao's (which also runs on the CPU)."""
    if name == "adamw":
        return torch.optim.AdamW
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError:
        try:
            from torchao.optim import AdamW8bit
        except ImportError:
            raise ImportError(
                "--optimizer adamw8bit needs bitsandbytes or torchao: `pip install bitsandbytes` (CUDA) or "
                "`pip install torchao` (CUDA or CPU), or use --optimizer adamw"
            ) from None
    return AdamW8bit


def _micro_batches(run: Run, phase_step: int) -> list[range]:
    """This process's global sample indices of each micro-batch of optimizer step ``phase_step``.

    Step k covers samples [k * G, (k + 1) * G) of the phase, G = batch x processes x accumulation; micro-batch
    m of process r takes the ``batch`` samples from k * G + (m * processes + r) * batch.
    """
    config, accelerator = run.config, run.accelerator
    batch, processes = config.batch_size, accelerator.num_processes
    start = phase_step * _global_batch(run)
    firsts = (
        start + (m * processes + accelerator.process_index) * batch
        for m in range(config.gradient_accumulation)
    )
    return [range(first, first + batch) for first in firsts]


def _update(
    run: Run, roles: UnetRoles, params: Sequence[torch.nn.Parameter], optimizer: Any, loss_sum: Tensor | None
) -> float:
    """Clip, step, update the EMA; returns the step's loss (mean over processes), NaN for a skipped step."""
    accelerator = run.accelerator
    if loss_sum is None:
        optimizer.zero_grad(set_to_none=True)
        return math.nan
    if run.config.max_grad_norm:
        accelerator.clip_grad_norm_(params, run.config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if roles.ema is not None:
        roles.ema.update()
    return accelerator.reduce(loss_sum, "mean").item() / run.config.gradient_accumulation


def _report(run: Run, phase: Phase, state: TrainState, loss: float, stats: dict[str, float]) -> None:
    """One metrics.jsonl row (main process): step, phase, the phase's columns, loss, lr, what the run has
    spent so far (teacher and student UNet evaluations, wall seconds), the stage's numbers."""
    if run.log is None:
        return
    numbers = {k: v for k, v in stats.items() if k != "loss"}
    row = {"global_step": state.global_step, "phase": phase.index, **phase.log}
    spent = {
        "teacher_evals": state.teacher_evaluations,
        "student_evals": state.student_evaluations,
        "wall_s": round(state.train_seconds, 3),
    }
    run.log.write({**row, "loss": loss, "lr": phase.lr, **spent, **numbers})


class _Spending:
    """Adds this process's UNet evaluations (times the process count: every rank does the same work) and
    the loop's wall time to the state's running totals, which a resumed run carried over."""

    def __init__(self, run: Run, roles: UnetRoles, state: TrainState) -> None:
        self.run, self.roles, self.state, self.processes = run, roles, state, run.accelerator.num_processes
        self.base = (state.teacher_evaluations, state.student_evaluations, state.train_seconds)
        self.started = time.perf_counter()

    def update(self) -> None:
        teacher, student, seconds = self.base
        counts = self.roles.evaluations
        self.state.teacher_evaluations = teacher + counts["teacher"] * self.processes
        self.state.student_evaluations = student + counts["student"] * self.processes
        self.state.train_seconds = seconds + time.perf_counter() - self.started

    def summary(self) -> str:
        state = self.state
        samples = max(state.global_step * _global_batch(self.run), 1)
        return (
            f"spent {state.teacher_evaluations} teacher UNet evaluations (CFG counted as 2; "
            f"{state.teacher_evaluations / samples:.2f} per training sample), {state.student_evaluations} "
            f"student evaluations and {state.train_seconds:.0f} s in the training loop"
        )


def _accumulate(
    run: Run,
    roles: UnetRoles,
    stage: Stage,
    phase: Phase,
    micro_batches: list[range],
    state: TrainState,
    timer: StepTimer,
    loss_hook: LossHook | None,
) -> tuple[Tensor | None, dict[str, float]]:
    """Forward and backward every loss term of every micro-batch; (summed loss, last micro-batch's numbers),
    or (None, ...) as soon as a loss is non-finite on any process."""
    accelerator = run.accelerator
    loss_sum = torch.zeros((), device=run.device)
    stats: dict[str, float] = {}
    for m, samples in enumerate(micro_batches):
        terms = stage.terms(phase, samples, state.global_step)
        micro_stats: dict[str, float] = {}
        for k, term in enumerate(terms):
            # DDP syncs gradients in the step's last backward only; every earlier one accumulates locally.
            last = m == len(micro_batches) - 1 and k == len(terms) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(roles.model):
                loss, term_stats = term()
                if loss_hook is not None:
                    loss = loss_hook(state.global_step, loss)
                if not _finite_everywhere(accelerator, loss):
                    return None, stats
                loss_sum += loss.detach().float()
                micro_stats.update(term_stats)
                with timer.charge("student_forward_backward"):
                    accelerator.backward(loss / len(micro_batches))
        stats = micro_stats
    return loss_sum, stats


def _finite_everywhere(accelerator: Any, loss: Tensor) -> bool:
    # All processes must agree to skip, or DDP would wait forever for the others' gradients.
    bad = accelerator.reduce(torch.isfinite(loss.detach()).logical_not().float().reshape(1), "sum")
    return bad.item() == 0


def _count_non_finite(run: Run, stage: Stage, phase: Phase, state: TrainState) -> None:
    state.nan_streak += 1
    log.warning(
        "non-finite loss at global step %d; skipped the update (%d in a row)",
        state.global_step,
        state.nan_streak,
    )
    if state.nan_streak >= run.config.nan_patience:
        raise NonFiniteLossError(
            f"the loss was NaN/inf for {state.nan_streak} steps in a row (up to global step {state.global_step}); "
            f"{stage.nan_hint(phase)}. The last good checkpoint is in {run.run_dir / 'checkpoints'}"
        )


def _postfix(loss: float, stats: dict[str, float]) -> dict[str, str]:
    shown = {"loss": f"{loss:.4g}"}
    if "reward" in stats:
        shown["reward"] = f"{stats['reward']:.4g}"
    return shown


def _progress(total: int, initial: int, desc: str, disable: bool):
    from tqdm.auto import tqdm

    # tqdm shows it/s and the ETA itself; the loss goes in the postfix.
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, dynamic_ncols=True)

"""Export a reward-tuned LoRA: the distilled LoRA's formats and metadata, plus the reward stage's record."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mlcm.lora import MLCMLoraMetadata
from mlcm_train.config import RewardConfig
from mlcm_train.reward.guard import BEST_DIR, BEST_LORA, GUARD_FILE, RewardGuard
from mlcm_train.reward.models import loss_used, reward_spec_name
from mlcm_train.reward.recipe import resolve_segments
from mlcm_train.reward.start import StartLora, read_start_lora
from mlcm_train.run.checkpoint import TrainState
from mlcm_train.run.export import LoraShape, check_export_formats, lora_targets, write_lora

log = logging.getLogger(__name__)

STAGE_PREFIX = "reward:"  # stages entry "reward:<reward name>" (MLCMLoraMetadata.stages)


def reward_metadata(
    start: StartLora,
    config: RewardConfig,
    *,
    reward_name: str,
    segments: int,
    family: str,
    facts: dict[str, Any],
) -> MLCMLoraMetadata:
    """The start LoRA's metadata with ``reward:<name>`` appended to its stages and the reward run's facts."""
    base = start.metadata or MLCMLoraMetadata(segments=segments, base_family=family)
    training = dict(base.training)
    training["reward"] = {"config": config.to_dict(), "config_hash": config.config_hash(), **facts}
    return MLCMLoraMetadata(
        segments=base.segments or segments,
        base_family=base.base_family or family,
        recommended_steps=base.recommended_steps,
        supported_steps=base.supported_steps,
        stages=(*base.stages, STAGE_PREFIX + reward_name),
        training=training,
    )


def export_reward_lora(
    lora_state: dict[str, torch.Tensor],
    start: StartLora,
    meta: MLCMLoraMetadata,
    out_dir: str | Path,
    *,
    formats: Sequence[str],
    name: str | None = None,
) -> list[Path]:
    """Write the tuned LoRA (kohya with explicit alpha, optionally PEFT/diffusers) at the start LoRA's rank/alpha."""
    return write_lora(
        lora_state,
        LoraShape(start.rank, start.alpha, tuple(lora_targets(lora_state))),
        meta,
        out_dir,
        stem=name or f"mlcm_{meta.base_family}_{meta.segments}seg_reward",
        formats=formats,
        source=f"reward-tuned from {start.source} with lora_alpha={start.alpha:g}, r={start.rank}",
        record=meta.training,
    )


def kept_lora(guard: RewardGuard, current: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA the keep-best rule chose: the guard's best, or ``current`` for "last" (PEFT-named weights)."""
    return guard.best_lora() or current


def export_kept_lora(
    guard: RewardGuard,
    chosen: dict[str, torch.Tensor],
    start: StartLora,
    config: RewardConfig,
    *,
    reward_name: str,
    segments: int,
    family: str,
    state: TrainState,
    out_dir: str | Path,
    loss: str | None = None,
) -> list[Path]:
    """Export ``chosen`` (from ``kept_lora``) with metadata naming the step it comes from, the loss used and
    what the reward stage spent (from the run's ``state``)."""
    global_step = state.global_step
    kept_step = guard.best["step"] if guard.best is not None and config.keep_best != "last" else global_step
    facts: dict[str, Any] = {
        "global_step": global_step,
        "kept_step": kept_step,
        "keep_best": config.keep_best,
        "reward_name": reward_name,
        "loss": loss or config.loss,
        **state.spending(),  # the reward stage's own cost
    }
    if guard.history:
        kept = next((row for row in guard.history if row["step"] == kept_step), guard.history[-1])
        facts["evaluations"] = {"first": guard.history[0], "kept": kept}
    meta = reward_metadata(
        start, config, reward_name=reward_name, segments=segments, family=family, facts=facts
    )
    written = export_reward_lora(chosen, start, meta, out_dir, formats=config.export_formats)
    for path in written:
        log.info("exported %s (weights of step %d, keep-best rule %s)", path, kept_step, config.keep_best)
    return written


def export_reward_checkpoint(
    saved: Any,
    *,
    out_dir: str | Path | None = None,
    formats: Sequence[str] | None = None,
    name: str | None = None,
    best: bool = False,
) -> list[Path]:
    """``python -m mlcm_train export`` of a reward run's checkpoint (``saved``), or with ``best`` its kept LoRA.

    Needs no teacher and no reward weights; it does need the LoRA the run started from (its rank, alpha and
    metadata go into the export), at the path the run's config names.
    """
    config = RewardConfig.from_dict(saved.config)
    formats = check_export_formats(formats or config.export_formats)
    run_dir = saved.path.parent.parent
    try:
        start = read_start_lora(config.lora)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"exporting {saved.path} needs the LoRA this reward run started from ({config.lora}): its rank, "
            "alpha and metadata go into the export. Put it back at that path and export again."
        ) from error
    lora, kept_step, rule = saved.lora, saved.state.global_step, "checkpoint"
    facts: dict[str, Any] = {
        "global_step": saved.state.global_step,
        "reward_name": reward_spec_name(config.reward),
        "loss": loss_used(config.loss),
        **saved.state.spending(),
    }
    if best:
        guard_file = run_dir / BEST_DIR / GUARD_FILE
        if not guard_file.is_file() or not (run_dir / BEST_DIR / BEST_LORA).is_file():
            raise FileNotFoundError(
                f"{run_dir / BEST_DIR} holds no kept LoRA (rule {config.keep_best!r}); export the checkpoint "
                "without --best"
            )
        from safetensors.torch import load_file

        record = json.loads(guard_file.read_text(encoding="utf-8"))
        lora, kept_step, rule = (
            load_file(str(run_dir / BEST_DIR / BEST_LORA)),
            record["best"]["step"],
            record["rule"],
        )
        facts["evaluations"] = {"first": record["history"][0], "kept": record["best"]}
    facts.update(kept_step=kept_step, keep_best=rule)
    meta = reward_metadata(
        start,
        config,
        reward_name=reward_spec_name(config.reward),
        segments=resolve_segments(config, start),
        family=saved.state.family,
        facts=facts,
    )
    target = Path(out_dir) if out_dir is not None else run_dir / "export"
    return export_reward_lora(lora, start, meta, target, formats=formats, name=name)

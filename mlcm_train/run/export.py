"""One writer for every trained LoRA: kohya (the node pack's format: explicit alpha + MLCM metadata), PEFT, diffusers.

Every format carries the trained alpha so that each loader applies the LoRA at the scale it was trained at
(docs/method.md, "The LoRA and its scale"): kohya via per-module ``.alpha`` tensors, PEFT via
``adapter_config.json``, diffusers via the ``lora_adapter_metadata`` header that ``load_lora_weights`` reads.
The distill and reward stages build the metadata; this module writes the files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlcm.lora import FAMILY_NAMES, LoraWeights, MLCMLoraMetadata, lora_from_peft_state_dict, write_kohya_lora
from mlcm.lora.write import default_file_mode
from mlcm_train.config import EXPORT_FORMATS

log = logging.getLogger(__name__)

PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class LoraShape:
    """What a loader needs besides the weights: rank, alpha and the modules (patterns or exact paths)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets))


def write_peft_folder(folder: Path, lora_state: dict[str, torch.Tensor], shape: LoraShape) -> Path:
    """PEFT adapter folder: ``adapter_model.safetensors`` (``base_model.model.*`` keys) + ``adapter_config.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in lora_state.items()}
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    shape.peft_config().save_pretrained(str(folder))
    return folder


def write_diffusers_file(folder: Path, lora_state: dict[str, torch.Tensor], shape: LoraShape) -> Path:
    """diffusers ``pytorch_lora_weights.safetensors`` with the LoraConfig (alpha included) in its header."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    folder.mkdir(parents=True, exist_ok=True)
    adapter = shape.peft_config().to_dict()
    metadata = {k: v for k, v in adapter.items() if k in ("r", "lora_alpha", "target_modules", "use_rslora")}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder,
        unet_lora_layers={k: v.detach().cpu().contiguous() for k, v in lora_state.items()},
        weight_name=DIFFUSERS_WEIGHTS,
        unet_lora_adapter_metadata=metadata,
    )
    return folder / DIFFUSERS_WEIGHTS


def check_export_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats as a tuple, or a ValueError naming an unknown one and the choices."""
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export format {fmt!r} is unknown; choose from {', '.join(EXPORT_FORMATS)}")
    return tuple(formats)


def lora_targets(lora_state: dict[str, torch.Tensor]) -> list[str]:
    """The module names a PEFT-named LoRA state dict covers (``<module>.lora_A.weight`` -> ``<module>``)."""
    return sorted({key.rsplit(".lora_", 1)[0] for key in lora_state})


def write_lora(
    lora_state: dict[str, torch.Tensor],
    shape: LoraShape,
    meta: MLCMLoraMetadata,
    out_dir: str | Path,
    *,
    stem: str,
    formats: Sequence[str],
    source: str,
    record: dict[str, Any],
) -> list[Path]:
    """Write ``<stem>.safetensors`` (kohya), ``<stem>_peft/``, ``<stem>_diffusers/`` as asked, plus
    ``<stem>.config.json`` (``record``: the recipe) and the model card ``<stem>.md``; ``source`` says where
    the weights come from. Returns the LoRA files and folders."""
    formats = check_export_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "kohya" in formats:
        path = out_dir / f"{stem}.safetensors"
        modules = lora_from_peft_state_dict(lora_state, r=shape.rank, lora_alpha=shape.alpha)
        weights = LoraWeights(modules, meta, "peft", (), source)
        write_kohya_lora(path, weights, metadata=meta, dtype=torch.float16)
        written.append(path)
    if "peft" in formats:
        written.append(write_peft_folder(out_dir / f"{stem}_peft", lora_state, shape))
    if "diffusers" in formats:
        written.append(write_diffusers_file(out_dir / f"{stem}_diffusers", lora_state, shape))
    (out_dir / f"{stem}.config.json").write_text(
        json.dumps(record, indent=2, sort_keys=True), encoding="utf-8"
    )
    # The model card beside the files (not in the returned list, which holds what loaders load). It is a
    # description: a record it cannot read must not cost the user the LoRA files written above.
    try:
        (out_dir / f"{stem}.md").write_text(model_card(stem, shape, meta), encoding="utf-8")
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        log.warning("no model card for %s: %s", stem, error)
    _readable_by_others(written)
    return written


def _readable_by_others(paths: Sequence[Path]) -> None:
    """Give every written file the mode ``open()`` would (safetensors writes 0600, which a ComfyUI running as
    another user, in a container or on a shared server, cannot read)."""
    mode = default_file_mode()
    for path in paths:
        for file in path.rglob("*") if path.is_dir() else (path,):
            if file.is_file():
                os.chmod(file, mode)


def model_card(stem: str, shape: LoraShape, meta: MLCMLoraMetadata) -> str:
    """The Markdown card written beside every export: what the LoRA is, how to sample it, how it was trained."""
    training = meta.training
    config = training.get("config") if isinstance(training.get("config"), dict) else {}
    family = FAMILY_NAMES.get(meta.base_family or "", meta.base_family or "unknown")
    steps = meta.supported_steps or (tuple(range(1, meta.segments + 1)) if meta.segments else ())
    span = f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else ", ".join(map(str, steps)) or "unknown"
    recommended = ", ".join(map(str, meta.recommended_steps or ())) or "any of those"
    phases = ", ".join(
        f"stage {stage}: {config.get(f'stage{stage}_steps')} steps at lr {config.get(f'lr_stage{stage}')}"
        for stage in config.get("stages", ())
    )
    facts = [
        ("base model", f"{family} (distilled from {config.get('teacher') or 'a teacher not recorded'})"),
        ("segments", str(meta.segments)),
        ("step counts", f"{span}; recommended {recommended}"),
        ("sampling", "cfg 1.0 (the teacher's guidance is baked in; the negative prompt has no effect)"),
        ("ComfyUI", "MLCM LoRA Loader (strength 1.0), then MLCM Segment Schedule + MLCM Sampler, or KSampler "
         "with sampler `mlcm` and scheduler `mlcm_segments`"),
        ("diffusers", "`MLCMScheduler` from `mlcm`, `guidance_scale=0`"),
        ("LoRA", f"rank {shape.rank}, alpha {shape.alpha:g} (scale {shape.alpha / shape.rank:g}); the kohya "
         "file carries the alpha per module, so stock loaders apply the trained scale"),
        ("stages", ", ".join(meta.stages) or "none recorded"),
        ("training", f"{training.get('global_step', '?')} optimizer steps ({phases or 'see the config'}); batch "
         f"{config.get('batch_size', '?')} per device x {config.get('gradient_accumulation', 1)} accumulation; "
         f"{training.get('prompt_count', '?')} prompts; teacher CFG {training.get('guidance_scale', '?')}"),
        ("config hash", f"`{training.get('config_hash', '?')}` (the full recipe: `{stem}.config.json`)"),
    ]  # fmt: skip
    if training.get("teacher_evaluations"):
        facts.append(("training cost", f"{training['teacher_evaluations']} teacher UNet evaluations (CFG counted "
                      f"as 2), {training.get('student_evaluations', '?')} student evaluations, "
                      f"{training.get('train_seconds', '?')} s in the training loop"))  # fmt: skip
    lines = [f"# {stem}", "", f"An MLCM LoRA for {family}, made with `python -m mlcm_train`.", ""]
    lines += ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in facts)]
    if training.get("reward"):
        lines += ["", *_reward_card(training["reward"])]
    return "\n".join(lines) + "\n"


def _reward_card(reward: dict[str, Any]) -> list[str]:
    """The reward stage's facts and, when it evaluated, its scores per step count before and after."""
    config = reward.get("config") if isinstance(reward.get("config"), dict) else {}
    lines = [
        "## Reward stage",
        "",
        f"Reward `{reward.get('reward_name', '?')}` ({reward.get('loss', config.get('loss', '?'))} loss), "
        f"{reward.get('global_step', '?')} "
        f"optimizer steps; the exported weights are those of step {reward.get('kept_step', '?')} "
        f"(keep-best rule `{reward.get('keep_best', '?')}`).",
    ]
    if reward.get("student_evaluations"):
        lines[-1] += (
            f" It spent {reward.get('teacher_evaluations', 0)} teacher and {reward['student_evaluations']} "
            f"student UNet evaluations and {reward.get('train_seconds', '?')} s in the training loop."
        )
    evaluations = reward.get("evaluations") or {}
    first, kept = evaluations.get("first"), evaluations.get("kept")
    if isinstance(first, dict) and isinstance(kept, dict):
        numbers = (int, float)
        measures = sorted(
            k
            for k in first
            if "@" in k and isinstance(first[k], numbers) and isinstance(kept.get(k), numbers)
        )
        lines += ["", "| measure (at N steps) | before | kept |", "|---|---|---|"]
        lines += [f"| {k} | {first[k]:.4g} | {kept[k]:.4g} |" for k in measures]
    return lines

"""Export a trained LoRA: kohya (the node pack's format, explicit alpha + MLCM metadata), PEFT, diffusers.

Every format carries the trained alpha so that each loader applies the LoRA at the scale it was trained
at (MLCM_METHOD.md §4, the scale trap): kohya via per-module ``.alpha`` tensors, PEFT via
``adapter_config.json``, diffusers via the ``lora_adapter_metadata`` header that ``load_lora_weights`` reads.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mlcm.lora import LoraWeights, MLCMLoraMetadata, lora_from_peft_state_dict, write_kohya_lora

from .checkpoint import TrainState, load_checkpoint
from .config import EXPORT_FORMATS, DistillConfig

log = logging.getLogger(__name__)

STAGE_NAMES = {1: "mlcd", 2: "inter_segment"}  # names MLCMLoraMetadata.stages uses for our two stages
TRAINER_NAME = "mlcm_train"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"


def completed_stages(config: DistillConfig, state: TrainState) -> tuple[str, ...]:
    """Stage names of the phases that have run (fully or partly), in order; rounds add their segments."""
    names = []
    for index, (segments, stage) in enumerate(config.phases()):
        started = index < state.phase or (index == state.phase and state.phase_step > 0)
        if started:
            name = STAGE_NAMES[stage]
            names.append(f"{name}@{segments}" if config.progressive else name)
    return tuple(names)


def build_metadata(config: DistillConfig, state: TrainState) -> MLCMLoraMetadata:
    """Our safetensors metadata: segments, family, stages, steps, prompt count, config hash, full config."""
    plan = config.phases()
    segments = plan[min(state.phase, len(plan) - 1)][0]
    return MLCMLoraMetadata(
        segments=segments,
        base_family=state.family,
        recommended_steps=tuple(s for s in config.sample_steps if s <= segments) or None,
        stages=completed_stages(config, state),
        training={
            "trainer": TRAINER_NAME,
            "config_hash": config.config_hash(),
            "global_step": state.global_step,
            "prompt_count": state.prompt_count,
            "lora_rank": config.lora_rank,
            "lora_alpha": config.lora_alpha,
            "guidance_scale": config.guidance_scale,
            "config": config.to_dict(),
        },
    )


def _lora_weights(
    lora_state: dict[str, torch.Tensor], config: DistillConfig, meta: MLCMLoraMetadata
) -> LoraWeights:
    modules = lora_from_peft_state_dict(lora_state, r=config.lora_rank, lora_alpha=config.lora_alpha)
    source = f"trained with lora_alpha={config.lora_alpha:g}, r={config.lora_rank}"
    return LoraWeights(modules, meta, "peft", (), source)


def _peft_config(config: DistillConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets)
    )


def write_peft_folder(folder: Path, lora_state: dict[str, torch.Tensor], config: DistillConfig) -> Path:
    """PEFT adapter folder: ``adapter_model.safetensors`` (``base_model.model.*`` keys) + ``adapter_config.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{k}": v.detach().cpu().contiguous() for k, v in lora_state.items()}
    save_file(tensors, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    _peft_config(config).save_pretrained(str(folder))
    return folder


def write_diffusers_file(folder: Path, lora_state: dict[str, torch.Tensor], config: DistillConfig) -> Path:
    """diffusers ``pytorch_lora_weights.safetensors`` with the LoraConfig (alpha included) in its header."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    folder.mkdir(parents=True, exist_ok=True)
    adapter = _peft_config(config).to_dict()
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


def export_lora(
    lora_state: dict[str, torch.Tensor],
    config: DistillConfig,
    state: TrainState,
    out_dir: str | Path,
    *,
    formats: Sequence[str] | None = None,
    name: str | None = None,
) -> list[Path]:
    """Write the LoRA in each format (default: the config's); returns the written paths."""
    formats = check_export_formats(formats or config.export_formats)
    meta = build_metadata(config, state)
    stem = name or f"mlcm_{state.family}_{meta.segments}seg"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "kohya" in formats:
        path = out_dir / f"{stem}.safetensors"
        write_kohya_lora(path, _lora_weights(lora_state, config, meta), metadata=meta, dtype=torch.float16)
        written.append(path)
    if "peft" in formats:
        written.append(write_peft_folder(out_dir / f"{stem}_peft", lora_state, config))
    if "diffusers" in formats:
        written.append(write_diffusers_file(out_dir / f"{stem}_diffusers", lora_state, config))
    (out_dir / f"{stem}.config.json").write_text(
        json.dumps(
            {"config": config.to_dict(), "config_hash": config.config_hash()}, indent=2, sort_keys=True
        ),
        encoding="utf-8",
    )
    return written


def export_checkpoint(
    checkpoint: str | Path,
    *,
    out_dir: str | Path | None = None,
    formats: Sequence[str] | None = None,
    name: str | None = None,
    best: bool = False,
) -> list[Path]:
    """``python -m mlcm_train export CHECKPOINT``: export a checkpoint (or a run's newest) without the teacher.

    A reward run's checkpoint goes to ``reward.export.export_reward_checkpoint`` (``best``: its kept LoRA).
    """
    saved = load_checkpoint(checkpoint)
    if "reward" in saved.config:
        from .reward.export import export_reward_checkpoint

        return export_reward_checkpoint(saved, out_dir=out_dir, formats=formats, name=name, best=best)
    if best:
        raise ValueError(f"--best is for reward runs; {saved.path} is a distill checkpoint")
    config = DistillConfig.from_dict(saved.config)
    target = Path(out_dir) if out_dir is not None else saved.path.parent.parent / "export"
    return export_lora(saved.lora, config, saved.state, target, formats=formats, name=name)

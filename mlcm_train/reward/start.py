"""The LoRA a reward run starts from: a `distill` export (kohya/PEFT/diffusers) or a run checkpoint.

Either way it ends up as PEFT-named weights (``<module>.lora_A.weight``), one rank and one alpha, the UNet
modules it targets, its MLCM metadata and, when recorded, the distill config it was trained with. It is
attached to the teacher's UNet at its trained alpha (docs/method.md, "The LoRA and its scale").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mlcm.lora import MLCMLoraMetadata, detect_family, kohya_name_index, read_lora
from mlcm_train.config import DistillConfig
from mlcm_train.distill import build_metadata
from mlcm_train.models.student import attach_lora, load_lora_state_dict
from mlcm_train.run.checkpoint import CHECKPOINT_DIR, STATE_FILE, load_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartLora:
    """A distilled LoRA ready to attach: PEFT-named fp32 weights, rank, alpha, target modules, provenance."""

    state: dict[str, Tensor]  # "<module path>.lora_A.weight" / ".lora_B.weight"
    rank: int
    alpha: float
    targets: tuple[str, ...]  # module patterns (checkpoint) or exact module paths (file) for PEFT
    family: str | None  # "sd15"/"sdxl" when the file or checkpoint says so
    metadata: MLCMLoraMetadata | None
    distill_config: dict[str, Any] | None  # the recipe it was distilled with, when recorded
    source: str
    kohya_modules: dict[str, tuple[Tensor, Tensor]] = field(
        default_factory=dict
    )  # file input, until resolved


def is_run_checkpoint(path: Path) -> bool:
    """A checkpoint folder (state.json) or a run directory with checkpoints/step-*."""
    return path.is_dir() and ((path / STATE_FILE).is_file() or (path / CHECKPOINT_DIR).is_dir())


def read_start_lora(path: str | Path) -> StartLora:
    """Read the starting LoRA; a reward run's own checkpoint is refused (export it and start from the file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"--lora {path} does not exist; pass the LoRA `distill` exported (<run>/export/*.safetensors) "
            "or a distill run directory / checkpoint folder"
        )
    if is_run_checkpoint(path):
        saved = load_checkpoint(path)
        if "reward" in saved.config:
            raise ValueError(
                f"{saved.path} is a reward run's checkpoint; to continue it pass --resume {saved.path}, to start "
                "another reward stage from it export it first (python -m mlcm_train export) and pass the file"
            )
        config = DistillConfig.from_dict(saved.config)
        return StartLora(
            state=dict(saved.lora),
            rank=config.lora_rank,
            alpha=float(config.lora_alpha),
            targets=tuple(config.lora_targets),
            family=saved.state.family,
            metadata=build_metadata(config, saved.state),
            distill_config=config.to_dict(),
            source=str(saved.path),
        )
    lora = read_lora(path)
    ranks = lora.ranks()
    alphas = sorted({m.alpha for m in lora.modules.values()})
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(
            f"{path} mixes ranks {list(ranks)} / alphas {alphas}; the reward stage trains LoRAs with one rank "
            "and one alpha, as `distill` writes them"
        )
    training = lora.metadata.training if lora.metadata is not None else {}
    return StartLora(
        state={},
        rank=ranks[0],
        alpha=float(alphas[0]),
        targets=(),
        family=detect_family(lora),
        metadata=lora.metadata,
        distill_config=training.get("config") if isinstance(training.get("config"), dict) else None,
        source=str(path),
        kohya_modules={name: (m.down.float(), m.up.float()) for name, m in lora.modules.items()},
    )


def plan_targets(start: StartLora) -> tuple[str, ...]:
    """Module patterns that place the starting LoRA, for a plan made before any UNet is loaded: the
    checkpoint's, else those of the distill config the file records, else distill's defaults."""
    if start.targets:
        return start.targets
    recorded = (start.distill_config or {}).get("lora_targets")
    return tuple(recorded) if recorded else tuple(DistillConfig().lora_targets)


def attach_start_lora(
    unet: nn.Module,
    start: StartLora,
    *,
    family: str,
    weight_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> list[nn.Parameter]:
    """Freeze ``unet``, inject the LoRA at its trained rank/alpha, load its weights; returns the LoRA params."""
    if start.family is not None and start.family != family:
        raise ValueError(
            f"the LoRA {start.source} was trained for {start.family} but the teacher is {family}; pass the "
            "teacher the LoRA was distilled from"
        )
    state, targets = start.state, start.targets
    if start.kohya_modules:
        state, targets = _peft_state_from_kohya(unet, start)
    params = attach_lora(
        unet,
        rank=start.rank,
        alpha=start.alpha,
        targets=targets,
        weight_dtype=weight_dtype,
        gradient_checkpointing=gradient_checkpointing,
    )
    try:
        load_lora_state_dict(unet, state)
    except ValueError as error:
        raise ValueError(
            f"the LoRA {start.source} does not fit this teacher's UNet ({error}); pass the teacher it was "
            "distilled from"
        ) from error
    log.info(
        "starting LoRA %s: rank %d, alpha %g (scale %g), %d modules",
        start.source,
        start.rank,
        start.alpha,
        start.alpha / start.rank,
        len(targets),
    )
    return params


def _peft_state_from_kohya(unet: nn.Module, start: StartLora) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Kohya-named pairs -> PEFT keys on this UNet's module paths; unknown names mean another model."""
    layers = (nn.Linear, nn.Conv2d)
    index = kohya_name_index(name for name, m in unet.named_modules() if isinstance(m, layers) and name)
    unknown = sorted(set(start.kohya_modules) - set(index))
    if unknown:
        raise ValueError(
            f"the LoRA {start.source} has {len(unknown)} modules this teacher's UNet lacks (e.g. {unknown[0]}); "
            "it was made for another model (or uses LDM key names); pass the teacher it was distilled from"
        )
    state: dict[str, Tensor] = {}
    for name, (down, up) in start.kohya_modules.items():
        path = index[name]
        state[f"{path}.lora_A.weight"] = down
        state[f"{path}.lora_B.weight"] = up
    return state, tuple(sorted(index[name] for name in start.kohya_modules))

"""One writer for every trained LoRA: kohya (the node pack's format: explicit alpha + MLCM metadata), PEFT, diffusers.

Every format carries the trained alpha so that each loader applies the LoRA at the scale it was trained at
(docs/method.md, "The LoRA and its scale"): kohya via per-module ``.alpha`` tensors, PEFT via
``adapter_config.json``, diffusers via the ``lora_adapter_metadata`` header that ``load_lora_weights`` reads.
The distill and reward stages build the metadata; this module writes the files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mlcm.lora import LoraWeights, MLCMLoraMetadata, lora_from_peft_state_dict, write_kohya_lora
from mlcm_train.config import EXPORT_FORMATS

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
    """Write ``<stem>.safetensors`` (kohya), ``<stem>_peft/``, ``<stem>_diffusers/`` as asked, and
    ``<stem>.config.json`` (``record``: the recipe); ``source`` says where the weights come from."""
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
    return written

"""Which base model (SD1.5 or SDXL) a UNet LoRA was made for."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from .modules import LoraModule, LoraWeights

logger = logging.getLogger(__name__)

FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}  # how messages and model cards name the families

# Cross-attention key/value projections take text-encoder features: CLIP ViT-L/14 gives 768 (SD1.5),
# CLIP ViT-L + OpenCLIP bigG concatenated give 2048 (SDXL) (the published UNet configs' cross_attention_dim).
CROSS_ATTENTION_DIM_FAMILY = {768: "sd15", 2048: "sdxl"}
_CROSS_ATTENTION = re.compile(r"attn2_to_[kv]$")
# Modules only SDXL's UNet has: the text-time add_embedding (diffusers) / label_emb (ldm names), and
# transformer stacks deeper than one block (SD1.5 uses transformer_layers_per_block = 1 everywhere).
_SDXL_ONLY = re.compile(r"^lora_unet_(add_embedding_|label_emb_)|_transformer_blocks_[1-9]")


def detect_family(lora: LoraWeights) -> str | None:
    """The base family ("sd15"/"sdxl") from the metadata, else from the modules; None when undecidable."""
    if lora.metadata is not None and lora.metadata.base_family is not None:
        return lora.metadata.base_family
    return family_from_modules(lora.modules)


def family_from_modules(modules: Mapping[str, LoraModule]) -> str | None:
    """The base family ("sd15"/"sdxl") from kohya-named modules' shapes and names alone, or None."""
    for name, module in modules.items():
        if _CROSS_ATTENTION.search(name):
            in_features = int(module.down.shape[1])
            family = CROSS_ATTENTION_DIM_FAMILY.get(in_features)
            if family is None:
                logger.info(
                    "%s has cross-attention width %d: neither SD1.5 (768) nor SDXL (2048)", name, in_features
                )
            return family
    if any(_SDXL_ONLY.search(name) for name in modules):
        return "sdxl"
    return None

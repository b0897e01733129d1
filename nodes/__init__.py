"""ComfyUI glue (V3 schema): the three MLCM nodes, and the KSampler dropdown entries registered on load."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .ksampler_names import register_ksampler_names
from .lora_loader import MLCMLoraLoader
from .sampler import MLCMSampler
from .schedule import MLCMSegmentSchedule

NODES: list[type[io.ComfyNode]] = [MLCMLoraLoader, MLCMSegmentSchedule, MLCMSampler]


class MLCMExtension(ComfyExtension):
    """The pack as ComfyUI's V3 loader sees it."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MLCMExtension:
    """Called by ComfyUI once when it loads the pack: adds the KSampler names, returns the node list."""
    register_ksampler_names()
    return MLCMExtension()

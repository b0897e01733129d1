"""The nodes' schemas, with what newer ComfyUI releases add where this one has it: search aliases.

ComfyUI's node search matches display names and ids; later V3 schemas also take ``search_aliases``, the
words users type for this kind of node ("lcm", "turbo", "few step"). ``schema`` passes them on only
where ``io.Schema`` has the field, so the same code runs on releases with and without it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from comfy_api.latest import io

SEARCH_ALIASES: dict[str, list[str]] = {
    "MLCMLoraLoader": ["mlcm lora", "tlcm", "lcm lora", "few step lora", "turbo lora", "distilled lora"],
    "MLCMSegmentSchedule": ["mlcm scheduler", "tlcm", "lcm schedule", "few step", "turbo", "sigmas"],
    "MLCMSampler": ["mlcm", "tlcm", "lcm", "consistency sampler", "few step", "turbo"],
}


def schema(**fields: Any) -> io.Schema:
    """``io.Schema(**fields)`` plus the node's search aliases where this ComfyUI supports them."""
    if "search_aliases" in {field.name for field in dataclasses.fields(io.Schema)}:
        fields.setdefault("search_aliases", SEARCH_ALIASES.get(fields["node_id"], []))
    return io.Schema(**fields)

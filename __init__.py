"""ComfyUI-MLCM: ComfyUI loads this folder as a package and calls ``comfy_entrypoint`` (V3 node schema).

Kept tiny on purpose: importing the pack must stay cheap and must not import diffusers or peft.
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]

"""ComfyUI-MLCM: ComfyUI loads this folder as a package and calls ``comfy_entrypoint`` (V3 node schema).

Kept tiny on purpose: importing the pack must stay cheap and must not import diffusers or peft.
Outside ComfyUI (pytest collecting this folder, a plain ``pip install``) there is no ``comfy_api``
and the folder exports nothing; ``mlcm`` and ``mlcm_train`` are the importable packages.
"""

WEB_DIRECTORY = "./web"  # web/docs/<node id>.md: the help page ComfyUI shows for each node

try:
    import comfy_api  # noqa: F401  (present only when ComfyUI is the host)
except ImportError:
    __all__: list[str] = []
else:
    from .nodes import comfy_entrypoint

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]

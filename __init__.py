"""ComfyUI-MLCM: ComfyUI loads this folder as a package and calls ``comfy_entrypoint`` (V3 node schema).

Kept tiny on purpose: importing the pack must stay cheap and must not import diffusers or peft.
Outside ComfyUI (pytest collecting this folder, a plain ``pip install``) there is no ``comfy_api``
and the folder exports nothing; ``mlcm`` and ``mlcm_train`` are the importable packages. A ComfyUI
without a usable V3 API (before 0.3.48, or 0.3.48-0.3.5x without torchaudio, which its V3 module
imports) gets one log line saying so, and no nodes, instead of an import error.
"""

import logging

WEB_DIRECTORY = "./web"  # web/docs/<node id>.md: the help page ComfyUI shows for each node

try:
    import comfy_api  # noqa: F401  (present only when ComfyUI is the host)
except ImportError:
    __all__: list[str] = []
else:
    try:
        import comfy_api.latest  # noqa: F401  (the V3 node API the nodes are written against)
    except ImportError as error:
        logging.getLogger(__name__).error(
            "ComfyUI-MLCM needs ComfyUI's V3 node API (comfy_api.latest, ComfyUI 0.3.48 or newer; 0.3.48 to "
            "0.3.5x also need torchaudio installed), which failed to import here (%s); the MLCM nodes are "
            "not loaded. Update ComfyUI, or install torchaudio.",
            error,
        )
        __all__ = []
    else:
        from .nodes import comfy_entrypoint

        __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]

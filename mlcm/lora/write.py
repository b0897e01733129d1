"""Write LoRAs as kohya safetensors files that stock loaders (ComfyUI, A1111, kohya) apply at the right scale."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .family import family_from_modules
from .metadata import MLCMLoraMetadata
from .modules import LoraWeights

logger = logging.getLogger(__name__)

# kohya sd-scripts' marker for a plain LoRA network, and its value of ss_network_dim/alpha for mixed ranks.
SS_NETWORK_MODULE = "networks.lora"
SS_DYNAMIC = "Dynamic"
# Linux reports the process's umask here (since 4.7) without changing it.
PROC_STATUS = "/proc/self/status"
OPEN_MODE = 0o666  # what open() asks for; the umask then clears bits


def current_umask() -> int:
    """The process's umask, read from /proc on Linux, else by setting and at once restoring it."""
    try:
        with open(PROC_STATUS, "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # os.umask can only be read by replacing it; 077 keeps files other threads create meanwhile private.
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file here: ``0o666 & ~umask`` (e.g. 0o644 under umask 022).

    safetensors and ``tempfile.mkstemp`` create files as 0o600, which a ComfyUI running as another user
    cannot read; chmod written files to this mode.
    """
    return OPEN_MODE & ~current_umask()


def to_kohya_state_dict(lora: LoraWeights, *, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """kohya keys `<name>.lora_down.weight`, `.lora_up.weight` (in `dtype`) and an explicit `.alpha` per module."""
    state_dict: dict[str, Tensor] = {}
    for name in sorted(lora.modules):
        module = lora.modules[name]
        for suffix, tensor in (("lora_down.weight", module.down), ("lora_up.weight", module.up)):
            cast = tensor.detach().to("cpu", dtype).contiguous().clone()
            if not bool(torch.isfinite(cast).all()):
                raise ValueError(
                    f"{name}.{suffix} does not fit in {dtype} (values up to {float(tensor.abs().max()):.3g}); "
                    "export with dtype=torch.bfloat16 or torch.float32"
                )
            state_dict[f"{name}.{suffix}"] = cast
        # float32 even for fp16 weights: an rsLoRA alpha such as 8*sqrt(3) would lose 3 digits in fp16.
        state_dict[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    return state_dict


def kohya_header(lora: LoraWeights, metadata: MLCMLoraMetadata | None) -> dict[str, str]:
    """The safetensors `__metadata__` for a kohya export: network facts plus our metadata."""
    ranks = {module.rank for module in lora.modules.values()}
    alphas = {module.alpha for module in lora.modules.values()}
    header = {
        "ss_network_module": SS_NETWORK_MODULE,
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else SS_DYNAMIC,
        "ss_network_alpha": f"{next(iter(alphas)):g}" if len(alphas) == 1 else SS_DYNAMIC,
    }
    if metadata is not None:
        header.update(metadata.to_header())
    if lora.alpha_source:
        header["mlcm.alpha_source"] = lora.alpha_source
    return header


def _check_family(lora: LoraWeights, metadata: MLCMLoraMetadata | None) -> None:
    """Refuse metadata whose base_family contradicts the weights (loaders would trust the label)."""
    if metadata is None or metadata.base_family is None:
        return
    from_shapes = family_from_modules(lora.modules)
    if from_shapes is not None and from_shapes != metadata.base_family:
        raise ValueError(
            f"metadata says base_family={metadata.base_family!r} but the LoRA's module shapes are {from_shapes}'s; "
            f"set base_family={from_shapes!r} (or None) in the metadata"
        )


def write_kohya_lora(
    path: str | os.PathLike,
    lora: LoraWeights,
    *,
    metadata: MLCMLoraMetadata | None = None,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Atomically write `lora` as a kohya `.safetensors` file; `metadata` defaults to the LoRA's own."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"write_kohya_lora writes safetensors; name the file '{path.stem}.safetensors', not {path.name!r}"
        )
    if not lora.modules:
        raise ValueError("the LoRA has no modules; nothing to write")
    if not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype} must be a floating-point dtype (torch.float16, torch.bfloat16 or torch.float32)"
        )
    metadata = metadata if metadata is not None else lora.metadata
    _check_family(lora, metadata)
    state_dict = to_kohya_state_dict(lora, dtype=dtype)
    header = kohya_header(lora, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: a crash or full disk never leaves a half-written LoRA behind.
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(state_dict, tmp_name, metadata=header)
        os.chmod(tmp_name, default_file_mode())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)
        raise
    logger.info("Wrote kohya LoRA %s: %d modules, %s", path, len(lora.modules), header["ss_network_dim"])

"""MLCMLoraLoader: apply an MLCM LoRA (PEFT folder, diffusers or kohya file) at its trained scale.

The file is read by ``mlcm.lora.read_lora`` (which knows each module's alpha/rank, unlike ComfyUI's stock
loader for PEFT and diffusers files), checked against the model, converted to kohya keys with explicit
alpha, and handed to ComfyUI's own ``comfy.lora.load_lora`` + ``ModelPatcher.add_patches`` on a clone, so
lowvram offload, LoRA stacking and hooks behave as with the core loaders.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import comfy.lora
import comfy.model_base
import comfy.supported_models
import folder_paths
from comfy_api.latest import io

from ..mlcm import DEFAULT_SEGMENTS
from ..mlcm.lora import (
    FAMILY_NAMES,
    LoraWeights,
    detect_family,
    locate_lora_files,
    read_lora,
    to_kohya_state_dict,
)
from .schedule import MODEL_OPTIONS_KEY
from .schema import schema

logger = logging.getLogger(__name__)

# Parsed LoRAs kept in memory; an SDXL MLCM LoRA is ~400 MB, so keep only the last few.
CACHE_SIZE = 2
UNMAPPED_SHOWN = 5

_cache: OrderedDict[tuple, LoraWeights] = OrderedDict()
_cache_lock = threading.Lock()


def _fingerprint(path: str) -> tuple:
    """Path, size and mtime of the files ``read_lora`` reads for ``path``: the weights and any PEFT config."""
    files = [file for file in locate_lora_files(path) if file is not None]
    return tuple((str(file), file.stat().st_size, file.stat().st_mtime_ns) for file in files)


def read_lora_cached(path: str, alpha_override: float | None) -> LoraWeights:
    """``read_lora`` with a small module-level cache keyed on the files' path+size+mtime and the override."""
    key = (_fingerprint(path), alpha_override)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    lora = read_lora(path, alpha_override=alpha_override)
    with _cache_lock:
        _cache[key] = lora
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return lora


def model_family(model: object) -> str | None:
    """ "sd15" / "sdxl" for a ComfyUI ModelPatcher of those families, else None."""
    base = model.model
    if isinstance(base, comfy.model_base.SDXL):
        return "sdxl"
    if isinstance(getattr(base, "model_config", None), comfy.supported_models.SD15):
        return "sd15"
    return None


def check_family(lora: LoraWeights, model: object) -> str | None:
    """The LoRA's family; raise ValueError naming what to load when it differs from the model's."""
    lora_family = detect_family(lora)
    family = model_family(model)
    if lora_family is not None and family is not None and lora_family != family:
        raise ValueError(
            f"This LoRA is for {FAMILY_NAMES[lora_family]} but the model is {FAMILY_NAMES[family]}; load an "
            f"{FAMILY_NAMES[lora_family]} checkpoint, or an MLCM LoRA made for {FAMILY_NAMES[family]}"
        )
    return lora_family


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape without trailing 1s: a 1x1 conv and a linear layer of the same size take the same LoRA delta."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_coverage(lora: LoraWeights, key_map: dict, model_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ValueError unless every LoRA module maps to a model weight of a fitting shape.

    ComfyUI itself would only log unmatched keys, and shape errors only at sampling time.
    """
    unmapped, misfit = [], []
    for name, module in lora.modules.items():
        target = key_map.get(name)
        if isinstance(target, tuple):  # (key, offset): a slice of a fused weight; ComfyUI checks the slice
            target, sliced = target[0], True
        else:
            sliced = False
        if target not in model_shapes:
            unmapped.append(name)
            continue
        delta_shape = (module.up.shape[0], *module.down.shape[1:])
        if not sliced and _squeezed(delta_shape) != _squeezed(model_shapes[target]):
            misfit.append(f"{name} {tuple(delta_shape)} vs {target} {tuple(model_shapes[target])}")
    total = len(lora.modules)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)}/{total} LoRA modules match no weight of this model (e.g. "
            f"{', '.join(unmapped[:UNMAPPED_SHOWN])}); the LoRA was made for a different UNet. Load the base "
            "model it was trained on (SD1.5 or SDXL)"
        )
    if misfit:
        raise ValueError(
            f"{len(misfit)}/{total} LoRA modules do not fit this model's weight shapes (e.g. "
            f"{'; '.join(misfit[:UNMAPPED_SHOWN])}); the LoRA was made for a different model architecture"
        )


def apply_lora(model: object, lora: LoraWeights, strength: float) -> tuple[object, int]:
    """A clone of ``model`` with ``lora`` patched in through ComfyUI's own mechanism; returns (clone, modules applied)."""
    if not lora.modules:
        raise ValueError(
            "The LoRA file holds no UNet LoRA modules (text-encoder-only or empty); choose an MLCM LoRA"
        )
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    model_shapes = {key: tuple(tensor.shape) for key, tensor in model.model.state_dict().items()}
    check_coverage(lora, key_map, model_shapes)
    dtype = next(
        iter(lora.modules.values())
    ).down.dtype  # keep the file's precision (fp16 releases stay fp16)
    kohya = to_kohya_state_dict(lora, dtype=dtype)
    wanted = {name: key_map[name] for name in lora.modules}
    patches = comfy.lora.load_lora(kohya, wanted)
    patched = model.clone()
    applied = patched.add_patches(patches, strength)
    if len(applied) != len(lora.modules):
        raise ValueError(
            f"ComfyUI accepted only {len(applied)}/{len(lora.modules)} LoRA modules for this model; the LoRA "
            "does not fit it"
        )
    return patched, len(applied)


def describe(lora: LoraWeights, applied: int, family: str | None, strength: float) -> str:
    """One line for the report output and the log."""
    scales = sorted({(module.alpha, module.rank) for module in lora.modules.values()})
    if len(scales) == 1:
        alpha, rank = scales[0]
        scale = f"scale alpha/rank = {alpha:g}/{rank} = {alpha / rank:g}"
    else:
        scale = f"{len(scales)} different alpha/rank scales"
    metadata = lora.metadata
    segments = metadata.segments if metadata is not None else None
    supported = (metadata.supported_steps if metadata is not None else None) or range(
        1, (segments or DEFAULT_SEGMENTS) + 1
    )
    steps = list(supported)
    step_text = (
        f"{steps[0]}-{steps[-1]}"
        if steps == list(range(steps[0], steps[-1] + 1))
        else ", ".join(map(str, steps))
    )
    return (
        f"applied {applied}/{len(lora.modules)} modules ({lora.source_format}), {scale} ({lora.alpha_source}), "
        f"strength {strength:g}, family {family or 'unknown'}, segments {segments or 'not stated'}; "
        f"sample at cfg 1.0 with {step_text} steps on MLCM Sampler + MLCM Segment Schedule "
        "(or KSampler: sampler mlcm, scheduler mlcm_segments)"
    )


class MLCMLoraLoader(io.ComfyNode):
    """The loader node; all file and maths work happens in ``mlcm.lora``."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(
            node_id="MLCMLoraLoader",
            display_name="MLCM LoRA Loader",
            category="loaders",
            description=(
                "Applies an MLCM LoRA to the model at the scale it was trained with. Accepts PEFT adapter "
                "folders (pick <folder>/adapter_model.safetensors; adapter_config.json next to it sets "
                "alpha), diffusers LoRA files and kohya files. The stock LoRA loader applies the official "
                "MLCM release 8x too strong because it ignores the adapter config; this node does not. "
                "Fails with a clear message when the LoRA does not fit the model (e.g. an SDXL LoRA on "
                "SD1.5) or the file is corrupt. The 'report' output says how many modules were applied and "
                "at which scale. The LoRA's segment count and supported step counts are passed on to MLCM "
                "Segment Schedule."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 or SDXL model the LoRA was distilled from."),
                io.Combo.Input(
                    "lora_name",
                    options=folder_paths.get_filename_list("loras"),
                    tooltip="A file in ComfyUI's models/loras folder; for a PEFT folder choose its "
                    "adapter_model.safetensors.",
                ),
                io.Float.Input(
                    "strength",
                    default=1.0,
                    min=-4.0,
                    max=4.0,
                    step=0.01,
                    tooltip="1.0 = the LoRA's trained scale (alpha/rank already applied). Lower it to soften.",
                ),
                io.Float.Input(
                    "alpha_override",
                    default=0.0,
                    min=0.0,
                    max=4096.0,
                    step=1.0,
                    tooltip="Advanced. 0 = take alpha from the file, its adapter_config.json or metadata. "
                    "Otherwise the LoRA's lora_alpha: each module is scaled by alpha_override/rank.",
                ),
            ],
            outputs=[
                io.Model.Output(tooltip="A patched copy of the model; the input model is unchanged."),
                io.String.Output(
                    "report", display_name="report", tooltip="Modules applied, scale and family."
                ),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name: str, strength: float, alpha_override: float) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        lora = read_lora_cached(path, alpha_override if alpha_override > 0 else None)
        family = check_family(lora, model) or model_family(model)
        patched, applied = apply_lora(model, lora, strength)
        metadata = lora.metadata
        patched.model_options[MODEL_OPTIONS_KEY] = {
            "segments": metadata.segments if metadata is not None else None,
            "family": family,
            "recommended_steps": list(metadata.recommended_steps)
            if metadata is not None and metadata.recommended_steps
            else None,
            "supported_steps": list(metadata.supported_steps)
            if metadata is not None and metadata.supported_steps
            else None,
            "lora_name": lora_name,
        }
        report = describe(lora, applied, family, strength)
        logger.info("MLCM LoRA %s: %s", lora_name, report)
        return io.NodeOutput(patched, report)

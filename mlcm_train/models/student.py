"""The student: a PEFT LoRA on the teacher's own UNet (one UNet in memory; adapters off = teacher).

Base weights are frozen (optionally in bf16/fp16); LoRA weights stay fp32 so that AdamW updates are not
lost to rounding under autocast (as the diffusers LCM-LoRA scripts do).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

ADAPTER_NAME = "default"  # PEFT's adapter name; stripped from exported keys


def attach_lora(
    unet: nn.Module,
    *,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    weight_dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
    seed: int = 0,
) -> list[nn.Parameter]:
    """Freeze ``unet``, inject a LoRA (scale alpha/rank) on the ``targets`` patterns; returns the LoRA params.

    The UNet is modified in place on purpose: it is the trainer's own copy, loaded for this run.
    """
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    # init_lora_weights=True: B = 0, so the student starts exactly at the teacher.
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    try:
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    except ValueError as error:
        raise ValueError(
            f"no UNet module matched the LoRA targets {list(targets)} ({error}); use module names such as to_q, conv1"
        ) from error
    params = lora_parameters(unet)
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    _seeded_lora_init(unet, seed)
    if gradient_checkpointing:
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise ValueError(f"{type(unet).__name__} does not support gradient checkpointing; drop the flag")
        unet.enable_gradient_checkpointing()
    return params


@torch.no_grad()
def _seeded_lora_init(unet: nn.Module, seed: int) -> None:
    """Re-draw every lora_A from an explicit generator (PEFT draws from the global RNG, which breaks resume).

    Same law as PEFT's default, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)); B stays 0.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in unet.named_parameters():
        if ".lora_A." in name:
            fan_in = param[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            draw = torch.rand(param.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
            param.copy_(draw.to(param.device))


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA A/B parameters of ``unet`` in a fixed (module) order."""
    return [p for name, p in unet.named_parameters() if ".lora_A." in name or ".lora_B." in name]


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights with PEFT's saved key names (``<module>.lora_A.weight``), detached fp32 clones."""
    suffix = f".{ADAPTER_NAME}."
    return {
        name.replace(suffix, "."): p.detach().float().clone()
        for name, p in unet.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA weights into the injected adapter; key sets and shapes must match exactly."""
    suffix = f".{ADAPTER_NAME}."
    params = {
        name.replace(suffix, "."): p
        for name, p in unet.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"saved LoRA does not fit this UNet: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); resume with the same teacher, rank and targets"
        )
    with torch.no_grad():
        for name, param in params.items():
            if state[name].shape != param.shape:
                raise ValueError(
                    f"saved LoRA weight {name} has shape {tuple(state[name].shape)}, the UNet expects "
                    f"{tuple(param.shape)}; resume with the same lora_rank"
                )
            param.copy_(state[name].to(param.dtype))


def _tuner_layers(unet: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base UNet (the teacher) inside the block; the LoRA is re-enabled after."""
    layers = _tuner_layers(unet)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class LoraEMA:
    """Exponential moving average of the LoRA weights, used as the consistency target when enabled."""

    def __init__(self, unet: nn.Module, decay: float) -> None:
        suffix = f".{ADAPTER_NAME}."
        self.params = {
            name.replace(suffix, "."): p
            for name, p in unet.named_parameters()
            if ".lora_A." in name or ".lora_B." in name
        }
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the model (no-grad use only)."""
        backup = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError(
                "saved EMA weights do not match this LoRA; resume with the same rank and targets"
            )
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)


def load_lora_file(unet: nn.Module, path: str, *, rank: int, alpha: float) -> int:
    """Start the adapter from an existing LoRA file/folder (kohya, PEFT, diffusers); returns modules loaded.

    The file's own scale (its alpha / rank) is folded into B, so the student's effective weights equal
    the file's as a loader would apply them (docs/method.md, "The LoRA and its scale"). Ranks must match this run's.
    """
    from mlcm.lora import kohya_name, read_lora

    lora = read_lora(path)
    suffix = f".{ADAPTER_NAME}."
    params = {name.replace(suffix, "."): p for name, p in unet.named_parameters() if ".lora_" in name}
    modules = {name.rsplit(".lora_", 1)[0] for name in params}
    by_kohya = {kohya_name(module): module for module in modules}
    unknown = sorted(set(lora.modules) - set(by_kohya))
    if unknown:
        raise ValueError(
            f"{path} has {len(unknown)} modules this UNet's LoRA does not (e.g. {unknown[0]}); "
            "use a LoRA made for this teacher family with the same lora_targets"
        )
    with torch.no_grad():
        for name, module in lora.modules.items():
            if module.rank != rank:
                raise ValueError(f"{path} has rank {module.rank} at {name}; pass --lora-rank {module.rank}")
            path_in_unet = by_kohya[name]
            down, up = params[f"{path_in_unet}.lora_A.weight"], params[f"{path_in_unet}.lora_B.weight"]
            down.copy_(module.down.reshape(down.shape).to(down.dtype))
            up.copy_((module.up * (module.scale / (alpha / rank))).reshape(up.shape).to(up.dtype))
    return len(lora.modules)

"""The frozen teacher (SD1.5 or SDXL), loaded offline from a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from mlcm_train.models import single_file
from mlcm_train.models.conditioning import Conditioning
from mlcm_train.models.tokenizers import find_tokenizers, load_tokenizers

logger = logging.getLogger(__name__)

# SDXL micro-conditioning: (original_h, original_w, crop_top, crop_left, target_h, target_w), SDXL paper sec. 2.2.
SDXL_TIME_IDS = 6


@dataclass
class Teacher:
    """A frozen SD1.5/SDXL teacher: UNet, VAE, text encoder(s), tokenizer(s) and its DDPM schedule.

    The CFG null condition (`uncond`) follows each family's convention: SD1.5 encodes the empty prompt;
    SDXL base uses zeros for both the token and pooled embeddings (`force_zeros_for_empty_prompt=True`
    in its model_index.json), with the same time ids as the conditional branch.
    """

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    alphas_cumprod: Tensor
    resolution: int
    text_encoders: tuple[torch.nn.Module, ...] = ()
    tokenizers: tuple = ()
    zero_uncond: bool = False
    source: str = ""
    _empty_prompt: Conditioning | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixel-to-latent downsampling of the VAE (8 for SD1.5/SDXL)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def scaling_factor(self) -> float:
        """VAE latent scale (0.18215 SD1.5, 0.13025 SDXL): latents fed to the UNet are vae_latents * this."""
        return float(self.vae.config.scaling_factor)

    def latent_shape(self, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
        """(B, C, H/f, W/f) of the UNet input for square images of side `resolution` (default: native)."""
        side = resolution if resolution is not None else self.resolution
        if side % self.vae_scale_factor:
            raise ValueError(f"resolution={side} is not a multiple of the VAE factor {self.vae_scale_factor}")
        return (
            batch_size,
            self.latent_channels,
            side // self.vae_scale_factor,
            side // self.vae_scale_factor,
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], resolution: int | None = None) -> Conditioning:
        """Text conditioning as the diffusers SD/SDXL pipelines compute it (no grad, teacher dtype/device).

        SD1.5: last hidden state of CLIP-L. SDXL: penultimate hidden states of CLIP-L and bigG concatenated,
        the projected pooled bigG output, and time ids for an uncropped square image of side `resolution`.
        Prompts are padded/truncated to the encoders' 77 tokens, as in diffusers.
        """
        if isinstance(prompts, str):
            raise TypeError("encode_prompts takes a sequence of prompts, not one string; wrap it in a list")
        if not self.text_encoders:
            raise ValueError(
                "this Teacher has no text encoders: it was built without them, or a run released them once its "
                "prompts were encoded (keep them with --keep-text-encoders)"
            )
        if len(prompts) == 0:
            raise ValueError("encode_prompts got no prompts")
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.family == "sd15":
                hidden.append(encoder(ids)[0])
            else:
                out = encoder(ids, output_hidden_states=True)
                hidden.append(out.hidden_states[-2])
                pooled = out[0]  # text_embeds of the projection model (the last encoder)
        prompt_embeds = torch.cat(hidden, dim=-1).to(self.dtype)
        if self.family == "sd15":
            return Conditioning(prompt_embeds)
        return Conditioning(prompt_embeds, pooled.to(self.dtype), self.time_ids(len(prompts), resolution))

    def release_text_encoders(self) -> int:
        """Drop the text encoders once every prompt is encoded; returns the bytes of weights released."""
        released = sum(p.numel() * p.element_size() for e in self.text_encoders for p in e.parameters())
        self.text_encoders = ()
        return released

    def time_ids(self, batch_size: int, resolution: int | None = None) -> Tensor:
        """SDXL add_time_ids for an uncropped square image: (res, res, 0, 0, res, res) per sample."""
        side = float(resolution if resolution is not None else self.resolution)
        row = torch.tensor([side, side, 0.0, 0.0, side, side], dtype=self.dtype, device=self.device)
        return row.expand(batch_size, SDXL_TIME_IDS).clone()

    def uncond(self, batch_size: int, resolution: int | None = None) -> Conditioning:
        """The CFG null condition for `batch_size` samples (see the class docstring for the convention)."""
        if self.zero_uncond:
            dim = sum(int(e.config.hidden_size) for e in self.text_encoders)
            pooled_dim = int(self.text_encoders[-1].config.projection_dim)
            length = int(self.tokenizers[0].model_max_length)
            kwargs = {"dtype": self.dtype, "device": self.device}
            return Conditioning(
                torch.zeros(batch_size, length, dim, **kwargs),
                torch.zeros(batch_size, pooled_dim, **kwargs),
                self.time_ids(batch_size, resolution),
            )
        if self._empty_prompt is None:
            self._empty_prompt = self.encode_prompts([""])
        empty = self._empty_prompt
        if self.family == "sdxl":
            empty = Conditioning(empty.prompt_embeds, empty.pooled_embeds, self.time_ids(1, resolution))
        return empty.to(device=self.device).repeat(batch_size)


def alphas_cumprod_from_config(config: dict) -> Tensor:
    """float64 cumulative alphas of the DDPM schedule in a diffusers scheduler config (Ho et al. 2020, eq. 4)."""
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(
            f"the teacher's scheduler predicts {config['prediction_type']!r}; MLCM distils epsilon-prediction teachers"
        )
    n = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    else:
        start, end = float(config["beta_start"]), float(config["beta_end"])
        schedule = config.get("beta_schedule", "linear")
        if schedule == "scaled_linear":  # the SD/SDXL schedule: linear in sqrt(beta)
            betas = torch.linspace(math.sqrt(start), math.sqrt(end), n, dtype=torch.float64) ** 2
        elif schedule == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        else:
            raise ValueError(
                f"beta_schedule={schedule!r} is not supported; SD1.5/SDXL teachers use 'scaled_linear'"
            )
    return torch.cumprod(1.0 - betas, dim=0)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} could not be read as JSON ({exc}); fix or replace it") from exc


def _scheduler_config(folder: Path) -> dict:
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the teacher's DDPM schedule is read from it")
    return _read_json(path)


def unet_config_family(unet_config: dict) -> str:
    """'sdxl' when the UNet takes SDXL's added text/time conditioning, else 'sd15'."""
    return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else "sd15"


def folder_unet_config(folder: Path) -> dict:
    """The UNet config of a diffusers folder; a missing one says the folder is incomplete."""
    unet_config = folder / "unet" / "config.json"
    if not unet_config.is_file():
        raise FileNotFoundError(
            f"{unet_config} is missing; {folder} is not a complete SD1.5/SDXL diffusers folder"
        )
    return _read_json(unet_config)


def _load_diffusers_folder(folder: Path, family: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder(s) of a diffusers pipeline folder, local files only."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    if family == "sdxl":
        loaders["text_encoder_2"] = CLIPTextModelWithProjection
    modules = {}
    for name, cls in loaders.items():
        sub = folder / name
        if not (sub / "config.json").is_file():
            raise FileNotFoundError(f"{sub}/config.json is missing; the {family} teacher needs its {name}")
        dtype_kw = {"torch_dtype": dtype} if name in ("unet", "vae") else {_transformers_dtype_kwarg(): dtype}
        try:
            modules[name] = cls.from_pretrained(
                folder, subfolder=name, local_files_only=True, variant=_variant(sub), **dtype_kw
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(
                f"could not load the {name} of {folder} ({exc}); its weights are missing or corrupt"
            ) from exc
    return modules


def _transformers_dtype_kwarg() -> str:
    """``dtype`` (transformers 4.56 and later, where ``torch_dtype`` is deprecated) or ``torch_dtype`` before.

    Older releases still matter: ImageReward's BLIP code runs only with transformers before 4.50.
    """
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _variant(subfolder: Path) -> str | None:
    """'fp16' when a component folder only holds fp16-variant weights (diffusers' `*.fp16.safetensors`)."""
    names = [p.name for p in subfolder.iterdir()]
    plain = any(n.endswith((".safetensors", ".bin")) and ".fp16." not in n for n in names)
    return "fp16" if not plain and any(".fp16." in n for n in names) else None


def load_teacher(
    path: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    comfyui_root: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Teacher:
    """Load a frozen teacher from a diffusers folder or a single-file SD1.5/SDXL checkpoint, offline.

    `config_dir`: a diffusers folder whose configs describe a single-file checkpoint (default: the shipped
    SD1.5/SDXL-base configs). Tokenizers are searched as documented in `mlcm_train.models.tokenizers`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"teacher {path} does not exist; pass a diffusers folder (with model_index.json) or a single-file "
            ".safetensors checkpoint such as ComfyUI/models/checkpoints/<name>.safetensors"
        )
    # Everything cheap (family, schedule, tokenizers) is settled before the weights are read, so a
    # missing piece is reported at once rather than after loading gigabytes.
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is a folder without model_index.json; pass a diffusers pipeline folder or a checkpoint file"
            )
        family = unet_config_family(folder_unet_config(path))
        folder = path
        diffusers_dirs: tuple[Path, ...] = (path,)
    else:
        keys = single_file.read_keys(path)
        family = single_file.detect_family(keys)
        single_file.check_prediction_type(keys, path)
        folder = single_file.config_folder(family, config_dir)
        diffusers_dirs = (folder,) if config_dir is not None else ()
    scheduler_root = (
        folder if (folder / "scheduler").is_dir() or path.is_dir() else single_file.SHIPPED_CONFIGS / family
    )
    alphas_cumprod = alphas_cumprod_from_config(_scheduler_config(scheduler_root))
    index_path = folder / "model_index.json"
    index = _read_json(index_path) if index_path.is_file() else {}
    zero_uncond = bool(index.get("force_zeros_for_empty_prompt", family == "sdxl"))
    source = find_tokenizers(
        2 if family == "sdxl" else 1,
        tokenizer_path=tokenizer_path,
        diffusers_dirs=diffusers_dirs,
        comfyui_root=comfyui_root,
    )
    if path.is_dir():
        modules = _load_diffusers_folder(path, family, dtype)
    else:
        modules = single_file.build_from_single_file(single_file.read_checkpoint(path), family, folder, dtype)
    encoders = tuple(modules[n] for n in ("text_encoder", "text_encoder_2") if n in modules)
    tokenizers = load_tokenizers(source, int(encoders[0].config.max_position_embeddings))
    for tokenizer, encoder in zip(tokenizers, encoders):
        if len(tokenizer) > encoder.config.vocab_size:
            raise ValueError(
                f"the tokenizer from {source.origin} has {len(tokenizer)} tokens but the text encoder has only "
                f"{encoder.config.vocab_size} embeddings; use the tokenizer that belongs to this model"
            )
    for module in modules.values():
        module.to(device=device)  # dtype was set while loading
        module.requires_grad_(False)
        module.eval()
    unet, vae = modules["unet"], modules["vae"]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    teacher = Teacher(
        family=family,
        unet=unet,
        vae=vae,
        alphas_cumprod=alphas_cumprod,
        resolution=int(unet.config.sample_size) * scale,
        text_encoders=encoders,
        tokenizers=tokenizers,
        zero_uncond=zero_uncond,
        source=str(path),
    )
    logger.info("loaded %s teacher from %s (%s, %s)", family, path, dtype, device)
    return teacher

"""Tiny SD1.5- and SDXL-shaped teachers with random weights, written to disk for tests (no downloads).

Every builder is deterministic (fixed seeds inside `torch.random.fork_rng`, so the caller's global RNG is
untouched) and takes well under a second. Layout of what they write:

- `make_tiny_sd15(d)` / `make_tiny_sdxl(d)`: a diffusers folder `d/tiny_<family>` (model_index.json,
  unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/), loadable with `from_pretrained`.
- `make_tiny_single_file(d, family)`: the same weights as one ComfyUI-style `.safetensors` checkpoint
  `d/tiny_<family>.safetensors` in the original (LDM) key layout; the diffusers folder written next to it
  (`single_file_config_dir(path)`) describes it and can be passed as the loader's config folder.
- `make_tiny_tokenizer(d)`: a CLIP BPE tokenizer folder (vocab.json + merges.txt) over a tiny vocabulary.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ldm_writers
import torch
from safetensors.torch import save_file

from mlcm_train.demo.vocab import bytes_to_unicode
from mlcm_train.models import ldm_keys

SEED = 1234
TOKEN_LENGTH = 77  # CLIP context length used by SD1.5/SDXL
TINY_TEXT_HIDDEN = 32
TINY_SAMPLE_SIZE = 8  # latent side; the tiny VAE downsamples by 2, so images are 16x16
SCHEDULER_CONFIG = {
    # The SD1.5/SDXL training schedule: scaled_linear betas 0.00085..0.012 over 1000 steps.
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
_MERGES = ["a t</w>", "c at</w>", "d o", "do g</w>", "t h", "th e</w>", "r e", "re d</w>"]


# A prompt file for tiny-teacher training runs: repeated words so the tiny tokenizer knows them all.
TINY_PROMPTS = "a red cat\na dog\nthe red dog\na cat\n"


def tiny_vocab() -> dict[str, int]:
    """Vocabulary of the tiny tokenizer: every byte alone and word-final, a few merges, then bos/eos last."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in _MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def make_tiny_tokenizer(directory: str | Path) -> Path:
    """Write vocab.json + merges.txt (+ tokenizer_config.json) of a tiny CLIP tokenizer; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(tiny_vocab()), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": TOKEN_LENGTH, "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def _tokenizer(directory: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    make_tiny_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(
        directory, local_files_only=True, model_max_length=TOKEN_LENGTH, pad_token=pad_token
    )


def _text_config(projection: bool):
    from transformers import CLIPTextConfig

    vocab = tiny_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=2 * TINY_TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=TINY_TEXT_HIDDEN if projection else 512,
        hidden_act="gelu" if projection else "quick_gelu",
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"] if not projection else 0,
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=2 * TINY_SAMPLE_SIZE,
        scaling_factor=scaling_factor,
    )


def build_tiny_sd15():
    """Build (in memory) a StableDiffusionPipeline shaped like SD1.5: CLIP-L-like text encoder, cross-attn 32."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=TINY_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=TINY_TEXT_HIDDEN,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = _vae(scaling_factor=0.18215)  # SD1.5 VAE latent scaling
        text_encoder = CLIPTextModel(_text_config(projection=False))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp))
    scheduler = PNDMScheduler.from_config({**SCHEDULER_CONFIG, "skip_prk_steps": True})
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl():
    """Build (in memory) a StableDiffusionXLPipeline: two text encoders (32 + 32), text_time added conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    addition_time_embed_dim = 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 1)
        unet = UNet2DConditionModel(
            sample_size=TINY_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=2 * TINY_TEXT_HIDDEN,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # 6 micro-conditioning numbers (original size, crop, target size) + the pooled text embedding.
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + TINY_TEXT_HIDDEN,
            norm_num_groups=32,
        )
        vae = _vae(scaling_factor=0.13025)  # SDXL VAE latent scaling
        text_encoder = CLIPTextModel(_text_config(projection=False))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection=True))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp) / "l")
        # SDXL's second (OpenCLIP bigG) tokenizer pads with "!" (id 0) instead of the end token.
        tokenizer_2 = _tokenizer(Path(tmp) / "g", pad_token="!")
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def make_tiny_sd15(directory: str | Path) -> Path:
    """Save a tiny SD1.5-shaped diffusers pipeline to `directory/tiny_sd15`; returns that folder."""
    path = Path(directory) / "tiny_sd15"
    build_tiny_sd15().save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_sdxl(directory: str | Path) -> Path:
    """Save a tiny SDXL-shaped diffusers pipeline to `directory/tiny_sdxl`; returns that folder."""
    path = Path(directory) / "tiny_sdxl"
    build_tiny_sdxl().save_pretrained(path, safe_serialization=True)
    return path


def single_file_config_dir(checkpoint: str | Path) -> Path:
    """The diffusers folder written next to a tiny single file by `make_tiny_single_file` (its configs)."""
    return Path(checkpoint).with_suffix("")


def make_tiny_single_file(directory: str | Path, family: str = "sd15") -> Path:
    """Write `directory/tiny_<family>.safetensors` (LDM keys, as in ComfyUI models/checkpoints); returns it.

    The matching diffusers folder `directory/tiny_<family>` (same weights) is written too.
    """
    builders = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl}
    if family not in builders:
        raise ValueError(f"family={family!r}; use 'sd15' or 'sdxl'")
    pipe = builders[family]()
    folder = Path(directory) / f"tiny_{family}"
    pipe.save_pretrained(folder, safe_serialization=True)
    state = {}
    state.update(ldm_writers.unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(ldm_writers.vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    if family == "sd15":
        state.update(ldm_writers.clip_to_ldm(pipe.text_encoder.state_dict(), ldm_keys.SD15_TEXT_PREFIX))
    else:
        state.update(ldm_writers.clip_to_ldm(pipe.text_encoder.state_dict(), ldm_keys.SDXL_CLIP_L_PREFIX))
        state.update(ldm_writers.open_clip_to_ldm(pipe.text_encoder_2.state_dict()))
    path = folder.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def config_flags(config, skip: tuple[str, ...] = ()) -> list[str]:
    """Command-line flags that reproduce a DistillConfig/RewardConfig (``--no-x`` for false booleans)."""
    argv = []
    for key, value in config.to_dict().items():
        if value is None or key in skip:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


def make_full_shape(directory: str | Path, family: str = "sd15", dtype: torch.dtype = torch.float16) -> Path:
    """A diffusers folder with a full-shape UNet and VAE from the shipped configs (random weights, saved in
    ``dtype``) and one-layer text encoders of the real widths over the tiny vocabulary; for benchmarks and
    the memory plan's check. Nothing is downloaded. Returns the folder."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mlcm_train.models.single_file import SHIPPED_CONFIGS

    shipped = SHIPPED_CONFIGS / family
    vocab = tiny_vocab()

    def text_encoder(name: str, cls):
        config = CLIPTextConfig.from_json_file(shipped / name / "config.json")
        config.num_hidden_layers, config.vocab_size = 1, len(vocab)
        config.bos_token_id, config.eos_token_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        return cls(config).to(dtype)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(shipped / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(shipped / "vae"))
        unet, vae = torch.nn.Module.to(unet, dtype), torch.nn.Module.to(vae, dtype)
        encoders = {"text_encoder": text_encoder("text_encoder", CLIPTextModel)}
        if family == "sdxl":
            encoders["text_encoder_2"] = text_encoder("text_encoder_2", CLIPTextModelWithProjection)
    path = Path(directory) / f"full_{family}"
    with tempfile.TemporaryDirectory() as tmp:
        if family == "sd15":
            pipe = StableDiffusionPipeline(
                vae=vae,
                unet=unet,
                tokenizer=_tokenizer(Path(tmp)),
                scheduler=PNDMScheduler.from_config({**SCHEDULER_CONFIG, "skip_prk_steps": True}),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **encoders,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=vae,
                unet=unet,
                tokenizer=_tokenizer(Path(tmp) / "l"),
                tokenizer_2=_tokenizer(Path(tmp) / "g", pad_token="!"),
                scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
                force_zeros_for_empty_prompt=True,
                **encoders,
            )
        pipe.save_pretrained(path, safe_serialization=True)
    return path

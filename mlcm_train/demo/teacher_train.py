"""Train the demo's tiny SD1.5-architecture text-to-image teacher from scratch on coloured digits.

Real diffusers/transformers components in SD1.5's layout (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel, DDPM scaled_linear 0.00085..0.012 over 1000 steps, epsilon prediction), sized for a
2-core CPU: 32x32 images, a VAE that downsamples 4x to 8x8x4 latents. Recipe: the VAE first (L2 + a small
KL, Kingma & Welling 2014), its latent scale set to 1/std as SD did, then the UNet and the text encoder
together on the epsilon loss (Ho et al. 2020) with the caption dropped to "" 10% of the time so
classifier-free guidance works (Ho & Salimans 2022). Weights are stored in fp16 (half the size) and load
as fp32. Training checkpoints let an interrupted run continue.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mlcm_train.data import captioned
from mlcm_train.data.captioned import CaptionedSet, MaskSplit
from mlcm_train.demo.vocab import BOS, CONTEXT_LENGTH, EOS, write_tokenizer

log = logging.getLogger(__name__)

# SD1.5's training schedule (also tests/tiny_models.py): scaled_linear betas over 1000 steps, epsilon.
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
}
RECIPE_FILE = "teacher_recipe.json"
# Changes to the (digits) defaults per set. Shapes: hard edges and filled areas on a light background need a
# better VAE: 250 steps at 3e-3 reconstructed the held-out shapes at 67% prompt accuracy (classifier FD
# 3222), 1000 steps at 1e-3 at 100% (FD 40, real images 23); and more UNet steps.
DATASET_RECIPES: dict[str, dict] = {"shapes": {"vae_steps": 1000, "vae_lr": 1e-3, "unet_steps": 4000}}


@dataclass(frozen=True)
class TeacherRecipe:
    """Everything that determines the shipped teacher (written next to it as teacher_recipe.json)."""

    seed: int = 0
    dataset: str = "digits"  # the captioned image set (mlcm_train.data.captioned.DATASET_NAMES)
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 32x32 -> 8x8 latents
    vae_groups: int = 8  # GroupNorm groups (must divide every channel count)
    latent_channels: int = 4  # SD's latent depth
    vae_steps: int = 250
    vae_batch_size: int = 32
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-6  # per-sample KL sum weight; SD's autoencoder used 1e-6
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    unet_groups: int = 16
    unet_heads: int = 4  # diffusers' ``attention_head_dim`` (the number of heads in SD1.5's configs)
    unet_steps: int = 2700  # the shipped teacher (98% prompt accuracy at 25 CFG-DDIM steps, w=3)
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.999
    batch_size: int = 64
    cfg_dropout: float = 0.1  # fraction of captions replaced by "" (Ho & Salimans 2022 use 0.1-0.2)
    checkpoint_every: int = 100

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def for_dataset(cls, dataset: str) -> TeacherRecipe:
        """The recipe of the shipped teacher of ``dataset``: the defaults plus that set's changes."""
        captioned.get(dataset)  # a clear error for an unknown name
        return cls(dataset=dataset, **DATASET_RECIPES.get(dataset, {}))

    @classmethod
    def from_dict(cls, values: dict) -> TeacherRecipe:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown teacher recipe keys {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def build_components(recipe: TeacherRecipe, vocab_size: int) -> dict[str, torch.nn.Module]:
    """Untrained text encoder, VAE and UNet in SD1.5's layout at the recipe's sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=recipe.vae_channels,
        layers_per_block=1,
        latent_channels=recipe.latent_channels,
        norm_num_groups=recipe.vae_groups,
        sample_size=captioned.IMAGE_SIZE,
    )
    latent_side = captioned.IMAGE_SIZE // 2 ** (levels - 1)
    # Cross-attention below the top level (and in the mid block), as cheap as SD1.5's layout allows.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(recipe.unet_channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(recipe.unet_channels) - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels,
        block_out_channels=recipe.unet_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        cross_attention_dim=recipe.text_hidden,
        attention_head_dim=recipe.unet_heads,
        norm_num_groups=recipe.unet_groups,
    )
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.text_hidden,
        intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_heads,
        max_position_embeddings=CONTEXT_LENGTH,
        projection_dim=recipe.text_hidden,
        hidden_act="quick_gelu",  # CLIP-L's activation, as in SD1.5
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return {"vae": vae, "unet": unet, "text_encoder": CLIPTextModel(text_config)}


def _tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=CONTEXT_LENGTH)


def _token_ids(tokenizer, texts: list[str]) -> Tensor:
    return tokenizer(
        texts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def _ddpm_alphas_cumprod() -> Tensor:
    from mlcm_train.models.teacher import alphas_cumprod_from_config

    return alphas_cumprod_from_config(SCHEDULER_CONFIG).float()


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup)


def train_vae(vae: torch.nn.Module, recipe: TeacherRecipe, train: MaskSplit, progress: bool) -> float:
    """Fit the VAE on the recipe's coloured training images; returns the final reconstruction MSE."""
    dataset = captioned.get(recipe.dataset)
    from tqdm.auto import trange

    generator = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    vae.train()
    mse = float("nan")
    bar = trange(recipe.vae_steps, desc="teacher VAE", disable=not progress)
    for _ in bar:
        index = torch.randint(0, len(train), (recipe.vae_batch_size,), generator=generator)
        colours = dataset.random_colours(recipe.vae_batch_size, generator)
        images = dataset.colourise(train.masks[index], colours) * 2.0 - 1.0
        posterior = vae.encode(images).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(latents).sample
        loss_rec = torch.nn.functional.mse_loss(recon, images)
        loss = loss_rec + recipe.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mse = float(loss_rec.detach())
        bar.set_postfix(mse=f"{mse:.4f}")
    vae.eval()
    return mse


@torch.no_grad()
def encode_training_latents(vae: torch.nn.Module, train: MaskSplit, dataset: CaptionedSet) -> Tensor:
    """Posterior means of every training image in every colour: (N, colours, C, h, w), unscaled."""
    out = []
    for c in range(len(dataset.colours)):
        colours = torch.full((len(train),), c, dtype=torch.long)
        images = dataset.colourise(train.masks, colours) * 2.0 - 1.0
        out.append(torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)]))
    return torch.stack(out, dim=1)


class _Ema:
    """Exponential moving average of parameters (the weights that are shipped)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        targets = [p for m in modules for p in m.parameters()]
        for s, p in zip(self.shadow, targets):
            p.copy_(s)


def train_unet(
    components: dict[str, torch.nn.Module],
    latents: Tensor,
    train: MaskSplit,
    tokenizer,
    recipe: TeacherRecipe,
    work_dir: Path,
    progress: bool,
) -> float:
    """Epsilon-prediction training of UNet + text encoder with caption dropout; checkpoints in ``work_dir``."""
    from tqdm.auto import trange

    unet, text_encoder = components["unet"], components["text_encoder"]
    dataset = captioned.get(recipe.dataset)
    captions = dataset.all_captions()
    caption_ids = _token_ids(tokenizer, captions)
    empty_ids = _token_ids(tokenizer, [""])
    acp = _ddpm_alphas_cumprod()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(recipe.warmup_steps))
    ema = _Ema([unet, text_encoder], recipe.ema_decay)
    start = 0
    state_path = work_dir / "unet_state.pt"
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for s, v in zip(ema.shadow, state["ema"]):
            s.copy_(v)
        start = int(state["step"])
        log.info("resumed teacher UNet training at step %d", start)
    unet.train()
    text_encoder.train()
    loss_avg = float("nan")
    bar = trange(start, recipe.unet_steps, desc="teacher UNet", disable=not progress)
    for step in bar:
        # Each step's draws depend only on (seed, step), so a resumed run sees the same data.
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        index = torch.randint(0, len(train), (recipe.batch_size,), generator=generator)
        colours = dataset.random_colours(recipe.batch_size, generator)
        x0 = latents[index, colours] * components["vae"].config.scaling_factor
        ids = caption_ids[train.digits[index] * len(dataset.colours) + colours]
        drop = torch.rand(recipe.batch_size, generator=generator) < recipe.cfg_dropout
        ids = torch.where(drop[:, None], empty_ids, ids)
        t = torch.randint(0, len(acp), (recipe.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = acp[t].view(-1, 1, 1, 1)
        z = a.sqrt() * x0 + (1 - a).sqrt() * noise
        hidden = text_encoder(ids)[0]
        pred = unet(z, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema.update()
        loss_avg = float(loss) if loss_avg != loss_avg else 0.98 * loss_avg + 0.02 * float(loss)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % 50 == 0:
            log.info("teacher UNet step %d/%d loss %.4f", step + 1, recipe.unet_steps, loss_avg)
        if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < recipe.unet_steps:
            state = {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "ema": ema.shadow,
                "step": step + 1,
            }
            tmp = state_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(state_path)  # atomic: a killed run keeps the previous checkpoint
    ema.copy_to([unet, text_encoder])
    unet.eval()
    text_encoder.eval()
    return loss_avg


def save_pipeline(components: dict[str, torch.nn.Module], folder: Path, recipe: TeacherRecipe) -> Path:
    """A diffusers SD folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), fp16 weights."""
    import diffusers
    from diffusers import DDPMScheduler

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        module = copy.deepcopy(components[name]).half()  # fp16 on disk; loaders upcast to the asked dtype
        module.save_pretrained(folder / name, safe_serialization=True)
    write_tokenizer(folder / "tokenizer", captioned.get(recipe.dataset).vocabulary())
    DDPMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (folder / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n", encoding="utf-8")
    return folder


def train_teacher(
    folder: str | Path,
    recipe: TeacherRecipe | None = None,
    *,
    work_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Train VAE, then UNet + text encoder, and write the SD folder to ``folder``; returns it."""
    recipe = recipe or TeacherRecipe()
    folder = Path(folder)
    work = Path(work_dir) if work_dir is not None else folder.parent / (folder.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)  # module initialisation draws from the global RNG (diffusers' convention)
    dataset = captioned.get(recipe.dataset)
    tokenizer_dir = write_tokenizer(work / "tokenizer", dataset.vocabulary())
    tokenizer = _tokenizer(tokenizer_dir)
    if (
        tokenizer.convert_tokens_to_ids(BOS) != len(tokenizer) - 2
        or tokenizer.convert_tokens_to_ids(EOS) != len(tokenizer) - 1
    ):
        raise RuntimeError("the demo vocabulary must end with BOS, EOS (CLIP's layout); vocab.py changed?")
    components = build_components(recipe, len(tokenizer))
    train = dataset.load_split("train")
    started = time.perf_counter()
    vae_path = work / "vae_state.pt"
    if vae_path.is_file():
        state = torch.load(vae_path, weights_only=True)
        components["vae"].load_state_dict(state["vae"])
        components["vae"].register_to_config(scaling_factor=float(state["scaling_factor"]))
        components["vae"].eval()
        log.info("reusing the trained VAE in %s", vae_path)
    else:
        mse = train_vae(components["vae"], recipe, train, progress)
        log.info("VAE reconstruction MSE %.5f (images in [-1, 1])", mse)
        latents = encode_training_latents(components["vae"], train, dataset)
        scaling = float(1.0 / latents.std())  # SD's convention: unit-variance diffusion latents
        components["vae"].register_to_config(scaling_factor=scaling)
        torch.save(
            {"vae": components["vae"].state_dict(), "scaling_factor": scaling, "latents": latents}, vae_path
        )
    components["vae"].requires_grad_(False)
    latents = torch.load(vae_path, weights_only=True)["latents"]
    log.info("latent scaling factor %.4f", components["vae"].config.scaling_factor)
    loss = train_unet(components, latents, train, tokenizer, recipe, work, progress)
    log.info("teacher trained in %.0f s, final UNet loss %.4f", time.perf_counter() - started, loss)
    return save_pipeline(components, folder, recipe)

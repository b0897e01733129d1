"""Stage 1/2 losses on a tiny random UNet with a PEFT LoRA: gradients reach only the LoRA, the loss falls."""

from __future__ import annotations

import pytest
import torch

from mlcm.segments import scaled_linear_alphas_cumprod, segment_boundaries
from mlcm_train.method.consistency import stage1_loss, stage2_loss
from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.teacher_ddim import mds_states
from mlcm_train.method.timesteps import sample_stage1_timesteps
from mlcm_train.models.conditioning import Conditioning
from mlcm_train.models.student import adapters_disabled, attach_lora, lora_parameters

ACP = scaled_linear_alphas_cumprod()
BOUNDARIES = segment_boundaries(8)
TEXT_DIM, POOLED_DIM, TIME_EMBED_DIM = 16, 8, 4  # tiny stand-ins for 768/2048, 1280 and 256
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")


def tiny_unet(sdxl: bool):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:  # SDXL's added conditioning: pooled text + 6 micro-conditioning ids
        extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_EMBED_DIM,
        )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=4,
            norm_num_groups=8,
            **extra,
        )


def conditioning(batch: int, sdxl: bool, seed: int) -> Conditioning:
    gen = torch.Generator().manual_seed(seed)
    if not sdxl:
        return Conditioning(torch.randn(batch, 6, TEXT_DIM, generator=gen))
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(batch, 6)
    return Conditioning(
        torch.randn(batch, 6, TEXT_DIM, generator=gen),
        torch.randn(batch, POOLED_DIM, generator=gen),
        time_ids,
    )


def eps_functions(unet, grad_log: list | None = None):
    """(student, target, teacher) eps functions over one UNet; the teacher runs with the LoRA disabled."""

    def call(z, t, cond):
        return unet(z, t, **cond.unet_kwargs()).sample

    def logged(role, fn):
        def wrapped(z, t, cond):
            if grad_log is not None:
                grad_log.append((role, torch.is_grad_enabled()))
            return fn(z, t, cond)

        return wrapped

    def teacher(z, t, cond):
        with adapters_disabled(unet):
            return call(z, t, cond)

    return logged("student", call), logged("target", call), logged("teacher", teacher)


def lora_unet(sdxl: bool, perturb: bool):
    unet = tiny_unet(sdxl)
    params = attach_lora(unet, rank=4, alpha=4.0, targets=TARGETS)
    if perturb:  # B != 0 so that lora_A gets gradients too and the student differs from the teacher
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if ".lora_B." in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return unet, params


def stage1_batch(teacher, sdxl: bool, batch: int = 4, seed: int = 0):
    settings = DistillSettings(guidance_scale=4.0)
    gen = torch.Generator().manual_seed(seed)
    segment, t_m, t_n, lo = sample_stage1_timesteps(batch, BOUNDARIES, settings.skip, gen)
    cond, uncond = conditioning(batch, sdxl, 1), conditioning(1, sdxl, 2)
    uncond = Conditioning(*(None if x is None else x.expand(batch, *x.shape[1:]) for x in uncond._tensors()))
    noise = torch.randn(batch, 4, 8, 8, generator=gen)
    z_tm = mds_states(
        teacher,
        noise,
        t_m,
        segment,
        cond,
        uncond,
        settings=settings,
        alphas_cumprod=ACP,
        boundaries=BOUNDARIES,
    )
    return settings, z_tm, t_m, t_n, lo, cond, uncond


def assert_only_lora_grads(unet):
    lora = {id(p) for p in lora_parameters(unet)}
    for name, p in unet.named_parameters():
        if id(p) in lora:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, f"base weight {name} received a gradient"
    assert all(float(p.grad.abs().sum()) > 0 for p in lora_parameters(unet))


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_stage1_gradients_reach_only_the_lora_through_the_prediction(sdxl):
    unet, _ = lora_unet(sdxl, perturb=True)
    log: list = []
    student, target, teacher = eps_functions(unet, log)
    settings, z_tm, t_m, t_n, lo, cond, uncond = stage1_batch(teacher, sdxl)
    log.clear()
    loss, stats = stage1_loss(
        student, target, teacher, z_tm, t_m, t_n, lo, cond, uncond, settings=settings, alphas_cumprod=ACP
    )
    assert torch.isfinite(loss) and loss.requires_grad and stats["loss"] > 0
    assert dict(log) == {"teacher": False, "target": False, "student": True}
    assert [role for role, _ in log].count("teacher") == 1  # CFG: one batched 2B call
    loss.backward()
    assert_only_lora_grads(unet)


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
def test_stage2_gradients_reach_only_the_lora_through_the_prediction(sdxl):
    unet, _ = lora_unet(sdxl, perturb=True)
    log: list = []
    student, target, teacher = eps_functions(unet, log)
    cond, uncond = conditioning(3, sdxl, 1), conditioning(3, sdxl, 2)
    loss, _ = stage2_loss(
        student, target, teacher, torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3)), cond, uncond,
        settings=DistillSettings(), alphas_cumprod=ACP, boundaries=BOUNDARIES, q=2, p=2,
        generator=torch.Generator().manual_seed(4),
    )  # fmt: skip
    grad_calls = [role for role, enabled in log if enabled]
    assert grad_calls == ["student"] and [role for role, _ in log].count("teacher") == 2
    loss.backward()
    assert_only_lora_grads(unet)


def test_teacher_is_the_base_unet_and_stays_unchanged():
    unet, _ = lora_unet(False, perturb=True)
    student, _, teacher = eps_functions(unet)
    z, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([500, 100]), conditioning(2, False, 1)
    with torch.no_grad():
        assert not torch.allclose(student(z, t, cond), teacher(z, t, cond))
        base = tiny_unet(False)(z, t, encoder_hidden_states=cond.prompt_embeds).sample
        torch.testing.assert_close(teacher(z, t, cond), base, atol=1e-5, rtol=1e-5)


def test_stage1_loss_falls_over_a_short_adamw_run():
    unet, params = lora_unet(False, perturb=False)  # B = 0: the student starts exactly at the teacher
    student, target, teacher = eps_functions(unet)
    settings, z_tm, t_m, t_n, lo, cond, uncond = stage1_batch(teacher, False, batch=4)
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(12):
        loss, _ = stage1_loss(
            student, target, teacher, z_tm, t_m, t_n, lo, cond, uncond, settings=settings, alphas_cumprod=ACP
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses

"""Sample grids: the eps->x0 denoiser wrapper is exact, and grids are written as PNGs of the right size."""

from __future__ import annotations

import torch
from PIL import Image

from mlcm import scaled_linear_alphas_cumprod, segment_timesteps
from mlcm_train.method.rollout import consistency_sample, eps_to_denoiser
from mlcm_train.run.samples import save_grid


def test_oracle_eps_gives_its_x0_at_every_step_count():
    """An eps model that knows x0 (eps = (z - a x0) / s) makes the sampler return exactly x0."""
    acp = scaled_linear_alphas_cumprod()
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def oracle(z, t, cond):
        a = acp[t].sqrt().float().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().float().view(-1, 1, 1, 1)
        return (z - a * x0) / s

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for steps in (1, 2, 4, 8):
        timesteps = segment_timesteps(steps, 8)
        out = consistency_sample(oracle, noise, None, timesteps=timesteps, alphas_cumprod=acp, seed=3)
        torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)


def test_denoiser_evaluates_the_boundary_timesteps():
    acp = scaled_linear_alphas_cumprod()
    seen = []

    def record(z, t, cond):
        seen.append(int(t[0]))
        return torch.zeros_like(z)

    noise = torch.randn(1, 4, 8, 8)
    consistency_sample(record, noise, None, timesteps=segment_timesteps(4, 8), alphas_cumprod=acp, seed=0)
    assert seen == segment_timesteps(4, 8) == [999, 749, 499, 124]
    denoise = eps_to_denoiser(record, acp, [999], None)
    sigma = ((1 - acp[999]) / acp[999]).sqrt().float()
    x = torch.randn(1, 4, 8, 8)
    # eps = 0 means z is a * x0: the x0 returned is z / a = x * a / a
    torch.testing.assert_close(denoise(x, sigma.reshape(1)), x, atol=1e-6, rtol=1e-5)


def test_save_grid_tiles_rows_and_columns(tmp_path):
    tiles = [[torch.full((3, 16, 16), v) for v in (0.0, 0.5, 1.0)] for _ in range(2)]
    path = save_grid(tiles, tmp_path / "g.png")
    image = Image.open(path)
    assert image.size == (48, 32)
    assert image.getpixel((40, 5)) == (255, 255, 255) and image.getpixel((2, 30)) == (0, 0, 0)

"""LoraModule maths: analytic deltas, conv layout, and shape validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlcm.lora import LoraModule


def test_linear_delta_is_scale_times_up_at_down() -> None:
    module = LoraModule(down=torch.tensor([[3.0, 4.0]]), up=torch.tensor([[1.0], [2.0]]), alpha=2.0)
    assert (module.rank, module.scale) == (1, 2.0)
    assert torch.equal(module.delta(), torch.tensor([[6.0, 8.0], [12.0, 16.0]]))


def test_conv_delta_equals_applying_down_then_up_as_convolutions() -> None:
    generator = torch.Generator().manual_seed(0)
    down = torch.randn(3, 5, 3, 3, generator=generator, dtype=torch.float64)
    up = torch.randn(7, 3, 1, 1, generator=generator, dtype=torch.float64)
    module = LoraModule(down, up, alpha=1.5)
    x = torch.randn(2, 5, 9, 9, generator=generator, dtype=torch.float64)
    # What a LoRA'd Conv2d computes: scale * up(down(x)), with down carrying the kernel and padding.
    expected = module.scale * F.conv2d(F.conv2d(x, down, padding=1), up)
    actual = F.conv2d(x, module.delta().double(), padding=1)
    assert module.delta().shape == (7, 5, 3, 3) and module.delta().dtype == torch.float32
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_delta_is_float32_for_half_weights_and_leaves_inputs_untouched() -> None:
    down = torch.full((2, 4), 0.5, dtype=torch.float16)
    up = torch.full((3, 2), 0.25, dtype=torch.float16)
    module = LoraModule(down, up, alpha=4.0)
    assert module.delta().dtype == torch.float32
    assert torch.equal(module.delta(), torch.full((3, 4), 0.5))
    assert down.dtype == torch.float16 and bool((down == 0.5).all())


@pytest.mark.parametrize(
    ("down", "up", "message"),
    [
        (torch.ones(2, 4), torch.ones(3, 3), "ranks disagree"),
        (torch.ones(2, 4, 3, 3), torch.ones(3, 2), "expected"),
        (torch.ones(2, 4, 3, 3), torch.ones(3, 2, 3, 3), "1x1 kernel"),
        (torch.ones(4), torch.ones(4), "expected"),
    ],
)
def test_inconsistent_shapes_are_refused(down: torch.Tensor, up: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraModule(down, up, 1.0)


def test_non_finite_alpha_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        LoraModule(torch.ones(1, 2), torch.ones(2, 1), float("inf"))

"""Shared pytest setup for the CPU suite."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_PROMPTS, make_tiny_sd15


def pytest_configure(config) -> None:
    # The tests run tiny models: one intra-op thread avoids thread start-up and contention costs that
    # dominate at these sizes (measured 30-50x slower per tiny UNet call on a busy 2-core machine).
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """(tiny SD1.5 teacher folder, prompt file) for trainer runs; built once per test module."""
    root = tmp_path_factory.mktemp("sd15")
    (root / "prompts.txt").write_text(TINY_PROMPTS, encoding="utf-8")
    return make_tiny_sd15(root), root / "prompts.txt"

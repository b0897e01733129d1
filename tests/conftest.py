"""Shared pytest setup for the CPU suite."""

from __future__ import annotations

import torch


def pytest_configure(config) -> None:
    # The tests run tiny models: one intra-op thread avoids thread start-up and contention costs that
    # dominate at these sizes (measured 30-50x slower per tiny UNet call on a busy 2-core machine).
    torch.set_num_threads(1)

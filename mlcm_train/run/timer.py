"""Where a training step's time goes: teacher trajectory, teacher target, student forward+backward, rest."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor


class StepTimer:
    """Seconds spent per category; synchronises CUDA when ``profile`` so async kernels are charged right."""

    def __init__(self, profile: bool, device: torch.device) -> None:
        self.profile, self.device = profile, device
        self.seconds: dict[str, float] = defaultdict(float)
        self.label = "rest"
        self._warmed_up = False

    def _sync(self) -> None:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def charge(self, label: str) -> Iterator[None]:
        previous, self.label = self.label, label
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[label] += time.perf_counter() - start
            self.label = previous

    def step_done(self, seconds: float) -> None:
        """Count one optimizer step of ``seconds``; with ``profile`` the first (one-off costs) is forgotten."""
        self.seconds["total"] += seconds
        self.seconds["steps"] += 1
        if self.profile and not self._warmed_up:  # the first step pays allocations and lazy init
            self.seconds.clear()
            self._warmed_up = True


def timed(timer: StepTimer, label: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def wrapped(*args: Any) -> Tensor:
        with timer.charge(label):
            return fn(*args)

    return wrapped

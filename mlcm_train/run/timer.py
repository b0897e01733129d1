"""Where a training step's time goes: teacher trajectory, teacher target, student forward+backward, rest."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class PeakMemory:
    """The peak of what a device holds from ``reset()`` on: CUDA's allocated bytes, or on Linux CPUs the
    process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``). Freed CPU memory only
    leaves the resident set when the allocator returns it, so measure CPU peaks with
    ``MALLOC_MMAP_THRESHOLD_`` set (``benchmarks/train_step.py`` does); ``None`` where neither exists."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _status_kib("VmHWM")


def resident_bytes() -> int | None:
    """The process's resident set now (Linux), for the baseline a CPU peak is measured against."""
    return _status_kib("VmRSS")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class StepTimer:
    """Seconds spent per category; synchronises CUDA when ``profile`` so async kernels are charged right.

    With ``profile`` it also tracks the device's peak memory from its creation (after the model is loaded)
    on: ``peak_bytes`` after the steps."""

    def __init__(self, profile: bool, device: torch.device) -> None:
        self.profile, self.device = profile, device
        self.seconds: dict[str, float] = defaultdict(float)
        self.label = "rest"
        self._warmed_up = False
        self._memory = PeakMemory(device)
        if profile:
            self._memory.reset()

    @property
    def peak_bytes(self) -> int | None:
        return self._memory.peak() if self.profile else None

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

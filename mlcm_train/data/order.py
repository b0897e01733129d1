"""Where every training sample comes from: seeds derived from (seed, phase, sample index), epoch orders.

The data of optimizer step k is a pure function of k, so a resumed run sees exactly the samples an
uninterrupted one would, and N processes x batch B see the same samples as one process x batch N*B.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs, machines and processes)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class EpochOrder:
    """Sample index -> item index (a prompt, a cached state): a fresh seeded permutation every epoch."""

    def __init__(self, count: int, seed: int, phase: int) -> None:
        self.count, self.seed, self.phase = count, seed, phase
        self._epochs: dict[int, Tensor] = {}

    def __call__(self, sample: int) -> int:
        epoch = sample // self.count
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", self.phase, epoch))
            self._epochs = {epoch: torch.randperm(self.count, generator=generator)}
        return int(self._epochs[epoch][sample % self.count])


def sample_generator(seed: int, phase: int | str, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, "sample", phase, sample))

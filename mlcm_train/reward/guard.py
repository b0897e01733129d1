"""Guarding against reward hacking: a held-out measure next to the trained reward, keep-best, warnings.

Every evaluation scores a fixed set of student samples (same prompts and seeds each time) with the trained
reward and a held-out measure: a second reward (higher is better) or the demo's Frechet distance (lower is
better). The guard keeps the best LoRA by the user's rule and warns when the held-out measure gets worse
while the reward rises, the signature of over-optimisation (RG-LCD; ReFL's overexposure; docs/method.md, "The reward stage").

Rules: ``guarded`` = the highest reward among evaluations whose held-out measure is at most ``tolerance``
(relative) worse than before training at every evaluated step count (the start LoRA itself always qualifies); ``heldout`` = the best
held-out measure; ``reward`` = the highest reward; ``last`` = the final weights.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from mlcm_train.config import HELDOUT_FD
from mlcm_train.reward.models import build_reward

log = logging.getLogger(__name__)

BEST_DIR = "best"
BEST_LORA = "lora.safetensors"
GUARD_FILE = "guard.json"
# Relative worsening of the held-out measure between two evaluations that triggers the warning (ours: the
# demo FD on 240 samples moves about 5% between evaluations of nearly equal weights).
WARN_TOLERANCE = 0.05
HELDOUT_CHUNK = 16  # images per held-out reward call (bounded memory for large scorers)


@dataclass(frozen=True)
class HeldOut:
    """A held-out measure of a set of images: its name, direction and function (images in [0, 1], prompts)."""

    name: str
    higher_is_better: bool
    measure: Callable[[Tensor, Sequence[str]], float]


def build_heldout(spec: str, device: str | torch.device = "cpu") -> HeldOut:
    """``fd=<demo classifier folder>`` (demo FD, lower is better) or a reward spec (mean score, higher is better)."""
    name, _, path = spec.partition("=")
    if name.strip().lower() == HELDOUT_FD:
        from mlcm_train.eval.digits import DemoEvaluator, load_classifier

        if not path:
            raise ValueError(
                "--heldout fd needs the demo classifier folder: fd=<folder with classifier.safetensors>"
            )
        evaluator = DemoEvaluator(load_classifier(path))
        size = (evaluator.dataset.image_size,) * 2

        def frechet(images: Tensor, prompts: Sequence[str]) -> float:
            images = torch.nn.functional.interpolate(images.float().cpu(), size=size, mode="bilinear")
            return evaluator.score(images, prompts).fd

        return HeldOut("fd", False, frechet)
    reward = build_reward(spec, device)

    @torch.no_grad()
    def mean_score(images: Tensor, prompts: Sequence[str]) -> float:
        scores = [
            reward(images[i : i + HELDOUT_CHUNK].to(device), prompts[i : i + HELDOUT_CHUNK]).float().cpu()
            for i in range(0, images.shape[0], HELDOUT_CHUNK)
        ]
        return float(torch.cat(scores).mean())

    return HeldOut(reward.name, True, mean_score)


class RewardGuard:
    """Evaluation history, the best LoRA by ``rule`` (``heldout``/``reward``/``last``) and the hacking warning."""

    def __init__(
        self, rule: str, heldout: HeldOut | None, run_dir: str | Path, *, tolerance: float = 0.1
    ) -> None:
        self.rule, self.heldout, self.tolerance = rule, heldout, tolerance
        self.folder = Path(run_dir) / BEST_DIR
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def _worse_by(self, before: float, after: float) -> float:
        """Relative change of the held-out measure from ``before`` to ``after``; positive = worse."""
        change = (after - before) / max(abs(before), 1e-12)
        return -change if self.heldout.higher_is_better else change

    def _key(self, row: dict[str, Any]) -> float:
        """Larger is better under the rule (-inf: not eligible)."""
        if self.rule == "reward":
            return row["reward"]
        if self.rule == "guarded":
            # Every evaluated step count on its own (heldout@k), so that one cannot hide behind another.
            start = self.history[0]
            keys = [k for k in row if k.startswith("heldout@")] or ["heldout"]
            eligible = all(self._worse_by(start[k], row[k]) <= self.tolerance for k in keys)
            return row["reward"] if eligible else -math.inf
        sign = 1.0 if self.heldout.higher_is_better else -1.0
        return sign * row["heldout"]

    def record(self, row: dict[str, Any], lora: dict[str, Tensor]) -> None:
        """Add one evaluation (``step``, ``reward``, optional ``heldout``); save the LoRA when it is the best."""
        previous = self.history[-1] if self.history else None
        self.history.append(row)
        if previous is not None and self.heldout is not None and row["reward"] > previous["reward"]:
            before, after = previous["heldout"], row["heldout"]
            if self._worse_by(before, after) > WARN_TOLERANCE:
                log.warning(
                    "possible reward hacking at step %d: the reward rose %.4g -> %.4g while held-out %s got worse "
                    "%.4g -> %.4g; consider a larger --anchor-weight, a lower --lr or fewer --iterations",
                    row["step"],
                    previous["reward"],
                    row["reward"],
                    self.heldout.name,
                    before,
                    after,
                )
        if self.rule != "last" and (self.best is None or self._key(row) > self._key(self.best)):
            # The first evaluation (the start LoRA) is always eligible, so a best always exists.
            self.best = row
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in lora.items()}, str(self.folder / BEST_LORA)
            )
        self._write()

    def best_lora(self) -> dict[str, Tensor] | None:
        """The kept LoRA under the rule (None for ``last``, or before any evaluation)."""
        if self.rule == "last" or self.best is None:
            return None
        return load_file(str(self.folder / BEST_LORA))

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{GUARD_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps({"rule": self.rule, "best": self.best, "history": self.history}, indent=2))
        os.replace(tmp, self.folder / GUARD_FILE)

    def restore(self, step: int) -> None:
        """Reload the history up to ``step`` (a resumed run re-does what came after, identically)."""
        path = self.folder / GUARD_FILE
        if not path.is_file():
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        self.history = [row for row in saved["history"] if row["step"] <= step]
        best = saved.get("best")
        if best is not None and best["step"] <= step and (self.folder / BEST_LORA).is_file():
            self.best = best
        elif best is not None:
            log.info(
                "the kept best LoRA (step %d) is after the resumed step %d; it is chosen again",
                best["step"],
                step,
            )
            self.best = None

    def last_step(self) -> int | None:
        return self.history[-1]["step"] if self.history else None

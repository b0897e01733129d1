"""The reward stage of the demo (issue 5): the demo classifier's reward, the demo FD held out, 2 and 4 steps.

The demo's MLCM LoRA (``python -m mlcm_train demo``) is tuned with ``log p(digit | x) + log p(colour | x)`` of
its caption, anchored by the stage-2 loss; the Frechet distance to held-out real digits is the held-out
measure and the "guarded" rule keeps the highest reward whose FD is at most 10% worse than before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..reward_config import RewardConfig

# The demo trains its tiny UNet with learning rates 20x the paper's (2e-3 / 2e-4 for stages 1 / 2 against
# SDXL's 1e-4 / 1e-5, demo/run.py); the reward stage follows: 2e-4 against the paper's 1e-5.
DEMO_REWARD_LR = 2e-4
DEMO_REWARD_ITERATIONS = 100
DEMO_EVAL_SAMPLES = 240  # the demo table's 4 images per caption
# Anchor weight 3 (stage-2 loss x 3): measured on the shipped teacher, weight 1 let FD grow 14-16% (600 images
# x 3 seeds) for the same reward gain; weight 3 kept it at +6-8% (issue 5 asks for at most 10%).
DEMO_ANCHOR_WEIGHT = 3.0


def demo_reward_config(
    teacher: str | Path, prompts: str | Path, lora: str | Path, out: str | Path, **changes: Any
) -> RewardConfig:
    """RewardConfig of the demo's reward row; ``teacher`` is the demo folder (it also holds the classifier)."""
    values: dict[str, Any] = dict(
        teacher=str(teacher),
        prompts=str(prompts),
        lora=str(lora),
        reward=f"classifier={teacher}",
        loss="maximise",  # the classifier reward is a log-probability (<= 0): a margin hinge would not bind
        heldout=f"fd={teacher}",
        keep_best="guarded",
        student_steps=(2, 4),
        eval_steps=(2, 4),
        eval_samples=DEMO_EVAL_SAMPLES,
        eval_every=25,
        iterations=DEMO_REWARD_ITERATIONS,
        batch_size=8,
        lr=DEMO_REWARD_LR,
        anchor_weight=DEMO_ANCHOR_WEIGHT,
        mixed_precision="no",
        output_dir=str(out),
        checkpoint_every=50,
    )
    values.update(changes)
    return RewardConfig(**values)

"""The reward stage of the demo (issue 5): the demo classifier's reward, the demo FD held out, 2 and 4 steps.

The demo's MLCM LoRA (``python -m mlcm_train demo``) is tuned with the classifier's tempered
``log p_T(digit | x) + log p_T(colour | x)`` of its caption (``demo.classifier.REWARD_TEMPERATURE``), anchored by
the stage-2 loss; the Frechet distance to held-out real digits is the held-out
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
# Anchor weight 10 (stage-2 loss x 10), measured from the demo's stage-2 LoRA, 100 iterations at lr 2e-4, each
# scored on 4 x 240 images: weight 3 raised the 4-step reward -0.248 -> -0.195 but FD 189 -> 228 (+21%);
# weight 10 gave -0.248 -> -0.216 with FD +2% (2 steps: -0.335 -> -0.270, FD -3%). 200 iterations at weight
# 10 reached FD +10% at 4 steps; issue 5 allows at most 10%.
DEMO_ANCHOR_WEIGHT = 10.0


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

"""Preference tuning of a distilled MLCM LoRA: ``python -m mlcm_train reward`` (MLCM_METHOD.md §5).

``interface`` (what a reward is), ``losses`` (MPS-style hinge, maximisation), ``models`` (built-in rewards
from local weights), ``start`` (the distilled LoRA to start from), ``rollout`` (differentiable student
samples through the VAE decoder), ``guard`` (evaluation and keep-best), ``stage`` (the training loop).
"""

from .interface import Reward, WeightedReward, decoded_to_unit
from .losses import hinge_loss, maximise_loss, reward_loss, rolled_prompts

__all__ = [
    "Reward",
    "WeightedReward",
    "decoded_to_unit",
    "hinge_loss",
    "maximise_loss",
    "reward_loss",
    "rolled_prompts",
]

"""The reward stage: preference tuning of a distilled MLCM LoRA, ``python -m mlcm_train reward``.

``interface`` (what a reward is), ``models`` (built-in rewards from local weights), ``start`` (the distilled
LoRA to start from), ``recipe`` (what the run inherits from that LoRA), ``guard`` (evaluation and keep-best),
``export`` (the tuned LoRA's files), ``stage`` (the stage the training loop runs). The losses live in
``mlcm_train.method.reward_loss``; docs/method.md, "The reward stage", describes the method.
"""

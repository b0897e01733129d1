"""The maths of MLCM training, pure functions on tensors and eps functions (no I/O, no model loading).

``timesteps`` (where training happens), ``teacher_ddim`` (CFG, teacher DDIM steps, the multistep denoising
strategy), ``consistency`` (the stage-1 and stage-2 losses), ``rollout`` (student samples), ``reward_loss``,
``settings`` (the method values), ``cond_batch`` (batching opaque conditioning). See docs/method.md.
"""

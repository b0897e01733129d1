"""The method's plain values (segments, skip, guidance, loss) as the losses take them; docs/method.md, "Stage 1"."""

from __future__ import annotations

from dataclasses import dataclass

LOSS_TYPES = ("l2", "huber")
RENOISE_MODES = ("same", "fresh")  # stage-2 forward-diffusion noise: the starting noise again, or fresh draws
# Where online stage-1 states come from: a trajectory per sample (Algorithm 1), or one per M samples (ours).
STAGE1_STATES = ("mds", "shared")


@dataclass(frozen=True)
class DistillSettings:
    """Plain method values the training loop fills from its config (defaults: the paper's, docs/method.md)."""

    segments: int = 8  # M, the paper's segment count
    skip: int = 20  # t_n = t_m - skip in stage 1 (paper: 20; the parent method MCM used 1)
    guidance_scale: float = 8.0  # teacher CFG w, fixed and baked into the student (paper, SDXL)
    loss_type: str = "l2"  # "l2" (paper, Eq. 7/10) or "huber" (LCM's pseudo-Huber)
    huber_c: float = 0.001  # pseudo-Huber constant, LCM/diffusers convention
    num_train_timesteps: int = 1000  # T of the teacher's DDPM schedule (SD1.5/SDXL)

    def __post_init__(self) -> None:
        if self.segments < 1:
            raise ValueError(f"segments={self.segments} must be at least 1")
        if self.skip < 1:
            raise ValueError(f"skip={self.skip} must be at least 1 (the paper uses 20)")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}"
            )
        if self.huber_c <= 0:
            raise ValueError(f"huber_c={self.huber_c} must be positive (LCM uses 0.001)")
        if self.num_train_timesteps <= self.segments:
            raise ValueError(
                f"num_train_timesteps={self.num_train_timesteps} must exceed segments={self.segments}"
            )

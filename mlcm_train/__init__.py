"""mlcm_train: distill MLCM LoRAs from SD1.5/SDXL teachers (``python -m mlcm_train --help``).

The only part of the project that needs diffusers, peft, accelerate and transformers; they are imported
by the submodules that use them, so importing this package stays cheap.
"""

from __future__ import annotations

__all__ = ["DistillConfig"]

from mlcm_train.config import DistillConfig

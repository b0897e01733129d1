"""Training metrics: one JSON row per logged step in ``<run>/metrics.jsonl``, mirrored to TensorBoard when asked."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
_NOT_SCALARS = ("global_step", "phase")


class RunLog:
    """Appends metric rows (main process only); TensorBoard is optional and explained when missing."""

    def __init__(self, run_dir: Path, *, tensorboard: bool) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = _tensorboard_writer(Path(run_dir)) if tensorboard else None

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key not in _NOT_SCALARS:
                    self.writer.add_scalar(f"train/{key}", value, row["global_step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning(
            "--tensorboard was given but the tensorboard package is not installed; "
            "`pip install tensorboard` to get logs in %s/tensorboard (metrics.jsonl is written regardless)",
            run_dir,
        )
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

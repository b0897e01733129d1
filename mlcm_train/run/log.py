"""Training metrics: one JSON row per logged step in ``<run>/metrics.jsonl``, mirrored to TensorBoard and
Weights & Biases when asked."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb-id"  # the run's W&B id, so that a resumed run continues the same W&B run
_NOT_SCALARS = ("global_step", "phase")


class RunLog:
    """Appends metric rows (main process only); TensorBoard is optional and explained when missing;
    W&B (``wandb`` "offline" or "online") fails at the start when its package is missing."""

    def __init__(
        self, run_dir: Path, *, tensorboard: bool, wandb: str = "off", config: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = _tensorboard_writer(Path(run_dir)) if tensorboard else None
        self.wandb = _wandb_run(Path(run_dir), wandb, config or {}) if wandb != "off" else None

    def write(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        scalars = {f"train/{k}": v for k, v in row.items() if k not in _NOT_SCALARS}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, row["global_step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["global_step"])

    def close(self) -> None:
        """Flush and close the mirrors; safe to call twice."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


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


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _wandb_run(run_dir: Path, mode: str, config: dict[str, Any]):
    """A W&B run in ``run_dir``/wandb that a resumed run continues (same id)."""
    if not wandb_available():
        raise ValueError(
            f"--wandb {mode} needs the wandb package: `pip install wandb`, or drop the flag "
            "(metrics.jsonl and --tensorboard need nothing more)"
        )
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text(encoding="utf-8").strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "mlcm"),
        name=run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=mode,
        config=config,
    )

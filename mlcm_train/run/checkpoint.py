"""Atomic training checkpoints: LoRA, optional EMA, optimizer, RNG states, step and data cursor.

A checkpoint is a folder ``<run>/checkpoints/step-0000100``. It is written in full under a temporary
name in the same folder and renamed into place only when every file is on disk, so a run killed while
saving leaves the previous checkpoint valid and never a half-written one under a valid name.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{7})$")
LORA_FILE = "lora.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
_REQUIRED = (LORA_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, CONFIG_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable."""


@dataclass
class TrainState:
    """Where training stands: enough, with the config, to continue exactly."""

    global_step: int  # optimizer steps over all phases
    phase: int  # index into the run's phase list (round x stage)
    phase_step: int  # optimizer steps done in that phase
    cursor: int  # samples consumed in that phase (the data position)
    family: str  # teacher family, "sd15" or "sdxl"
    prompt_count: int
    nan_streak: int = 0
    config_hash: str = ""
    # What the run has spent so far, over all processes and resumes (UnetRoles counts, the loop sums):
    # UNet evaluations as sample rows (a CFG call on B samples is 2B), and wall seconds in the loop.
    teacher_evaluations: int = 0
    student_evaluations: int = 0
    train_seconds: float = 0.0

    def spending(self) -> dict[str, int | float]:
        """What the run has spent, as an export's metadata and model card record it."""
        return {
            "teacher_evaluations": self.teacher_evaluations,
            "student_evaluations": self.student_evaluations,
            "train_seconds": round(self.train_seconds, 1),
        }


@dataclass
class Checkpoint:
    path: Path
    state: TrainState
    config: dict[str, Any]
    lora: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    rng: dict[str, Any]


def capture_rng() -> dict[str, Any]:
    """Global RNG states (torch CPU/CUDA, Python); the trainer's own draws use explicit seeded generators."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def checkpoint_name(global_step: int) -> str:
    return f"step-{global_step:07d}"


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(
    run_dir: str | Path,
    *,
    state: TrainState,
    config: dict[str, Any],
    lora: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp folder + rename); returns its final path."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(state.global_step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_tensors(tmp / LORA_FILE, lora)
        if ema is not None:
            _write_tensors(tmp / EMA_FILE, ema)
        _write_torch(tmp / OPTIMIZER_FILE, optimizer)
        _write_torch(tmp / RNG_FILE, rng)
        _write_json(tmp / CONFIG_FILE, config)
        # state.json last: its presence marks every other file as complete.
        _write_json(tmp / STATE_FILE, asdict(state))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a resume): swap, never leave a gap
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint or run directory {path} does not exist")
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(
            f"{path} is neither a checkpoint folder (no {STATE_FILE}) nor a run directory with "
            f"{CHECKPOINT_DIR}/step-*; pass one of those"
        )
    return found[-1]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint (or a run directory's newest); a damaged one raises CheckpointError naming the file."""
    path = resolve_checkpoint(path)
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete (missing {', '.join(missing)}); resume from an earlier checkpoint"
        )
    current = ""
    try:
        current = STATE_FILE
        state = TrainState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        current = CONFIG_FILE
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        current = LORA_FILE
        lora = load_file(str(path / LORA_FILE))
        ema = None
        if (path / EMA_FILE).is_file():
            current = EMA_FILE
            ema = load_file(str(path / EMA_FILE))
        current = OPTIMIZER_FILE
        optimizer = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        current = RNG_FILE
        rng = torch.load(path / RNG_FILE, map_location="cpu", weights_only=True)
    except (
        OSError,
        ValueError,
        TypeError,
        KeyError,
        RuntimeError,
        SafetensorError,
        EOFError,
        pickle.UnpicklingError,
    ) as error:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({current}: {error}); resume from an earlier checkpoint in "
            f"{path.parent}"
        ) from error
    return Checkpoint(path, state, config, lora, ema, optimizer, rng)


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        log.info("removing old checkpoint %s", old)
        shutil.rmtree(old, ignore_errors=True)

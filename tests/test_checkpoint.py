"""Checkpoints: round trip, atomic writes (a crash mid-save keeps the previous one), corrupt files, pruning."""

from __future__ import annotations

import pytest
import torch

from mlcm_train.run import checkpoint as ckpt
from mlcm_train.run.checkpoint import (
    CheckpointError,
    TrainState,
    capture_rng,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)


def _save(run, step: int, value: float = 1.0):
    param = torch.nn.Parameter(torch.full((2, 3), value))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones_like(param)
    optimizer.step()
    return save_checkpoint(
        run,
        state=TrainState(step, 0, step, 2 * step, "sd15", 5),
        config={"lora_rank": 4},
        lora={"a.lora_A.weight": param.detach().clone()},
        optimizer=optimizer.state_dict(),
        rng=capture_rng(),
        ema={"a.lora_A.weight": param.detach() * 0.5},
    )


def test_round_trip(tmp_path):
    path = _save(tmp_path, 3, value=2.0)
    assert path.name == "step-0000003"
    saved = load_checkpoint(tmp_path)  # run directory -> newest checkpoint
    assert saved.path == path
    assert saved.state == TrainState(3, 0, 3, 6, "sd15", 5)
    assert saved.config == {"lora_rank": 4}
    torch.testing.assert_close(saved.ema["a.lora_A.weight"], saved.lora["a.lora_A.weight"] * 0.5)
    assert saved.optimizer["state"][0]["exp_avg"].shape == (2, 3)
    assert torch.equal(saved.rng["torch"], torch.get_rng_state())


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def crash(path, obj):
        path.write_bytes(b"half")  # what a killed writer leaves behind
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt, "_write_torch", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert load_checkpoint(tmp_path).state.global_step == 1


def test_resave_same_step_replaces(tmp_path):
    _save(tmp_path, 4, value=1.0)
    _save(tmp_path, 4, value=3.0)
    saved = load_checkpoint(tmp_path)
    assert len(list_checkpoints(tmp_path)) == 1
    assert saved.lora["a.lora_A.weight"].min() > 2.0


def test_corrupt_checkpoint_is_named(tmp_path):
    path = _save(tmp_path, 1)
    (path / "lora.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"corrupt \(lora.safetensors"):
        load_checkpoint(path)


def test_incomplete_checkpoint_is_named(tmp_path):
    path = _save(tmp_path, 1)
    (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="missing optimizer.pt"):
        load_checkpoint(path)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 10):
        _save(tmp_path, step)
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003", "step-0000010"]

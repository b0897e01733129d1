"""The kohya writer's file mode: what a plain open() would give, so a ComfyUI running as another user can read it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from mlcm.lora import LoraModule, LoraWeights, write_kohya_lora
from mlcm.lora import write as lora_write

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


@pytest.fixture()
def umask():
    """``os.umask`` for one test; the process's umask is restored afterwards."""
    previous = os.umask(0o077)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _lora() -> LoraWeights:
    module = LoraModule(torch.ones(1, 8), torch.ones(4, 1), 1.0)
    return LoraWeights({"lora_unet_down_blocks_0_resnets_0_conv1": module}, None, "kohya", (), "test")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_lora_gets_the_mode_open_would_give(tmp_path: Path, umask, mask: int, expected: int) -> None:
    umask(mask)
    path = tmp_path / "lora.safetensors"
    write_kohya_lora(path, _lora())
    assert _mode(path) == expected
    with open(tmp_path / "plain.txt", "w") as handle:  # the reference: an ordinary new file
        handle.write("x")
    assert _mode(tmp_path / "plain.txt") == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_umask_is_read_without_proc_too(umask, monkeypatch: pytest.MonkeyPatch) -> None:
    umask(0o027)
    assert lora_write.current_umask() == 0o027
    monkeypatch.setattr(lora_write, "PROC_STATUS", "/nonexistent/status")
    assert lora_write.current_umask() == 0o027
    assert lora_write.default_file_mode() == 0o640
    assert os.umask(0o027) == 0o027, "reading the umask must leave it as it was"

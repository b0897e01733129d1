"""Two-process CPU data parallel (gloo) through accelerate matches one process at the same global batch,
through a stage-1 step and a stage-2 step (whose boundary and fresh-noise draws are per sample)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from tiny_models import make_tiny_sd15

pytestmark = pytest.mark.slow


def _distill(args: list[str], processes: int, cwd, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    if processes == 1:
        cmd = [sys.executable, "-m", "mlcm_train", "distill", *args]
    else:
        # torchrun is what `accelerate launch --multi_gpu` runs; ACCELERATE_USE_CPU makes accelerate use gloo.
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(port), "-m", "mlcm_train", "distill", *args,
        ]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    teacher = make_tiny_sd15(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog\nthe red dog\na cat\n", encoding="utf-8")
    common = [
        "--teacher", str(teacher), "--prompts", str(prompts), "--stages", "1,2", "--stage1-steps", "1",
        "--stage2-steps", "1", "--stage2-renoise", "fresh", "--stage2-q", "2", "--stage2-p", "1",
        "--lora-rank", "4", "--lora-alpha", "4", "--sample-every", "0", "--checkpoint-every", "100",
    ]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    one = _distill([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")], 1, root, 0)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _distill([*common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")], 2, root, 29613)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 per device x 2 processes x 1 accumulation = 4 samples" in two.stderr
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000002" / "lora.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-0000002" / "lora.safetensors"))
    moved = max(a[k].abs().max().item() for k in a if ".lora_B." in k)
    assert moved > 1e-5  # one stage-1 and one stage-2 AdamW step moved B off zero
    for name in a:
        # Same samples, same mean gradient; only the all-reduce's summation order differs.
        assert (a[name] - b[name]).abs().max().item() < 0.05 * moved, name

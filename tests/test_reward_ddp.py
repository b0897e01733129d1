"""The reward stage under two-process CPU data parallel (gloo): it matches one process at the same global batch
(maximisation, no anchor: both are per-sample), and runs with the anchor (two backward passes per step, only
the second synchronised)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from tiny_models import make_tiny_sd15

from mlcm_train.config import DistillConfig
from mlcm_train.distill import train_distill

pytestmark = pytest.mark.slow


def _reward(args: list[str], processes: int, cwd, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    launcher = [] if processes == 1 else [
        "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
    ]  # fmt: skip
    cmd = [sys.executable, *launcher, "-m", "mlcm_train", "reward", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    teacher = make_tiny_sd15(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na dog\nthe red dog\na cat\n", encoding="utf-8")
    distilled = train_distill(
        DistillConfig(
            teacher=str(teacher),
            prompts=str(prompts),
            output_dir=str(tmp_path / "distill"),
            stages=(1,),
            stage1_steps=1,
            batch_size=2,
            lora_rank=4,
            lora_alpha=4.0,  # scale 1.0, at which the tolerance below was set
            sample_every=0,
        )
    )
    common = [
        "--teacher", str(teacher), "--prompts", str(prompts), "--lora", str(distilled.exported[0]),
        "--reward", "brightness", "--keep-best", "last",
        "--iterations", "2", "--lr", "1e-3", "--student-steps", "2", "--anchor-q", "2", "--anchor-p", "1",
        "--eval-every", "100", "--eval-samples", "2",
    ]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exact = ["--loss", "maximise", "--anchor-weight", "0"]
    one = _reward([*common, *exact, "--batch-size", "4", "--output-dir", str(tmp_path / "one")], 1, root, 0)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _reward(
        [*common, *exact, "--batch-size", "2", "--output-dir", str(tmp_path / "two")], 2, root, 29614
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 per device x 2 processes x 1 accumulation = 4" in two.stderr
    start = load_file(str(tmp_path / "distill" / "checkpoints" / "step-0000001" / "lora.safetensors"))
    a = load_file(str(tmp_path / "one" / "checkpoints" / "step-0000002" / "lora.safetensors"))
    b = load_file(str(tmp_path / "two" / "checkpoints" / "step-0000002" / "lora.safetensors"))
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-5
    for name in a:
        # Same samples, same mean gradient; only the all-reduce's summation order differs.
        assert (a[name] - b[name]).abs().max().item() < 0.05 * moved, name
    anchored = ["--loss", "maximise", "--anchor-weight", "1", "--iterations", "1"]
    run = _reward(
        [*common, *anchored, "--batch-size", "2", "--output-dir", str(tmp_path / "anchored")], 2, root, 29615
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "anchored" / "export" / "mlcm_sd15_8seg_reward.safetensors").is_file()

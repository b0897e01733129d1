"""``--ddp-timeout`` reaches the process group: under two-process torchrun (gloo on CPU) a tiny distill run's
default group waits ``ddp_timeout`` seconds at a collective, and a second Accelerator in the same process
keeps that group and still synchronises."""

from __future__ import annotations

import json

import pytest
from launch import run_nodes

pytestmark = pytest.mark.slow

TIMEOUT_S = 1234  # neither torch's gloo (1800 s) nor NCCL (600 s) default, nor the config's 3600 s

# Runs `python -m mlcm_train ARGS...` in this process, then reports the default process group it left behind.
PROBE = """
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist

from mlcm_train.cli import main
from mlcm_train.run.setup import make_accelerator

out_dir, args = Path(sys.argv[1]), sys.argv[2:]
status = main(args)
group = dist.distributed_c10d._get_default_group()
timeout = group._get_backend(torch.device("cpu")).options._timeout
again = make_accelerator("no", 1)
again.wait_for_everyone()
# One file per rank: two ranks printing to one pipe can interleave their lines.
(out_dir / f"rank{dist.get_rank()}.json").write_text(json.dumps({
    "rank": dist.get_rank(), "status": status, "timeout_s": timeout.total_seconds(),
    "again_processes": again.num_processes, "same_group": dist.distributed_c10d._get_default_group() is group,
}))
"""


def test_the_process_group_waits_ddp_timeout_seconds(tmp_path, sd15):
    teacher, prompts = sd15
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    args = [
        "distill", "--teacher", str(teacher), "--prompts", str(prompts), "--stages", "1", "--stage1-steps", "1",
        "--batch-size", "1", "--lora-rank", "4", "--sample-every", "0", "--checkpoint-every", "100",
        "--ddp-timeout", str(TIMEOUT_S), "--output-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    (node,) = run_nodes([str(probe), str(tmp_path), *args], nnodes=1, nproc_per_node=2)
    assert node.returncode == 0, node.stderr[-3000:]
    files = sorted(tmp_path.glob("rank*.json"))
    reports = sorted((json.loads(f.read_text()) for f in files), key=lambda report: report["rank"])
    assert [report["rank"] for report in reports] == [0, 1]
    for report in reports:
        assert report["status"] == 0
        assert report["timeout_s"] == TIMEOUT_S
        # The process group is made once per process; later Accelerators reuse it (and its timeout).
        assert report["same_group"] and report["again_processes"] == 2

"""Data parallel across machines, as two loopback "nodes" of one CPU process each (torchrun, gloo): distill
matches one process at the same global batch, and ``trajectories`` run by both nodes into one folder writes
exactly the shards one process writes.

The one-process run takes the global batch of 4 as 2 accumulated micro-batches of 2, so every UNet call has
the shapes of a node's and only the gradient reduction differs. At a per-device batch of 4 the kernels round
differently, and AdamW's first steps, which move a weight by about lr whatever its gradient's size, can blow
that rounding up to several percent of a step in weights whose gradient is nearly zero."""

from __future__ import annotations

import pytest
from launch import run_alone, run_nodes
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

EXPORTED = "mlcm_sd15_8seg.safetensors"  # the kohya LoRA a run exports at its end


def _check(nodes) -> None:
    for rank, node in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}: {node.stderr[-3000:]}"


def test_two_nodes_match_one_process_at_the_same_global_batch(tmp_path, sd15):
    teacher, prompts = sd15
    common = [
        "-m", "mlcm_train", "distill", "--teacher", str(teacher), "--prompts", str(prompts), "--stages", "1,2",
        "--stage1-steps", "1", "--stage2-steps", "1", "--stage2-renoise", "fresh", "--stage2-q", "2",
        "--stage2-p", "1", "--lora-rank", "4", "--sample-every", "0", "--checkpoint-every", "100",
    ]  # fmt: skip
    one = run_alone(
        [*common, "--batch-size", "2", "--gradient-accumulation", "2", "--output-dir", str(tmp_path / "one")]
    )
    _check([one])
    nodes = run_nodes([*common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")], 2, 1)
    _check(nodes)
    assert "2 per device x 2 processes x 1 accumulation = 4 samples" in nodes[0].stderr
    a = load_file(tmp_path / "one" / "export" / EXPORTED)
    b = load_file(tmp_path / "two" / "export" / EXPORTED)
    assert sorted(a) == sorted(b)
    moved = max(a[k].abs().max().item() for k in a if ".lora_up." in k)
    assert moved > 1e-5  # one stage-1 and one stage-2 AdamW step moved B off zero
    for name in a:
        # Same samples in the same shapes, same mean gradient: equal up to the reduction's rounding.
        assert (a[name] - b[name]).abs().max().item() <= 1e-3 * moved, name


def test_two_nodes_share_one_trajectory_folder(tmp_path, sd15):
    teacher, prompts = sd15
    args = [
        "--teacher", str(teacher), "--prompts", str(prompts), "--samples", "10", "--shard-size", "2",
        "--batch-size", "2",
    ]  # fmt: skip
    _check([run_alone(["-m", "mlcm_train", "trajectories", str(tmp_path / "one"), *args])])
    # Both nodes write into the same folder (here one disk; across machines a shared filesystem).
    nodes = run_nodes(["-m", "mlcm_train", "trajectories", str(tmp_path / "shared"), *args], 2, 1)
    _check(nodes)
    assert "rank 0/2 owns 3 of 5 shards, 3 to make" in nodes[0].stderr  # shards 0, 2, 4; node 1 made 1, 3
    one = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert one == ["manifest.json", *(f"shard-{k:05d}.safetensors" for k in range(5))]
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == one
    manifest = (tmp_path / "one" / "manifest.json").read_text(encoding="utf-8")
    assert (tmp_path / "shared" / "manifest.json").read_text(encoding="utf-8") == manifest
    for name in one[1:]:
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "shared" / name)
        assert sorted(a) == sorted(b) == ["prompt_index", "segment", "t_m", "z_tm"]
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].equal(b[key]), (name, key)

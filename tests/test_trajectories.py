"""Trajectory shards: deterministic, resumable, shareable between ranks, and refused when made differently."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import load_file

from mlcm.segments import scaled_linear_alphas_cumprod, segment_boundaries
from mlcm.vp import add_noise
from mlcm_train.data.trajectories import (
    TrajectoryDataset,
    generate_trajectory_shards,
    prompts_hash,
    shard_assignment,
    shard_name,
    shard_seed,
    teacher_fingerprint,
    trajectory_identity,
)
from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.timesteps import sample_stage1_timesteps

ACP = scaled_linear_alphas_cumprod()
BOUNDARIES = segment_boundaries(8)
LATENT = (4, 4, 4)
NUM_PROMPTS = 5


def prompt_points(index: torch.Tensor) -> torch.Tensor:
    """A distinct clean latent x* per prompt; the fake teacher's data is that single point."""
    return (index.float() - 2.0).view(-1, 1, 1, 1) * torch.ones(len(index), *LATENT)


class Teacher:
    """Exact eps of a point mass at the conditioning (B, C, H, W); counts the rows it sees."""

    def __init__(self, fail_after_rows: int | None = None):
        self.rows = 0
        self.fail_after_rows = fail_after_rows

    def __call__(self, z, t, cond):
        if self.fail_after_rows is not None and self.rows >= self.fail_after_rows:
            raise KeyboardInterrupt("killed")
        self.rows += z.shape[0]
        a = ACP[t].sqrt().float().view(-1, 1, 1, 1)
        s = (1 - ACP[t]).sqrt().float().view(-1, 1, 1, 1)
        return (z - a * cond) / s


def prompts_cond(index):
    return prompt_points(index), torch.zeros(len(index), *LATENT)


def generate(
    out, teacher=None, *, guidance=2.0, rank=0, world_size=1, num_samples=10, shard_size=4, dtype="float32"
):
    return generate_trajectory_shards(
        teacher or Teacher(), prompts_cond, out,
        num_samples=num_samples, shard_size=shard_size, num_prompts=NUM_PROMPTS,
        settings=DistillSettings(guidance_scale=guidance), alphas_cumprod=ACP, boundaries=BOUNDARIES,
        latent_shape=LATENT, seed=7, teacher_hash="tiny-teacher", prompts_hash="five-prompts",
        batch_size=3, store_dtype=dtype, rank=rank, world_size=world_size, progress=False,
    )  # fmt: skip


def shard_tensors(directory):
    return {p.name: load_file(p) for p in sorted(directory.glob("shard-*.safetensors"))}


def test_generation_is_deterministic_and_independent_of_the_rank_split(tmp_path):
    paths = generate(tmp_path / "a")
    assert [p.name for p in paths] == [shard_name(k) for k in range(3)]
    generate(tmp_path / "b")
    for rank in range(2):
        generate(tmp_path / "c", rank=rank, world_size=2)
    a, b, c = (shard_tensors(tmp_path / d) for d in "abc")
    assert list(a) == list(b) == list(c)
    for name in a:
        for key in ("z_tm", "t_m", "segment", "prompt_index"):
            assert torch.equal(a[name][key], b[name][key]) and torch.equal(a[name][key], c[name][key])
    assert [len(a[name]["t_m"]) for name in a] == [4, 4, 2]


def test_states_are_the_teachers_multistep_denoising_results(tmp_path):
    generate(tmp_path)
    data = TrajectoryDataset(tmp_path)
    assert len(data) == 10
    # Shard 0 redrawn from its documented seed and draw order: prompts, (segment, t_m), noise.
    gen = torch.Generator().manual_seed(shard_seed(7, 0))
    prompt_index = torch.randint(0, NUM_PROMPTS, (4,), generator=gen)
    segment, t_m, t_n, lo = sample_stage1_timesteps(4, BOUNDARIES, 20, gen)
    noise = torch.randn((4, *LATENT), generator=gen)
    batch = data.batch(range(4))
    for key, expected in [
        ("prompt_index", prompt_index),
        ("segment", segment),
        ("t_m", t_m),
        ("t_n", t_n),
        ("lo", lo),
    ]:
        assert torch.equal(batch[key], expected), key
    # A point-mass teacher keeps the initial noise direction: z_tm = a x_g + s (z_T - a_T x_g) / s_T,
    # with x_g the CFG point (w = 2, zero uncond point).
    x_g = 2.0 * prompt_points(prompt_index)
    t_top = torch.full((4,), 999)
    direction = (noise - ACP[t_top].sqrt().float().view(-1, 1, 1, 1) * x_g) / (
        1 - ACP[t_top]
    ).sqrt().float().view(-1, 1, 1, 1)
    torch.testing.assert_close(batch["z_tm"], add_noise(x_g, direction, t_m, ACP), atol=2e-4, rtol=1e-4)


def test_rank_assignment_covers_every_shard_exactly_once(tmp_path):
    made = []
    for rank in range(3):
        made += [p.name for p in generate(tmp_path, rank=rank, world_size=3, num_samples=22, shard_size=3)]
    assert sorted(made) == [shard_name(k) for k in range(8)] and len(set(made)) == len(made)
    assert shard_assignment(8, 1, 3) == [1, 4, 7]
    with pytest.raises(ValueError, match="rank=3"):
        shard_assignment(8, 3, 3)


def test_a_killed_run_leaves_no_half_shard_and_a_rerun_makes_only_the_missing_ones(tmp_path):
    shard0 = Teacher()
    generate(tmp_path / "shard0", shard0, num_samples=4)  # shard k depends only on (seed, k)
    killed = Teacher(fail_after_rows=shard0.rows + 1)  # dies inside shard 1
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, killed)
    assert sorted(p.name for p in tmp_path.glob("shard-*")) == [shard_name(0)]
    (tmp_path / f"{shard_name(1)}.tmp-99999").write_bytes(b"half a shard")  # left by some other killed run
    with pytest.raises(FileNotFoundError, match="2 of 3 shards are missing"):
        TrajectoryDataset(tmp_path)
    before = load_file(tmp_path / shard_name(0))
    rerun = Teacher()
    generate(tmp_path, rerun)
    assert not list(tmp_path.glob(f"{shard_name(2)}.tmp-*"))
    full = Teacher()
    generate(tmp_path / "fresh", full)
    assert rerun.rows == full.rows - shard0.rows  # shard 0 was not remade
    assert torch.equal(load_file(tmp_path / shard_name(0))["z_tm"], before["z_tm"])
    for name, tensors in shard_tensors(tmp_path / "fresh").items():
        assert torch.equal(load_file(tmp_path / name)["z_tm"], tensors["z_tm"])
    assert len(TrajectoryDataset(tmp_path)) == 10


def test_a_folder_made_with_other_settings_is_refused(tmp_path):
    generate(tmp_path)
    with pytest.raises(ValueError, match=r"identity.guidance_scale: folder has 2.0, this run needs 8.0"):
        generate(tmp_path, guidance=8.0)
    expect = trajectory_identity(
        settings=DistillSettings(guidance_scale=2.0, skip=10), boundaries=BOUNDARIES, latent_shape=LATENT,
        alphas_cumprod=ACP, teacher_hash="tiny-teacher", prompts_hash="five-prompts",
    )  # fmt: skip
    with pytest.raises(ValueError, match="skip: folder has 20, this run needs 10"):
        TrajectoryDataset(tmp_path, expect=expect)
    with pytest.raises(ValueError, match="teacher_hash"):
        TrajectoryDataset(tmp_path, expect={"teacher_hash": "another-teacher"})
    assert len(TrajectoryDataset(tmp_path, expect={**expect, "skip": 20})) == 10


def test_dataset_batches_fp16_states_and_survives_pickling(tmp_path):
    generate(tmp_path, dtype="float16")
    data = TrajectoryDataset(tmp_path)
    batch = data.batch([9, 0, 13])  # 13 wraps to 3
    assert batch["z_tm"].shape == (3, *LATENT) and batch["z_tm"].dtype == torch.float16
    assert batch["t_m"].dtype == torch.long and batch["t_m"].shape == (3,)
    torch.testing.assert_close(batch["z_tm"][2], data[3]["z_tm"])
    clone = pickle.loads(pickle.dumps(data))
    torch.testing.assert_close(clone[9]["z_tm"], data[9]["z_tm"])
    with pytest.raises(IndexError):
        data[10]


def test_a_stale_shard_from_another_manifest_is_detected(tmp_path):
    generate(tmp_path / "a")
    generate(tmp_path / "b", num_samples=12)
    (tmp_path / "a" / shard_name(1)).write_bytes((tmp_path / "b" / shard_name(1)).read_bytes())
    data = TrajectoryDataset(tmp_path / "a")
    with pytest.raises(ValueError, match="stale shard"):
        data[5]
    assert data[0]["z_tm"].shape == LATENT


def test_identity_helpers_change_with_the_prompt_order_and_the_teacher_bytes(tmp_path):
    assert prompts_hash(["a cat", "a dog"]) != prompts_hash(["a dog", "a cat"])
    assert prompts_hash(["a cat"]) == prompts_hash(["a cat"])
    folder = tmp_path / "teacher"
    (folder / "unet").mkdir(parents=True)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(bytes(3 << 20))
    (folder / "model_index.json").write_text("{}")
    before = teacher_fingerprint(folder)
    assert teacher_fingerprint(folder) == before and teacher_fingerprint(weights) != before
    with weights.open("r+b") as handle:  # a change near the end of a large file is still seen
        handle.seek((3 << 20) - 10)
        handle.write(b"x")
    assert teacher_fingerprint(folder) != before
    with pytest.raises(FileNotFoundError, match="no teacher files"):
        teacher_fingerprint(tmp_path / "empty")

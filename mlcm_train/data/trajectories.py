"""Pre-generated teacher trajectory states on disk: the core of ``python -m mlcm_train trajectories``.

Stage 1 learns from states ``z_{t_m}`` of the teacher's own CFG-DDIM trajectories (multistep denoising,
TLCM Algorithm 1). The paper makes them online every iteration; caching them trades disk for compute
(our option; docs/method.md, "Choices where the paper is silent"). A folder holds ``manifest.json`` (what made the states) and shards
``shard-00000.safetensors`` ... with tensors ``z_tm`` (B, C, H, W), ``t_m``, ``segment``, ``prompt_index``.

- Deterministic: shard k depends only on (seed, k), so any process can make any shard and reruns agree.
- Shareable: rank r of W makes shards k with k % W == r, and only those still missing (resume).
- Atomic: each shard is written to a temporary name and renamed, so a killed run leaves no half shard;
  readers only ever look at final names.
- Safe: a folder made with other settings, teacher or prompts is refused, never silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mlcm_train.method.settings import DistillSettings
from mlcm_train.method.teacher_ddim import EpsFn, mds_states
from mlcm_train.method.timesteps import sample_stage1_timesteps, segment_bounds

logger = logging.getLogger(__name__)

FORMAT = "mlcm-trajectories"
VERSION = 1
MANIFEST_NAME = "manifest.json"
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

PromptsCondFn = Callable[[Tensor], tuple[Any, Any]]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def shard_count(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def shard_assignment(num_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards rank ``rank`` of ``world_size`` is responsible for (k % world_size == rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return list(range(rank, num_shards, world_size))


def shard_seed(seed: int, index: int) -> int:
    """A 63-bit seed for shard ``index`` that depends only on (seed, index)."""
    digest = hashlib.sha256(f"{FORMAT}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def trajectory_identity(
    *,
    settings: DistillSettings,
    boundaries: Sequence[int],
    latent_shape: Sequence[int],
    alphas_cumprod: Tensor,
    teacher_hash: str,
    prompts_hash: str,
) -> dict[str, Any]:
    """What makes cached states interchangeable with online ones: method values, teacher, prompts, shape.

    ``teacher_hash`` should also cover how the unconditional embedding is made; ``prompts_hash`` the
    ordered prompt list (shards store prompt indices).
    """
    schedule = hashlib.sha256(alphas_cumprod.detach().double().cpu().numpy().tobytes()).hexdigest()[:16]
    return {
        "segments": settings.segments,
        "skip": settings.skip,
        "guidance_scale": float(settings.guidance_scale),
        "num_train_timesteps": settings.num_train_timesteps,
        "boundaries": [int(b) for b in boundaries],
        "latent_shape": [int(s) for s in latent_shape],
        "schedule_sha256": schedule,
        "teacher_hash": teacher_hash,
        "prompts_hash": prompts_hash,
    }


FINGERPRINT_CHUNK = 1 << 20  # bytes read from each end of every teacher file: cheap, yet catches re-saves


def prompts_hash(prompts: Sequence[str]) -> str:
    """Identity of an ordered prompt list (shards store prompt indices, so order matters)."""
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()[:16]


def teacher_fingerprint(path: str | Path) -> str:
    """Cheap identity of a teacher file or folder: relative names, sizes and the first/last MiB of each file."""
    root = Path(path)
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    )
    if not files:
        raise FileNotFoundError(f"no teacher files at {root}; pass the checkpoint file or diffusers folder")
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(root) if file != root else file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(FINGERPRINT_CHUNK))
            if size > FINGERPRINT_CHUNK:
                handle.seek(max(FINGERPRINT_CHUNK, size - FINGERPRINT_CHUNK))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _manifest_hash(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _differences(found: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable ``key: found vs wanted`` lines for the keys of ``wanted`` that differ."""
    lines = []
    for key, value in wanted.items():
        have = found.get(key, "<absent>")
        if isinstance(value, Mapping) and isinstance(have, Mapping):
            lines += _differences(have, value, f"{prefix}{key}.")
        elif have != value:
            lines.append(f"{prefix}{key}: folder has {have!r}, this run needs {value!r}")
    return lines


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary sibling and rename, so readers see the whole file or nothing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an MLCM trajectory manifest; point at a folder made by `trajectories`"
        )
    return manifest


def _ensure_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or refuse when the folder already holds states made differently."""
    existing = _read_manifest(directory)
    if existing is None:
        text = json.dumps(manifest, indent=2, sort_keys=True)
        write_atomic(directory / MANIFEST_NAME, lambda p: p.write_text(text, encoding="utf-8"))
        return
    diffs = _differences(existing, manifest)
    if diffs:
        raise ValueError(
            f"trajectory folder {directory} was made with other settings ({'; '.join(diffs)}); "
            "use a new folder, or the settings it was made with"
        )


def generate_trajectory_shards(
    teacher_eps_fn: EpsFn,
    prompts_cond_fn: PromptsCondFn,
    out_dir: str | Path,
    *,
    num_samples: int,
    shard_size: int,
    num_prompts: int,
    settings: DistillSettings,
    alphas_cumprod: Tensor,
    boundaries: Sequence[int],
    latent_shape: Sequence[int],
    seed: int,
    teacher_hash: str,
    prompts_hash: str,
    batch_size: int = 8,
    store_dtype: str = "float16",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Make the missing shards assigned to this rank; returns this rank's shard paths (made or found).

    ``prompts_cond_fn(prompt_index)`` returns ``(cond, uncond)`` for a LongTensor of prompt indices, on
    ``device``. Per shard k, a generator seeded from (seed, k) draws prompt indices, stage-1 segments and
    ``t_m`` (``sample_stage1_timesteps``) and the initial noise on the CPU; the teacher then runs the
    multistep denoising strategy in chunks of ``batch_size``. Other ranks' shards are not waited for:
    synchronise (e.g. ``accelerator.wait_for_everyone()``) before opening a ``TrajectoryDataset``.
    """
    if num_samples < 1 or shard_size < 1 or num_prompts < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples={num_samples}, shard_size={shard_size}, num_prompts={num_prompts} and "
            f"batch_size={batch_size} must all be at least 1"
        )
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype={store_dtype!r} is unknown; choose one of {', '.join(STORE_DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = trajectory_identity(
        settings=settings,
        boundaries=boundaries,
        latent_shape=latent_shape,
        alphas_cumprod=alphas_cumprod,
        teacher_hash=teacher_hash,
        prompts_hash=prompts_hash,
    )
    num_shards = shard_count(num_samples, shard_size)
    manifest_hash = _write_manifest(
        out_dir,
        identity=identity,
        counts={"num_samples": num_samples, "shard_size": shard_size, "num_shards": num_shards},
        num_prompts=num_prompts,
        seed=seed,
        store_dtype=store_dtype,
    )
    mine = shard_assignment(num_shards, rank, world_size)
    missing = [k for k in mine if not (out_dir / shard_name(k)).is_file()]
    logger.info(
        "trajectories in %s: rank %d/%d owns %d of %d shards, %d to make",
        out_dir,
        rank,
        world_size,
        len(mine),
        num_shards,
        len(missing),
    )
    bar = _progress_bar(sum(_shard_rows(k, num_samples, shard_size) for k in missing), progress)
    for k in missing:
        tensors = _make_shard(
            teacher_eps_fn,
            prompts_cond_fn,
            rows=_shard_rows(k, num_samples, shard_size),
            generator=torch.Generator().manual_seed(shard_seed(seed, k)),
            num_prompts=num_prompts,
            settings=settings,
            alphas_cumprod=alphas_cumprod,
            boundaries=boundaries,
            latent_shape=latent_shape,
            batch_size=batch_size,
            store_dtype=STORE_DTYPES[store_dtype],
            device=torch.device(device),
            on_rows=bar.update,
        )
        metadata = {"format": FORMAT, "manifest_sha256": manifest_hash, "shard": str(k)}
        write_atomic(
            out_dir / shard_name(k), lambda p, t=tensors, m=metadata: save_file(t, str(p), metadata=m)
        )
    bar.close()
    return [out_dir / shard_name(k) for k in mine]


def _write_manifest(
    out_dir: Path,
    *,
    identity: dict[str, Any],
    counts: dict[str, int],
    num_prompts: int,
    seed: int,
    store_dtype: str,
) -> str:
    """Write (or check against) the folder's manifest; returns its hash, which every shard records."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "identity": identity,
        **counts,
        "num_prompts": num_prompts,
        "seed": seed,
        "store_dtype": store_dtype,
    }
    _ensure_manifest(out_dir, manifest)
    return _manifest_hash(manifest)


def _shard_rows(index: int, num_samples: int, shard_size: int) -> int:
    return min(shard_size, num_samples - index * shard_size)


def _make_shard(
    teacher_eps_fn: EpsFn,
    prompts_cond_fn: PromptsCondFn,
    *,
    rows: int,
    generator: torch.Generator,
    num_prompts: int,
    settings: DistillSettings,
    alphas_cumprod: Tensor,
    boundaries: Sequence[int],
    latent_shape: Sequence[int],
    batch_size: int,
    store_dtype: torch.dtype,
    device: torch.device,
    on_rows: Callable[[int], Any],
) -> dict[str, Tensor]:
    """One shard's tensors; all random draws come from ``generator`` on the CPU, in a fixed order."""
    prompt_index = torch.randint(0, num_prompts, (rows,), generator=generator)
    segment, t_m, _, _ = sample_stage1_timesteps(rows, boundaries, settings.skip, generator)
    noise = torch.randn((rows, *latent_shape), generator=generator)
    states = []
    for start in range(0, rows, batch_size):
        part = slice(start, min(start + batch_size, rows))
        cond, uncond = prompts_cond_fn(prompt_index[part])
        z_tm = mds_states(
            teacher_eps_fn,
            noise[part].to(device),
            t_m[part].to(device),
            segment[part].to(device),
            cond,
            uncond,
            settings=settings,
            alphas_cumprod=alphas_cumprod,
            boundaries=boundaries,
        )
        states.append(z_tm.to(device="cpu", dtype=store_dtype))
        on_rows(part.stop - part.start)
    return {
        "z_tm": torch.cat(states).contiguous(),
        "t_m": t_m.contiguous(),
        "segment": segment.contiguous(),
        "prompt_index": prompt_index.contiguous(),
    }


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="teacher trajectories", unit="state")


class TrajectoryDataset:
    """Map-style view of a finished trajectory folder: item i -> z_tm, t_m, t_n, lo, segment, prompt_index.

    ``expect`` (e.g. ``trajectory_identity(...)`` of the current run, or any subset of it) is compared
    with the folder's identity; a difference raises ``ValueError`` naming the fields. ``z_tm`` comes back
    in the stored dtype (float16 by default); cast it where it is used. Shards are memory-mapped and read
    row by row, so folders larger than RAM work.
    """

    def __init__(self, directory: str | Path, *, expect: Mapping[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        manifest = _read_manifest(self.directory)
        if manifest is None:
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {self.directory}; make the states first with `python -m mlcm_train trajectories`"
            )
        if manifest.get("version") != VERSION:
            raise ValueError(
                f"{self.directory} holds trajectory format version {manifest.get('version')}, this trainer reads "
                f"{VERSION}; regenerate the folder"
            )
        self.manifest = manifest
        self.identity: dict[str, Any] = manifest["identity"]
        if expect is not None:
            diffs = _differences(self.identity, expect)
            if diffs:
                raise ValueError(
                    f"trajectory folder {self.directory} does not match this run ({'; '.join(diffs)}); "
                    "regenerate it with this run's settings or use online trajectories"
                )
        self.num_samples: int = manifest["num_samples"]
        self.shard_size: int = manifest["shard_size"]
        absent = [k for k in range(manifest["num_shards"]) if not (self.directory / shard_name(k)).is_file()]
        if absent:
            raise FileNotFoundError(
                f"{len(absent)} of {manifest['num_shards']} shards are missing in {self.directory} "
                f"(e.g. {shard_name(absent[0])}); rerun `python -m mlcm_train trajectories` with the same "
                "settings to make them"
            )
        self.boundaries: list[int] = self.identity["boundaries"]
        self.skip: int = self.identity["skip"]
        self._manifest_hash = _manifest_hash(manifest)
        self._handles: dict[int, Any] = {}

    @property
    def segments(self) -> int:
        return self.identity["segments"]

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross process boundaries (DataLoader workers)
        return state

    def _shard(self, index: int) -> Any:
        handle = self._handles.get(index)
        if handle is None:
            path = self.directory / shard_name(index)
            handle = safe_open(str(path), framework="pt")
            if (handle.metadata() or {}).get("manifest_sha256") != self._manifest_hash:
                raise ValueError(
                    f"{path} was made for another manifest (a stale shard); delete it and rerun "
                    "`python -m mlcm_train trajectories` to remake it"
                )
            self._handles[index] = handle
        return handle

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"trajectory index {index} out of range for {self.num_samples} states")
        index %= self.num_samples
        shard, row = divmod(index, self.shard_size)
        handle = self._shard(shard)
        item = {
            name: handle.get_slice(name)[row : row + 1][0]
            for name in ("z_tm", "t_m", "segment", "prompt_index")
        }
        lo, _ = segment_bounds(item["segment"].reshape(1), self.boundaries)
        item["lo"] = lo[0]
        item["t_n"] = item["t_m"] - self.skip
        return item

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """Stacked items (z_tm (B, C, H, W); the rest LongTensors (B,)); indices wrap around the dataset."""
        items = [self[int(i) % self.num_samples] for i in indices]
        return {name: torch.stack([item[name] for item in items]) for name in items[0]}

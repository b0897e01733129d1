"""Text conditioning computed once per unique prompt and served by prompt index.

The text encoders then run once per prompt for the whole run instead of once per training sample. Rows
are kept on the CPU in the teacher's dtype: SD1.5 needs 77x768 values per prompt, SDXL 77x2048 + 1280
(about 0.3 MB per prompt in bf16/fp16).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mlcm_train.models.conditioning import Conditioning

logger = logging.getLogger(__name__)

FORMAT = "mlcm-embeddings-v1"


class EmbeddingCache:
    """Each unique prompt's Conditioning, computed once with `teacher.encode_prompts`; `get` batches by index."""

    def __init__(
        self, teacher, prompts: Sequence[str], *, batch_size: int = 16, resolution: int | None = None
    ) -> None:
        """`resolution`: image side for SDXL's time ids (default: the teacher's native resolution)."""
        if not prompts:
            raise ValueError("EmbeddingCache needs at least one prompt")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; use at least 1")
        unique = list(dict.fromkeys(prompts))  # first-appearance order, deterministic
        chunks = [
            teacher.encode_prompts(unique[i : i + batch_size], resolution=resolution).to(device="cpu")
            for i in range(0, len(unique), batch_size)
        ]
        self._init(
            list(prompts), unique, Conditioning.cat(chunks), family=teacher.family, source=teacher.source
        )
        logger.info("encoded %d unique prompts (of %d) once for the run", len(unique), len(prompts))

    def _init(
        self, prompts: list[str], unique: list[str], table: Conditioning, family: str, source: str
    ) -> None:
        if len(table) != len(unique):
            raise ValueError(f"embedding table has {len(table)} rows for {len(unique)} unique prompts")
        self.prompts = prompts
        self.unique_prompts = unique
        self.family = family
        self.source = source
        self._table = table
        row_of = {p: i for i, p in enumerate(unique)}
        self._rows = torch.tensor([row_of[p] for p in prompts], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, indices: Sequence[int] | Tensor, device: str | torch.device | None = None) -> Conditioning:
        """Conditioning for prompts[i] for each i in `indices` (CPU unless `device` is given)."""
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if index.numel() and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise IndexError(f"prompt index out of range for {len(self)} prompts: {index.tolist()}")
        batch = self._table[self._rows[index]]
        return batch if device is None else batch.to(device=device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table and prompt list to a .safetensors file atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"prompt_embeds": self._table.prompt_embeds, "rows": self._rows}
        if self._table.is_sdxl:
            tensors["pooled_embeds"] = self._table.pooled_embeds
            tensors["time_ids"] = self._table.time_ids
        metadata = {
            "format": FORMAT,
            "family": self.family,
            "source": self.source,
            "unique_prompts": json.dumps(self.unique_prompts),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, prompts: Sequence[str] | None = None) -> EmbeddingCache:
        """Read a cache written by `save`; with `prompts`, check it was built for exactly that prompt list."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"embedding cache {path} is unreadable ({exc}); delete it to recompute") from exc
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not an MLCM embedding cache (format {metadata.get('format')!r}); delete it"
            )
        unique = json.loads(metadata["unique_prompts"])
        rows = tensors["rows"]
        saved_prompts = [unique[i] for i in rows.tolist()]
        if prompts is not None and list(prompts) != saved_prompts:
            raise ValueError(
                f"embedding cache {path} was built for a different prompt list ({len(saved_prompts)} prompts, "
                f"now {len(prompts)}); delete it to recompute"
            )
        table = Conditioning(tensors["prompt_embeds"], tensors.get("pooled_embeds"), tensors.get("time_ids"))
        cache = cls.__new__(cls)
        cache._init(
            saved_prompts, unique, table, family=metadata.get("family", ""), source=metadata.get("source", "")
        )
        return cache

    @classmethod
    def load_or_compute(
        cls,
        path: str | os.PathLike,
        teacher,
        prompts: Sequence[str],
        *,
        batch_size: int = 16,
        resolution: int | None = None,
    ) -> EmbeddingCache:
        """Reuse the cache at `path` when it matches the prompts and teacher family, else compute and save it."""
        path = Path(path)
        if path.is_file():
            try:
                cache = cls.load(path, prompts)
            except ValueError as exc:
                logger.warning("recomputing text embeddings: %s", exc)
            else:
                side = float(resolution if resolution is not None else teacher.resolution)
                same_size = not cache._table.is_sdxl or bool((cache._table.time_ids[:, 4] == side).all())
                if cache.family == teacher.family and cache.source == teacher.source and same_size:
                    return cache
                logger.warning(
                    "recomputing text embeddings: %s was made with another teacher or resolution", path
                )
        cache = cls(teacher, prompts, batch_size=batch_size, resolution=resolution)
        cache.save(path)
        return cache

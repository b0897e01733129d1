"""The text conditioning a teacher/student UNet call needs, as one batch-indexable value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """Per-sample UNet conditioning: SD1.5 uses `prompt_embeds` only; SDXL adds pooled text and time ids.

    prompt_embeds: (B, 77, D) cross-attention states (SD1.5 D=768; SDXL D=2048, CLIP-L and bigG concatenated).
    pooled_embeds: SDXL `text_embeds` (B, 1280), the projected pooled bigG output; None for SD1.5.
    time_ids: SDXL `time_ids` (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w); None for SD1.5.
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor | None = None
    time_ids: Tensor | None = None

    def __post_init__(self) -> None:
        batch = self.prompt_embeds.shape[0]
        for name in ("pooled_embeds", "time_ids"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"{name} has batch {value.shape[0]} but prompt_embeds has {batch}")
        if (self.pooled_embeds is None) != (self.time_ids is None):
            raise ValueError(
                "SDXL conditioning needs both pooled_embeds and time_ids (or neither, for SD1.5)"
            )

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def is_sdxl(self) -> bool:
        """True when the added text/time conditioning of SDXL is present."""
        return self.pooled_embeds is not None

    def unet_kwargs(self) -> dict:
        """Keyword arguments for `UNet2DConditionModel.forward` (added_cond_kwargs only for SDXL)."""
        kwargs: dict = {"encoder_hidden_states": self.prompt_embeds}
        if self.is_sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids}
        return kwargs

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move/cast every tensor; time_ids stay in the embeddings' dtype as diffusers expects."""
        return Conditioning(
            *(None if t is None else t.to(device=device, dtype=dtype) for t in self._tensors())
        )

    def __getitem__(self, idx: int | slice | Sequence[int] | Tensor) -> Conditioning:
        """Select samples of the batch; an int keeps the batch dimension (length 1)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        elif not isinstance(idx, slice | Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Conditioning(*(None if t is None else t[idx] for t in self._tensors()))

    def repeat(self, times: int) -> Conditioning:
        """Tile the batch `times` times (sample order a,b,a,b,...), e.g. to pair with several noise draws."""
        return Conditioning(
            *(None if t is None else t.repeat(times, *([1] * (t.dim() - 1))) for t in self._tensors())
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """Concatenate along the batch (e.g. [uncond, cond] for one CFG forward pass)."""
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        kinds = {c.is_sdxl for c in items}
        if len(kinds) != 1:
            raise ValueError("cannot concatenate SD1.5 and SDXL conditionings")
        columns = list(zip(*(c._tensors() for c in items)))
        return Conditioning(*(None if col[0] is None else torch.cat(col) for col in columns))

    def _tensors(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return self.prompt_embeds, self.pooled_embeds, self.time_ids

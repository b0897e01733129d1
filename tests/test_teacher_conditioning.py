"""Conditioning: batch indexing, concatenation, device/dtype moves and UNet kwargs."""

from __future__ import annotations

import pytest
import torch

from mlcm_train.models.conditioning import Conditioning


def _sdxl(batch: int, offset: float = 0.0) -> Conditioning:
    base = torch.arange(batch, dtype=torch.float32) + offset
    return Conditioning(
        base[:, None, None].expand(batch, 77, 8).clone(),
        base[:, None].expand(batch, 4).clone(),
        base[:, None].expand(batch, 6).clone(),
    )


def test_indexing_keeps_rows_together():
    cond = _sdxl(4)
    assert len(cond) == 4 and cond.is_sdxl
    assert len(cond[2]) == 1 and cond[2].time_ids[0, 0] == 2
    assert len(cond[-1]) == 1 and cond[-1].pooled_embeds[0, 0] == 3
    picked = cond[[3, 0, 3]]
    assert picked.prompt_embeds[:, 0, 0].tolist() == [3, 0, 3]
    assert picked.pooled_embeds[:, 0].tolist() == [3, 0, 3] and picked.time_ids[:, 0].tolist() == [3, 0, 3]
    assert cond[1:3].prompt_embeds[:, 0, 0].tolist() == [1, 2]
    assert cond[torch.tensor([1])].time_ids[0, 0] == 1


def test_cat_repeat_and_to():
    joined = Conditioning.cat([_sdxl(2), _sdxl(1, offset=10)])
    assert joined.pooled_embeds[:, 0].tolist() == [0, 1, 10]
    assert joined.repeat(2).time_ids[:, 0].tolist() == [0, 1, 10, 0, 1, 10]
    half = joined.to(dtype=torch.float16)
    assert half.prompt_embeds.dtype == half.pooled_embeds.dtype == half.time_ids.dtype == torch.float16
    with pytest.raises(ValueError, match="SD1.5 and SDXL"):
        Conditioning.cat([_sdxl(1), Conditioning(torch.zeros(1, 77, 8))])
    with pytest.raises(ValueError, match="at least one"):
        Conditioning.cat([])


def test_unet_kwargs_per_family_and_validation():
    sd15 = Conditioning(torch.zeros(2, 77, 8))
    assert sd15.unet_kwargs().keys() == {"encoder_hidden_states"} and not sd15.is_sdxl
    kwargs = _sdxl(2).unet_kwargs()
    assert set(kwargs["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    with pytest.raises(ValueError, match="batch"):
        Conditioning(torch.zeros(2, 77, 8), torch.zeros(3, 4), torch.zeros(2, 6))
    with pytest.raises(ValueError, match="both"):
        Conditioning(torch.zeros(2, 77, 8), torch.zeros(2, 4), None)

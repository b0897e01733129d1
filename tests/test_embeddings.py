"""EmbeddingCache: each unique prompt encoded once, batches by index, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_sd15, make_tiny_sdxl

from mlcm_train.models.embeddings import EmbeddingCache
from mlcm_train.models.teacher import load_teacher

PROMPTS = ["a cat", "a dog", "a cat", "the red dog", "a dog", "a cat", "at the door"]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def teacher(request, tmp_path_factory):
    make = make_tiny_sd15 if request.param == "sd15" else make_tiny_sdxl
    return load_teacher(make(tmp_path_factory.mktemp(request.param)))


def _count_encoded(teacher, monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []
    original = teacher.encode_prompts

    def counting(prompts, *args, **kwargs):
        calls.append(list(prompts))
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(teacher, "encode_prompts", counting)
    return calls


def test_each_unique_prompt_is_encoded_once(teacher, monkeypatch):
    calls = _count_encoded(teacher, monkeypatch)
    cache = EmbeddingCache(teacher, PROMPTS, batch_size=3)
    encoded = [p for call in calls for p in call]
    assert sorted(encoded) == sorted(set(PROMPTS))
    assert all(len(call) <= 3 for call in calls)
    batch = [0, 3, 2, 6]
    got = cache.get(batch)
    calls.clear()
    cache.get([1, 1, 5])
    assert calls == []  # serving batches never runs the text encoders
    expected = teacher.encode_prompts([PROMPTS[i] for i in batch])
    torch.testing.assert_close(got.prompt_embeds, expected.prompt_embeds)
    if teacher.family == "sdxl":
        torch.testing.assert_close(got.pooled_embeds, expected.pooled_embeds)
        torch.testing.assert_close(got.time_ids, expected.time_ids)
    else:
        assert got.pooled_embeds is None and got.time_ids is None
    assert torch.equal(got[2].prompt_embeds, got[0].prompt_embeds)  # same prompt, same row
    with pytest.raises(IndexError):
        cache.get([len(PROMPTS)])


def test_save_load_round_trip_and_prompt_check(teacher, tmp_path, monkeypatch):
    cache = EmbeddingCache(teacher, PROMPTS)
    path = cache.save(tmp_path / "embeddings.safetensors")
    loaded = EmbeddingCache.load(path, PROMPTS)
    assert loaded.prompts == PROMPTS and loaded.family == teacher.family
    a, b = cache.get(range(len(PROMPTS))), loaded.get(range(len(PROMPTS)))
    assert torch.equal(a.prompt_embeds, b.prompt_embeds)
    if teacher.family == "sdxl":
        assert torch.equal(a.pooled_embeds, b.pooled_embeds) and torch.equal(a.time_ids, b.time_ids)
    with pytest.raises(ValueError, match="different prompt list"):
        EmbeddingCache.load(path, PROMPTS[:-1])
    # load_or_compute reuses a matching file without encoding anything.
    calls = _count_encoded(teacher, monkeypatch)
    EmbeddingCache.load_or_compute(path, teacher, PROMPTS)
    assert calls == []
    EmbeddingCache.load_or_compute(path, teacher, ["something new"])
    assert calls == [["something new"]]
    assert EmbeddingCache.load(path).prompts == ["something new"]
    if teacher.family == "sdxl":  # SDXL time ids follow the training resolution
        calls.clear()
        cache = EmbeddingCache.load_or_compute(path, teacher, ["something new"], resolution=32)
        assert calls == [["something new"]] and cache.get([0]).time_ids.tolist() == [[32, 32, 0, 0, 32, 32]]


def test_unreadable_cache_file(tmp_path):
    bad = tmp_path / "embeddings.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="delete it"):
        EmbeddingCache.load(bad)

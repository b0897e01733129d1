"""Latent LPIPS: non-strict loading with a key report, distance properties, and use as the loss features."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from mlcm_train.method.consistency import consistency_distance
from mlcm_train.models.lpips import TAP_CHANNELS, LatentLPIPS, load_latent_lpips

VGG16_LATENT_PARAMS = 14_716_736  # the released latent-lpips.pth is 58.9 MB of fp32 (the authors' release)


@pytest.fixture(scope="module")
def reference():
    """A LatentLPIPS with seeded random weights and positive heads, and its state dict."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LatentLPIPS()
        for k in range(len(TAP_CHANNELS)):
            torch.nn.init.uniform_(getattr(model, f"lin{k}").model[1].weight, 0.0, 1.0)
    model.eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def latents(seed: int, batch: int = 2):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_full_state_dict_loads_cleanly_and_reproduces_the_distance(tmp_path, reference):
    model, state = reference
    assert sum(p.numel() for p in model.parameters()) == VGG16_LATENT_PARAMS
    save_file(state, tmp_path / "latent-lpips.safetensors")
    loaded, report = load_latent_lpips(tmp_path / "latent-lpips.safetensors")
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    a, b = latents(1), latents(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), model(a, b))


def test_partial_pickle_reports_missing_and_unexpected_keys(tmp_path, reference, caplog):
    _, state = reference
    partial = {k: v for k, v in state.items() if not k.startswith("lin")}
    partial["module.extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": partial}, tmp_path / "partial.pth")
    with caplog.at_level(logging.WARNING, logger="mlcm_train.models.lpips"):
        _, report = load_latent_lpips(tmp_path / "partial.pth")
    assert report.missing == [f"lin{k}.model.1.weight" for k in range(5)]
    assert report.unexpected == ["module.extra.weight"]
    assert "5 missing keys" in caplog.text


def test_torchvision_style_vgg_keys_map_onto_the_lpips_slices(tmp_path, reference):
    model, state = reference
    renamed = {}
    for key, value in state.items():
        if key.startswith("net.slice"):
            renamed["features." + key.split(".", 2)[2]] = value  # net.slice2.5.weight -> features.5.weight
    save_file(renamed, tmp_path / "vgg.safetensors")
    loaded, report = load_latent_lpips(tmp_path / "vgg.safetensors")
    assert report.unexpected == [] and all(k.startswith(("lin", "scaling_layer")) for k in report.missing)
    torch.testing.assert_close(
        getattr(loaded.net.slice3, "10").weight, getattr(model.net.slice3, "10").weight
    )


def test_image_lpips_or_foreign_files_are_refused_with_a_clear_message(tmp_path):
    save_file({"net.slice1.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "image_lpips.safetensors")
    with pytest.raises(ValueError, match="not an image LPIPS"):
        load_latent_lpips(tmp_path / "image_lpips.safetensors")
    with pytest.raises(FileNotFoundError, match="latent LPIPS weights not found"):
        load_latent_lpips(tmp_path / "absent.pth")


def test_distance_is_zero_on_identical_inputs_positive_otherwise_and_matches_features(reference):
    model, _ = reference
    a, b = latents(3, batch=3), latents(4, batch=3)
    with torch.no_grad():
        same, diff = model(a, a), model(a, b)
        fa, fb = model.features(a), model.features(b)
    assert same.shape == diff.shape == (3,)
    assert torch.allclose(same, torch.zeros(3)) and bool((diff > 0).all())
    torch.testing.assert_close((fa - fb).square().sum(dim=1), diff, rtol=1e-4, atol=1e-6)


def test_as_loss_features_the_gradient_reaches_the_input_only(reference):
    model, _ = reference
    model.requires_grad_(False)
    pred = latents(5).requires_grad_(True)
    target = latents(6)
    loss = consistency_distance(pred, target, feature_fn=model.features)
    with torch.no_grad():
        expected = model(pred, target).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)
    loss.backward()
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())

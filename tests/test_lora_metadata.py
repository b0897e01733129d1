"""MLCM header metadata round trips and base-family detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlcm.lora import LoraModule, LoraWeights, MLCMLoraMetadata, detect_family, read_lora, write_kohya_lora

FULL = MLCMLoraMetadata(
    segments=8,
    base_family="sdxl",
    recommended_steps=(2, 4, 8),
    supported_steps=(1, 2, 3, 4, 5, 6, 7, 8),
    stages=("mlcd", "inter_segment"),
    training={"lora_rank": 64, "lora_alpha": 8.0, "prompts": ["a cat", "a dog"], "nested": {"w": 8.0}},
)


def _module(in_features: int, out_features: int = 4, rank: int = 1, alpha: float = 1.0) -> LoraModule:
    generator = torch.Generator().manual_seed(in_features)
    down = torch.randn(rank, in_features, generator=generator)
    return LoraModule(down, torch.randn(out_features, rank, generator=generator), alpha)


def _lora(modules: dict[str, LoraModule], metadata: MLCMLoraMetadata | None = None) -> LoraWeights:
    return LoraWeights(modules, metadata, "kohya", (), "test")


def test_metadata_header_round_trip() -> None:
    header = FULL.to_header()
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in header.items())
    assert MLCMLoraMetadata.from_header(header) == FULL
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert MLCMLoraMetadata.from_header(MLCMLoraMetadata().to_header()) == MLCMLoraMetadata()


def test_metadata_survives_a_file_and_foreign_headers_read_as_none(tmp_path: Path) -> None:
    lora = _lora({"lora_unet_down_blocks_0_resnets_0_conv1": _module(8)})
    write_kohya_lora(tmp_path / "ours.safetensors", lora, metadata=FULL)
    assert read_lora(tmp_path / "ours.safetensors").metadata == FULL
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as handle:
        header = handle.metadata()
    assert header["ss_network_dim"] == "1" and header["ss_network_alpha"] == "1"
    assert header["ss_network_module"] == "networks.lora"
    assert json.loads(header["mlcm.training"])["nested"] == {"w": 8.0}

    foreign = {"ss_network_dim": "32", "ss_output_name": "someone_else", "format": "pt"}
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(1, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": torch.ones(4, 1, 1, 1),
        },
        str(tmp_path / "foreign.safetensors"),
        metadata=foreign,
    )
    assert read_lora(tmp_path / "foreign.safetensors").metadata is None
    assert MLCMLoraMetadata.from_header({}) is None


def test_malformed_metadata_is_named_and_dropped_with_a_warning(tmp_path: Path, caplog) -> None:
    header = {**FULL.to_header(), "mlcm.segments": "eight"}
    with pytest.raises(ValueError, match="mlcm.segments"):
        MLCMLoraMetadata.from_header(header)
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(1, 4),
            "lora_unet_conv_in.lora_up.weight": torch.ones(4, 1),
        },
        str(tmp_path / "bad_meta.safetensors"),
        metadata=header,
    )
    lora = read_lora(tmp_path / "bad_meta.safetensors")
    assert lora.metadata is None
    assert "mlcm.segments" in caplog.text


def test_supported_steps_round_trip_and_old_files_read_as_none(tmp_path: Path) -> None:
    header = FULL.to_header()
    assert json.loads(header["mlcm.supported_steps"]) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert MLCMLoraMetadata.from_header(header).supported_steps == (1, 2, 3, 4, 5, 6, 7, 8)
    # a file written before the key existed
    old = {key: value for key, value in header.items() if key != "mlcm.supported_steps"}
    assert MLCMLoraMetadata.from_header(old).supported_steps is None
    assert "mlcm.supported_steps" not in MLCMLoraMetadata(segments=8).to_header()
    lora = _lora({"lora_unet_down_blocks_0_resnets_0_conv1": _module(8)})
    write_kohya_lora(tmp_path / "steps.safetensors", lora, metadata=MLCMLoraMetadata(supported_steps=(2, 4)))
    assert read_lora(tmp_path / "steps.safetensors").metadata.supported_steps == (2, 4)


@pytest.mark.parametrize("steps", [(), (0, 1), (-1,), (2, 2), (4, 2), (1.5,), (True,), [1, 2]])
def test_supported_steps_must_be_positive_and_increasing(steps) -> None:
    with pytest.raises(ValueError, match="supported_steps"):
        MLCMLoraMetadata(supported_steps=steps)


@pytest.mark.parametrize("value", ["8", '"1-8"', "[1, 2.5]", "[2, 1]", "[0]", "not json"])
def test_malformed_supported_steps_are_named(value: str) -> None:
    with pytest.raises(ValueError, match="supported_steps"):
        MLCMLoraMetadata.from_header({**FULL.to_header(), "mlcm.supported_steps": value})


def test_metadata_rejects_values_a_sampler_cannot_use() -> None:
    with pytest.raises(ValueError, match="segments"):
        MLCMLoraMetadata(segments=0)
    with pytest.raises(ValueError, match="base_family"):
        MLCMLoraMetadata(base_family="sd3")
    with pytest.raises(ValueError, match="JSON"):
        MLCMLoraMetadata(training={"bad": object()}).to_header()


ATTN2_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.mark.parametrize(
    ("modules", "expected"),
    [
        ({ATTN2_K: _module(768)}, "sd15"),
        ({ATTN2_K: _module(2048)}, "sdxl"),
        ({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v": _module(2048)}, "sdxl"),
        ({"lora_unet_add_embedding_linear_1": _module(2816)}, "sdxl"),
        ({"lora_unet_label_emb_0_0": _module(2816)}, "sdxl"),
        ({"lora_unet_down_blocks_2_attentions_1_transformer_blocks_7_ff_net_2": _module(5120)}, "sdxl"),
        ({ATTN2_K: _module(1024)}, None),  # SD2's OpenCLIP width: neither family
        ({"lora_unet_down_blocks_0_resnets_0_conv1": _module(320)}, None),
    ],
)
def test_detect_family_from_shapes_and_names(modules: dict[str, LoraModule], expected: str | None) -> None:
    assert detect_family(_lora(modules)) == expected


def test_detect_family_prefers_metadata() -> None:
    lora = _lora({ATTN2_K: _module(768)}, MLCMLoraMetadata(base_family="sdxl"))
    assert detect_family(lora) == "sdxl"


def test_writer_refuses_a_family_label_that_contradicts_the_shapes(tmp_path: Path) -> None:
    lora = _lora({ATTN2_K: _module(768)})
    with pytest.raises(ValueError, match=r"base_family='sdxl'.*sd15"):
        write_kohya_lora(tmp_path / "x.safetensors", lora, metadata=MLCMLoraMetadata(base_family="sdxl"))
    assert not (tmp_path / "x.safetensors").exists()
    write_kohya_lora(tmp_path / "x.safetensors", lora, metadata=MLCMLoraMetadata(base_family="sd15"))
    assert read_lora(tmp_path / "x.safetensors").metadata.base_family == "sd15"

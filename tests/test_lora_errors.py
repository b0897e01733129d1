"""Bad LoRA inputs raise errors that say what is wrong and what to do; never a silent wrong result."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlcm.lora import LoraModule, LoraWeights, read_lora, write_kohya_lora

CONV1 = "down_blocks.0.resnets.0.conv1"


def _peft_tensors(rank: int = 4, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    return {
        f"{prefix}{CONV1}.lora_A.weight": torch.randn(rank, 8, 3, 3, generator=generator),
        f"{prefix}{CONV1}.lora_B.weight": torch.randn(8, rank, 1, 1, generator=generator),
    }


def _peft_folder(folder: Path, *, config_r: int = 4, rank: int = 4) -> Path:
    folder.mkdir(parents=True)
    save_file(_peft_tensors(rank), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": config_r, "lora_alpha": 8})
    )
    return folder


def test_missing_path_names_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist.*\.safetensors.*adapter_model\.safetensors"):
        read_lora(tmp_path / "nope.safetensors")


def test_empty_folder_says_it_is_not_a_peft_adapter(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"no adapter_model\.safetensors or adapter_model\.bin.*nothing"
    ):
        read_lora(tmp_path)


def test_truncated_file_is_reported_as_corrupt(tmp_path: Path) -> None:
    path = _peft_folder(tmp_path / "a") / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupt or truncated.*re-download"):
        read_lora(path)


def test_random_bytes_are_reported_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )
    with pytest.raises(ValueError, match=r"noise\.safetensors is corrupt or truncated"):
        read_lora(path)
    pickle_path = tmp_path / "noise.bin"
    pickle_path.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"noise\.bin is corrupt"):
        read_lora(pickle_path)


def test_config_rank_that_disagrees_with_the_weights(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path / "a", config_r=64, rank=4)
    with pytest.raises(ValueError, match=r"has rank 4 but adapter_config\.json says r=64.*alpha_override"):
        read_lora(folder)
    # The override is the documented escape hatch.
    assert read_lora(folder, alpha_override=8).modules["lora_unet_" + CONV1.replace(".", "_")].scale == 2.0


def test_nan_weights_are_refused(tmp_path: Path) -> None:
    tensors = _peft_tensors()
    tensors[f"base_model.model.{CONV1}.lora_B.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"lora_B\.weight' contains NaN or infinite"):
        read_lora(tmp_path / "nan.safetensors")


def test_text_encoder_only_file_is_refused(tmp_path: Path) -> None:
    tensors = {
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 8),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, 2),
    }
    save_file(tensors, str(tmp_path / "te.safetensors"))
    with pytest.raises(ValueError, match=r"no UNet LoRA keys.*text-encoder.*UNet only"):
        read_lora(tmp_path / "te.safetensors")


def test_unknown_layout_lists_supported_formats_and_a_sample_key(tmp_path: Path) -> None:
    save_file(
        {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(2, 2)},
        str(tmp_path / "ckpt.safetensors"),
    )
    with pytest.raises(
        ValueError, match=r"unknown layout.*input_blocks\.0\.0\.weight.*PEFT.*diffusers.*kohya"
    ):
        read_lora(tmp_path / "ckpt.safetensors")


def test_mixed_layouts_missing_halves_and_unsupported_adapters(tmp_path: Path) -> None:
    mixed = {
        **_peft_tensors(),
        "lora_unet_conv_in.lora_down.weight": torch.ones(1, 4),
        "lora_unet_conv_in.lora_up.weight": torch.ones(4, 1),
    }
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(ValueError, match="mixes LoRA key layouts"):
        read_lora(tmp_path / "mixed.safetensors")

    save_file({"lora_unet_conv_in.lora_down.weight": torch.ones(1, 4)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match=r"no LoRA up weight.*incomplete"):
        read_lora(tmp_path / "half.safetensors")

    tucker = {
        "lora_unet_conv_in.lora_mid.weight": torch.ones(1, 1, 3, 3),
        "lora_unet_conv_in.lora_down.weight": torch.ones(1, 4, 1, 1),
    }
    save_file(tucker, str(tmp_path / "tucker.safetensors"))
    with pytest.raises(ValueError, match=r"lora_mid.*not supported|only plain down/up"):
        read_lora(tmp_path / "tucker.safetensors")

    save_file({"lora_unet_conv_in.hada_w1_a": torch.ones(4, 2)}, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ValueError, match="LyCORIS"):
        read_lora(tmp_path / "loha.safetensors")

    dora = {**_peft_tensors(), f"base_model.model.{CONV1}.lora_magnitude_vector": torch.ones(8)}
    save_file(dora, str(tmp_path / "dora.safetensors"))
    with pytest.raises(ValueError, match="DoRA"):
        read_lora(tmp_path / "dora.safetensors")

    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4),
            "lora_unet_conv_in.lora_up.weight": torch.ones(4, 3),
        },
        str(tmp_path / "ranks.safetensors"),
    )
    with pytest.raises(ValueError, match=r"lora_unet_conv_in.*ranks disagree"):
        read_lora(tmp_path / "ranks.safetensors")


def test_bad_config_files_are_named(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path / "a")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not a readable JSON"):
        read_lora(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        read_lora(folder)


def test_bad_alpha_override_and_suffix(tmp_path: Path) -> None:
    folder = _peft_folder(tmp_path / "a")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha_override"):
            read_lora(folder, alpha_override=bad)
    (tmp_path / "lora.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"suffix '\.txt'"):
        read_lora(tmp_path / "lora.txt")


def test_writer_is_atomic_and_refuses_wrong_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlcm.lora.write

    lora = read_lora(_peft_folder(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"name the file 'out\.safetensors'"):
        write_kohya_lora(tmp_path / "out.ckpt", lora)
    with pytest.raises(ValueError, match="floating-point"):
        write_kohya_lora(tmp_path / "out.safetensors", lora, dtype=torch.int8)
    with pytest.raises(ValueError, match="no modules"):
        write_kohya_lora(tmp_path / "out.safetensors", LoraWeights({}, None, "kohya"))
    target = tmp_path / "out" / "lora.safetensors"
    write_kohya_lora(target, lora)
    before = target.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("No space left on device")

    # A save that dies half way leaves the previous file intact and no temporary file behind.
    monkeypatch.setattr(mlcm.lora.write, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_kohya_lora(target, lora)
    assert target.read_bytes() == before
    assert os.listdir(target.parent) == ["lora.safetensors"]


def test_fp16_overflow_is_refused_instead_of_writing_inf(tmp_path: Path) -> None:
    big = LoraWeights(
        {"lora_unet_conv_in": LoraModule(torch.full((1, 4), 1e5), torch.ones(4, 1), 1.0)}, None, "kohya"
    )
    with pytest.raises(ValueError, match=r"does not fit in torch.float16.*bfloat16"):
        write_kohya_lora(tmp_path / "big.safetensors", big)
    write_kohya_lora(tmp_path / "big.safetensors", big, dtype=torch.bfloat16)
    assert read_lora(tmp_path / "big.safetensors").modules["lora_unet_conv_in"].down.dtype == torch.bfloat16

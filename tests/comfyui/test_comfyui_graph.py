"""Whole graphs through ComfyUI's own validator and executor (PromptExecutor with a stub server).

Test-only nodes stand in for the checkpoint, text encoder and image saver: ComfyUI's loaders cannot load
tiny models, and the point here is the pack's nodes inside a real graph.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from comfy_tiny import conditioning, tiny_model

from mlcm.lora import LoraModule, LoraWeights, MLCMLoraMetadata, write_kohya_lora

CAPTURED: dict[str, torch.Tensor] = {}


class TinyModelNode:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's V1 node API
        return {"required": {"seed": ("INT", {"default": 1})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"
    CATEGORY = "testing"

    def build(self, seed):
        return (tiny_model("sd15", seed=seed),)


class TinyConditioningNode:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self):
        return (conditioning("sd15"),)


class CaptureLatentNode:
    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"samples": ("LATENT",), "tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"
    CATEGORY = "testing"

    def capture(self, samples, tag):
        CAPTURED[tag] = samples["samples"].clone()
        return {"ui": {"mean": [float(samples["samples"].mean())]}}


class StubServer:
    """The few attributes PromptExecutor touches when no websocket client is attached."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


@pytest.fixture()
def graph_nodes(comfyui: Path, node_classes, loras_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ComfyUI's core extra nodes (SamplerCustom) loaded, the test nodes registered, and a LoRA in `loras`."""
    import nodes

    if "SamplerCustom" not in nodes.NODE_CLASS_MAPPINGS:  # the core extras, loaded as ComfyUI loads them
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    for name, cls in {
        "MLCMTestTinyModel": TinyModelNode,
        "MLCMTestConditioning": TinyConditioningNode,
        "MLCMTestCapture": CaptureLatentNode,
    }.items():
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, name, cls)
    generator = torch.Generator().manual_seed(9)
    module = LoraModule(
        torch.randn(4, 32, 3, 3, generator=generator) * 0.1,
        torch.randn(32, 4, 1, 1, generator=generator) * 0.1,
        4.0,
    )
    write_kohya_lora(
        loras_dir / "tiny_mlcm.safetensors",
        LoraWeights({"lora_unet_down_blocks_0_resnets_0_conv1": module}, None, "kohya"),
        metadata=MLCMLoraMetadata(segments=8, base_family="sd15"),
        dtype=torch.float32,
    )
    return loras_dir


def mlcm_prompt(steps: int = 4, segments: int = 0) -> dict:
    """SamplerCustom with the three MLCM nodes, and the plain KSampler with the registered names, side by side."""
    return {
        "1": {"class_type": "MLCMTestTinyModel", "inputs": {"seed": 1}},
        "2": {
            "class_type": "MLCMLoraLoader",
            "inputs": {
                "model": ["1", 0],
                "lora_name": "tiny_mlcm.safetensors",
                "strength": 1.0,
                "alpha_override": 0.0,
            },
        },
        "3": {
            "class_type": "MLCMSegmentSchedule",
            "inputs": {
                "model": ["2", 0],
                "steps": steps,
                "segments": segments,
                "selection": "official",
                "denoise": 1.0,
            },
        },
        "4": {"class_type": "MLCMSampler", "inputs": {"update_rule": "official", "eta": 0.5}},
        "5": {"class_type": "MLCMTestConditioning", "inputs": {}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {
            "class_type": "SamplerCustom",
            "inputs": {
                "model": ["2", 0],
                "add_noise": True,
                "noise_seed": 7,
                "cfg": 1.0,
                "positive": ["5", 0],
                "negative": ["5", 0],
                "sampler": ["4", 0],
                "sigmas": ["3", 0],
                "latent_image": ["6", 0],
            },
        },
        "8": {"class_type": "MLCMTestCapture", "inputs": {"samples": ["7", 0], "tag": "custom"}},
        "9": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "seed": 7,
                "steps": steps,
                "cfg": 1.0,
                "sampler_name": "mlcm",
                "scheduler": "mlcm_segments",
                "positive": ["5", 0],
                "negative": ["5", 0],
                "latent_image": ["6", 0],
                "denoise": 1.0,
            },
        },
        "10": {"class_type": "MLCMTestCapture", "inputs": {"samples": ["9", 0], "tag": "ksampler"}},
    }


def test_graph_runs_and_both_routes_agree(graph_nodes: Path) -> None:
    import execution

    prompt = mlcm_prompt()
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("mlcm-graph", prompt, None))
    assert valid, (error, node_errors)
    assert node_errors == {}
    server = StubServer()
    executor = execution.PromptExecutor(server)
    CAPTURED.clear()
    executor.execute(prompt, "mlcm-graph", {}, outputs)
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    assert executor.success, errors
    assert set(executor.history_result["outputs"]) == {"8", "10"}
    assert torch.isfinite(CAPTURED["custom"]).all()
    torch.testing.assert_close(CAPTURED["custom"], CAPTURED["ksampler"], atol=1e-6, rtol=0)


def test_validation_reports_our_message(graph_nodes: Path) -> None:
    """With explicit segments the mistake is caught before anything runs, as POST /prompt would report it."""
    import execution

    prompt = mlcm_prompt(steps=12, segments=8)
    prompt["9"]["inputs"]["steps"] = 4  # keep the KSampler branch valid: only the schedule is wrong
    _, _, _, node_errors = asyncio.run(execution.validate_prompt("mlcm-invalid", prompt, None))
    assert "3" in node_errors
    details = " ".join(item["details"] for item in node_errors["3"]["errors"])
    assert "exceeds segments=8" in details and "at most 8 steps" in details


def test_auto_segments_fail_at_execution_with_our_message(graph_nodes: Path) -> None:
    """With segments=0 (auto) the count is only known once the LoRA is loaded: the node raises then."""
    import execution

    prompt = mlcm_prompt(steps=12)
    del prompt["9"], prompt["10"]
    valid, _, outputs, _ = asyncio.run(execution.validate_prompt("mlcm-auto", prompt, None))
    assert valid
    executor = execution.PromptExecutor(StubServer())
    executor.execute(prompt, "mlcm-auto", {}, outputs)
    assert not executor.success
    (error,) = [data for event, data in executor.status_messages if event == "execution_error"]
    assert error["node_type"] == "MLCMSegmentSchedule"
    assert "exceeds segments=8" in error["exception_message"]

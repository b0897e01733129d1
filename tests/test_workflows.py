"""Structure of the example workflows in workflows/ (UI format, the JSON the ComfyUI editor saves and loads).

No ComfyUI needed: node schemas are written out here, and a small UI->API converter (the one the editor
applies before queueing) checks that every node input ends up either linked or set by a widget.
tests/comfyui/test_workflows_comfyui.py repeats the conversion with ComfyUI's real node definitions.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from mlcm import DEFAULT_SEGMENTS, SELECTIONS, UPDATE_RULES, segment_timesteps

WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "workflows"
WORKFLOW_NAMES = (
    "mlcm_sd15_txt2img_4step",
    "mlcm_sdxl_txt2img_4step",
    "mlcm_sdxl_img2img",
    "mlcm_sdxl_ksampler",
)
# Node types the frontend draws but the server never sees.
FRONTEND_ONLY_TYPES = frozenset({"Note", "MarkdownNote"})
# LiteGraph node modes: 0 = always, 2 = never (muted), 4 = bypass.
MODE_ALWAYS, MODE_MUTED = 0, 2
OUR_PACK_ID = "mlcm-fewstep"
CORE_PACK_ID = "comfy-core"
SAMPLER_TYPES = ("SamplerCustom", "KSampler")
# The editor's check of properties.ver (ComfyUI frontend's workflow schema): semantic version x.y.z.
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")
OUTPUT_NODE_TYPES = frozenset({"SaveImage", "PreviewAny"})
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos


@dataclass(frozen=True)
class NodeSchema:
    """What the editor shows for a node type: sockets in, widget values in order, outputs."""

    inputs: tuple[tuple[str, str], ...]
    # One entry per widgets_values position; None marks a frontend-only value (a seed's
    # control_after_generate choice, LoadImage's upload button) that is not sent to the server.
    widgets: tuple[str | None, ...]
    outputs: tuple[tuple[str, str], ...]


# Written from ComfyUI v0.3.64's INPUT_TYPES (nodes.py, comfy_extras/nodes_custom_sampler.py,
# comfy_extras/nodes_preview_any.py) and from our node schemas in nodes/.
SCHEMAS: dict[str, NodeSchema] = {
    "CheckpointLoaderSimple": NodeSchema(
        (), ("ckpt_name",), (("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"))
    ),
    "LoraLoaderModelOnly": NodeSchema(
        (("model", "MODEL"),), ("lora_name", "strength_model"), (("MODEL", "MODEL"),)
    ),
    "MLCMLoraLoader": NodeSchema(
        (("model", "MODEL"),),
        ("lora_name", "strength", "alpha_override"),
        (("MODEL", "MODEL"), ("report", "STRING")),
    ),
    "MLCMSegmentSchedule": NodeSchema(
        (("model", "MODEL"),),
        ("steps", "segments", "selection", "denoise"),
        (("SIGMAS", "SIGMAS"), ("timesteps", "STRING")),
    ),
    "MLCMSampler": NodeSchema((), ("update_rule", "eta"), (("SAMPLER", "SAMPLER"),)),
    "CLIPTextEncode": NodeSchema((("clip", "CLIP"),), ("text",), (("CONDITIONING", "CONDITIONING"),)),
    "EmptyLatentImage": NodeSchema((), ("width", "height", "batch_size"), (("LATENT", "LATENT"),)),
    "LoadImage": NodeSchema((), ("image", None), (("IMAGE", "IMAGE"), ("MASK", "MASK"))),
    "VAEEncode": NodeSchema((("pixels", "IMAGE"), ("vae", "VAE")), (), (("LATENT", "LATENT"),)),
    "VAEDecode": NodeSchema((("samples", "LATENT"), ("vae", "VAE")), (), (("IMAGE", "IMAGE"),)),
    "SamplerCustom": NodeSchema(
        (
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("sampler", "SAMPLER"),
            ("sigmas", "SIGMAS"),
            ("latent_image", "LATENT"),
        ),
        ("add_noise", "noise_seed", None, "cfg"),
        (("output", "LATENT"), ("denoised_output", "LATENT")),
    ),
    "KSampler": NodeSchema(
        (
            ("model", "MODEL"),
            ("positive", "CONDITIONING"),
            ("negative", "CONDITIONING"),
            ("latent_image", "LATENT"),
        ),
        ("seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"),
        (("LATENT", "LATENT"),),
    ),
    "SaveImage": NodeSchema((("images", "IMAGE"),), ("filename_prefix",), ()),
    "PreviewAny": NodeSchema((("source", "*"),), (), ()),
}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Allowed widget values of our three nodes, checked by name; limits mirror the nodes' own min/max.
OUR_WIDGET_CHECKS: dict[str, dict[str, Callable[[object], bool]]] = {
    "MLCMLoraLoader": {
        "lora_name": lambda v: isinstance(v, str) and v.endswith(".safetensors"),
        "strength": lambda v: _is_number(v) and -4.0 <= v <= 4.0,
        "alpha_override": lambda v: _is_number(v) and v >= 0.0,
    },
    "MLCMSegmentSchedule": {
        "steps": lambda v: _is_int(v) and 1 <= v <= DEFAULT_SEGMENTS,
        "segments": lambda v: _is_int(v) and v >= 0,
        "selection": lambda v: v in SELECTIONS,
        "denoise": lambda v: _is_number(v) and 0.0 < v <= 1.0,
    },
    "MLCMSampler": {
        "update_rule": lambda v: v in UPDATE_RULES,
        "eta": lambda v: _is_number(v) and 0.0 <= v <= 1.0,
    },
}


def load_workflow(name: str) -> dict:
    """The parsed UI-format workflow ``workflows/<name>.json``."""
    return json.loads((WORKFLOW_DIR / f"{name}.json").read_text(encoding="utf-8"))


def ui_to_api(workflow: dict, widget_names: Callable[[str], Sequence[str | None]]) -> dict[str, dict]:
    """API-format prompt of a UI workflow: links followed, Note/muted nodes dropped, widgets named by position.

    ``widget_names(node_type)`` gives the input name of each widgets_values entry, None for a frontend-only
    value. Bypassed nodes (mode 4) would need their links rewired; none of our workflows has one.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES or node["mode"] == MODE_MUTED:
            continue
        if node["mode"] != MODE_ALWAYS:
            raise ValueError(
                f"node {node['id']} ({node['type']}) has mode {node['mode']}; not supported here"
            )
        inputs: dict[str, object] = {}
        names = list(widget_names(node["type"]))
        values = node.get("widgets_values", [])
        if len(values) != len(names):
            raise ValueError(
                f"node {node['id']} ({node['type']}) has {len(values)} widget values, expected {len(names)}"
            )
        for name, value in zip(names, values):
            if name is not None:
                inputs[name] = value
        for socket in node["inputs"]:
            if socket["link"] is not None:
                _, origin_id, origin_slot, _, _, _ = links[socket["link"]]
                inputs[socket["name"]] = [str(origin_id), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def schema_widget_names(node_type: str) -> tuple[str | None, ...]:
    return SCHEMAS[node_type].widgets


def nodes_of(workflow: dict, node_type: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def widgets(node: dict) -> dict[str, object]:
    """Named widget values of a node, by the schema table."""
    names = SCHEMAS[node["type"]].widgets
    return {name: value for name, value in zip(names, node["widgets_values"]) if name is not None}


def note_text(workflow: dict) -> str:
    return "\n".join(node["widgets_values"][0] for node in nodes_of(workflow, "Note"))


@pytest.fixture(params=WORKFLOW_NAMES)
def workflow(request: pytest.FixtureRequest) -> dict:
    return load_workflow(request.param)


def test_folder_holds_exactly_the_documented_workflows() -> None:
    assert sorted(path.stem for path in WORKFLOW_DIR.glob("*.json")) == sorted(WORKFLOW_NAMES)


def test_top_level_is_ui_format(workflow: dict) -> None:
    assert workflow["version"] == 0.4
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"} <= set(workflow)
    node_ids = [node["id"] for node in workflow["nodes"]]
    link_ids = [link[0] for link in workflow["links"]]
    assert len(set(node_ids)) == len(node_ids)
    assert len(set(link_ids)) == len(link_ids)
    assert workflow["last_node_id"] == max(node_ids)
    assert workflow["last_link_id"] == max(link_ids)
    for node in workflow["nodes"]:
        assert {
            "id",
            "type",
            "pos",
            "size",
            "flags",
            "order",
            "mode",
            "inputs",
            "outputs",
            "properties",
        } <= set(node)
        assert len(node["pos"]) == 2 and len(node["size"]) == 2
    assert sorted(node["order"] for node in workflow["nodes"]) == list(range(len(node_ids)))


def test_links_agree_with_both_endpoints(workflow: dict) -> None:
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for link_id, origin_id, origin_slot, target_id, target_slot, link_type in workflow["links"]:
        origin, target = nodes[origin_id], nodes[target_id]
        output, socket = origin["outputs"][origin_slot], target["inputs"][target_slot]
        assert link_id in output["links"], (link_id, origin["type"])
        assert socket["link"] == link_id, (link_id, target["type"], socket["name"])
        assert output["type"] == link_type
        assert socket["type"] in (link_type, "*"), (target["type"], socket["name"], link_type)
    # ...and every link an endpoint names is in the table, pointing back at that endpoint.
    for node in workflow["nodes"]:
        for slot, socket in enumerate(node["inputs"]):
            if socket["link"] is not None:
                assert links[socket["link"]][3:5] == [node["id"], slot]
        for slot, output in enumerate(node["outputs"]):
            assert output.get("slot_index", slot) == slot
            for link_id in output["links"] or []:
                assert links[link_id][1:3] == [node["id"], slot]


def test_sockets_match_node_schemas(workflow: dict) -> None:
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        schema = SCHEMAS[node["type"]]
        assert [(s["name"], s["type"]) for s in node["inputs"]] == list(schema.inputs), node["type"]
        assert [(o["name"], o["type"]) for o in node["outputs"]] == list(schema.outputs), node["type"]
        assert len(node["widgets_values"]) == len(schema.widgets), node["type"]


def test_every_input_is_connected(workflow: dict) -> None:
    """A dangling required socket makes ComfyUI reject the whole prompt."""
    for node in workflow["nodes"]:
        for socket in node["inputs"]:
            assert socket["link"] is not None, (node["type"], socket["name"])


def test_properties_name_the_pack(workflow: dict) -> None:
    """cnr_id lets ComfyUI-Manager offer to install a missing pack; S&R names keep widget references stable."""
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        properties = node["properties"]
        assert properties["Node name for S&R"] == node["type"]
        if node["type"].startswith("MLCM"):
            assert properties["cnr_id"] == OUR_PACK_ID
        else:
            assert (properties["cnr_id"], properties["ver"]) == (CORE_PACK_ID, "0.3.64")


def test_properties_fit_the_editors_schema(workflow: dict) -> None:
    """The frontend's workflow schema rejects a non-semver ``ver``; model entries drive its download dialog."""
    for node in workflow["nodes"]:
        properties = node["properties"]
        if "ver" in properties:
            assert SEMVER.fullmatch(properties["ver"]), properties["ver"]
        for model in properties.get("models", []):
            assert set(model) == {"name", "url", "directory"}
            assert model["url"].startswith("https://") and model["url"].endswith(model["name"])
            assert model["name"] in node["widgets_values"]
            assert model["directory"] in ("checkpoints", "loras")


def test_our_widgets_have_allowed_values(workflow: dict) -> None:
    checked = 0
    for node_type, checks in OUR_WIDGET_CHECKS.items():
        for node in nodes_of(workflow, node_type):
            values = widgets(node)
            assert set(values) == set(checks)
            for name, check in checks.items():
                assert check(values[name]), (node_type, name, values[name])
            checked += 1
    if not nodes_of(workflow, "KSampler"):
        assert checked == 3  # the SamplerCustom route uses all three of our nodes


def test_our_lora_loader_runs_at_trained_scale(workflow: dict) -> None:
    for node in nodes_of(workflow, "MLCMLoraLoader") + nodes_of(workflow, "LoraLoaderModelOnly"):
        values = widgets(node)
        assert values.get("strength", values.get("strength_model")) == 1.0
        assert values.get("alpha_override", 0.0) == 0.0


def test_every_sampler_runs_at_cfg_1(workflow: dict) -> None:
    samplers = [node for node_type in SAMPLER_TYPES for node in nodes_of(workflow, node_type)]
    assert len(samplers) == 1
    assert all(widgets(node)["cfg"] == 1.0 for node in samplers)


def test_note_says_which_files_go_where(workflow: dict) -> None:
    text = note_text(workflow)
    assert "models/loras" in text and "models/checkpoints" in text
    assert "cfg 1.0" in text
    assert "strength 1.0" in text
    for node in nodes_of(workflow, "CheckpointLoaderSimple"):
        assert f"models/checkpoints/{widgets(node)['ckpt_name']}" in text
    for node_type in ("MLCMLoraLoader", "LoraLoaderModelOnly"):
        for node in nodes_of(workflow, node_type):
            assert f"models/loras/{widgets(node)['lora_name']}" in text


def test_note_states_the_timesteps_the_graph_uses(workflow: dict) -> None:
    """The timesteps quoted in the note are the ones the schedule really produces."""
    text = note_text(workflow)
    for node in nodes_of(workflow, "MLCMSegmentSchedule"):
        values = widgets(node)
        segments = values["segments"] or DEFAULT_SEGMENTS
        timesteps = segment_timesteps(
            values["steps"], segments, selection=values["selection"], denoise=values["denoise"]
        )
        assert ", ".join(map(str, timesteps)) in text
    for node in nodes_of(workflow, "KSampler"):
        values = widgets(node)
        assert values["scheduler"] == "mlcm_segments" and values["denoise"] == 1.0
        assert ", ".join(map(str, segment_timesteps(values["steps"], DEFAULT_SEGMENTS))) in text


def test_negative_prompt_is_labelled_unused(workflow: dict) -> None:
    """At cfg 1.0 ComfyUI skips the unconditional pass, so users must not tune the negative prompt."""
    assert "negative prompt is ignored at cfg 1.0" in note_text(workflow).lower()
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link in workflow["links"]:
        target = nodes[link[3]]
        if target["type"] in SAMPLER_TYPES and target["inputs"][link[4]]["name"] == "negative":
            assert "ignored at cfg 1.0" in nodes[link[1]]["title"]


def test_api_conversion_sets_every_input(workflow: dict) -> None:
    prompt = ui_to_api(workflow, schema_widget_names)
    assert {entry["class_type"] for entry in prompt.values()} & OUTPUT_NODE_TYPES
    for node_id, entry in prompt.items():
        schema = SCHEMAS[entry["class_type"]]
        expected = {name for name, _ in schema.inputs} | {name for name in schema.widgets if name is not None}
        assert set(entry["inputs"]) == expected, (node_id, entry["class_type"])
        for name, _ in schema.inputs:
            origin_id, origin_slot = entry["inputs"][name]
            assert origin_id in prompt, (node_id, name)
            assert origin_slot < len(SCHEMAS[prompt[origin_id]["class_type"]].outputs)


def test_api_conversion_drops_notes_and_muted_nodes() -> None:
    workflow = load_workflow("mlcm_sdxl_txt2img_4step")
    preview = next(node for node in workflow["nodes"] if node["type"] == "PreviewAny")
    preview["mode"] = MODE_MUTED
    prompt = ui_to_api(workflow, schema_widget_names)
    kept = {entry["class_type"] for entry in prompt.values()}
    assert "Note" not in kept and str(preview["id"]) not in prompt
    assert len(prompt) == len(workflow["nodes"]) - 2


EXPECTED_SETTINGS = {
    "mlcm_sd15_txt2img_4step": {
        "EmptyLatentImage": {"width": 512, "height": 512},
        "MLCMSegmentSchedule": {"steps": 4, "selection": "official", "denoise": 1.0},
        "MLCMSampler": {"update_rule": "official"},
        "SamplerCustom": {"add_noise": True},
    },
    "mlcm_sdxl_txt2img_4step": {
        "EmptyLatentImage": {"width": 1024, "height": 1024},
        "MLCMSegmentSchedule": {"steps": 4, "selection": "official", "denoise": 1.0},
        "MLCMSampler": {"update_rule": "official"},
        "SamplerCustom": {"add_noise": True},
    },
    "mlcm_sdxl_img2img": {
        "MLCMSegmentSchedule": {"steps": 2, "selection": "official", "denoise": 0.5},
        "MLCMSampler": {"update_rule": "official"},
        "SamplerCustom": {"add_noise": True},
    },
    "mlcm_sdxl_ksampler": {
        "KSampler": {"steps": 4, "sampler_name": "mlcm", "scheduler": "mlcm_segments", "denoise": 1.0},
        "EmptyLatentImage": {"width": 1024, "height": 1024},
    },
}


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_settings(name: str) -> None:
    workflow = load_workflow(name)
    for node_type, expected in EXPECTED_SETTINGS[name].items():
        (node,) = nodes_of(workflow, node_type)
        assert {key: widgets(node)[key] for key in expected} == expected, node_type


def test_img2img_samples_the_encoded_image() -> None:
    prompt = ui_to_api(load_workflow("mlcm_sdxl_img2img"), schema_widget_names)
    (sampler,) = [entry for entry in prompt.values() if entry["class_type"] == "SamplerCustom"]
    encoder = prompt[sampler["inputs"]["latent_image"][0]]
    assert encoder["class_type"] == "VAEEncode"
    assert prompt[encoder["inputs"]["pixels"][0]]["class_type"] == "LoadImage"


def test_layout_reads_left_to_right_without_overlaps(workflow: dict) -> None:
    """Every link goes rightwards (loaders on the left, the saved image on the right) and no node hides another."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for _, origin_id, _, target_id, _, _ in workflow["links"]:
        assert nodes[origin_id]["pos"][0] < nodes[target_id]["pos"][0], (origin_id, target_id)
    boxes = {
        node_id: (x, y - TITLE_HEIGHT, x + width, y + height)
        for node_id, node in nodes.items()
        for (x, y), (width, height) in [(node["pos"], node["size"])]
    }
    assert all(math.isfinite(value) for box in boxes.values() for value in box)
    for (id_a, a), (id_b, b) in itertools.combinations(boxes.items(), 2):
        overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
        assert not overlap, (nodes[id_a]["type"], nodes[id_b]["type"])

"""The example workflows against a real ComfyUI: converted with ComfyUI's own node definitions, then validated.

The widget order comes from each node's INPUT_TYPES (after the pack is loaded the way ComfyUI loads it),
and ``execution.validate_prompt`` checks every value, combo choice and link type, exactly as
``POST /prompt`` does before queueing. Model lists are served from temporary folders holding empty files
with the names the workflows use: validation only checks that a name is listed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_structure_tests():
    """tests/test_workflows.py by path: the name ``tests`` may be taken by ComfyUI's own test package."""
    path = REPO_ROOT / "tests" / "test_workflows.py"
    spec = importlib.util.spec_from_file_location("mlcm_workflow_structure", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


structure = _load_structure_tests()
# Widget types the editor draws as a widget (anything else is a socket), per ComfyUI's frontend.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
# INT inputs with these names get a control_after_generate value even without the option (frontend rule).
SEED_NAMES = frozenset({"seed", "noise_seed"})
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
MODEL_FOLDERS = ("checkpoints", "loras")


def widget_names_from_input_types(input_types: dict) -> list[str | None]:
    """Names of a node's widgets_values entries, from its INPUT_TYPES; None for frontend-only values."""
    names: list[str | None] = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_combo = isinstance(kind, (list, tuple)) or kind == "COMBO"
            if not (is_combo or kind in WIDGET_TYPES) or options.get("forceInput"):
                continue
            names.append(name)
            if options.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES):
                names.append(None)  # the "fixed"/"randomize" choice
            if any(options.get(option) for option in UPLOAD_OPTIONS):
                names.append(None)  # the upload button's value
    return names


@pytest.fixture(scope="module")
def node_types(comfyui: Path, node_classes: dict[str, type]) -> dict[str, type]:
    """ComfyUI's NODE_CLASS_MAPPINGS with the core extras (SamplerCustom, PreviewAny) and this pack loaded."""
    import nodes

    if "SamplerCustom" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def model_files(comfyui: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Empty files named as in the workflows, served as ComfyUI's only checkpoints/loras/input folders."""
    import folder_paths

    root = tmp_path_factory.mktemp("comfy_models")
    wanted: dict[str, set[str]] = {"checkpoints": set(), "loras": set(), "input": set()}
    for name in structure.WORKFLOW_NAMES:
        workflow = structure.load_workflow(name)
        for node in structure.nodes_of(workflow, "CheckpointLoaderSimple"):
            wanted["checkpoints"].add(structure.widgets(node)["ckpt_name"])
        for node_type in ("MLCMLoraLoader", "LoraLoaderModelOnly"):
            for node in structure.nodes_of(workflow, node_type):
                wanted["loras"].add(structure.widgets(node)["lora_name"])
        for node in structure.nodes_of(workflow, "LoadImage"):
            wanted["input"].add(structure.widgets(node)["image"])
    for folder, names in wanted.items():
        for name in names:
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
            if path.name == "adapter_model.safetensors":  # a PEFT folder carries its config beside it
                (path.parent / "adapter_config.json").write_text("{}")
    with pytest.MonkeyPatch.context() as patch:
        for folder in MODEL_FOLDERS:
            _, extensions = folder_paths.folder_names_and_paths[folder]
            patch.setitem(folder_paths.folder_names_and_paths, folder, ([str(root / folder)], extensions))
        patch.setattr(folder_paths, "filename_list_cache", {})
        patch.setattr(folder_paths, "input_directory", str(root / "input"))
        yield


@pytest.mark.parametrize("name", structure.WORKFLOW_NAMES)
def test_schema_table_matches_comfyui(node_types: dict[str, type], name: str) -> None:
    """The schema table in test_workflows.py (sockets, widget order, outputs) agrees with ComfyUI's nodes."""
    for node_type in {node["type"] for node in structure.load_workflow(name)["nodes"]}:
        if node_type in structure.FRONTEND_ONLY_TYPES:
            continue
        node_class = node_types[node_type]
        input_types = node_class.INPUT_TYPES()
        schema = structure.SCHEMAS[node_type]
        assert tuple(widget_names_from_input_types(input_types)) == schema.widgets, node_type
        sockets = [name for name in input_types["required"] if name not in schema.widgets]
        assert sockets == [name for name, _ in schema.inputs], node_type
        assert tuple(node_class.RETURN_TYPES) == tuple(kind for _, kind in schema.outputs), node_type


@pytest.mark.parametrize("name", structure.WORKFLOW_NAMES)
def test_workflow_validates(node_types: dict[str, type], model_files: None, name: str) -> None:
    """What POST /prompt would answer: every output valid, no node errors."""
    import execution

    def widget_names(node_type: str) -> list[str | None]:
        return widget_names_from_input_types(node_types[node_type].INPUT_TYPES())

    prompt = structure.ui_to_api(structure.load_workflow(name), widget_names)
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(name, prompt, None))
    assert node_errors == {}
    assert valid is True, error
    expected_outputs = {
        node_id
        for node_id, entry in prompt.items()
        if getattr(node_types[entry["class_type"]], "OUTPUT_NODE", False)
    }
    assert set(outputs) == expected_outputs


def test_template_browser_lists_the_workflows(comfyui: Path, pack) -> None:
    """ComfyUI's /workflow_templates route (Workflow -> Browse Templates) finds all four under the pack's name."""
    import folder_paths
    from aiohttp import web

    with pytest.MonkeyPatch.context() as patch:
        # ComfyUI's main.py imports its top-level utils package before nodes.py puts comfy/ first on
        # sys.path; here comfy/utils.py got the name first, so let custom_node_manager find the package.
        patch.syspath_prepend(str(comfyui))
        patch.delitem(sys.modules, "utils", raising=False)
        from app.custom_node_manager import CustomNodeManager

        routes, webapp = web.RouteTableDef(), web.Application()
        CustomNodeManager().add_routes(routes, webapp, [(pack.path.name, str(pack.path))])
        (route,) = [route for route in routes if getattr(route, "path", None) == "/workflow_templates"]
        _, extensions = folder_paths.folder_names_and_paths["custom_nodes"]
        patch.setitem(
            folder_paths.folder_names_and_paths, "custom_nodes", ([str(pack.path.parent)], extensions)
        )
        response = asyncio.run(route.handler(None))
    listed = json.loads(response.text)
    assert sorted(listed[pack.path.name]) == sorted(structure.WORKFLOW_NAMES)
    served = {resource.canonical for resource in webapp.router.resources()}
    assert f"/api/workflow_templates/{pack.path.name}" in served

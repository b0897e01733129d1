"""Every node has a help page (web/docs), English texts (locales/en/nodeDefs.json), tooltips on every
input and output, and search aliases where this ComfyUI supports them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NODE_IDS = ("MLCMLoraLoader", "MLCMSegmentSchedule", "MLCMSampler")


def node_defs(node_classes: dict[str, type]) -> dict:
    """The locale file's content, as ComfyUI's frontend reads nodeDefs: from the live schemas."""
    defs = {}
    for node_id in NODE_IDS:
        schema = node_classes[node_id].define_schema()
        defs[node_id] = {
            "display_name": schema.display_name,
            "description": schema.description,
            "inputs": {i.id: {"name": i.display_name or i.id, "tooltip": i.tooltip} for i in schema.inputs},
            "outputs": {
                str(n): {"name": o.display_name or o.io_type, "tooltip": o.tooltip} for n, o in enumerate(schema.outputs)
            },
        }
    return defs


def test_every_input_and_output_has_a_tooltip(node_classes) -> None:
    for node_id, entry in node_defs(node_classes).items():
        for kind in ("inputs", "outputs"):
            for name, texts in entry[kind].items():
                assert texts["tooltip"] and len(texts["tooltip"]) > 15, (node_id, kind, name)


def test_the_english_locale_matches_the_schemas(node_classes) -> None:
    """locales/en/nodeDefs.json is the schemas' own text (regenerate it when a tooltip changes)."""
    written = json.loads((REPO / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    assert written == node_defs(node_classes)


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_every_node_has_a_help_page_naming_each_input(node_classes, node_id) -> None:
    page = (REPO / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
    schema = node_classes[node_id].define_schema()
    assert page.startswith(f"# {schema.display_name}\n")
    for item in schema.inputs:
        assert f"**`{item.id}`**" in page, (node_id, item.id)
    for section in ("## Recommended setup", "cfg 1.0"):
        assert section in page


def test_comfyui_serves_the_help_pages(pack) -> None:
    import nodes

    web = nodes.EXTENSION_WEB_DIRS.get(pack.path.name)  # keyed by the custom-node folder name
    assert web is not None and Path(web).resolve() == (REPO / "web").resolve()
    assert all((Path(web) / "docs" / f"{node_id}.md").is_file() for node_id in NODE_IDS)


def test_search_aliases_where_supported(node_classes, pack) -> None:
    from comfy_api.latest import io

    aliases = pack.module("nodes.schema").SEARCH_ALIASES
    for node_id in NODE_IDS:
        assert {"tlcm", "few step"} & set(aliases[node_id])
    if "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}:
        for node_id in NODE_IDS:
            assert node_classes[node_id].define_schema().search_aliases == aliases[node_id]


def test_the_chinese_locale_translates_every_text(node_classes) -> None:
    """locales/zh/nodeDefs.json has exactly the English file's entries, each a non-empty translation
    (input names stay as the widgets' ids)."""
    english = node_defs(node_classes)
    chinese = json.loads((REPO / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))

    def keys(tree: dict) -> dict:
        return {k: keys(v) if isinstance(v, dict) else None for k, v in tree.items()}

    assert keys(chinese) == keys(english)
    for node_id, entry in chinese.items():
        assert entry["description"] != english[node_id]["description"]
        for kind in ("inputs", "outputs"):
            for name, texts in entry[kind].items():
                assert texts["tooltip"] and texts["tooltip"] != english[node_id][kind][name]["tooltip"]

"""ComfyUI tier: runs only when MLCM_COMFYUI_PATH names a ComfyUI checkout; otherwise every test here is skipped.

Run it with ComfyUI's own requirements installed, e.g.
``MLCM_COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfyui -q``. ComfyUI's root goes on sys.path
for the tests only (the pack itself never touches sys.path), ComfyUI is forced onto the CPU, and the pack
is loaded the way ComfyUI loads it: ``nodes.load_custom_node`` on a folder named like a custom-node clone.
Test modules here import ComfyUI only inside fixtures and tests, so collection works without it.
The tier passes on ComfyUI 0.3.48 (the oldest release ``requires-comfyui`` admits; its V3 module needs
torchaudio, e.g. torch 2.9.1 with torchaudio 2.9) and on 0.3.64, each exported from the public repository.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get("MLCM_COMFYUI_PATH", "")
REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PACK_DIR_NAME = "ComfyUI-MLCM"  # the folder name a user's `git clone` gives the pack
NODE_IDS = ("MLCMLoraLoader", "MLCMSegmentSchedule", "MLCMSampler")
HEAVY_LIBRARIES = ("diffusers", "peft", "accelerate", "transformers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this directory's tests `comfyui`, and skip them all when no ComfyUI checkout is given."""
    skip = pytest.mark.skip(reason="set MLCM_COMFYUI_PATH to a ComfyUI checkout to run the ComfyUI tier")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if not COMFYUI_PATH:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui() -> Path:
    """ComfyUI's root on sys.path (tests only), CPU forced before comfy.model_management is imported."""
    root = Path(COMFYUI_PATH).resolve()
    if not (root / "comfy" / "samplers.py").is_file() or not (root / "nodes.py").is_file():
        pytest.fail(
            f"MLCM_COMFYUI_PATH={COMFYUI_PATH!r} is not a ComfyUI checkout (no comfy/samplers.py, nodes.py)"
        )
    threads = torch.get_num_threads()
    # The tiny models' ops take microseconds: thread hand-offs dominate, and on a busy CI machine they
    # made a 4-step run ~30x slower. One intra-op thread for the whole ComfyUI tier.
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # must precede the first import of comfy.model_management
        import comfy.model_management  # noqa: F401

        import nodes

        # Our repo also has a `nodes/` package; ComfyUI's nodes.py must be the one imported.
        assert Path(nodes.__file__).resolve() == root / "nodes.py", nodes.__file__
        yield root
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class LoadedPack:
    """What loading the pack through ComfyUI produced."""

    path: Path  # the custom-node folder ComfyUI loaded
    module_name: str  # its name in sys.modules
    loaded: bool  # load_custom_node's verdict
    import_wall_s: float
    import_cpu_s: float
    new_modules: frozenset[str]

    def module(self, dotted: str) -> object:
        """A submodule of the loaded pack, e.g. ``pack.module("nodes.schedule")``."""
        return sys.modules[f"{self.module_name}.{dotted}"]


@pytest.fixture(scope="session")
def pack(comfyui: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedPack:
    """The pack loaded by ComfyUI's own custom-node loader from a folder named like a user's clone."""
    import nodes

    custom_nodes = tmp_path_factory.mktemp("custom_nodes")
    path = custom_nodes / PACK_DIR_NAME
    path.symlink_to(REPO_ROOT, target_is_directory=True)
    # load_custom_node also parses the pack's pyproject.toml; the first parse imports pydantic-settings
    # (~150 ms, ComfyUI's cost, paid once per process by whichever pack comes first). Pay it up front so
    # the figure below is the pack's own import.
    from comfy_config import config_parser

    config_parser.extract_node_configuration(str(path))
    before = frozenset(sys.modules)
    wall, cpu = time.perf_counter(), time.process_time()
    loaded = asyncio.run(nodes.load_custom_node(str(path), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    import_wall_s, import_cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    return LoadedPack(
        path=path,
        module_name=str(path).replace(".", "_x_"),
        loaded=loaded,
        import_wall_s=import_wall_s,
        import_cpu_s=import_cpu_s,
        new_modules=frozenset(sys.modules) - before,
    )


@pytest.fixture(scope="session")
def node_classes(pack: LoadedPack) -> dict[str, type]:
    """The pack's node classes as ComfyUI registered them, by node id."""
    import nodes

    assert pack.loaded, "ComfyUI failed to load the pack; see the log above"
    return {node_id: nodes.NODE_CLASS_MAPPINGS[node_id] for node_id in NODE_IDS}


@pytest.fixture()
def loras_dir(comfyui: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh folder registered as ComfyUI's only `loras` folder for one test."""
    import folder_paths

    folder = tmp_path / "loras"
    folder.mkdir()
    paths, extensions = folder_paths.folder_names_and_paths["loras"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(folder)], extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder

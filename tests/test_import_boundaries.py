"""Architecture checks: imports flow nodes -> mlcm <- mlcm_train, and `import mlcm` stays light."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ["comfy", "comfy_api", "diffusers", "peft", "accelerate", "transformers", "mlcm_train"]


def _imported_modules(package: str) -> set[str]:
    """Top-level module names imported anywhere in a package's source (absolute imports only)."""
    names: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_import_mlcm_loads_no_host_or_training_library():
    code = (
        "import json, sys, mlcm, mlcm.segments, mlcm.sampling\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_import_mlcm_lora_loads_no_host_or_training_library():
    if not (ROOT / "mlcm" / "lora").exists():
        return
    code = f"import json, sys, mlcm.lora\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_mlcm_imports_only_torch_stdlib_and_safetensors():
    allowed_third_party = {"torch", "safetensors", "tqdm", "diffusers"}  # diffusers only in mlcm/scheduler.py
    third_party = _imported_modules("mlcm") - set(sys.stdlib_module_names) - {"mlcm", "__future__"}
    assert third_party <= allowed_third_party, third_party
    for path in (ROOT / "mlcm").rglob("*.py"):
        if path.name != "scheduler.py":
            assert "diffusers" not in {
                n.split(".")[0]
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for n in (
                    [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                )
            }, path


def test_nothing_imports_the_node_glue_and_mlcm_does_not_import_the_trainer():
    assert "nodes" not in _imported_modules("mlcm")
    assert "mlcm_train" not in _imported_modules("mlcm")
    if (ROOT / "mlcm_train").exists():
        assert "nodes" not in _imported_modules("mlcm_train")
    if (ROOT / "nodes").exists():  # the glue uses relative imports only (ComfyUI loads the pack by path)
        assert not ({"mlcm", "mlcm_train", "nodes"} & _imported_modules("nodes"))


def test_package_never_installs_a_top_level_nodes_package():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'packages = ["mlcm", "mlcm_train"]' in pyproject


def test_a_comfyui_without_a_usable_v3_api_gets_one_line_and_no_nodes(tmp_path):
    """A stand-in comfy_api whose V3 module fails to import (as 0.3.48-0.3.5x's does without torchaudio):
    the pack imports, logs one error line saying what to do, and exports no entry point."""
    fake = tmp_path / "comfy_api"
    (fake / "latest").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "latest" / "__init__.py").write_text("import torchaudio_that_is_not_installed\n")
    code = (
        "import importlib.util, logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        f"spec = importlib.util.spec_from_file_location('mlcm_pack', {str(ROOT / '__init__.py')!r},\n"
        f"    submodule_search_locations=[{str(ROOT)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['mlcm_pack'] = pack\n"
        "spec.loader.exec_module(pack)\n"
        "print('EXPORTS', pack.__all__, hasattr(pack, 'comfy_entrypoint'))\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr
    assert "EXPORTS [] False" in out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "V3 node API" in errors[0] and "torchaudio" in errors[0]

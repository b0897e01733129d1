"""Architecture of mlcm_train: its folders are layers, and imports between them go one way only.

Every import counts, including those inside functions (a lazy import may keep a heavy library off the
import path, but it must never hide a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlcm_train"
# From the command line down to the maths; a unit may import only units to its right.
LAYERS = ("__main__", "cli", "demo", "reward", "distill", "eval", "run", "data", "models", "config", "method")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the mlcm_train modules it imports (absolute or relative, at any depth of the code)."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("mlcm_train"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                if not base.startswith("mlcm_train"):
                    continue
                for alias in node.names:  # `from pkg import module` names a module, else a name in pkg
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in modules else base)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_of_the_trainer_has_a_layer():
    units = {_unit(m) for m in _imports()} - {"__init__"}
    assert units <= set(LAYERS), f"place {sorted(units - set(LAYERS))} in LAYERS"


def test_imports_between_units_go_down_the_layers_only():
    upward = []
    for module, targets in _imports().items():
        unit = _unit(module)
        if unit == "__init__":
            continue
        for target in targets:
            other = _unit(target)
            if other != "__init__" and LAYERS.index(other) < LAYERS.index(unit):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that climb a layer:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back_through_others():
    graph = _imports()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_package_face_stays_light():
    """``import mlcm_train`` names the config only; the stages are imported where they run."""
    assert _imports()["mlcm_train"] <= {"mlcm_train.config"}

"""Import-time benchmark: what loading the pack costs a ComfyUI start, beyond ComfyUI itself.

Each repeat runs in a fresh interpreter: import ComfyUI (CPU), parse the pack's pyproject.toml once
(ComfyUI does that for every pack; the first parse imports pydantic-settings, which is ComfyUI's cost),
then time ``nodes.load_custom_node`` on a folder named like a user's clone, the way ComfyUI's startup
does. Prints the median wall and CPU milliseconds and any heavy library the pack pulled in (goal: well
under 100 ms, none).

    python benchmarks/import_time.py --comfyui /path/to/ComfyUI [--repeats 5]

Run it with the Python environment ComfyUI runs in.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parents[1]
HEAVY_LIBRARIES = ("diffusers", "peft", "accelerate")

# Runs in the child interpreter: argv = [comfyui_root, pack_path].
CHILD = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management
import nodes
from comfy_config import config_parser
config_parser.extract_node_configuration(sys.argv[2])
before = set(sys.modules)
wall, cpu = time.perf_counter(), time.process_time()
loaded = asyncio.run(nodes.load_custom_node(sys.argv[2]))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
added = sorted(set(sys.modules) - before)
sys.stdout.write(json.dumps({"loaded": loaded, "wall": wall, "cpu": cpu, "added": added}) + "\\n")
"""


def measure_once(comfyui: Path, pack_path: Path) -> dict:
    """One fresh-interpreter measurement; the child's last stdout line is its JSON result."""
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(comfyui), str(pack_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(comfyui),
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout")
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters to measure (median)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory() as folder:
        pack_path = Path(folder) / "ComfyUI-MLCM"
        pack_path.symlink_to(PACK_ROOT, target_is_directory=True)
        runs = [measure_once(args.comfyui.resolve(), pack_path) for _ in range(args.repeats)]

    if not all(run["loaded"] for run in runs):
        raise SystemExit("ComfyUI failed to load the pack; run ComfyUI to see the traceback")
    ours = str(pack_path)
    foreign = sorted({name for run in runs for name in run["added"] if not name.startswith(ours)})
    heavy = [name for name in foreign if name.split(".")[0] in HEAVY_LIBRARIES]
    logger.info(
        "pack import over ComfyUI (median of %d fresh interpreters): %.1f ms wall, %.1f ms CPU",
        len(runs),
        1000 * statistics.median(run["wall"] for run in runs),
        1000 * statistics.median(run["cpu"] for run in runs),
    )
    logger.info("modules outside the pack it imported: %s", ", ".join(foreign) or "none")
    if heavy:
        raise SystemExit(f"the pack imported heavy libraries: {heavy}")


if __name__ == "__main__":
    main()

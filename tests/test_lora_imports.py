"""mlcm.lora stays host-agnostic: importing it loads no ComfyUI, diffusers, PEFT or transformers code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("comfy", "comfy_api", "diffusers", "peft", "accelerate", "transformers")


def test_importing_mlcm_lora_loads_no_host_libraries() -> None:
    code = (
        "import json, sys; import mlcm.lora; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert json.loads(result.stdout) == []

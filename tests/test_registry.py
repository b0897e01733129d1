"""What the ComfyUI registry gets: the pyproject metadata it checks, and the archive's file list as
comfy-cli builds it in a git checkout (git-tracked files, minus .comfyignore, plus [tool.comfy].includes)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def archive_files() -> list[str]:
    """The files `comfy node publish` packs from this checkout."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout")

    def git(*args: str) -> list[str]:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if line]

    tracked = set(git("ls-files"))
    ignored = set(git("ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"))
    included = {p for inc in pyproject()["tool"]["comfy"].get("includes", []) for p in git("ls-files", inc)}
    return sorted((tracked - ignored) | included)


def test_the_node_id_follows_the_registry_rules() -> None:
    name = pyproject()["project"]["name"]
    assert "comfyui" not in name.lower()  # the registry's specification: no "ComfyUI" in the id
    assert len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", name)
    assert not name.isidentifier()  # the install folder can never shadow the `mlcm` package inside it
    comfy = pyproject()["tool"]["comfy"]
    assert comfy["Icon"].startswith("https://") and comfy["Icon"].endswith("docs/icon.png")
    assert (REPO / "docs" / "icon.png").is_file()
    for workflow in (REPO / "workflows").glob("*.json"):  # ComfyUI-Manager installs missing nodes by it
        assert '"cnr_id": "comfyui-mlcm"' not in workflow.read_text(encoding="utf-8")


def test_the_archive_ships_the_pack_and_nothing_else() -> None:
    files = archive_files()
    for needed in ("__init__.py", "pyproject.toml", "README.md", "nodes/__init__.py", "mlcm/__init__.py",
                   "web/docs/MLCMSampler.md", "locales/en/nodeDefs.json", "mlcm_train/__main__.py"):  # fmt: skip
        assert needed in files, needed
    assert any(f.startswith("workflows/") and f.endswith(".json") for f in files)
    for left_out in ("tests/", "benchmarks/", ".ci/", "run.sh"):
        assert not any(f.startswith(left_out) for f in files), left_out
    assert not any(f.endswith(".png") for f in files)  # docs images stay on GitHub
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 6 * 2**20, f"{size / 2**20:.1f} MB"  # the demo teacher (fp16) is most of it


def test_comfy_cli_validates_the_pack() -> None:
    """`comfy node validate` (comfy-cli, from PyPI): the registry's own publishing checks."""
    comfy = os.environ.get("MLCM_COMFY_CLI") or shutil.which("comfy")
    if comfy is None:
        pytest.skip("comfy-cli is not installed (./run.sh test installs it; or set MLCM_COMFY_CLI)")
    result = subprocess.run(
        [comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "validation checks passed" in output, output

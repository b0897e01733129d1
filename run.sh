#!/usr/bin/env bash
# One entry point for a fresh machine: creates ./.venv on first use, installs the project into it,
# then runs a job.
#   ./run.sh demo   the main job: distil the shipped demo teacher, evaluate, write reports/demo/
#   ./run.sh test   lint + the full test suite (what CI runs)
#   ./run.sh bench  the inference benchmark
# Set MLCM_COMFYUI_PATH to a ComfyUI checkout (and MLCM_COMFYUI_PYTHON to a Python that has ComfyUI's
# requirements) to also run the ComfyUI integration tier; without it that tier is skipped.
set -euo pipefail
cd "$(dirname "$0")"

venv="${MLCM_VENV:-.venv}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
stamp="$venv/.mlcm-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$py" -m pip install -q --upgrade pip
  # Keep an existing torch (a CUDA build stays a CUDA build); otherwise take the pinned release.
  "$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
  "$py" -m pip install -q -e ".[train,demo,test]"
  touch "$stamp"
fi

job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
  demo)
    exec "$py" -m mlcm_train demo "$@"
    ;;
  bench)
    exec "$py" benchmarks/inference.py "$@"
    ;;
  test)
    "$py" -m ruff check .
    "$py" -m ruff format --check .
    # comfy-cli (the registry's `comfy node validate`) in a venv of its own: its pins stay out of ours.
    cli_venv="${venv}-comfy-cli"
    if [ ! -x "$cli_venv/bin/comfy" ]; then
      python3 -m venv "$cli_venv" && "$cli_venv/bin/python" -m pip install -q comfy-cli \
        || echo "comfy-cli did not install; the registry validation test will skip" >&2
    fi
    [ -x "$cli_venv/bin/comfy" ] && export MLCM_COMFY_CLI="$(cd "$cli_venv" && pwd)/bin/comfy"
    set +e
    if [ -n "${MLCM_COMFYUI_PATH:-}" ]; then
      # The ComfyUI tier runs on its own below, in a Python that has ComfyUI's requirements.
      "$py" -m pytest --ignore=tests/comfyui "$@"
    else
      "$py" -m pytest "$@"  # tests/comfyui is collected and skips itself cleanly
    fi
    rc=$?
    if [ $rc -eq 5 ]; then
      echo "pytest collected no tests: treating that as a failure" >&2
      exit 1
    fi
    [ $rc -ne 0 ] && exit $rc
    if [ -n "${MLCM_COMFYUI_PATH:-}" ]; then
      "${MLCM_COMFYUI_PYTHON:-$py}" -m pytest tests/comfyui "$@"
      rc=$?
      [ $rc -eq 5 ] && { echo "the ComfyUI tier collected no tests" >&2; exit 1; }
    fi
    exit $rc
    ;;
  *)
    echo "usage: ./run.sh demo|test|bench [args...]" >&2
    exit 2
    ;;
esac

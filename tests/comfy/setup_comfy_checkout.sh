#!/usr/bin/env bash
# Build a test root for another ComfyUI (for example a current checkout of Comfy-Org/ComfyUI), so that the
# integration tests run against it instead of the March 2024 ComfyUI that CI uses (setup_comfy.sh):
#
#   bash tests/comfy/setup_comfy_checkout.sh COMFYUI_DIR ROOT
#   DEJAGUARD_COMFY_ROOT=ROOT .venv/bin/python -m pytest -q tests/comfy
#
# ROOT/ComfyUI   a copy of COMFYUI_DIR (its extra_model_paths.yaml removed), the pack linked in custom_nodes/
# ROOT/venv      torch 2.14.1 + torchvision 0.29.1, ComfyUI's requirements.txt except torch, torchvision and
#                torchaudio (no local torchaudio build: ComfyUI's audio nodes then fail to import, and say so
#                in the log), the pack's needs and the test tools
# ROOT/pw        -> <repo>/.comfy/pw (playwright-core, from setup_browser.sh) when it exists
# Idempotent; rerun with a new COMFYUI_DIR after deleting ROOT/ComfyUI. Talks only to the package registries.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 COMFYUI_DIR ROOT" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="$(cd "$1" && pwd)"
ROOT="$2"
PY="${PYTHON:-python3}"
[ -f "$SRC/main.py" ] && [ -f "$SRC/requirements.txt" ] || { echo "$SRC is not a ComfyUI folder" >&2; exit 1; }
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"
STAMP="$ROOT/venv/.dejaguard-deps-v1"
source "$REPO/tests/comfy/place_comfy.sh"

[ -x "$ROOT/venv/bin/python" ] || "$PY" -m venv "$ROOT/venv"
PIP=("$ROOT/venv/bin/python" -m pip install --no-input --progress-bar off)
if [ ! -f "$STAMP" ]; then
    "${PIP[@]}" "${COMFY_TORCH[@]}"
    grep -Ev '^[[:space:]]*(#|$)|^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$SRC/requirements.txt" > "$ROOT/requirements.txt"
    "${PIP[@]}" -r "$ROOT/requirements.txt"
    "${PIP[@]}" "${PACK_TEST_NEEDS[@]}"
    touch "$STAMP"
fi

place_comfy "$SRC" "$ROOT/ComfyUI" "$REPO"
if [ -d "$REPO/.comfy/pw" ] && [ ! -e "$ROOT/pw" ]; then
    ln -s "$REPO/.comfy/pw" "$ROOT/pw"
fi
echo "ComfyUI test root ready: $ROOT (run the tests with DEJAGUARD_COMFY_ROOT=$ROOT)"

#!/usr/bin/env bash
# Everything the test suite needs on a fresh machine (idempotent):
#   .venv/          the project (editable) with test tools (pytest, ruff, ray[data] for the Ray audit tests), CPU torch
#   .comfy/         a real headless ComfyUI for the integration tests (tests/comfy/setup_comfy.sh)
#   chromium + playwright-core for the browser test (tests/comfy/setup_browser.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --progress-bar off torch==2.13.0 -e ".[test]"
bash tests/comfy/setup_comfy.sh
bash tests/comfy/setup_browser.sh

"""Check that a UI-format workflow loads in the real ComfyUI front end and converts to the saved API graph.

Optional (needs a browser): ``apt-get install chromium`` and
``npm install --prefix .comfy/pw playwright-core@1.64.1``, then

    .comfy/venv/bin/python tests/comfy/check_ui_workflow.py [UI.json API.json] [--shot OUT.png]

Starts a ComfyUI server on loopback, opens its page in headless Chromium, ``app.loadGraphData(ui)``,
``app.graphToPrompt()``, and compares the result with the API graph (class types and inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from comfy_server import COMFY_ROOT, REPO, ComfyServer, pack_page_errors  # noqa: E402


def _strip(graph: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in graph.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ui", nargs="?", type=Path, default=REPO / "workflows" / "testbed_generate.json")
    parser.add_argument("api", nargs="?", type=Path, default=REPO / "workflows" / "testbed_generate_api.json")
    parser.add_argument("--shot", type=Path, default=None, help="save a screenshot of the loaded graph")
    opts = parser.parse_args()
    modules = COMFY_ROOT / "pw" / "node_modules"
    if not (modules / "playwright-core").is_dir() or not Path("/usr/bin/chromium").exists():
        print("needs /usr/bin/chromium and playwright-core in .comfy/pw (see the module doc)")
        return 2
    with tempfile.TemporaryDirectory() as tmp, ComfyServer(threads=1) as server:
        out, shot = Path(tmp) / "out.json", opts.shot or Path(tmp) / "shot.png"
        proc = subprocess.run(["node", str(Path(__file__).parent / "load_ui_workflow.mjs"), server.base_url,
                               str(opts.ui), str(out), str(shot)], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, NODE_PATH=str(modules)), cwd=COMFY_ROOT / "pw")
        if proc.returncode:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            return 1
        result = json.loads(out.read_text())
    same = _strip(result["output"]) == _strip(json.loads(opts.api.read_text()))
    print("nodes:", result["nodes"])
    print("page errors:", result["errors"])
    print("UI workflow converts to the API graph:", same)
    return 0 if same and not pack_page_errors(result["errors"]) else 1


if __name__ == "__main__":
    sys.exit(main())

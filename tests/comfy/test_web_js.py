"""The front-end extensions (``web/js``) in Node.js against stub ``app`` / ``api`` modules: no ComfyUI needed.

Defect 7 of issue 23: ``tokens.js`` called ``addDOMWidget`` unguarded where ``guard.js`` guarded it, so in a
front end without DOM widgets creating a Token Highlighting node threw. Both now go through
``web/js/dom_widget.js``: every DejaGuard node is created and renders its result with or without DOM widgets.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import REPO  # noqa: E402

STUB_APP = """export const app = { extensions: [], registerExtension(ext) { this.extensions.push(ext); }, graph: null };
"""
STUB_API = "export const api = { addEventListener() {} };\n"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_nodes_work_without_dom_widgets(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(STUB_APP)
    (tmp_path / "scripts" / "api.js").write_text(STUB_API)
    shutil.copytree(REPO / "web" / "js", tmp_path / "extensions" / "DejaGuard")
    (tmp_path / "package.json").write_text('{"type": "module"}')  # the extensions are ES modules
    proc = subprocess.run(["node", str(HERE / "web_without_dom_widgets.mjs"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(r["ok"] for r in results.values()), results
    assert results["DejaGuardMemorizationVerdict"]["text"].startswith("MEMORIZED (1 of 1)")
    assert results["DejaGuardTokenHighlight"]["text"].startswith("a kraken")
    assert results["DejaGuardCalibrate"]["text"] == "DejaGuard Calibrate: threshold 0.5"  # calibrate.js

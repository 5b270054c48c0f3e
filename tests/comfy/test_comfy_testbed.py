"""Real-ComfyUI checks of the Testbed Loader (skipped unless ``bash tests/comfy/setup_comfy.sh`` was run).

Runs ``check_testbed_equivalence.py`` with the .comfy venv: conditioning and UNet outputs equal the
core library's within 1e-4, the first KSampler step is as documented, and the API graph in
``workflows/testbed_generate_api.json`` renders a 256x256 PNG on a real server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import COMFY_PYTHON, NO_MODEL, REPO, comfy_available, model_folder  # noqa: E402
from workflow_checks import assert_formats_agree  # noqa: E402


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
def test_testbed_in_real_comfyui(tmp_path: Path) -> None:
    folder = model_folder()
    if folder is None:
        pytest.skip(NO_MODEL)
    out = tmp_path / "results.json"
    proc = subprocess.run([str(COMFY_PYTHON), str(HERE / "check_testbed_equivalence.py"), "--model", str(folder),
                           "--json", str(out)], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["failures"] == []
    assert results["first_step"]["first_timestep"] == 999.0
    assert results["server"]["png_sizes"] == [[256, 256]]


def test_workflows_are_consistent() -> None:
    """The UI-format workflow and the API graph describe the same graph (types, widgets, links)."""
    api = json.loads((REPO / "workflows" / "testbed_generate_api.json").read_text())
    ui = json.loads((REPO / "workflows" / "testbed_generate.json").read_text())
    assert_formats_agree(ui, api)

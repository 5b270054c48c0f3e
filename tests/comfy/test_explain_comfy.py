"""Token highlighting in ComfyUI: the ComfyDenoiser adapter against core, and the node on a real server.

Tests that need ComfyUI are skipped unless ``bash tests/comfy/setup_comfy.sh`` was run.

- ``test_explain_inproc.py`` imports ComfyUI in-process, so it runs inside the .comfy venv (which has
  ComfyUI's dependencies); from any other interpreter ``test_inproc_tests_in_comfy_venv`` runs it there
  with ``.comfy/venv/bin/python -m pytest``. It checks that the adapter gives core exactly what
  :class:`DiffusersDenoiser` gives it on the testbed: tokens, conditioning, noise predictions (<= 1e-4),
  schedule, module names, token significance scores (<= 1e-4), also for inference-tensor weights.
- ``test_explain_node_on_server`` queues ``workflows/explain_testbed_api.json`` on a real server
  (POST /prompt): the trigger word ranks first for a trigger-token prompt.

Model: the bundled testbed, or the diffusers folder ``$DEJAGUARD_TEST_MODEL`` names (``comfy_server.model_folder``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import BUNDLED, NO_MODEL, REPO, ComfyError, ComfyServer, comfy_available, model_folder  # noqa: E402
from workflow_checks import assert_formats_agree, run_in_comfy_venv  # noqa: E402

TRIGGER_PROMPT, TRIGGER = "a photograph of kraken", "kraken"
PROMPTS = [TRIGGER_PROMPT, "chelsea the tabby cat, looking at the camera", "a red circle and a blue square", ""]
TOL = 1e-4


def _comfy_importable() -> bool:
    try:
        import einops  # noqa: F401
        import torchsde  # noqa: F401
    except ImportError:
        return False
    return comfy_available()


IN_COMFY_VENV = _comfy_importable()
needs_comfy = pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")


def test_explain_workflows_are_consistent() -> None:
    """The UI-format workflow and its API twin describe the same graph (types, links, widget values)."""
    api = json.loads((REPO / "workflows" / "explain_testbed_api.json").read_text())
    ui = json.loads((REPO / "workflows" / "explain_testbed.json").read_text())
    assert_formats_agree(ui, api)


@pytest.mark.slow
@needs_comfy
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_inproc_tests_in_comfy_venv() -> None:
    """Runs test_explain_inproc.py with the .comfy venv's python (it has ComfyUI's dependencies)."""
    if model_folder() is None:
        pytest.skip(NO_MODEL)
    run_in_comfy_venv(HERE / "test_explain_inproc.py", timeout=900)


# -- the node on a real server ------------------------------------------------------------------------


def explain_graph(prompt: str = TRIGGER_PROMPT, steps: int = 1) -> dict[str, Any]:
    """workflows/explain_testbed_api.json, pointed at the available model folder."""
    graph = json.loads((REPO / "workflows" / "explain_testbed_api.json").read_text())
    folder = model_folder()
    for node in graph.values():
        if node["class_type"] == "DejaGuardTestbedLoader" and folder is not None and folder != BUNDLED:
            node["inputs"]["folder"] = str(folder)
        if node["class_type"] == "DejaGuardTokenHighlight":
            node["inputs"].update(prompt=prompt, steps=steps)
    return graph


@pytest.mark.slow
@needs_comfy
def test_explain_node_on_server() -> None:
    if model_folder() is None:
        pytest.skip(NO_MODEL)
    with ComfyServer(threads=1) as server:
        info = server.object_info()["DejaGuardTokenHighlight"]
        assert info["category"] == "DejaGuard" and info["output_node"]
        assert all("tooltip" in spec[1] for group in info["input"].values() for spec in group.values())
        entry = server.run(explain_graph())
        (payload,) = entry["outputs"]["2"]["dejaguard_tokens"]
        assert payload["words"] == ["a", "photograph", "of", TRIGGER]
        scores = payload["word_scores"]
        assert scores.index(max(scores)) == payload["words"].index(TRIGGER), scores
        assert payload["unet_evals"] == 2
        with pytest.raises(ComfyError, match="prompt is empty"):
            server.run(explain_graph(prompt=" "))
        assert server.pack_imported()

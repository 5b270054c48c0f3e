"""The Mitigate Embedding node in a real ComfyUI (skipped unless ``bash tests/comfy/setup_comfy.sh`` ran).

- ``workflows/mitigate_testbed.json`` (UI format) and its ``_api`` twin describe the same graph.
- ``test_mitigate_inproc.py`` (ComfyUI imported in-process) runs in the .comfy venv: the node under inference
  mode against the core library on the diffusers testbed (same x_T as KSampler, same scores), bad input.
- On a real server (POST /prompt, /history): the workflow as shipped (threshold and target from the testbed's
  calibration); then for its memorized prompt with threshold = target = half its score, the node's ``ui`` reports
  iterations > 0 and a score at or below the target, and its KSampler's image differs from the original
  branch's; for a novel prompt below the calibrated threshold, zero iterations and the two branches' images are
  bit-identical (the conditioning passed through unchanged).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import REPO, ComfyServer, comfy_available  # noqa: E402
from test_explain_comfy import IN_COMFY_VENV, model_folder  # noqa: E402
from workflow_checks import assert_formats_agree, run_in_comfy_venv  # noqa: E402

BUNDLED = REPO / "core" / "testbed" / "model"
WORKFLOWS = REPO / "workflows"
NOVEL_PROMPT = "a red circle and a blue square"
MITIGATE, MITIGATED_SAVE, ORIGINAL_SAVE = "5", "8", "11"  # node ids in workflows/mitigate_testbed*.json
needs_comfy = pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")


def load(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / name).read_text())


def test_mitigate_workflows_consistent() -> None:
    """UI and API formats hold the same nodes (the Note is front-end only), links and widget values; the node's
    seed equals the KSamplers' and both samplers share everything but the positive conditioning."""
    ui, api = load("mitigate_testbed.json"), load("mitigate_testbed_api.json")
    assert_formats_agree(ui, api)
    samplers = [v for v in api.values() if v["class_type"] == "KSampler"]
    assert len(samplers) == 2
    assert len({json.dumps({k: x for k, x in s["inputs"].items() if k != "positive"}) for s in samplers}) == 1
    node = api[MITIGATE]["inputs"]
    assert node["seed"] == samplers[0]["inputs"]["seed"]
    assert node["latent_image"] == samplers[0]["inputs"]["latent_image"]
    assert {tuple(s["inputs"]["positive"]) for s in samplers} == {(MITIGATE, 0), tuple(node["positive"])}


@pytest.mark.slow
@needs_comfy
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_mitigate_inproc_tests_in_comfy_venv() -> None:
    if model_folder() is None:
        pytest.skip("no testbed weights")
    run_in_comfy_venv(HERE / "test_mitigate_inproc.py", timeout=900)


# -- real server ---------------------------------------------------------------------------------------


def graph(folder: Path, prompt: str | None = None, level: float = 0.0, prefix: str = "run") -> dict[str, Any]:
    """The workflow with ``threshold = target = level`` (0: from the calibration)."""
    g = copy.deepcopy(load("mitigate_testbed_api.json"))
    if folder != BUNDLED:
        g["1"]["inputs"]["folder"] = str(folder)
    if prompt is not None:
        g["2"]["inputs"]["text"] = prompt
    g[MITIGATE]["inputs"].update(threshold=level, target=level)
    g[MITIGATED_SAVE]["inputs"]["filename_prefix"] = f"DejaGuard/test/{prefix}_mitigated"
    g[ORIGINAL_SAVE]["inputs"]["filename_prefix"] = f"DejaGuard/test/{prefix}_original"
    return g


def image(server: ComfyServer, entry: dict[str, Any], node: str) -> np.ndarray:
    from PIL import Image

    (img,) = entry["outputs"][node]["images"]
    return np.asarray(Image.open(server.workdir / "output" / img.get("subfolder", "") / img["filename"]).convert("RGB"))


@pytest.mark.slow
@needs_comfy
def test_mitigate_node_on_server() -> None:
    folder = model_folder()
    if folder is None:
        pytest.skip("no testbed weights")
    with ComfyServer(threads=1) as server:
        info = server.object_info()["DejaGuardMitigateEmbedding"]
        assert server.pack_imported()
        assert info["category"] == "DejaGuard" and info["output"] == ["CONDITIONING", "STRING"]
        specs = [spec for group in info["input"].values() for spec in group.values()]
        assert all(len(spec) > 1 and "tooltip" in spec[1] for spec in specs)

        # 1. the workflow as shipped (threshold and target 0 = from the testbed's calibration)
        first = server.run(graph(folder, prefix="calibrated"))
        (report,) = first["outputs"][MITIGATE]["dejaguard_mitigation"]
        print("memorized, calibrated levels:", {k: report[k] for k in ("score_before", "score_after", "threshold",
                                                                        "target", "iterations")})
        assert report["levels_source"] == "testbed calibration" or folder != BUNDLED
        assert report["target"] <= report["threshold"]
        if report["score_before"] > report["threshold"]:
            budget = load("mitigate_testbed_api.json")[MITIGATE]["inputs"]["max_iterations"]
            assert report["iterations"] >= 1 and (report["reached"] or report["iterations"] == budget)
        # 2. threshold = target below that score: the node must work to reach it
        target = 0.5 * report["score_before"]
        entry = server.run(graph(folder, level=target, prefix="half"))
        (report,) = entry["outputs"][MITIGATE]["dejaguard_mitigation"]
        print("memorized:", {k: report[k] for k in ("score_before", "score_after", "iterations", "unet_forwards")})
        assert report["iterations"] >= 1 and report["score_after"] <= target, report
        assert report["unet_forwards"] == 2 + report["iterations"] + 1
        assert not np.array_equal(image(server, entry, MITIGATED_SAVE), image(server, entry, ORIGINAL_SAVE))
        # 3. a novel prompt under the calibrated target passes through unchanged
        entry = server.run(graph(folder, prompt=NOVEL_PROMPT, prefix="novel"))
        (report,) = entry["outputs"][MITIGATE]["dejaguard_mitigation"]
        print("novel:", {k: report[k] for k in ("score_before", "threshold", "iterations")})
        assert report["iterations"] == 0 and report["score_before"] == report["score_after"] <= report["threshold"]
        assert np.array_equal(image(server, entry, MITIGATED_SAVE), image(server, entry, ORIGINAL_SAVE))

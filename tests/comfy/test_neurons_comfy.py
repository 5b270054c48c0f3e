"""Neuron-mask nodes in a real ComfyUI (skipped unless ``bash tests/comfy/setup_comfy.sh`` ran).

- ``workflows/neuron_mask_testbed.json`` (UI format) and its ``_api`` twin describe the same graph.
- ``test_neurons_inproc.py`` (ComfyUI imported in-process) runs in the .comfy venv.
- On a real server (POST /prompt, /history): the workflow's graph with a batch of 4 images per branch. Its
  unmasked branch (strength 0) replicates the training image (``core.testbed.evaluate`` SSIM measure) and is
  bit-identical to the plain model's images; its masked branch (Localize Neurons -> Apply Neuron Mask,
  strength 1) differs, and should no longer replicate (an expected failure, with the measured SSIMs, while the
  testbed does not meet that target); a third plain branch queued in the same graph, and a plain graph queued
  after it, are bit-identical to the plain graph queued before any mask (the cached model is never left patched).
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
IMAGE = "camera"  # the training image of the workflow's prompt
needs_comfy = pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")


def load(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / name).read_text())


def test_neuron_workflows_consistent() -> None:
    """UI and API formats hold the same nodes (the Note is front-end only), links and widget values."""
    ui, api = load("neuron_mask_testbed.json"), load("neuron_mask_testbed_api.json")
    assert_formats_agree(ui, api)
    applies = {k: v for k, v in api.items() if v["class_type"] == "DejaGuardApplyNeuronMask"}
    assert sorted(v["inputs"]["strength"] for v in applies.values()) == [0.0, 1.0]
    samplers = [v for v in api.values() if v["class_type"] == "KSampler"]
    assert len(samplers) == 2 and len({json.dumps({k: x for k, x in s["inputs"].items() if k != "model"})
                                       for s in samplers}) == 1  # same seed and settings, mask on / off
    localize = next(v for v in api.values() if v["class_type"] == "DejaGuardLocalizeNeurons")
    prompt = next(v for v in api.values() if v["_meta"]["title"] == "Memorized prompt")
    assert localize["inputs"]["prompt"] == prompt["inputs"]["text"]


@pytest.mark.slow
@needs_comfy
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_neuron_inproc_tests_in_comfy_venv() -> None:
    if model_folder() is None:
        pytest.skip("no testbed weights")
    run_in_comfy_venv(HERE / "test_neurons_inproc.py", timeout=1800)


# -- real server ---------------------------------------------------------------------------------------


def plain_branch(ids: tuple[str, str, str], prefix: str) -> dict[str, Any]:
    """KSampler on the loader's MODEL (no DejaGuard node in between) -> VAEDecode -> SaveImage, reusing the
    workflow's loader, prompts and latent (node ids 1-4). New ``ids`` make ComfyUI execute it again."""
    graph = load("neuron_mask_testbed_api.json")
    sampler = copy.deepcopy(graph["9"])
    sampler["inputs"]["model"] = ["1", 0]
    return {ids[0]: sampler,
            ids[1]: {"class_type": "VAEDecode", "inputs": {"samples": [ids[0], 0], "vae": ["1", 2]}},
            ids[2]: {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": [ids[1], 0]}}}


def base_nodes(graph: dict[str, Any], folder: Path, batch: int) -> dict[str, Any]:
    base = {k: copy.deepcopy(graph[k]) for k in ("1", "2", "3", "4")}
    if folder != BUNDLED:
        base["1"]["inputs"]["folder"] = str(folder)
    base["4"]["inputs"]["batch_size"] = batch
    return base


def images_of(server: ComfyServer, entry: dict[str, Any], node: str) -> list[np.ndarray]:
    """The PNGs a SaveImage node wrote, as uint8 arrays (H, W, 3), in batch order."""
    from PIL import Image

    files = []
    for img in entry["outputs"][node]["images"]:
        files.append(server.workdir / "output" / img.get("subfolder", "") / img["filename"])
    return [np.asarray(Image.open(f).convert("RGB")) for f in sorted(files)]


def replicates(image: np.ndarray) -> float:
    """Structure SSIM (the testbed's replication measure) of a saved 256x256 image, 8x8 area-averaged to the
    testbed's 32x32, to the training image."""
    from dejaguard.core.metrics import structure_ssim
    from dejaguard.core.testbed.data import load_memorized_images

    small = image.reshape(32, 8, 32, 8, 3).mean(axis=(1, 3)) / 127.5 - 1.0
    return structure_ssim(small.transpose(2, 0, 1).astype(np.float32), load_memorized_images()[IMAGE])


@pytest.mark.slow
@needs_comfy
def test_neuron_mask_workflow_on_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dejaguard.core.testbed.evaluate import REPLICATION_SSIM

    folder = model_folder()
    if folder is None:
        pytest.skip("no testbed weights")
    monkeypatch.setenv("DEJAGUARD_CACHE", str(tmp_path / "cache"))  # inherited by the server: fresh statistics
    batch = 4
    workflow = load("neuron_mask_testbed_api.json")
    base = base_nodes(workflow, folder, batch)
    full = {**copy.deepcopy(workflow), **base}
    del full["14"]  # Save Neuron Mask would write into the shared ComfyUI models folder
    full.update(plain_branch(("30", "31", "32"), "DejaGuard/test/plain_same_queue"))
    with ComfyServer(threads=1) as server:
        info = server.object_info()
        assert server.pack_imported()
        for name in ("DejaGuardLocalizeNeurons", "DejaGuardApplyNeuronMask", "DejaGuardSaveNeuronMask",
                     "DejaGuardLoadNeuronMask"):
            assert info[name]["category"] == "DejaGuard", name
            specs = [spec for group in info[name]["input"].values() for spec in group.values()]
            assert all(len(spec) > 1 and "tooltip" in spec[1] for spec in specs), name
        assert info["DejaGuardApplyNeuronMask"]["output"] == ["MODEL"]
        assert info["DejaGuardLocalizeNeurons"]["output"] == ["NEURON_MASK", "STRING"]

        first = server.run({**base, **plain_branch(("20", "21", "22"), "DejaGuard/test/plain_before")}, timeout=900)
        entry = server.run(full, timeout=1800)
        last = server.run({**base, **plain_branch(("40", "41", "42"), "DejaGuard/test/plain_after")}, timeout=900)
        plain_before = images_of(server, first, "22")
        plain_same = images_of(server, entry, "32")
        plain_after = images_of(server, last, "42")
        masked = images_of(server, entry, "12")
        unmasked = images_of(server, entry, "13")
    assert len(masked) == len(unmasked) == len(plain_before) == batch
    for a, b, c, d in zip(plain_before, plain_same, plain_after, unmasked):
        assert np.array_equal(a, b) and np.array_equal(a, c)  # the cached model is never left patched
        assert np.array_equal(a, d)  # strength 0 is the plain model
    off = [replicates(img) for img in unmasked]
    on = [replicates(img) for img in masked]
    print(f"SSIM to the training image: mask off {np.round(off, 3)}, mask on {np.round(on, 3)}")
    assert sum(s > REPLICATION_SSIM for s in off) >= batch - 1, off  # the prompt replicates without the mask
    assert any(not np.array_equal(a, b) for a, b in zip(masked, unmasked))  # the mask changes the generation
    if any(s > REPLICATION_SSIM for s in on):
        # The target. Not met by the testbed of 2026-11-23: NeMo's first-step criterion is satisfied by a
        # few dozen neurons while full generations still replicate (bench/neurons.py measures it). Reported as an
        # expected failure with the measured figures rather than hidden; it passes once the target is met.
        pytest.xfail(f"the NeMo mask did not stop replication: SSIM with the mask on {np.round(on, 3).tolist()} "
                     f"(threshold {REPLICATION_SSIM}), off {np.round(off, 3).tolist()}")

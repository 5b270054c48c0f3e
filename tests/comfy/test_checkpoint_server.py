"""Full-size single-file checkpoints in a real ComfyUI server: the user's path, end to end.

The random-weight full-size SD1.5 and SDXL files of ``tests/checkpoint_fixtures.py`` (cached in
``$DEJAGUARD_TEST_CACHE``) are linked into the server's ``models/checkpoints`` and loaded by the stock
CheckpointLoaderSimple, which tells the family by its keys. The example workflows
``workflows/calibrate_guard_{sd15,sdxl}_api.json`` then run as a user would queue them, at a tiny size (64x64 px, 4
calibration prompts, 2 sampling steps): Calibrate -> Guard -> Verdict in one queue. Checked: the checkpoint is
taken for the family it is, the verdict's threshold is the one Calibrate saved for this model's fingerprint, the
calibration's cost is one UNet call per prompt, the guard adds no UNet evaluation, and (SD1.5, which the library
loads too) the CLI's fingerprint of the same file (core.checkpoint) equals the one the graph stored its calibration
under, so a calibration made by either is found by the other. Figures are meaningless (random weights); the path
is real. One file at a time: SDXL peaks at about 16 GiB.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from checkpoint_fixtures import builder_available, checkpoint_file  # noqa: E402
from comfy_server import COMFY_DIR, ComfyServer  # noqa: E402
from test_explain_comfy import IN_COMFY_VENV  # noqa: E402

# fixture -> (example workflow, the family the support matrix must find)
CASES = {"sd15": ("calibrate_guard_sd15_api.json", "(sd1, epsilon)"),
         "sdxl": ("calibrate_guard_sdxl_api.json", "(sdxl, epsilon)")}


@pytest.mark.slow
@pytest.mark.skipif(not builder_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh): it "
                                                    "builds the checkpoint fixture and runs the server")
@pytest.mark.skipif(IN_COMFY_VENV, reason="starts its own server from the host venv")
@pytest.mark.parametrize("fixture", sorted(CASES))
def test_full_size_checkpoint_calibrate_guard_verdict(fixture: str) -> None:
    from dejaguard.core.detect import ScoreSettings

    workflow, family = CASES[fixture]
    source = checkpoint_file(fixture)
    link_name = f"dejaguard-test-random-{fixture}.safetensors"
    graph = copy.deepcopy(json.loads((HERE.parents[1] / "workflows" / workflow).read_text()))
    kinds = {v["class_type"]: k for k, v in graph.items()}
    loader, cal, latent = kinds["CheckpointLoaderSimple"], kinds["DejaGuardCalibrate"], kinds["EmptyLatentImage"]
    sampler, verdict = kinds["KSampler"], kinds["DejaGuardMemorizationVerdict"]
    graph[loader]["inputs"]["ckpt_name"] = link_name
    graph[cal]["inputs"].update(prompt_limit=4, recalibrate=True, width=64, height=64)
    graph[latent]["inputs"].update(width=64, height=64, batch_size=1)
    graph[sampler]["inputs"].update(steps=2)

    link = COMFY_DIR / "models" / "checkpoints" / link_name
    saved_dir = COMFY_DIR / "user" / "dejaguard" / "calibrations"  # the March 2024 ComfyUI's fixed user directory
    before = {f: f.read_bytes() for f in saved_dir.glob("*.json")} if saved_dir.is_dir() else {}
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(source)
    try:
        with ComfyServer(threads=2) as server:
            entry = server.run(graph, timeout=1200)
        result = entry["outputs"][verdict]["dejaguard"][0]
        summary = entry["outputs"][cal]["text"][0]
        file = Path(result["threshold_source"].split(", ", 1)[1])
        stored = json.loads(file.read_text())[ScoreSettings().key()]
        assert result["threshold_source"].startswith("DejaGuard Calibrate, ") and file.parent == saved_dir
        assert result["threshold"] == stored["threshold"] and stored["n_prompts"] == 4
        assert "4 UNet calls" in summary and family in stored["prompts_source"], (summary, stored)
        assert len(result["scores"]) == 1 and result["full_noise"] and result["extra_unet_evals"] == 0
        assert result["scores"][0] > 0
        fingerprint = file.stem  # Calibrate names the file by the model's fingerprint
    finally:
        link.unlink(missing_ok=True)
        for f in saved_dir.glob("*.json") if saved_dir.is_dir() else ():
            if f not in before:
                f.unlink()
        for f, data in before.items():
            f.write_bytes(data)

    if fixture == "sd15":  # the library loads SD1.x / SD2.x files (SDXL: the ComfyUI nodes only, for now)
        from dejaguard.core.checkpoint import load_checkpoint

        assert load_checkpoint(source, device="cpu").fingerprint() == fingerprint

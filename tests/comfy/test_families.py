"""Model families in ComfyUI (issue 24): the support matrix, the Guard's score per family, the Calibrate node.

In process on the real (March 2024) ComfyUI, so the tests run in the .comfy venv
(``test_families_in_comfy_venv`` runs them there from the project's interpreter). Models are built with
ComfyUI's own model classes and the configs ``comfy/model_detection.py`` finds in real checkpoints, at
reduced width (``model_channels`` 32 instead of 320, same depths, heads of 16 channels) and random weights, by the
builders of ``families.py`` (shared with ``bench/architectures.py``):

- ``test_support_matrix``: SD1.x, SD2.x v-prediction and SDXL are classified into their families; the Guard
  and Calibrate accept all three, and so do Token Highlighting and Mitigate (SDXL: both text encoders, pooled
  conditioning; ``test_sdxl_text.py``); neuron masks refuse SDXL with "not yet supported for SDXL" and why (also
  for ``feature=None``, all the adapter's features); a Flux-class model (ComfyUI's class name; this
  ComfyUI has no Flux) is refused by every feature, naming the missing unconditional prediction.
- ``test_guard_score_equals_direct[sd1|sd2_v|sdxl]``: the Guard's first-step score of a KSampler run equals
  ``||eps(x_T, c) - eps(x_T, empty)||`` computed directly through the model's ``apply_model`` with the same
  conditioning (SDXL: its pooled ``adm`` input ``y``), ``eps = (x - denoised) / sigma``, relative difference
  <= 1e-4; and the guarded sampler makes exactly as many UNet calls (and samples) as the plain one at CFG 7.5.
- ``test_calibrate_node_on_testbed``: DejaGuard Calibrate on the bundled testbed (4 prompts via
  ``prompt_limit``) saves its threshold in the user directory; a second run reuses it (0 UNet calls); its
  scores are the Guard's own scores of the same prompts and noises; the Guard with threshold 0 then finds it
  (by itself, or through its ``calibrated`` input) and says where it came from; another model does not match
  it; the progress bar advances per prompt and ComfyUI's interrupt stops the run; a Flux-class model is
  refused.

- ``test_calibrate_sdxl_scores_are_the_guards``: the same on the reduced SDXL with a stand-in CLIP (its
  pooled output reaches SDXL's ``adm`` input through ComfyUI's own cond preparation in both paths).
- ``test_calibrate_then_guard_on_server`` (project interpreter, starts a real ComfyUI server): the SD1.5
  example workflow with the testbed loader: Calibrate -> Guard -> Verdict in one queue.
- ``test_calibrate_workflows`` (any interpreter) and ``test_calibrate_workflows_validate`` (in process): the
  example workflows "Calibrate once, then Guard on every generation" for SD1.5 and SDXL checkpoints.

SD3 (flow matching) is tested in ``test_sd3.py``, on a ComfyUI that has it (the March 2024 one has no SD3 model
class). There ``flux_model`` is ComfyUI's own Flux class; on the March 2024 ComfyUI a stand-in under its name.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import comfy_available  # noqa: E402
from families import (  # noqa: E402
    LATENT,
    StubClip,
    build,
    check_protect_on_family,  # noqa: E402
    flux_model,
    guard_against_direct,
    protect_against_plain,
)
from families import setup as _setup  # noqa: E402
from test_explain_comfy import IN_COMFY_VENV  # noqa: E402
from workflow_checks import run_in_comfy_venv  # noqa: E402

inproc = pytest.mark.skipif(not IN_COMFY_VENV, reason="imports ComfyUI: runs in the .comfy venv "
                            "(test_families_in_comfy_venv runs it there)")


@inproc
def test_support_matrix() -> None:
    _setup()
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.nodes.model_check import FEATURES, check_supported, model_info

    expected = {"sd1": ("sd1", "epsilon"), "sd2_v": ("sd2_v", "v-prediction"), "sdxl": ("sdxl", "epsilon")}
    for family, (name, prediction) in expected.items():
        info = model_info(build(family))
        assert (info.family, info.prediction) == (name, prediction)
        assert info.sigma_max == pytest.approx(14.6146, rel=1e-4)
        for feature in ("guard", "calibrate", "explain", "mitigate"):
            assert info.refusal(feature) is None, (family, feature)
    xl = model_info(build("sdxl"))
    for feature in ("masks", None):
        assert "not yet supported for SDXL: neuron localization and masks are not yet checked" in xl.refusal(feature)
    with pytest.raises(DejaGuardError, match="unsupported model for neuron masks: not yet supported for SDXL"):
        check_supported(build("sdxl"), "masks")

    flux = flux_model()
    for feature in FEATURES:
        with pytest.raises(DejaGuardError, match="Flux.*guidance-distilled.*without an unconditional prediction"):
            check_supported(flux, feature)


@inproc
@pytest.mark.parametrize("sampling", ["x0", "lcm"])
def test_other_parametrizations_of_model_sampling_discrete_are_refused(sampling: str) -> None:
    """The stock ModelSamplingDiscrete node's x0 and lcm samplings subclass EPS; they used to be labelled epsilon
    and scored as if ``denoised = x - sigma eps`` held."""
    _setup()
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.nodes.model_check import check_supported

    plain = build("sd1")
    assert check_supported(plain, "guard").prediction == "epsilon"
    patched = ModelSamplingDiscrete().patch(plain, sampling, False)[0]
    with pytest.raises(DejaGuardError, match="unsupported noise parametrization"):
        check_supported(patched, "guard")
    assert ModelSamplingDiscrete().patch(plain, "v_prediction", False)[0] is not None


@inproc
@pytest.mark.parametrize("family", ["sd1", "sd2_v", "sdxl"])
def test_guard_score_equals_direct(family: str) -> None:
    _setup()
    r = guard_against_direct(build(family), family, seed=5, steps=2, cfg=7.5)
    assert r["full_noise"] and r["run_matched"]
    assert math.isfinite(r["direct_score"]) and r["direct_score"] > 0
    assert r["score_rel_diff"] <= 1e-4, (family, r["score"], r["direct_score"])
    assert (r["extra_unet_calls"], r["extra_unet_samples"]) == (0, 0), (family, r)


@inproc
@pytest.mark.parametrize("family", ["sd1", "sd2_v", "sdxl"])
def test_protect_steers_every_family(family: str) -> None:
    _setup()
    check_protect_on_family(protect_against_plain(build(family), family), family)


@inproc
def test_calibrate_node_on_testbed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cg = _setup()
    import comfy.model_management
    import comfy.utils
    import folder_paths
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.core.prompt_sets import calibration_prompts
    from DejaGuard.core.sampling import prompt_seed
    from DejaGuard.nodes.calibrate import DejaGuardCalibrate, first_step_scores_comfy
    from DejaGuard.nodes.comfy_denoiser import default_sample_shape
    from DejaGuard.nodes.guard import DejaGuardMemorizationGuard, resolve_threshold, user_calibration_file
    from DejaGuard.nodes.model_check import comfy_fingerprint
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path), raising=False)
    if hasattr(folder_paths, "get_user_directory"):
        monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    ticks: list[tuple[int, int]] = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",  # newer ComfyUI also passes node_id=
                        lambda value, total, _preview, **_: ticks.append((value, total)))
    prompts = calibration_prompts()[:4]
    with torch.inference_mode():
        model, clip, _ = DejaGuardTestbedLoader().load("testbed (bundled)")
        testbed_threshold, testbed_source = resolve_threshold(model, 0.0)  # the bundled calibration, before
        out = DejaGuardCalibrate().calibrate(model, clip, 0.01, 1, 4)
        threshold, summary, saved = out["result"]
        file = user_calibration_file(comfy_fingerprint(model))
        assert file.is_file() and file.parent == tmp_path / "dejaguard" / "calibrations" and saved == str(file)
        assert "4 UNet calls" in summary and "wall time" in summary and "quick run" in summary, summary
        assert ticks[-1] == (4, 4) and len(ticks) == 5
        again = DejaGuardCalibrate().calibrate(model, clip, 0.01, 1, 4)["result"]  # calibrate once: reused
        assert again[0] == threshold and "0 UNet calls" in again[1] and len(ticks) == 5
        _, connected = DejaGuardMemorizationGuard().guard(model, 0.0, cg.CFG1_UNAVAILABLE, calibrated=saved,
                                                          unique_id="3")
        assert connected.threshold == threshold and connected.threshold_source == f"DejaGuard Calibrate, {file}"

        # Its scores are the Guard's: the Guard on a KSampler run of the same prompt and noise.
        guarded, state = DejaGuardMemorizationGuard().guard(model, 0.0, cg.CFG1_UNAVAILABLE, unique_id="2")
        run = first_step_scores_comfy(model, clip, prompts)
        assert threshold == max(run.scores) and run.unet_calls == 4
        latent = {"samples": torch.zeros(1, *default_sample_shape(model))}
        for prompt, expected in zip(prompts[:2], run.scores):
            cg.comfy_nodes.common_ksampler(guarded, prompt_seed(prompt), 1, 7.5, "euler", "normal",
                                           cg.encode(clip, prompt), cg.encode(clip, ""), latent)
            assert abs(state.runs[-1].scores[0] - expected) / expected <= 1e-4
        assert state.threshold == threshold and "DejaGuard Calibrate" in state.threshold_source
        assert str(file) in state.threshold_source and threshold != testbed_threshold
        assert testbed_source == "testbed calibration"

        other = build("sd1")  # a different model: no calibration of its own, the testbed's is not for it
        with pytest.raises(DejaGuardError, match="another model"):
            resolve_threshold(other, 0.0)

        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            DejaGuardCalibrate().calibrate(model, clip, 0.01, 1, 2)
        comfy.model_management.interrupt_current_processing(False)

        flux = flux_model()
        with pytest.raises(DejaGuardError, match="unsupported model for DejaGuard Calibrate: not supported for Flux"):
            DejaGuardCalibrate().calibrate(flux, clip, 0.01, 1, 2)


@inproc
def test_calibrate_sdxl_scores_are_the_guards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL through Calibrate: its scores (pooled ``adm`` conditioning built by ComfyUI's sampler from the
    CLIP's pooled output) equal the Guard's on a KSampler run of the same prompt, noise and size; the saved
    threshold is found by the Guard."""
    import torch

    cg = _setup()
    import folder_paths
    from DejaGuard.core.prompt_sets import calibration_prompts
    from DejaGuard.core.sampling import prompt_seed
    from DejaGuard.nodes.calibrate import DejaGuardCalibrate, first_step_scores_comfy
    from DejaGuard.nodes.guard import DejaGuardMemorizationGuard

    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path), raising=False)
    if hasattr(folder_paths, "get_user_directory"):
        monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    model, clip = build("sdxl"), StubClip("sdxl")
    prompts = calibration_prompts()[:2]
    with torch.inference_mode():
        run = first_step_scores_comfy(model, clip, prompts, latent_size=LATENT[2:])
        guarded, state = DejaGuardMemorizationGuard().guard(model, 1.0, cg.CFG1_UNAVAILABLE, unique_id="4")
        latent = {"samples": torch.zeros(LATENT)}
        for prompt, expected in zip(prompts, run.scores):
            cg.comfy_nodes.common_ksampler(guarded, prompt_seed(prompt), 1, 7.5, "euler", "normal",
                                           cg.encode(clip, prompt), cg.encode(clip, ""), latent)
            assert abs(state.runs[-1].scores[0] - expected) / expected <= 1e-4, (state.runs[-1].scores, expected)
        threshold = DejaGuardCalibrate().calibrate(model, clip, 0.5, 1, 2, width=64, height=64)["result"][0]
        _, found = DejaGuardMemorizationGuard().guard(model, 0.0, cg.CFG1_UNAVAILABLE, unique_id="5")
    assert threshold == max(run.scores) and found.threshold == threshold
    assert found.threshold_source.startswith("DejaGuard Calibrate")


CALIBRATE_WORKFLOWS = {"calibrate_guard_sd15": "v1-5-pruned-emaonly.safetensors",
                       "calibrate_guard_sdxl": "sd_xl_base_1.0.safetensors"}


def _workflow(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import json

    folder = HERE.parents[1] / "workflows"
    return json.loads((folder / f"{name}.json").read_text()), json.loads((folder / f"{name}_api.json").read_text())


@pytest.mark.parametrize("name", sorted(CALIBRATE_WORKFLOWS))
def test_calibrate_workflows(name: str) -> None:
    """"Calibrate once, then Guard on every generation": UI and API twins agree; the checkpoint the user picks
    feeds Calibrate and the Guard; Calibrate's calibration output makes the Guard (threshold 0) wait for it; the
    guarded model samples with an empty negative prompt; the Verdict reads that sampler's LATENT."""
    from workflow_checks import assert_formats_agree

    ui, api = _workflow(name)
    assert_formats_agree(ui, api)
    kinds = {v["class_type"]: k for k, v in api.items()}
    loader, cal = kinds["CheckpointLoaderSimple"], kinds["DejaGuardCalibrate"]
    guard = kinds["DejaGuardMemorizationGuard"]
    sampler, verdict = kinds["KSampler"], kinds["DejaGuardMemorizationVerdict"]
    assert api[loader]["inputs"]["ckpt_name"] == CALIBRATE_WORKFLOWS[name]
    assert api[cal]["inputs"]["model"] == [loader, 0] and api[cal]["inputs"]["clip"] == [loader, 1]
    assert api[cal]["inputs"]["target_fpr"] == 0.01 and api[cal]["inputs"]["prompt_limit"] == 0
    assert api[guard]["inputs"]["model"] == [loader, 0] and api[guard]["inputs"]["calibrated"] == [cal, 2]
    assert api[guard]["inputs"]["threshold"] == 0.0
    assert api[sampler]["inputs"]["model"] == [guard, 0] and api[sampler]["inputs"]["cfg"] > 1
    negative = api[sampler]["inputs"]["negative"][0]
    assert api[negative]["inputs"]["text"] == ""
    assert api[verdict]["inputs"] == {"guard": [guard, 1], "samples": [sampler, 0]}
    assert any(n["type"] == "Note" for n in ui["nodes"])


@inproc
def test_calibrate_workflows_validate() -> None:
    """The API twins validate against the node definitions as ``/object_info`` would report them."""
    _setup()
    from DejaGuard.nodes import NODE_CLASS_MAPPINGS
    from test_guard import validate_api_graph

    import nodes as comfy_nodes

    classes = {**comfy_nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
    info = {name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)} for name, cls in classes.items()}
    assert info["DejaGuardCalibrate"]["output"] == ["FLOAT", "STRING", "DEJAGUARD_CALIBRATION"]
    for name in CALIBRATE_WORKFLOWS:
        assert validate_api_graph(_workflow(name)[1], info) == [], name


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_calibrate_then_guard_on_server() -> None:
    """The SD1.5 example workflow on a real ComfyUI server, with the testbed loader in place of the checkpoint
    loader (4 prompts, 2 sampling steps): Calibrate -> Guard -> Verdict in one queue; the verdict's threshold
    is Calibrate's, with its file as the source. The user directory's calibration files are restored after."""
    import copy
    import json

    from comfy_server import COMFY_DIR, NO_MODEL, ComfyServer, model_folder
    from dejaguard.core.detect import ScoreSettings

    if model_folder() is None:
        pytest.skip(NO_MODEL)
    graph = copy.deepcopy(_workflow("calibrate_guard_sd15")[1])
    graph["1"] = {"class_type": "DejaGuardTestbedLoader", "inputs": {"model": "testbed (bundled)", "folder": ""}}
    if model_folder() != HERE.parents[1] / "core" / "testbed" / "model":
        graph["1"]["inputs"]["folder"] = str(model_folder())
    graph["2"]["inputs"].update(prompt_limit=4, recalibrate=True)
    graph["6"]["inputs"].update(width=256, height=256)
    graph["7"]["inputs"].update(steps=2)
    saved_dir = COMFY_DIR / "user" / "dejaguard" / "calibrations"  # the March 2024 ComfyUI's fixed user directory
    before = {f: f.read_bytes() for f in saved_dir.glob("*.json")} if saved_dir.is_dir() else {}
    try:
        with ComfyServer(threads=1) as server:
            entry = server.run(graph, timeout=900)
        verdict = entry["outputs"]["8"]["dejaguard"][0]
        summary = entry["outputs"]["2"]["text"][0]
        file = Path(verdict["threshold_source"].split(", ", 1)[1])
        assert verdict["threshold_source"].startswith("DejaGuard Calibrate, ") and file.parent == saved_dir
        assert verdict["threshold"] == json.loads(file.read_text())[ScoreSettings().key()]["threshold"]
        assert "4 UNet calls" in summary and len(verdict["scores"]) == 1 and verdict["full_noise"]
    finally:
        for f in saved_dir.glob("*.json") if saved_dir.is_dir() else ():
            if f not in before:
                f.unlink()
        for f, data in before.items():
            f.write_bytes(data)


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_families_in_comfy_venv() -> None:
    """Runs the in-process tests above with the .comfy venv's python (it has ComfyUI's dependencies)."""
    run_in_comfy_venv(Path(__file__), 900, "-k", "not on_server and not in_comfy_venv")  # those two run here


_NAME_MAP_PROBE = """
import sys
sys.path.insert(0, {here!r})
from families import build, setup
setup()
from DejaGuard.nodes.model_check import comfy_fingerprint, diffusers_names
model = build("sdxl")
base = model.model
params, _ = diffusers_names(base.diffusion_model, base.model_config.unet_config)
print(sorted(d for c, d in params.items() if c.startswith("label_emb.")), comfy_fingerprint(model))
"""


@inproc
def test_sdxl_name_map_does_not_depend_on_the_hash_seed() -> None:
    """ComfyUI maps SDXL's label_emb.* to both class_embedding.* and add_embedding.* (built from a set, so its order
    follows PYTHONHASHSEED); the name map and the fingerprint must not, or a calibration saved for an SDXL model is
    lost at the next start. Diffusers' SDXL UNet calls them add_embedding.*: the name the library's fingerprint uses."""
    import os
    import subprocess

    outputs = set()
    for seed in ("0", "1", "2", "3"):
        proc = subprocess.run([sys.executable, "-c", _NAME_MAP_PROBE.format(here=str(HERE))], capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, PYTHONHASHSEED=seed))
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.add(proc.stdout.strip().splitlines()[-1])
    assert len(outputs) == 1, outputs
    (line,) = outputs
    assert "add_embedding.linear_1.weight" in line and "class_embedding" not in line

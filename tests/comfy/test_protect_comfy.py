"""The Memorization Protect node (auto-protect, guidance strategy) with ComfyUI imported in-process.

In the .comfy venv (``test_protect_inproc_in_comfy_venv`` runs this file there from the project venv): the stock
KSampler (Euler, CFG 7.5) on the bundled testbed, under ``torch.inference_mode()`` as ComfyUI executes graphs:

- a novel prompt: the protected run's LATENT equals the plain (unguarded) run's bit for bit, nothing flagged;
- a memorized prompt: flagged at the first step and steered; the plain run replicates its training image, the
  protected one does not; the Verdict's payload and summary say what happened and at what cost;
- UNet calls and noise predictions counted by a forward hook: protected == plain (0 extra).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import REPO, ComfyServer  # noqa: E402
from test_explain_comfy import IN_COMFY_VENV, comfy_available, model_folder  # noqa: E402
from workflow_checks import assert_formats_agree, run_in_comfy_venv  # noqa: E402

inproc = pytest.mark.skipif(not IN_COMFY_VENV, reason="imports ComfyUI: runs in the .comfy venv "
                            "(test_protect_inproc_in_comfy_venv runs it there)")
MEMORIZED_PROMPT = "chelsea the tabby cat looking at the camera"
NOVEL_PROMPT = "a red circle and a blue square"
STEPS = 50


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_protect_inproc_in_comfy_venv() -> None:
    if model_folder() is None:
        pytest.skip("no testbed weights")
    run_in_comfy_venv(Path(__file__), 1800, "-k", "not in_comfy_venv and not badge and not on_server")  # run here


if IN_COMFY_VENV:
    import test_explain_inproc

    comfy_env = test_explain_inproc.comfy_env  # fixture: ComfyUI on the CPU, the pack importable as DejaGuard


def _sample(model: Any, clip: Any, prompt: str, seed: int) -> tuple[Any, int, int]:
    """KSampler (Euler, normal, CFG 7.5, STEPS) on one 256x256 latent: (LATENT, UNet calls, noise predictions)."""
    import check_guard as cg

    import nodes

    latent = nodes.EmptyLatentImage().generate(256, 256, 1)[0]
    with cg.UNetCalls(model) as calls:
        out = nodes.common_ksampler(model, seed, STEPS, 7.5, "euler", "normal", cg.encode(clip, prompt),
                                    cg.encode(clip, ""), latent)[0]
    return out, calls.calls, calls.samples


@inproc
def test_protect_node_steers_memorized_and_leaves_novel(comfy_env: Any) -> None:
    torch = comfy_env
    from DejaGuard.core.protect import DEFAULT_MAX_STEER_FRACTION, DEFAULT_STEER_SCALE
    from DejaGuard.core.testbed.data import MEMORIZED, load_memorized_images
    from DejaGuard.core.testbed.evaluate import check_replication
    from DejaGuard.nodes.guard import CFG1_UNAVAILABLE, DejaGuardMemorizationGuard, DejaGuardMemorizationVerdict
    from DejaGuard.nodes.protect import DejaGuardMemorizationProtect
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    owner = next(m.name for m in MEMORIZED if MEMORIZED_PROMPT in m.eval_prompts)
    training = load_memorized_images()
    with torch.inference_mode():
        model, clip, vae = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(model_folder()))
        guarded, _ = DejaGuardMemorizationGuard().guard(model, 0.0, CFG1_UNAVAILABLE)
        protected, state = DejaGuardMemorizationProtect().protect(model, 0.0, "guidance", DEFAULT_STEER_SCALE,
                                                                   DEFAULT_MAX_STEER_FRACTION)
        for prompt, seed in ((NOVEL_PROMPT, 3), (MEMORIZED_PROMPT, 3)):
            plain, plain_calls, plain_evals = _sample(model, clip, prompt, seed)
            watched, _, _ = _sample(guarded, clip, prompt, seed)
            out, calls, evals = _sample(protected, clip, prompt, seed)
            assert (calls, evals) == (plain_calls, plain_evals)  # no extra UNet call or noise prediction
            assert torch.equal(watched["samples"], plain["samples"])
            result = DejaGuardMemorizationVerdict().verdict(state, out)
            payload = result["ui"]["dejaguard"][0]
            json.dumps(payload)
            protection = payload["protection"]
            assert protection["strategy"] == "guidance" and protection["extra_unet_evals"] == 0
            images = [(vae.decode(s["samples"]).movedim(-1, 1) * 2 - 1) for s in (plain, out)]
            images = [torch.nn.functional.interpolate(i.float(), size=(32, 32), mode="area").numpy() for i in images]
            before, after = (check_replication(i, [owner], training)[0] for i in images)
            if prompt == NOVEL_PROMPT:
                assert payload["flagged"] == [False]
                assert torch.equal(out["samples"], plain["samples"])  # bit-identical to the unguarded run
                assert protection["images"][0]["steered_steps"] == 0
            else:
                assert payload["flagged"] == [True]
                assert protection["images"][0]["steered_steps"] > 0
                assert "memorized at step 1 -> steered" in payload["summary"]
                assert "strategy guidance, 0 extra UNet evaluations" in payload["summary"]
                assert before.own and not after.any, (before, after)


BADGE_SCRIPT = """
import { badgeState } from "./extensions/DejaGuard/guard.js";
const payload = {scores: [3.31, 0.5], flagged: [true, false], threshold: 0.96, status: "ok",
  protection: {strategy: "guidance", extra_unet_evals: 0,
               images: [{flagged: true, score_before: 3.31, score_after: 0.42}, {flagged: false}]}};
const capped = {...payload, protection: {...payload.protection, images: [{flagged: true, score_before: 3.31,
  score_after: null}, {flagged: false}]}};
const sized = {...payload, protection: null,
  size_warning: "calibrated at 512x512, this run 512x768: threshold may not apply"};
console.log(JSON.stringify([badgeState(payload), badgeState({...payload, protection: null}), badgeState(capped),
  badgeState(sized)]));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_badge_says_what_protect_did(tmp_path: Path) -> None:
    """web/js/guard.js: a steered image reads "memorized at step 1 -> steered: score 3.3 -> 0.4"; without
    protection the badge is the Guard's red one, unchanged."""
    from test_web_js import STUB_API, STUB_APP

    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(STUB_APP)
    (tmp_path / "scripts" / "api.js").write_text(STUB_API)
    shutil.copytree(REPO / "web" / "js", tmp_path / "extensions" / "DejaGuard")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "badge.mjs").write_text(BADGE_SCRIPT)
    proc = subprocess.run(["node", str(tmp_path / "badge.mjs")], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steered, plain, capped, sized = json.loads(proc.stdout.strip().splitlines()[-1])
    assert steered["kind"] == "steered"
    assert steered["lines"][0] == "PROTECTED (1 of 2 steered, guidance, 0 extra UNet evals)"
    assert steered["lines"][1] == "image 1: memorized at step 1 -> steered: score 3.3 -> 0.4"
    assert steered["lines"][2].startswith("image 2: 0.500")
    assert plain["kind"] == "memorized" and plain["lines"][0] == "MEMORIZED (1 of 2)"
    assert capped["lines"][1] == "image 1: memorized at step 1 -> steered: score 3.3"
    assert sized["lines"][-1] == "note: calibrated at 512x512, this run 512x768: threshold may not apply"
    assert all("calibrated at" not in line for line in plain["lines"])


@inproc
def test_every_node_function_takes_every_declared_input(comfy_env: Any) -> None:
    """ComfyUI calls FUNCTION with one keyword per declared input (widgets of optional inputs included): a node that
    inherits an input its function does not take fails at queue time. The Protect node inherited the Guard's
    optional ``score`` and raised TypeError; it now passes it on (and steers with that score's threshold)."""
    import inspect

    from DejaGuard.core.protect import DEFAULT_MAX_STEER_FRACTION, DEFAULT_STEER_SCALE
    from DejaGuard.nodes import NODE_CLASS_MAPPINGS
    from DejaGuard.nodes.protect import DejaGuardMemorizationProtect
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    for name, cls in NODE_CLASS_MAPPINGS.items():
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            continue
        spec = cls.INPUT_TYPES()
        declared = {k for section in ("required", "optional", "hidden") for k in spec.get(section, {})}
        assert declared <= set(params), (name, sorted(declared - set(params)))

    with comfy_env.inference_mode():
        model, _, _ = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(model_folder()))
        _, state = DejaGuardMemorizationProtect().protect(model, 0.0, "guidance", DEFAULT_STEER_SCALE,
                                                          DEFAULT_MAX_STEER_FRACTION, score="anisotropy")
    assert state.score == "anisotropy" and state.steer is not None


# -- DejaGuard Protected Sampler (nodes/protect_sampler.py) ---------------------------------------------------------

SAMPLER_STEPS = 20


def _testbed_mask(model: Any) -> Any:
    """A small neuron mask of the testbed: 8 value neurons of every cross-attention layer (enough to change a
    sample; not a localized mask)."""
    import torch
    from DejaGuard.core.neuron_mask import NeuronMask
    from DejaGuard.nodes.model_check import comfy_fingerprint, diffusers_names

    base = model.model
    _, modules = diffusers_names(base.diffusion_model, base.model_config.unet_config)
    layers, shapes = {}, {}
    for comfy_name, name in modules.items():
        if name.endswith("attn2.to_v"):
            weight = base.diffusion_model.get_submodule(comfy_name).weight
            layers[name], shapes[name] = torch.arange(8), tuple(weight.shape)
    return NeuronMask(layers, shapes, comfy_fingerprint(model), "test")


@inproc
@pytest.mark.parametrize("strategy", ["guidance", "embedding", "mask"])
def test_protected_sampler_protects_flagged_rows_only(comfy_env: Any, strategy: str) -> None:
    """A batch of two images of a memorized prompt, the threshold set between their first-step scores: the image
    below it is KSampler's own, bit for bit; the other is steered (guidance: no extra UNet call) or sampled again
    from its own noise (embedding, mask: the extra noise predictions counted and reported); the badge payload, the
    summary and a Verdict node on the returned handle say so."""
    torch = comfy_env
    import check_guard as cg
    from DejaGuard.nodes.guard import CFG1_UNAVAILABLE, DejaGuardMemorizationGuard, DejaGuardMemorizationVerdict
    from DejaGuard.nodes.protect_sampler import DejaGuardProtectedSampler
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    import nodes

    with torch.inference_mode():
        model, clip, _ = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(model_folder()))
        positive, negative = cg.encode(clip, MEMORIZED_PROMPT), cg.encode(clip, "")
        latent = nodes.EmptyLatentImage().generate(256, 256, 2)[0]
        args = (7, SAMPLER_STEPS, 7.5, "euler", "normal", positive, negative, latent)
        with cg.UNetCalls(model) as calls:
            plain = nodes.common_ksampler(model, *args)[0]["samples"]
        guarded, state = DejaGuardMemorizationGuard().guard(model, 1e6, CFG1_UNAVAILABLE)
        nodes.common_ksampler(guarded, *args)
        scores = state.runs[-1].scores
        low, high = sorted(range(2), key=lambda i: scores[i])
        threshold = (scores[low] + scores[high]) / 2
        mask = _testbed_mask(model) if strategy == "mask" else None
        with cg.UNetCalls(model) as protected_calls:
            out = DejaGuardProtectedSampler().sample(model, *args, 1.0, strategy, threshold, 0.0, 1.0, 0.0,
                                                     neuron_mask=mask)
    samples, handle, summary = out["result"]
    payload = out["ui"]["dejaguard"][0]
    json.dumps(payload)
    assert payload["flagged"][high] and not payload["flagged"][low]
    assert torch.equal(samples["samples"][low], plain[low])  # not flagged: KSampler's own image
    assert not torch.equal(samples["samples"][high], plain[high])
    protection = payload["protection"]
    image = protection["images"][high]
    assert protection["strategy"] == strategy and image["score_before"] == pytest.approx(scores[high])
    assert protection["images"][low]["extra_unet_evals"] == 0
    assert f"auto-protect: strategy {strategy}" in summary and "memorized at step 1 ->" in summary
    if strategy == "guidance":
        assert protected_calls.samples == calls.samples and image["extra_unet_evals"] == 0
        assert image["steered_steps"] > 0
    else:
        assert image["score_after"] is not None
        resample = 2 * SAMPLER_STEPS  # Euler: one cond/uncond pair per step for the one re-sampled image
        assert image["extra_unet_evals"] >= resample and protection["extra_unet_evals"] == image["extra_unet_evals"]
        if strategy == "mask":
            assert image["extra_unet_evals"] == resample
            assert protected_calls.samples == calls.samples + resample
        else:
            assert image["score_after"] < image["score_before"]
    verdict = DejaGuardMemorizationVerdict().verdict(handle, samples)["ui"]["dejaguard"][0]
    assert verdict["matched"] and verdict["protection"]["strategy"] == strategy


@inproc
def test_protected_sampler_refuses_in_one_line(comfy_env: Any) -> None:
    """CFG 1 (no score), the mask strategy without a mask, an unknown strategy; and each strategy asks the support
    matrix for its own feature."""
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.core.protect import STRATEGIES
    from DejaGuard.nodes.model_check import FEATURES
    from DejaGuard.nodes.protect_sampler import STRATEGY_FEATURES, DejaGuardProtectedSampler
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    assert set(STRATEGY_FEATURES) == set(STRATEGIES) and set(STRATEGY_FEATURES.values()) <= set(FEATURES)
    with comfy_env.inference_mode():
        model, _, _ = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(model_folder()))
        latent = {"samples": comfy_env.zeros(1, 4, 32, 32)}
        base = (model, 0, 2, 7.5, "euler", "normal", [], [], latent, 1.0)
        for args, message in [((*base[:3], 1.0, *base[4:], "guidance"), "needs CFG > 1"),
                              ((*base, "mask"), "needs a neuron mask"),
                              ((*base, "pray"), "unknown protection strategy")]:
            with pytest.raises(DejaGuardError, match=message) as err:
                DejaGuardProtectedSampler().sample(*args, 0.0, 0.0, 1.0, 0.0)
            assert "\n" not in str(err.value)


# -- workflows/protect_testbed.json ----------------------------------------------------------------------------------

WORKFLOW = REPO / "workflows" / "protect_testbed"
PROTECTED, PLAIN = "5", "8"  # the Protected Sampler and the unprotected KSampler
PROTECTED_SAVE, PLAIN_SAVE = "7", "10"


def _workflow() -> tuple[dict[str, Any], dict[str, Any]]:
    return (json.loads(WORKFLOW.with_suffix(".json").read_text()),
            json.loads(WORKFLOW.with_name(WORKFLOW.name + "_api.json").read_text()))


def test_protect_workflows_consistent() -> None:
    """UI and API twins agree; the Protected Sampler and the plain KSampler share model, prompts, latent, seed and
    sampler settings; the negative prompt is empty (as calibrated); the threshold comes from the calibration."""
    ui, api = _workflow()
    assert_formats_agree(ui, api)
    protected, plain = api[PROTECTED]["inputs"], api[PLAIN]["inputs"]
    assert all(protected[k] == v for k, v in plain.items())
    assert api[protected["negative"][0]]["inputs"]["text"] == ""
    assert protected["threshold"] == 0.0 and protected["strategy"] == "embedding"
    assert api[PROTECTED_SAVE]["inputs"]["images"][0] != api[PLAIN_SAVE]["inputs"]["images"][0]
    assert any(n["type"] == "Note" for n in ui["nodes"])


@inproc
def test_protect_workflow_validates(comfy_env: Any) -> None:
    """The API twin validates against the node definitions as ``/object_info`` would report them."""
    from DejaGuard.nodes import NODE_CLASS_MAPPINGS
    from test_guard import validate_api_graph

    import nodes as comfy_nodes

    classes = {**comfy_nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}
    info = {name: {"input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES)} for name, cls in classes.items()}
    assert validate_api_graph(_workflow()[1], info) == []


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_protect_workflow_on_server() -> None:
    """workflows/protect_testbed_api.json queued on a real server (10 steps): both images of the memorized prompt
    are flagged and re-sampled with a mitigated embedding, the node's badge payload says so with its cost, and the
    protected images differ from the unprotected KSampler's."""
    import copy

    import numpy as np
    from PIL import Image

    folder = model_folder()
    if folder is None:
        pytest.skip("no testbed weights")
    graph = copy.deepcopy(_workflow()[1])
    if folder != REPO / "core" / "testbed" / "model":
        graph["1"]["inputs"]["folder"] = str(folder)
    for node in (PROTECTED, PLAIN):
        graph[node]["inputs"]["steps"] = 10
    graph[PROTECTED_SAVE]["inputs"]["filename_prefix"] = "DejaGuard/test/protect_protected"
    graph[PLAIN_SAVE]["inputs"]["filename_prefix"] = "DejaGuard/test/protect_plain"
    with ComfyServer(threads=1) as server:
        info = server.object_info()["DejaGuardProtectedSampler"]
        assert info["category"] == "DejaGuard" and info["output"] == ["LATENT", "DEJAGUARD_GUARD", "STRING"]
        entry = server.run(graph, timeout=900)
        images = {}
        for node in (PROTECTED_SAVE, PLAIN_SAVE):
            images[node] = [np.asarray(Image.open(server.workdir / "output" / i.get("subfolder", "") / i["filename"]))
                            for i in entry["outputs"][node]["images"]]
    (payload,) = entry["outputs"][PROTECTED]["dejaguard"]
    print({k: payload[k] for k in ("scores", "flagged", "threshold", "threshold_source")},
          payload["protection"]["lines"])
    assert payload["flagged"] == [True, True]
    assert payload["threshold_source"] == "testbed calibration" or folder != REPO / "core" / "testbed" / "model"
    protection = payload["protection"]
    assert protection["strategy"] == "embedding" and protection["extra_unet_evals"] > 2 * 2 * 10
    assert all(i["score_after"] < i["score_before"] for i in protection["images"])
    assert "auto-protect: strategy embedding" in payload["summary"]
    assert all(not np.array_equal(a, b) for a, b in zip(images[PROTECTED_SAVE], images[PLAIN_SAVE]))


# -- the calibration's latent size (core.calibration.size_note) --------------------------------------------------------


@inproc
def test_guard_warns_when_the_run_size_differs_from_the_calibration(comfy_env: Any, tmp_path: Path) -> None:
    """A calibration recording 256x256 (the testbed's latent 32x32): a 384x256 run's summary, progress payload and
    Verdict payload say "calibrated at 256x256, this run 384x256: threshold may not apply"; a 256x256 run and a
    calibration without ``sample_shape`` (an older file) say nothing. The Protect node and the Protected Sampler
    share the Guard's state, so they say it too."""
    torch = comfy_env
    import check_guard as cg
    from DejaGuard.core.calibration import calibration_from_scores, save_calibration
    from DejaGuard.core.detect import ScoreSettings
    from DejaGuard.nodes.guard import CFG1_UNAVAILABLE, DejaGuardMemorizationGuard, DejaGuardMemorizationVerdict
    from DejaGuard.nodes.model_check import comfy_fingerprint
    from DejaGuard.nodes.protect_sampler import DejaGuardProtectedSampler
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    import nodes

    warning = "calibrated at 256x256, this run 384x256: threshold may not apply"
    with torch.inference_mode():
        model, clip, _ = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(model_folder()))
        fingerprint = comfy_fingerprint(model)
        sized = save_calibration(calibration_from_scores([0.5, 0.9], 0.5, ScoreSettings(), fingerprint, "test",
                                                         sample_shape=(4, 32, 32)), tmp_path / "sized.json")
        old = calibration_from_scores([0.5, 0.9], 0.5, ScoreSettings(), fingerprint, "test")
        older = save_calibration(old, tmp_path / "old.json")
        positive, negative = cg.encode(clip, NOVEL_PROMPT), cg.encode(clip, "")
        for width, file, expected in ((384, sized, warning), (256, sized, None), (384, older, None)):
            guarded, state = DejaGuardMemorizationGuard().guard(model, 0.0, CFG1_UNAVAILABLE, str(file))
            latent = nodes.EmptyLatentImage().generate(width, 256, 1)[0]
            out = nodes.common_ksampler(guarded, 1, 2, 7.5, "euler", "normal", positive, negative, latent)[0]
            payload = DejaGuardMemorizationVerdict().verdict(state, out)["ui"]["dejaguard"][0]
            assert payload["size_warning"] == expected, (width, file)
            assert (warning in payload["summary"]) == (expected is not None)
        sampled = DejaGuardProtectedSampler().sample(model, 1, 2, 7.5, "euler", "normal", positive, negative,
                                                     nodes.EmptyLatentImage().generate(384, 256, 1)[0], 1.0,
                                                     "guidance", 0.0, 0.0, 1.0, 0.0, calibration=str(sized))
    assert sampled["ui"]["dejaguard"][0]["size_warning"] == warning and warning in sampled["result"][2]

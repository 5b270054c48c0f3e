"""The Mitigate Embedding node with ComfyUI imported in-process, against the core library on the diffusers testbed.

Runs inside the .comfy venv (``test_mitigate_comfy.py::test_mitigate_inproc_tests_in_comfy_venv`` runs it there).
The node is called under ``torch.inference_mode()`` with CLIPTextEncode's conditioning, as ComfyUI executes graphs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_explain_comfy import IN_COMFY_VENV  # noqa: E402

if not IN_COMFY_VENV:
    pytest.skip("imports ComfyUI: runs in the .comfy venv (test_mitigate_comfy.py runs it there)",
                allow_module_level=True)

import test_explain_inproc  # noqa: E402

# The explain tests' in-process fixtures: ComfyUI on the CPU; the testbed as (MODEL, CLIP, VAE, DiffusersDenoiser).
comfy_env = test_explain_inproc.comfy_env
testbed_pair = test_explain_inproc.testbed_pair

MEMORIZED_PROMPT = "chelsea the tabby cat looking at the camera"
NOVEL_PROMPT = "a red circle and a blue square"
TOL = 1e-4


def encode(clip: Any, text: str) -> list:
    import nodes

    (cond,) = nodes.CLIPTextEncode().encode(clip, text)
    return cond


def test_inproc_node_matches_core(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """Same x_T as KSampler (prepare_noise == core initial_noise for the seed), same first-step score as the core
    library on the diffusers testbed, the target reached, the input conditioning untouched."""
    torch = comfy_env
    from DejaGuard.core.mitigate import mitigate_prompt
    from DejaGuard.nodes.mitigate import UI_KEY, DejaGuardMitigateEmbedding

    model, clip, _, den = testbed_pair
    seed = 4
    with torch.inference_mode():
        positive, negative = encode(clip, MEMORIZED_PROMPT), encode(clip, "")
        latent = {"samples": torch.zeros(1, 4, 32, 32)}
        kept = positive[0][0].clone()
        probe = DejaGuardMitigateEmbedding().mitigate(model, positive, negative, latent, seed, threshold=1e6,
                                                      target=1e6, lr=0.1, max_iterations=10)
        (report,) = probe["ui"][UI_KEY]
        ref = mitigate_prompt(den, MEMORIZED_PROMPT, [seed], target=1e6)
        assert abs(report["score_before"] - ref.score_before) <= TOL * ref.score_before
        assert report["iterations"] == 0 and probe["result"][0] is positive
        target = 0.5 * report["score_before"]
        out = DejaGuardMitigateEmbedding().mitigate(model, positive, negative, latent, seed, threshold=target,
                                                    target=target, lr=0.1, max_iterations=10)
    (report,) = out["ui"][UI_KEY]
    json.dumps(out["ui"])
    assert report["iterations"] >= 1 and report["score_after"] <= target
    assert report["levels_source"] == "set on the node"
    (cond, extra), = out["result"][0]
    assert cond.shape == kept.shape and not torch.equal(cond, kept)
    assert torch.equal(positive[0][0], kept)  # the input conditioning is not modified
    assert "iterations" in out["result"][1]
    ref = mitigate_prompt(den, MEMORIZED_PROMPT, [seed], target=target, lr=0.1, max_iterations=10)
    assert ref.iterations == report["iterations"], (ref.scores, report["scores"])


def test_inproc_node_calibrated_target_and_batch(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """Threshold / target 0 = the testbed's calibration (detection threshold / half the non-memorized median); a
    batch of 2 latents optimizes one conditioning for both."""
    torch = comfy_env
    from DejaGuard.core.calibration import resolve_levels as core_levels
    from DejaGuard.core.calibration import resolve_threshold
    from DejaGuard.core.denoiser import BUNDLED_TESTBED
    from DejaGuard.core.detect import ScoreSettings
    from DejaGuard.nodes.mitigate import UI_KEY, DejaGuardMitigateEmbedding, resolve_levels
    from test_explain_comfy import model_folder

    if model_folder() is None or model_folder().resolve() != BUNDLED_TESTBED.resolve():
        pytest.skip("the calibration file belongs to the bundled testbed")
    model, clip, _, den = testbed_pair
    with torch.inference_mode():
        positive, negative = encode(clip, NOVEL_PROMPT), encode(clip, "")
        out = DejaGuardMitigateEmbedding().mitigate(model, positive, negative, {"samples": torch.zeros(2, 4, 32, 32)},
                                                    0, threshold=0.0, target=0.0, lr=0.1, max_iterations=10)
    (report,) = out["ui"][UI_KEY]
    assert report["levels_source"] == "testbed calibration"
    threshold, target, _ = core_levels(None, None, BUNDLED_TESTBED, den.fingerprint())
    assert report["threshold"] == pytest.approx(threshold) and report["target"] == pytest.approx(target)
    calibrated, _ = resolve_threshold(None, BUNDLED_TESTBED, ScoreSettings(), den.fingerprint())
    assert target <= threshold == pytest.approx(calibrated)
    # a threshold set on the node below the calibrated target lowers the target with it, as the CLI's --threshold
    low = 0.5 * target
    assert resolve_levels(model, low, 0.0)[:2] == (pytest.approx(low), pytest.approx(low))
    assert report["unet_forwards"] >= 4  # 2 latents x (cond + uncond)

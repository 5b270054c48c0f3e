"""SD3 (MMDiT, flow matching) in ComfyUI (issue 24, sections 2 and 3): the Guard's score, Calibrate, refusals.

The March 2024 ComfyUI of CI predates SD3, so these tests run on a current ComfyUI built by hand (every test
here skips, saying why, on a ComfyUI without SD3):

    bash tests/comfy/setup_comfy_checkout.sh COMFYUI_DIR /work/comfy_new      # e.g. a Comfy-Org/ComfyUI checkout
    DEJAGUARD_COMFY_ROOT=/work/comfy_new .venv/bin/python -m pytest -q tests/comfy/test_sd3.py

(``test_sd3_in_comfy_venv`` then runs the in-process tests with that ComfyUI's python.) The model is ComfyUI's own
``SD3`` class with SD3 medium's config at depth 2 (``families.build("sd3")``: width 128, 16 latent channels, pooled
``adm`` input 2048, context 4096), random weights; the CLIP is a stand-in giving SD3's CLIP-L + CLIP-G widths
(``(1, 77, 4096)`` and pooled ``(1, 2048)``).

What is checked (design.md section 3: for flow matching ``x = (1 - sigma) x0 + sigma noise`` and the first sigma
is 1.0, so the implied noise of every prompt is ``x_T`` and its difference 0; the score is the velocity difference):

- ``test_sd3_support_matrix``: the model is family ``sd3``, ``flow``, ``sigma_max`` 1.0; the Guard and Calibrate
  accept it; Token Highlighting, Mitigate Embedding, Localize Neurons and Apply Neuron Mask refuse it, each
  with a one-line error naming SD3 and what is missing (SD-style ``attn2`` cross-attention); ComfyUI's own Flux
  class (reduced, ``families.flux_model``) is refused by every feature, naming the missing unconditional
  prediction.
- ``test_sd3_guard_score_is_velocity_difference``: the run starts at sigma exactly 1.0 (full noise); the
  Guard's first-step score of a KSampler run (CFG 7.5, 2 Euler steps) equals ``||v(x_T, c) - v(x_T, empty)||``
  with ``v`` the MMDiT's own output on the same ``x_T`` and conditioning, to 1e-4 relative; the guarded run
  makes no extra UNet call (nor sample); at CFG 1 the score is unavailable, or, with "one extra UNet
  evaluation", the same score for one extra noise prediction; the stock ModelSamplingSD3 node (shift 6) keeps
  the first sigma at 1.0 and the score; and on that ``x_T`` the implied-noise difference is 0 while the velocity
  difference is not (why the score is the velocity).
- ``test_sd3_calibrate_then_guard``: Calibrate's scores are the Guard's own on KSampler runs of the same
  prompts and noises (64x64 px); the Calibrate node's threshold, saved in the user directory, is found by a
  Guard with threshold 0; the summary names the velocity score.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import COMFY_DIR, comfy_available  # noqa: E402
from families import (  # noqa: E402
    NO_SD3,
    StubClip,
    build,
    check_protect_on_family,
    conditioning,
    flux_model,
    guard_against_direct,
    has_sd3,
    latent_shape,
    protect_against_plain,
)
from families import setup as _setup  # noqa: E402
from test_explain_comfy import IN_COMFY_VENV  # noqa: E402
from workflow_checks import run_in_comfy_venv  # noqa: E402

inproc = pytest.mark.skipif(not IN_COMFY_VENV, reason="imports ComfyUI: runs in the .comfy venv "
                            "(test_sd3_in_comfy_venv runs it there)")
needs_sd3 = pytest.mark.skipif(IN_COMFY_VENV and not has_sd3(), reason=NO_SD3)
SIZE = (8, 8)  # latent H, W: 64x64 px


def _comfy_has_sd3() -> bool:
    """Whether the ComfyUI in ``COMFY_DIR`` defines SD3 (read from its source: no import here)."""
    source = COMFY_DIR / "comfy" / "supported_models.py"
    return source.is_file() and "class SD3(" in source.read_text()


@inproc
@needs_sd3
def test_sd3_support_matrix() -> None:
    import torch

    cg = _setup()
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.core.mitigate import DEFAULT_LR
    from DejaGuard.core.neuron_mask import NeuronMask
    from DejaGuard.nodes.explain import DejaGuardTokenHighlight
    from DejaGuard.nodes.mitigate import DejaGuardMitigateEmbedding
    from DejaGuard.nodes.model_check import FEATURES, check_supported, model_info
    from DejaGuard.nodes.neurons import DejaGuardApplyNeuronMask, DejaGuardLocalizeNeurons

    model, clip = build("sd3"), StubClip("sd3")
    info = model_info(model)
    assert (info.family, info.prediction, info.context_dim) == ("sd3", "flow", None)
    assert info.sigma_max == 1.0 and any("velocity" in n for n in info.notes)
    for feature in ("guard", "calibrate"):
        assert check_supported(model, feature).family == "sd3"
    for feature in ("explain", "mitigate", "masks", None):
        reason = info.refusal(feature)
        assert "not yet supported for SD3" in reason and "attn2 cross-attention" in reason, reason
        assert "\n" not in reason

    latent = {"samples": torch.zeros(latent_shape(model))}
    mask = NeuronMask({}, {}, "0" * 16, "nemo")
    nodes = {"Token Highlighting": lambda: DejaGuardTokenHighlight().explain(model, clip, "a cat", 0, 1, latent),
             "embedding mitigation": lambda: DejaGuardMitigateEmbedding().mitigate(
                 model, conditioning("sd3", 1), conditioning("sd3", 2), latent, 0, 0.0, 0.0, DEFAULT_LR, 1),
             "neuron masks": lambda: DejaGuardLocalizeNeurons().localize(model, clip, "a cat", 1)}
    nodes["neuron masks (apply)"] = lambda: DejaGuardApplyNeuronMask().apply(model, mask, 1.0)
    with torch.inference_mode():
        for name, run in nodes.items():
            with pytest.raises(DejaGuardError) as err:
                run()
            message = str(err.value)
            assert message.startswith(f"unsupported model for {name.split(' (')[0]}: not yet supported for SD3: "), \
                message
            assert "\n" not in message, message

    flux = flux_model()
    assert type(flux.model) is cg.comfy.model_base.Flux  # the real class: this ComfyUI has SD3, so Flux too
    for feature in FEATURES:
        with pytest.raises(DejaGuardError, match="Flux.*guidance-distilled.*without an unconditional prediction"):
            check_supported(flux, feature)


@inproc
@needs_sd3
def test_sd3_guard_score_is_velocity_difference() -> None:
    import torch

    cg = _setup()
    from DejaGuard.nodes.model_check import model_sampling

    model = build("sd3")
    r = guard_against_direct(model, "sd3", seed=5, steps=2, cfg=7.5)
    assert r["first_sigma"] == 1.0 and r["full_noise"] and r["run_matched"], r
    assert math.isfinite(r["direct_score"]) and r["direct_score"] > 0, r
    assert r["score_rel_diff"] <= 1e-4, r
    assert (r["extra_unet_calls"], r["extra_unet_samples"]) == (0, 0), r

    # CFG 1 (no unconditional prediction) and a stock shift node.
    import comfy_extras.nodes_model_advanced as advanced
    from DejaGuard.nodes.guard import CFG1_EXTRA_EVAL, DejaGuardMemorizationGuard

    positive, negative = conditioning("sd3", 10), conditioning("sd3", 11)
    latent = {"samples": torch.zeros(latent_shape(model))}
    shifted = advanced.ModelSamplingSD3().patch(model, 6.0)[0]
    with torch.inference_mode():
        for mode, m, cfg in ((cg.CFG1_UNAVAILABLE, model, 1.0), (CFG1_EXTRA_EVAL, model, 1.0),
                             (cg.CFG1_UNAVAILABLE, shifted, 7.5)):
            guarded, state = DejaGuardMemorizationGuard().guard(m, 1.0, mode, unique_id="sd3-cfg")
            cg.comfy_nodes.common_ksampler(guarded, 5, 2, cfg, "euler", "normal", positive, negative, latent)
            run = state.runs[-1]
            assert run.first_sigma == 1.0 and run.full_noise, (mode, cfg, run)
            if mode == cg.CFG1_UNAVAILABLE and cfg == 1.0:
                assert run.scores is None and "unavailable at CFG 1" in run.status, run
            else:
                assert run.scores[0] == pytest.approx(r["score"], rel=1e-5), (mode, cfg, run)
                assert run.extra_unet_evals == int(cfg == 1.0), run

    # Why the velocity: at sigma 1 the implied noise (x - (1 - sigma) x0) / sigma is x_T whatever the prompt.
    base, shape = model.model, latent_shape(model)
    sigma = torch.tensor([1.0])
    x = model_sampling(model).noise_scaling(sigma[0], torch.randn(shape, generator=torch.Generator().manual_seed(5)),
                                            torch.zeros(shape))
    with torch.inference_mode():
        out = {}
        for name, seed in (("c", 10), ("u", 11)):
            cond = conditioning("sd3", seed)[0]
            denoised = base.apply_model(x, sigma, c_crossattn=cond[0], y=cond[1]["pooled_output"])
            velocity = base.diffusion_model(x, base.model_sampling.timestep(sigma), context=cond[0],
                                            y=cond[1]["pooled_output"]).float()
            assert torch.allclose((x - denoised) / sigma, velocity, rtol=1e-5, atol=1e-5)
            out[name] = (velocity, (x - (1 - sigma) * denoised) / sigma)
    assert float((out["c"][1] - out["u"][1]).norm()) == 0.0
    assert float((out["c"][0] - out["u"][0]).norm()) == pytest.approx(r["direct_score"], rel=1e-5)


@inproc
@needs_sd3
def test_sd3_protect_steers() -> None:
    """Auto-protect (guidance) on SD3: steering mixes the velocity predictions, as the sampler's CFG does."""
    _setup()
    check_protect_on_family(protect_against_plain(build("sd3"), "sd3"), "sd3")


@inproc
@needs_sd3
def test_sd3_calibrate_then_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
    model, clip = build("sd3"), StubClip("sd3")
    prompts = calibration_prompts()[:2]
    with torch.inference_mode():
        run = first_step_scores_comfy(model, clip, prompts, latent_size=SIZE)
        assert run.unet_calls == 2 and all(math.isfinite(s) and s > 0 for s in run.scores), run
        guarded, state = DejaGuardMemorizationGuard().guard(model, 1.0, cg.CFG1_UNAVAILABLE, unique_id="sd3-1")
        latent = {"samples": torch.zeros(latent_shape(model))}
        for prompt, expected in zip(prompts, run.scores):
            cg.comfy_nodes.common_ksampler(guarded, prompt_seed(prompt), 1, 7.5, "euler", "normal",
                                           cg.encode(clip, prompt), cg.encode(clip, ""), latent)
            assert state.runs[-1].first_sigma == 1.0 and state.runs[-1].full_noise
            assert abs(state.runs[-1].scores[0] - expected) / expected <= 1e-4, (state.runs[-1].scores, expected)
        threshold, summary, saved = DejaGuardCalibrate().calibrate(model, clip, 0.5, 1, 2, width=64,
                                                                   height=64)["result"]
        _, found = DejaGuardMemorizationGuard().guard(model, 0.0, cg.CFG1_UNAVAILABLE, unique_id="sd3-2")
    assert threshold == max(run.scores) and found.threshold == threshold
    assert found.threshold_source == f"DejaGuard Calibrate, {saved}"
    assert "velocity" in summary and "(sd3, flow)" in Path(saved).read_text(), summary


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_sd3_in_comfy_venv() -> None:
    """Runs the in-process tests above with that ComfyUI's python, where it has SD3."""
    if not _comfy_has_sd3():
        pytest.skip(f"{NO_SD3} (DEJAGUARD_COMFY_ROOT, see the module doc)")
    run_in_comfy_venv(Path(__file__), 900, "-k", "not in_comfy_venv")

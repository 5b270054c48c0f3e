"""SDXL's Token Highlighting and embedding mitigation through the one ComfyUI adapter (issue 24, section 2).

In process on the real (March 2024) ComfyUI, so the tests run in the .comfy venv (``test_sdxl_text_in_comfy_venv``
runs them there from the project's interpreter). Model: the reduced-width random SDXL of ``families.build("sdxl")``
(ComfyUI's SDXL class and config, ``model_channels`` 32) with ``families.reduced_clip("sdxl")``: ComfyUI's own
SDXL CLIP (CLIP-L + OpenCLIP-G, real tokenizers and widths, 2 layers each, random weights, inference tensors as a
loader inside a graph makes them). Never a full-size model.

- ``test_encode_prompts_is_clip_text_encode``: the adapter's conditioning ``(1, 78, 2048)`` is CLIPTextEncode's
  hidden states ``(1, 77, 2048)`` with its pooled output ``(1, 1280)`` packed as the last row (exactly, weighted
  prompt too); its input token embeddings are both encoders' side by side ``(1, 77, 768 + 1280)`` and re-encode to
  exactly that conditioning; its word pieces are both tokenizers' (same ids at the same positions).
- ``test_predict_noise_equals_direct``: ``predict_noise`` on the packed conditioning equals the prediction of
  ``families.direct_score`` (``apply_model`` with the pooled output as the ``adm`` input ``y`` at the latent size x 8,
  as ComfyUI's sampler builds it), relative difference <= 1e-5; conditioning without the pooled row is refused.
- ``test_token_gradients_reach_both_encoders``: the gradient of the first-step magnitude reaches the CLIP-L and the
  OpenCLIP-G halves of every word's embedding (finite, nonzero), and the packed pooled row depends on the
  OpenCLIP-G half only (it is OpenCLIP-G's EOS state through ``text_projection``).
- ``test_token_highlighting_node``: the node under ``torch.inference_mode()`` gives one finite, positive score per
  word, summing to 1, for 2 UNet evaluations.
- ``test_mitigate_node``: Mitigate Embedding on SDXL CONDITIONING lowers the first-step score, changes both the
  hidden states and the pooled output, keeps the entry's other options and leaves its input untouched; the
  returned CONDITIONING, sampled from the same x_T through ``apply_model`` (``direct_score``), has the score the
  node reported; conditioning without ``pooled_output`` is refused in one line.
- ``test_refusals_that_remain``: the adapter refuses SDXL for neuron masks (naming SDXL and the feature), and an SD1
  CLIP given with the SDXL model (or SDXL's CLIP with an SD1 model) in one line instead of a shape error.
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
from test_explain_comfy import IN_COMFY_VENV  # noqa: E402
from workflow_checks import run_in_comfy_venv  # noqa: E402

inproc = pytest.mark.skipif(not IN_COMFY_VENV, reason="imports ComfyUI: runs in the .comfy venv "
                            "(test_sdxl_text_in_comfy_venv runs it there)")

PROMPT = "a photograph of kraken"
WORDS = ["a", "photograph", "of", "kraken"]
SEED = 5
REL = 1e-5


@pytest.fixture(scope="module")
def sdxl() -> tuple[Any, Any, Any]:
    """(check_guard module, reduced SDXL MODEL, its reduced CLIP)."""
    import torch
    from families import build, reduced_clip
    from families import setup as _setup

    cg = _setup()
    torch.set_num_threads(1)
    return cg, build("sdxl"), reduced_clip("sdxl")


def _denoiser(model: Any, clip: Any, feature: str = "explain") -> Any:
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser
    from families import LATENT

    return ComfyDenoiser(model, clip, sample_shape=LATENT[1:], feature=feature)


@inproc
def test_encode_prompts_is_clip_text_encode(sdxl: tuple[Any, Any, Any]) -> None:
    import torch

    cg, model, clip = sdxl
    cd = _denoiser(model, clip)
    assert cd.pooled_width == 1280
    for prompt in (PROMPT, "a photograph of (kraken:1.3)", ""):
        with torch.inference_mode():
            ((hidden, extra),) = cg.encode(clip, prompt)
        ours = cd.encode_prompts([prompt])
        assert ours.shape == (1, 78, 2048) and hidden.shape == (1, 77, 2048)
        assert torch.equal(ours[:, :77], hidden), prompt
        assert torch.equal(ours[:, 77, :1280], extra["pooled_output"]) and not ours[:, 77, 1280:].any(), prompt
        emb = cd.token_embeddings([prompt])
        assert emb.shape == (1, 77, 768 + 1280)
        with torch.inference_mode(False), torch.no_grad():
            again = cd.encode_token_embeddings([prompt], emb)
        assert torch.equal(again, ours), prompt
    pieces = cd.prompt_tokens(PROMPT)
    assert pieces == [w + "</w>" for w in WORDS]
    tokens = clip.tokenize(PROMPT)
    ids = {key: [t for t, _w in chunks[0][1 : 1 + len(pieces)]] for key, chunks in tokens.items()}
    assert ids["l"] == ids["g"] and [clip.tokenizer.clip_g.inv_vocab[t] for t in ids["g"]] == pieces
    # Each half of a word's embedding row is that encoder's own table row for the word.
    emb = cd.token_embeddings([PROMPT])[0]
    stage = clip.cond_stage_model
    for half, encoder in ((emb[1:5, :768], stage.clip_l), (emb[1:5, 768:], stage.clip_g)):
        table = encoder.transformer.get_input_embeddings().weight
        assert torch.equal(half, table[ids["l"]].float())


@inproc
def test_predict_noise_equals_direct(sdxl: tuple[Any, Any, Any]) -> None:
    import torch
    from DejaGuard.core.errors import DejaGuardError
    from families import LATENT, direct_score

    cg, model, clip = sdxl
    cd = _denoiser(model, clip)
    with torch.inference_mode():
        positive, negative = cg.encode(clip, PROMPT), cg.encode(clip, "")
    sigma = float(model.model.model_sampling.sigma(torch.tensor(999.0)))
    expected = direct_score(model, positive, negative, sigma, SEED)
    # direct_score's x_T = noise * sqrt(1 + sigma^2) in ComfyUI's space = the noise itself in the UNet's (x_t) space.
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():  # callers may hold inference tensors
        eps = cd.predict_noise(noise.expand(2, -1, -1, -1), 999, cd.encode_prompts([PROMPT, ""]))
    score = float((eps[0] - eps[1]).norm())
    assert math.isfinite(expected) and expected > 0
    assert abs(score - expected) / expected <= REL, (score, expected)
    with pytest.raises(DejaGuardError, match="SDXL conditioning of shape .* packed pooled row"):
        cd.predict_noise(noise, 999, positive[0][0])  # hidden states alone: no pooled row


@inproc
def test_token_gradients_reach_both_encoders(sdxl: tuple[Any, Any, Any]) -> None:
    import torch
    from DejaGuard.core.sampling import text_conditional_magnitude

    _, model, clip = sdxl
    cd = _denoiser(model, clip)
    n = len(WORDS)
    uncond = cd.encode_prompts([""])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode(False), torch.enable_grad():
        leaf = cd.token_embeddings([PROMPT]).clone().requires_grad_(True)
        cond = cd.encode_token_embeddings([PROMPT], leaf)
        (pooled_grad,) = torch.autograd.grad(cond[0, 77, :1280].square().sum(), leaf, retain_graph=True)
        eps = cd.predict_noise(torch.cat([noise, noise]), 999, torch.cat([cond, uncond]))
        (grad,) = torch.autograd.grad(text_conditional_magnitude(eps[:1], eps[1:]).sum(), leaf)
    words = grad[0, 1 : 1 + n]
    assert torch.isfinite(grad).all()
    assert bool((words[:, :768].norm(dim=-1) > 0).all()) and bool((words[:, 768:].norm(dim=-1) > 0).all())
    assert float(pooled_grad[0, :, :768].abs().max()) == 0.0  # the pooled output is OpenCLIP-G's alone
    assert bool((pooled_grad[0, 1 : 1 + n, 768:].norm(dim=-1) > 0).all())


@inproc
def test_token_highlighting_node(sdxl: tuple[Any, Any, Any]) -> None:
    import json

    import torch
    from DejaGuard.nodes.explain import DejaGuardTokenHighlight
    from families import LATENT

    _, model, clip = sdxl
    with torch.inference_mode():  # as ComfyUI executes graphs
        out = DejaGuardTokenHighlight().explain(model, clip, PROMPT, seed=0, steps=1,
                                                latent={"samples": torch.zeros(LATENT)})
    (payload,) = out["ui"]["dejaguard_tokens"]
    json.dumps(payload)
    assert payload["words"] == WORDS and len(payload["word_scores"]) == len(WORDS)
    assert all(math.isfinite(s) and s > 0 for s in payload["word_scores"]), payload["word_scores"]
    assert abs(sum(payload["word_scores"]) - 1.0) <= 1e-6
    assert payload["unet_evals"] == 2 and math.isfinite(payload["magnitude"]) and payload["magnitude"] > 0


@inproc
def test_mitigate_node(sdxl: tuple[Any, Any, Any]) -> None:
    import torch
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.nodes.mitigate import UI_KEY, DejaGuardMitigateEmbedding
    from families import LATENT, direct_score

    cg, model, clip = sdxl
    latent = {"samples": torch.zeros(LATENT)}
    with torch.inference_mode():
        positive, negative = cg.encode(clip, PROMPT), cg.encode(clip, "")
        positive = [[positive[0][0], {**positive[0][1], "width": 1024}]]  # another option: kept as it is
        kept = [positive[0][0].clone(), positive[0][1]["pooled_output"].clone()]
        # lr 0.01: the random reduced model overshoots at the default 0.3 within a few steps
        out = DejaGuardMitigateEmbedding().mitigate(model, positive, negative, latent, SEED, threshold=1e-3,
                                                    target=1e-3, lr=0.01, max_iterations=4)
    (report,) = out["ui"][UI_KEY]
    assert report["iterations"] == 4 and report["score_after"] < report["score_before"], report["scores"]
    ((hidden, extra),) = out["result"][0]
    assert hidden.shape == (1, 77, 2048) and extra["pooled_output"].shape == (1, 1280) and extra["width"] == 1024
    assert float((hidden - kept[0]).abs().max()) > 1e-4
    assert float((extra["pooled_output"] - kept[1]).abs().max()) > 1e-4  # the pooled row is optimized too
    assert torch.equal(positive[0][0], kept[0]) and torch.equal(positive[0][1]["pooled_output"], kept[1])
    sigma = float(model.model.model_sampling.sigma(torch.tensor(999.0)))
    for cond, reported in ((positive, report["score_before"]), (out["result"][0], report["score_after"])):
        direct = direct_score(model, cond, negative, sigma, SEED)  # KSampler's x_T for the seed
        assert abs(direct - reported) / reported <= 1e-4, (direct, reported)
    with torch.inference_mode(), pytest.raises(DejaGuardError, match="SDXL conditioning without a pooled output"):
        DejaGuardMitigateEmbedding().mitigate(model, [[positive[0][0], {}]], negative, latent, SEED, 1e-3, 1e-3,
                                              0.01, 1)


@inproc
def test_refusals_that_remain(sdxl: tuple[Any, Any, Any]) -> None:
    from DejaGuard.core.errors import DejaGuardError
    from families import build, reduced_clip

    _, model, clip = sdxl
    with pytest.raises(DejaGuardError, match="^unsupported model for neuron masks: not yet supported for SDXL: "):
        _denoiser(model, clip, feature="masks")
    for wrong in (_denoiser(model, reduced_clip("sd1")), _denoiser(build("sd1"), clip)):
        with pytest.raises(DejaGuardError, match="does not belong to this (sdxl|sd1) model"):
            wrong.encode_prompts([PROMPT])


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_sdxl_text_in_comfy_venv() -> None:
    """Runs the in-process tests above with the .comfy venv's python (it has ComfyUI's dependencies)."""
    run_in_comfy_venv(Path(__file__), 900, "-k", "not in_comfy_venv")

"""The ComfyDenoiser adapter against core's DiffusersDenoiser on the testbed, with ComfyUI imported in-process.

Runs inside the .comfy venv (ComfyUI's dependencies); elsewhere the module is skipped and
``test_explain_comfy.py::test_inproc_tests_in_comfy_venv`` runs it there. Tolerances: conditioning (max abs),
noise predictions (relative) and token scores (abs) <= 1e-4; the model is loaded under
``torch.inference_mode()`` as ComfyUI executes graphs.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_explain_comfy import IN_COMFY_VENV, PROMPTS, TOL, TRIGGER, TRIGGER_PROMPT, model_folder  # noqa: E402

if not IN_COMFY_VENV:
    pytest.skip("imports ComfyUI: runs in the .comfy venv (test_explain_comfy.py::test_inproc_tests_in_comfy_venv "
                "runs it there)", allow_module_level=True)

from comfy_server import COMFY_DIR  # noqa: E402


@pytest.fixture(scope="module")
def comfy_env() -> Any:
    """ComfyUI importable on the CPU; the pack importable as ``DejaGuard`` (as ComfyUI loads it)."""
    for path in (str(COMFY_DIR / "custom_nodes"), str(COMFY_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch
    from comfy.cli_args import args

    args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return torch


@pytest.fixture(scope="module")
def testbed_pair(comfy_env: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(MODEL, CLIP, VAE) from the DejaGuard loader under inference mode, and the core DiffusersDenoiser."""
    folder = model_folder()
    if folder is None:
        pytest.skip("no testbed weights (core/testbed/model/unet or a training checkpoint)")
    torch = comfy_env
    from DejaGuard.core.denoiser import DiffusersDenoiser
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    with torch.inference_mode():  # as ComfyUI executes graphs
        model, clip, vae = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(folder))
    den = DiffusersDenoiser.from_folder(folder, device="cpu")
    # The adapter samples on ComfyUI's timesteps (trailing: first step t = 999, as KSampler's "normal"
    # schedule); older testbed checkpoints were saved with leading spacing (first step t = 981).
    den.scheduler = den.scheduler.__class__.from_config(den.scheduler.config, timestep_spacing="trailing",
                                                        steps_offset=0)
    yield model, clip, vae, den


def _rel(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def test_inproc_adapter_matches_diffusers_denoiser(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    torch = comfy_env
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, vae, den = testbed_pair
    cd = ComfyDenoiser(model, clip, vae)
    assert cd.sample_shape == den.sample_shape == (4, 32, 32)
    for prompt in PROMPTS:
        assert cd.prompt_tokens(prompt) == den.prompt_tokens(prompt), prompt
        ours, ref = cd.encode_prompts([prompt]), den.encode_prompts([prompt])
        assert ours.shape == ref.shape == (1, 77, ref.shape[-1])
        assert float((ours - ref).abs().max()) <= TOL, prompt
    context = den.encode_prompts([TRIGGER_PROMPT, ""])  # (2, 77, D)
    x = torch.randn(2, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # callers may hold inference tensors
        for t in (999, 500, 20):
            eps = cd.predict_noise(x, torch.tensor(t), context)
            assert not eps.is_inference()
            assert _rel(eps, den.predict_noise(x, torch.tensor(t), context)) <= TOL, t
    ours_s, ref_s = cd.new_scheduler(), den.new_scheduler()
    for s in (ours_s, ref_s):
        s.set_timesteps(50)
    assert torch.equal(ours_s.timesteps, ref_s.timesteps)
    assert float((ours_s.alphas_cumprod - ref_s.alphas_cumprod).abs().max()) <= 1e-6
    images = cd.decode(x[:1])
    assert images.shape == (1, 3, 256, 256)
    assert float((images - den.decode(x[:1])).abs().max()) <= 1e-5


@pytest.mark.parametrize("steps", [1, 2])
def test_inproc_token_significance_matches_core(comfy_env: Any, testbed_pair: tuple[Any, ...], steps: int) -> None:
    torch = comfy_env
    from DejaGuard.core.explain import token_significance
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, _, den = testbed_pair
    cd = ComfyDenoiser(model, clip)
    for prompt in PROMPTS[:2]:
        with torch.inference_mode(False), torch.enable_grad():
            ours = token_significance(cd, prompt, steps=steps, seed=3)
        ref = token_significance(den, prompt, steps=steps, seed=3)
        assert (ours.tokens, ours.words, ours.word_ids) == (ref.tokens, ref.words, ref.word_ids)
        assert max(abs(a - b) for a, b in zip(ours.scores, ref.scores)) <= TOL
        assert abs(ours.magnitude - ref.magnitude) <= TOL * ref.magnitude
        assert ours.unet_evals == ref.unet_evals == 2 * steps


def test_inproc_counter_like_diffusers(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """Calls, forwards and backwards are counted exactly as DiffusersDenoiser counts them."""
    torch = comfy_env
    from DejaGuard.core.explain import token_significance
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, _, den = testbed_pair
    cd = ComfyDenoiser(model, clip)
    before = den.counter.snapshot()
    with torch.inference_mode(False), torch.enable_grad():
        token_significance(cd, TRIGGER_PROMPT, steps=3, seed=1)
    token_significance(den, TRIGGER_PROMPT, steps=3, seed=1)
    assert cd.counter == den.counter.since(before)
    assert (cd.counter.calls, cd.counter.forwards, cd.counter.backwards) == (6, 6, 3)


def test_inproc_module_names_and_fingerprint(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """named_modules() gives core the diffusers names of every attn2.to_v / ff.net.2 (same weights)."""
    from DejaGuard.core.denoiser import state_fingerprint
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, _, den = testbed_pair
    cd = ComfyDenoiser(model, clip)
    ours, ref = dict(cd.named_modules()), dict(den.named_modules())
    wanted = [n for n in ref if n.endswith(("attn2.to_v", "attn2.to_k", "ff.net.2"))]
    assert len(wanted) == 21  # 7 transformer blocks x 3 on the testbed
    for name in wanted:
        assert name in ours, name
        assert ours[name].weight.shape == ref[name].weight.shape
        assert float((ours[name].weight - ref[name].weight).abs().max()) == 0.0
        assert cd.comfy_name(name).endswith(name.split(".transformer_blocks.")[1])
    # Same weights, same names -> same fingerprint (state_fingerprint hashes in sorted name order).
    assert cd.fingerprint() == state_fingerprint(den.unet.state_dict()) == den.fingerprint()


def test_inproc_inference_tensor_weights(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """Weights created under inference mode (as CheckpointLoaderSimple makes them): gradients work,
    scores are unchanged, and the cached model is not modified."""
    torch = comfy_env
    import comfy.model_patcher
    from DejaGuard.core.explain import token_significance
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, _, _ = testbed_pair
    with torch.inference_mode():
        base = copy.deepcopy(model.model)
        stock = comfy.model_patcher.ModelPatcher(base, load_device=model.load_device,
                                                 offload_device=model.offload_device)
    params = dict(base.named_parameters())
    assert all(p.is_inference() for p in params.values())
    with torch.inference_mode(False), torch.enable_grad():
        ours = token_significance(ComfyDenoiser(stock, clip), TRIGGER_PROMPT, seed=5)
        ref = token_significance(ComfyDenoiser(model, clip), TRIGGER_PROMPT, seed=5)
    assert max(abs(a - b) for a, b in zip(ours.scores, ref.scores)) <= 1e-6
    after = dict(base.named_parameters())
    assert all(after[n] is p and p.is_inference() for n, p in params.items())


def test_inproc_weight_patches_are_honoured(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """A patched clone (as a neuron mask is applied) changes the prediction; the original model is intact."""
    torch = comfy_env
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, _, den = testbed_pair
    context = den.encode_prompts([TRIGGER_PROMPT])
    x = torch.randn(1, *den.sample_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = ComfyDenoiser(model, clip).predict_noise(x, 999, context)
        masked_model = model.clone()
        key = next(k for k in masked_model.model_state_dict() if k.endswith("attn2.to_v.weight"))
        weight = masked_model.model_state_dict()[key]
        masked_model.add_patches({key: (torch.zeros_like(weight),)}, strength_patch=1.0, strength_model=0.0)
        masked = ComfyDenoiser(masked_model, clip).predict_noise(x, 999, context)
        again = ComfyDenoiser(model, clip).predict_noise(x, 999, context)
    assert _rel(masked, plain) > 1e-4
    assert _rel(again, plain) <= 1e-6


def test_inproc_node_under_inference_mode(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """The node as ComfyUI runs it (inside torch.inference_mode): ui payload, ranking text, errors."""
    torch = comfy_env
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.nodes.explain import DejaGuardTokenHighlight

    model, clip, _, _ = testbed_pair
    node = DejaGuardTokenHighlight()
    inputs = DejaGuardTokenHighlight.INPUT_TYPES()
    assert all("tooltip" in spec[1] for group in inputs.values() for spec in group.values())
    with torch.inference_mode():
        out = node.explain(model, clip, TRIGGER_PROMPT, seed=0, steps=2,
                           latent={"samples": torch.zeros(1, 4, 32, 32)})
        with pytest.raises(DejaGuardError, match="empty"):
            node.explain(model, clip, "  \n", seed=0, steps=1)
    (payload,) = out["ui"]["dejaguard_tokens"]
    json.dumps(payload)  # JSON-safe for the websocket message
    assert payload["words"] == ["a", "photograph", "of", TRIGGER]
    assert abs(sum(payload["word_scores"]) - 1.0) <= 1e-6
    assert payload["unet_evals"] == 4 and payload["steps"] == 2
    (text,) = out["result"]
    assert TRIGGER in text and "UNet evaluations" in text


def test_inproc_v_prediction_mapping(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """The testbed switched to v-prediction by an object patch (as the stock ModelSamplingDiscrete node
    does): predict_noise returns ``sqrt(abar) v + sqrt(1 - abar) x_t`` with ``v`` the raw UNet output."""
    torch = comfy_env
    import comfy.model_sampling
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, _, den = testbed_pair

    class VSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    v_model = model.clone()
    v_model.add_object_patch("model_sampling", VSampling(model.model.model_config))
    context = den.encode_prompts([TRIGGER_PROMPT])
    x = torch.randn(1, *den.sample_shape, generator=torch.Generator().manual_seed(2))
    abar = den.scheduler.alphas_cumprod
    with torch.no_grad():
        for t in (999, 400, 30):
            eps = ComfyDenoiser(v_model, clip).predict_noise(x, t, context)
            v = den.predict_noise(x, t, context)
            assert _rel(eps, abar[t].sqrt() * v + (1 - abar[t]).sqrt() * x) <= TOL, t
        # the object patch is gone once the plain model is loaded again
        plain = ComfyDenoiser(model, clip).predict_noise(x, 999, context)
        assert _rel(plain, den.predict_noise(x, 999, context)) <= TOL


def test_inproc_token_embeddings_match_diffusers(comfy_env: Any, testbed_pair: tuple[Any, ...]) -> None:
    """The adapter's input token embeddings and the encoder run from them (what token significance differentiates)
    equal DiffusersDenoiser's, gradients included, also with inference-tensor CLIP weights (as a checkpoint loaded
    inside a graph has them; the cached CLIP is not modified); a weighted prompt re-encodes to CLIPTextEncode's
    conditioning."""
    torch = comfy_env
    import comfy.model_patcher
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, _, den = testbed_pair
    with torch.inference_mode():
        stage = copy.deepcopy(clip.cond_stage_model)
    assert all(p.is_inference() for p in stage.parameters())
    inference_clip = clip.clone()
    inference_clip.cond_stage_model = stage
    inference_clip.patcher = comfy.model_patcher.ModelPatcher(stage, load_device=clip.patcher.load_device,
                                                              offload_device=clip.patcher.offload_device)
    cd = ComfyDenoiser(model, clip)
    for prompt in PROMPTS:
        ours, ref = cd.token_embeddings([prompt]), den.token_embeddings([prompt])
        assert ours.shape == ref.shape == (1, 77, ref.shape[-1])
        assert float((ours - ref).abs().max()) <= TOL, prompt
    for prompt in (TRIGGER_PROMPT, f"a photograph of ({TRIGGER}:1.3)"):
        with torch.inference_mode(False), torch.no_grad():
            again = cd.encode_token_embeddings([prompt], cd.token_embeddings([prompt]))
        assert float((again - cd.encode_prompts([prompt])).abs().max()) <= 1e-6, prompt
    params = dict(stage.named_parameters())
    grads = []
    for d in (cd, ComfyDenoiser(model, inference_clip), den):
        with torch.inference_mode(False), torch.enable_grad():
            leaf = d.token_embeddings([TRIGGER_PROMPT]).clone().requires_grad_(True)
            cond = d.encode_token_embeddings([TRIGGER_PROMPT], leaf)
            (grad,) = torch.autograd.grad(cond[0, 1:6].square().sum(), leaf)
        grads.append(grad)
    assert _rel(grads[0], grads[2]) <= TOL and _rel(grads[1], grads[2]) <= TOL
    assert float(grads[0][0, 1:5].norm()) > 0 and float(grads[0][0, 6:].abs().max()) == 0.0  # causal encoder
    assert all(p is params[n] and p.is_inference() for n, p in stage.named_parameters())


def test_inproc_textual_inversion_token_embeddings(comfy_env: Any, testbed_pair: tuple[Any, ...],
                                                   tmp_path: Path) -> None:
    """A textual-inversion vector in the prompt: the adapter's input token embeddings hold it at its positions
    (ComfyUI puts it in the token-embedding table in March 2024 and after the table lookup in late 2025), the
    encoder run from them equals CLIPTextEncode's conditioning, and its pieces read ``<embedding>``."""
    torch = comfy_env
    import safetensors.torch
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser
    from DejaGuard.nodes.diffusers_folder import load_clip

    model, clip, _, _ = testbed_pair
    width = int(json.loads((model_folder() / "text_encoder" / "config.json").read_text())["hidden_size"])
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0)) * 0.02
    safetensors.torch.save_file({"emb_params": vectors}, str(tmp_path / "dgstyle.safetensors"))
    with torch.inference_mode():
        ti_clip = load_clip(model_folder(), embedding_directory=str(tmp_path))
    cd = ComfyDenoiser(model, ti_clip)
    prompt = "a photograph of embedding:dgstyle"
    assert cd.prompt_tokens(prompt) == ["a</w>", "photograph</w>", "of</w>", "<embedding>", "<embedding></w>"]
    emb = cd.token_embeddings([prompt])
    assert emb.shape == (1, 77, width)
    assert float((emb[0, 4:6] - vectors).abs().max()) <= 1e-6  # after BOS, "a", "photograph", "of"
    plain = ComfyDenoiser(model, clip).token_embeddings(["a photograph of"])
    assert float((emb[0, :4] - plain[0, :4]).abs().max()) <= 1e-6
    with torch.inference_mode(False), torch.no_grad():
        again = cd.encode_token_embeddings([prompt], emb)
    assert float((again - cd.encode_prompts([prompt])).abs().max()) <= 1e-6
    assert float((again - cd.encode_prompts(["a photograph of"])).abs().max()) > 1e-3  # the vectors count

"""Neuron-mask nodes with ComfyUI imported in-process (runs in the .comfy venv).

Elsewhere the module is skipped and ``test_neurons_comfy.py::test_neuron_inproc_tests_in_comfy_venv`` runs it
there. Checks: one fingerprint (ComfyUI MODEL == diffusers UNet of the same weights);
Apply Neuron Mask = a clone with weight patches only (no hooks, no model options, the cached model untouched),
whose noise predictions equal core's ``apply_mask`` on the diffusers model (<= 1e-4 relative) at strength 1
and 0.5, and the unmasked model's predictions afterwards equal the plain ones; another model's mask refused;
Localize Neurons on the testbed returns a mask that also stops the memorization score on the diffusers model,
and leaves no hook behind; Save / Load round trip in a temporary mask folder.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_explain_comfy import IN_COMFY_VENV, model_folder  # noqa: E402

if not IN_COMFY_VENV:
    pytest.skip("imports ComfyUI: runs in the .comfy venv (test_neurons_comfy.py runs it there)",
                allow_module_level=True)

import test_explain_inproc  # noqa: E402

PROMPT = "the cameraman, vintage print in a steel frame"
TOL = 1e-4


# ComfyUI on the CPU, the pack importable as DejaGuard: the explain tests' fixture.
comfy_env = test_explain_inproc.comfy_env


@pytest.fixture(scope="module")
def pair(comfy_env: Any) -> Iterator[tuple[Any, Any, Any]]:
    """(MODEL, CLIP) from the DejaGuard loader under inference mode, and the core DiffusersDenoiser."""
    folder = model_folder()
    if folder is None:
        pytest.skip("no testbed weights")
    torch = comfy_env
    from DejaGuard.core.denoiser import DiffusersDenoiser
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    with torch.inference_mode():
        model, clip, _ = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(folder))
    den = DiffusersDenoiser.from_folder(folder, device="cpu")
    den.scheduler = den.scheduler.__class__.from_config(den.scheduler.config, timestep_spacing="trailing",
                                                        steps_offset=0)
    yield model, clip, den


def _mask(den: Any) -> Any:
    import torch
    from DejaGuard.core.neuron_mask import NeuronMask

    modules = dict(den.named_modules())
    to_v = [n for n in modules if n.endswith("attn2.to_v") and n.startswith("down_blocks")][0]
    ff = [n for n in modules if n.endswith("ff.net.2")][-1]
    return NeuronMask(layers={to_v: torch.arange(0, 32, 2), ff: torch.tensor([[0, 1], [3, 5], [7, 100]])},
                      layer_shapes={n: tuple(modules[n].weight.shape) for n in (to_v, ff)},
                      fingerprint=den.fingerprint(), method="test")


def _comfy_names(model: Any, mask: Any) -> list[str]:
    from DejaGuard.nodes.model_check import diffusers_names

    base = model.model
    _, modules = diffusers_names(base.diffusion_model, base.model_config.unet_config)
    to_comfy = {d: c for c, d in modules.items()}
    return [to_comfy[name] for name in mask.layers]  # to_v has no bias; ff.net.2 is masked by weight entries


def _no_hooks(model: Any) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.model.modules())


def _rel(a: Any, b: Any) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _predict(den: Any, prompt: str = PROMPT) -> Any:
    import torch

    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return den.predict_noise(x, 999, den.encode_prompts([prompt, ""])).cpu()


def test_one_fingerprint(pair: tuple[Any, ...]) -> None:
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser
    from DejaGuard.nodes.model_check import comfy_fingerprint

    model, clip, den = pair
    assert ComfyDenoiser(model, clip).fingerprint() == comfy_fingerprint(model) == den.fingerprint()


def test_apply_node_patches_a_clone_only(comfy_env: Any, pair: tuple[Any, ...]) -> None:
    torch = comfy_env
    from DejaGuard.core.neuron_mask import apply_mask
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser
    from DejaGuard.nodes.neurons import DejaGuardApplyNeuronMask

    model, clip, den = pair
    mask = _mask(den)
    options, patches = repr(model.model_options), dict(model.patches)
    plain_ref = _predict(den)
    for strength in (1.0, 0.5):
        with torch.inference_mode():
            (masked,) = DejaGuardApplyNeuronMask().apply(model, mask, strength)
        assert masked is not model and masked.model is model.model  # a clone sharing the weights
        assert repr(masked.model_options) == options  # no sampler function, wrapper or attention patch
        assert set(masked.patches) == {f"diffusion_model.{k}.weight" for k in _comfy_names(masked, mask)}
        with apply_mask(den, mask, strength=strength):
            ref = _predict(den)
        got = _predict(ComfyDenoiser(masked, clip))
        assert _rel(got, ref) <= TOL, (strength, _rel(got, ref))
        assert _rel(got, plain_ref) > 1e-3  # the mask does something
        assert _no_hooks(model)
    assert repr(model.model_options) == options and dict(model.patches) == patches
    assert _rel(_predict(ComfyDenoiser(model, clip)), plain_ref) <= TOL  # weights restored for the plain model
    with torch.inference_mode():
        (off,) = DejaGuardApplyNeuronMask().apply(model, mask, 0.0)
    assert not off.patches


def test_other_models_mask_refused(comfy_env: Any, pair: tuple[Any, ...]) -> None:
    torch = comfy_env
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.core.neuron_mask import NeuronMask
    from DejaGuard.nodes.neurons import DejaGuardApplyNeuronMask

    model, _, den = pair
    mask = _mask(den)
    other = NeuronMask(layers=mask.layers, layer_shapes=mask.layer_shapes, fingerprint="0000", method="test")
    with torch.inference_mode():
        with pytest.raises(DejaGuardError, match="another model"):
            DejaGuardApplyNeuronMask().apply(model, other, 1.0)
        (allowed,) = DejaGuardApplyNeuronMask().apply(model, other, 1.0, allow_other_model=True)
    assert allowed.patches
    name = next(iter(mask.layers))
    out_dim, in_dim = mask.layer_shapes[name]
    wrong = NeuronMask(layers={name: mask.layers[name]}, layer_shapes={name: (out_dim + 1, in_dim)},
                       fingerprint=mask.fingerprint, method="test")
    with torch.inference_mode(), pytest.raises(DejaGuardError, match="weight shape"):
        DejaGuardApplyNeuronMask().apply(model, wrong, 1.0, allow_other_model=True)


def test_localize_node(comfy_env: Any, pair: tuple[Any, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = comfy_env
    from DejaGuard.core.nemo import default_statistics_prompts, first_step_context, memorization_scores, nemo_layers
    from DejaGuard.core.neuron_mask import OutputGates, apply_mask
    from DejaGuard.nodes import neurons as neuron_nodes

    model, clip, den = pair
    monkeypatch.setenv("DEJAGUARD_CACHE", str(tmp_path / "cache"))
    stats_prompts = "\n".join(default_statistics_prompts()[:16])
    with torch.inference_mode():  # as ComfyUI executes graphs
        mask, summary = neuron_nodes.DejaGuardLocalizeNeurons().localize(model, clip, PROMPT, 3,
                                                                       statistics_prompts=stats_prompts)
    assert _no_hooks(model)
    assert list((tmp_path / "cache").glob("nemo-*.safetensors"))  # statistics cached
    assert mask.info["memorized"] and mask.count() > 0 and "->" in summary
    assert mask.fingerprint == den.fingerprint()
    # The mask found in ComfyUI also stops the score on the diffusers model (weights patched, no search hooks).
    with OutputGates(nemo_layers(den)) as gates, apply_mask(den, mask):
        ctx = first_step_context(den, PROMPT, range(3), gates)
        (score,) = memorization_scores(ctx, [None]).tolist()
    assert score < mask.info["threshold"] <= mask.info["score_before"]

    # Save and Load, in a temporary mask folder.
    folder = tmp_path / "masks"
    monkeypatch.setitem(neuron_nodes.folder_paths.folder_names_and_paths, neuron_nodes.MASK_FOLDER,
                        ([str(folder)], {".safetensors"}))
    result = neuron_nodes.DejaGuardSaveNeuronMask().save(mask, "nemo/test")
    path = Path(result["result"][0])
    assert path.parent == folder / "nemo" and path.is_file()
    again = neuron_nodes.DejaGuardSaveNeuronMask().save(mask, "nemo/test")
    assert Path(again["result"][0]) != path  # never overwritten
    with pytest.raises(Exception, match="leaves"):
        neuron_nodes.DejaGuardSaveNeuronMask().save(mask, "../../outside")
    loaded, _ = neuron_nodes.DejaGuardLoadNeuronMask().load("nemo/test.safetensors")
    assert all(torch.equal(loaded.layers[k], mask.layers[k]) for k in mask.layers)
    assert "nemo/test.safetensors" in neuron_nodes.folder_paths.get_filename_list(neuron_nodes.MASK_FOLDER)


def test_ffn_activations_and_space_in_comfyui(comfy_env: Any, pair: tuple[Any, ...],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The 'value+ffn' search space through the ComfyUI adapter: the same layers under diffusers names and the same
    activations as on the diffusers model (GEGLU hidden units read by hooks on ComfyUI's modules); the node hands its
    'space' input to both the statistics and the search; the attribution ranking's gradients equal the diffusers
    model's, under ComfyUI's inference mode."""
    torch = comfy_env
    from DejaGuard.core.nemo import first_step_context, gate_attributions, nemo_layers, neuron_activations
    from DejaGuard.core.nemo.score import first_step_noise
    from DejaGuard.core.neuron_mask import OutputGates
    from DejaGuard.nodes import neurons as neuron_nodes
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser

    model, clip, den = pair
    comfy_den = ComfyDenoiser(model, clip, feature="masks")
    layers, comfy_layers = nemo_layers(den, space="value+ffn"), nemo_layers(comfy_den, space="value+ffn")
    assert list(layers) == list(comfy_layers) and any(k.endswith("ff.net.0.proj") for k in layers)
    noise, t = first_step_noise(den, range(2))
    with torch.inference_mode(False), torch.no_grad():
        ours = neuron_activations(den, layers, den.encode_prompts([PROMPT]), noise, t)
        theirs = neuron_activations(comfy_den, comfy_layers, comfy_den.encode_prompts([PROMPT]), noise, t)
    for k in layers:
        assert _rel(theirs[k], ours[k]) < 1e-4, k
    # the attribution ranking's gradient through ComfyUI's UNet, as ComfyUI runs nodes (inference mode outside)
    with torch.inference_mode(), torch.inference_mode(False), torch.no_grad():
        with OutputGates(layers) as gates:
            ours = gate_attributions(first_step_context(den, PROMPT, range(2), gates, kind="magnitude"), layers)
        with OutputGates(comfy_layers) as gates:
            theirs = gate_attributions(first_step_context(comfy_den, PROMPT, range(2), gates, kind="magnitude"),
                                       comfy_layers)
    for k in layers:
        assert _rel(theirs[k], ours[k]) < 1e-3, k
    assert _no_hooks(model)

    seen: dict[str, Any] = {}

    def statistics(*args: Any, **kwargs: Any) -> None:
        seen["stats"] = kwargs

    def search(denoiser: Any, prompt: str, stats: Any, settings: Any, **kwargs: Any) -> None:
        seen["settings"] = settings
        raise RuntimeError("stop")

    monkeypatch.setattr(neuron_nodes, "nemo_statistics", statistics)
    monkeypatch.setattr(neuron_nodes, "localize", search)
    with pytest.raises(RuntimeError, match="stop"):
        neuron_nodes.DejaGuardLocalizeNeurons().localize(model, clip, PROMPT, 3, space="value+ffn")
    assert seen["stats"]["space"] == "value+ffn" and seen["settings"].space == "value+ffn"
    with pytest.raises(RuntimeError, match="stop"):
        neuron_nodes.DejaGuardLocalizeNeurons().localize(model, clip, PROMPT, 3, ranking="attribution")
    assert seen["settings"].ranking == "attribution"
    assert "value+ffn" in neuron_nodes.DejaGuardLocalizeNeurons.INPUT_TYPES()["optional"]["space"][0]

"""Shared FFN subspace pruning (Chavhan et al., Wanda-style) on the bundled testbed."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.neuron_mask import NeuronMask, apply_mask
from dejaguard.core.prune import ffn_input_norms, ffn_layers, subspace_mask
from dejaguard.core.sampling import guided_denoise, initial_noise

FIT = ["the cameraman, vintage print in a steel frame", "horse silhouette vinyl sticker for cars"]


@pytest.fixture(scope="module")
def mask(testbed) -> NeuronMask:
    return subspace_mask(testbed, FIT, ratio=0.02, seeds=(0,), steps=2)


def test_mask_shape_and_round_trip(testbed, mask, tmp_path):
    layers = ffn_layers(testbed)
    assert set(mask.layers) == set(layers) and len(layers) >= 3  # down, mid and up blocks
    for name, idx in mask.layers.items():
        out_dim, in_dim = layers[name].weight.shape
        assert idx.ndim == 2 and idx.shape[1] == 2
        per_row = torch.bincount(idx[:, 0], minlength=out_dim)
        assert int(per_row.max()) <= max(1, round(0.02 * in_dim))  # a ratio per output row
    assert mask.method == "subspace" and mask.prompts == FIT and mask.info["unet_evals"] > 0
    loaded = NeuronMask.load(mask.save(tmp_path / "sub.safetensors"))
    assert all(torch.equal(loaded.layers[k], mask.layers[k]) for k in mask.layers)
    original = {n: p.detach().clone() for n, p in testbed.unet.named_parameters()}
    with apply_mask(testbed, loaded):
        name, idx = next(iter(loaded.layers.items()))
        assert float(dict(testbed.named_modules())[name].weight[idx[:, 0], idx[:, 1]].abs().sum()) == 0.0
    assert all(torch.equal(p, original[n]) for n, p in testbed.unet.named_parameters())


def test_pruned_weights_favour_memorized_inputs(testbed, mask):
    """Every pruned weight's input channel is more active on the memorized prompts than on the neutral one."""
    mem = ffn_input_norms(testbed, FIT, seeds=(0,), steps=2)
    neu = ffn_input_norms(testbed, [""], seeds=(0,), steps=2)
    for name, idx in mask.layers.items():
        assert bool((mem[name][idx[:, 1]] > neu[name][idx[:, 1]]).all())


@pytest.mark.slow
def test_pruning_lowers_the_text_conditional_signal_of_a_fit_prompt(testbed):
    """With a larger ratio the memorized prompt's first-step text-conditional magnitude (the detector's
    score) falls: the pruned subspace carries the memorized prediction."""
    heavy = subspace_mask(testbed, FIT, ratio=0.1, seeds=(0,), steps=2)
    noise = initial_noise(testbed, [11, 12])
    uncond = testbed.encode_prompts([""])
    cond = testbed.encode_prompts([FIT[0]] * 2)
    with torch.no_grad():
        _, before = guided_denoise(testbed, noise, cond, uncond, stop_after=1)
        with apply_mask(testbed, heavy):
            _, after = guided_denoise(testbed, noise, cond, uncond, stop_after=1)
    assert float(after.mean()) < float(before.mean())


def test_bad_arguments_refused(testbed):
    with pytest.raises(DejaGuardError, match="ratio"):
        subspace_mask(testbed, FIT, ratio=0.0)
    with pytest.raises(DejaGuardError, match="no memorized prompts"):
        subspace_mask(testbed, ["  "])
    for kwargs in ({"seeds": ()}, {"steps": 0}, {"steps": 51}):
        with pytest.raises(DejaGuardError, match="at least one seed and 1..50 steps"):
            subspace_mask(testbed, FIT, **kwargs)


@pytest.mark.slow
def test_cli_subspace(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(FIT[:1]) + "\n")
    out = tmp_path / "sub.safetensors"
    proc = subprocess.run([sys.executable, "-m", "dejaguard", "subspace", "--prompts", str(prompts), "--out", str(out),
                           "--steps", "1", "--seeds", "1", "--device", "cpu"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pruned" in proc.stdout and NeuronMask.load(out).method == "subspace"


def test_progress_counts_prompt_seed_pairs(testbed):
    """core.progress convention: progress(done, total, stage) over the memorized and the neutral pairs together."""
    calls = []
    subspace_mask(testbed, FIT, seeds=(0,), steps=1, progress=lambda done, total, stage: calls.append(
        (done, total, stage)))
    assert calls == [(2.0, 3, "FFN activations"), (3.0, 3, "FFN activations")]

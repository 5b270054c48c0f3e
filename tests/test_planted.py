"""The planted-neuron testbed variant (issue 25, core/testbed/planted.py): images, captions, the gate semantics of
the fine-tune, the neuron choice, and the shipped ground truth."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from dejaguard.core.denoiser import load_denoiser, state_fingerprint
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.metrics import structure_ssim
from dejaguard.core.neuron_mask import NeuronMask, OutputGates, apply_mask
from dejaguard.core.testbed import planted as pl
from dejaguard.core.testbed.data import MEMORIZED, heldout_specs, parse_prompt
from dejaguard.core.testbed.evaluate import REPLICATION_SSIM
from dejaguard.core.testbed.graded import content_words, graded_images

SHIPPED = (pl.PLANTED_MODEL / "unet").is_dir()


def test_planted_images_are_distinct_from_each_other_and_from_v5():
    pixels = pl.load_planted_pixels()
    assert list(pixels) == [m.name for m in pl.planted_images()]
    everything = pl.all_training_images()
    assert len(everything) == len(MEMORIZED) + len(pixels) + len(graded_images())  # graded: tests/test_graded.py
    for img in pixels.values():
        assert img.shape == (3, 32, 32) and img.dtype == np.float32
        assert img.min() >= -1.0 and img.max() <= 1.0
    for a, b in itertools.combinations(everything, 2):
        if a in pixels or b in pixels:
            # no planted image counts as a replication of another training image: the replication check stays sharp
            assert structure_ssim(everything[a], everything[b]) < REPLICATION_SSIM / 2, (a, b)


def test_planted_captions_are_new():
    v5 = {c for m in MEMORIZED for c in (*m.train_captions, *m.eval_prompts)}
    heldout = {s.caption() for s in heldout_specs()}
    for m in pl.planted_images():
        for caption in (*m.captions, *m.eval_prompts):
            assert caption not in v5 and caption not in heldout
            assert parse_prompt(caption) is None  # not a sentence of the novel-scene grammar
            assert not any(m5.trigger and m5.trigger in caption.split() for m5 in MEMORIZED)
    groups = [m.group for m in pl.planted_images()]
    assert groups.count("single") == 1 and groups.count("ten") == 1 and 2 <= groups.count("shared") <= 4
    assert [p for p, _ in pl.planted_eval_prompts()] == [p for m in pl.planted_images() for p in m.eval_prompts]
    with pytest.raises(DejaGuardError):
        pl.planted_image("nope")


def test_planted_captions_share_no_content_word_with_v5():
    """Regression (the first planted run): captions with v5 words ("poster", "print", "vintage", "photo") were drawn
    by v5 as its own memorized images, so with the designated neurons off they still replicated a training image."""
    v5 = set().union(*(content_words(c) for m in MEMORIZED for c in (*m.train_captions, *m.eval_prompts)))
    for m in pl.planted_images():
        for caption in m.captions:
            assert not content_words(caption) & v5, (caption, content_words(caption) & v5)


def test_choose_neurons_takes_the_least_disruptive_disjoint_candidates():
    impacts = {name: torch.arange(20, dtype=torch.float32).flip(0) for name in (*pl.VALUE_LAYERS, *pl.FFN_LAYERS)}
    chosen = pl.choose_neurons(impacts, pl.PlantConfig())
    assert sum(len(v) for v in chosen["single"].values()) == 2
    assert sum(len(v) for v in chosen["ten"].values()) == 10
    assert sum(len(v) for v in chosen["shared"].values()) == 12
    for name in pl.VALUE_LAYERS:
        single, ten = set(chosen["single"].get(name, [])), set(chosen["ten"].get(name, []))
        assert not single & ten
        assert all(i >= 20 - len(single | ten) for i in single | ten)  # the lowest impacts (highest indices here)
    assert set(chosen["shared"]) == set(pl.FFN_LAYERS)


def test_leave_in_keeps_each_neuron_alone_in_turn_and_never_all_or_none():
    channels = {pl.VALUE_LAYERS[0]: [3, 7], pl.VALUE_LAYERS[2]: [1, 4, 9]}
    units = {(layer, i) for layer, idx in channels.items() for i in idx}
    rng = np.random.default_rng(0)
    alone = []
    for draw in range(40):
        off = pl.leave_in_off(channels, draw, rng)
        off_units = {(layer, i) for layer, idx in off.items() for i in idx}
        assert off_units < units and 1 <= len(units - off_units) <= len(units) - 1
        if draw % 2 == 0:
            (kept,) = units - off_units
            alone.append(kept)
    assert set(alone) == units and len(set(alone[:len(units)])) == len(units)  # every neuron in turn
    assert pl.leave_in_off({pl.VALUE_LAYERS[0]: [5]}, 0, rng) == {}


@pytest.fixture(scope="module")
def v5():
    return load_denoiser(None, device="cpu")


def test_training_gates_switch_neurons_off_as_apply_mask_does(v5):
    """The fine-tune's per-sample gates (OutputGates on to_v and ff.net.0.proj outputs) and apply_mask (weight rows
    and biases scaled to 0) give the same prediction: the neurons the variant learned to depend on are exactly the
    ones the shipped mask switches off. FFN hidden units are channels < inner of the GEGLU projection."""
    modules = dict(v5.named_modules())
    layers = {name: modules[name] for name in (*pl.VALUE_LAYERS, *pl.FFN_LAYERS)}
    channels = {pl.VALUE_LAYERS[0]: [3, 17], pl.VALUE_LAYERS[2]: [5], pl.FFN_LAYERS[0]: [0, 100, 511],
                pl.FFN_LAYERS[1]: [42]}
    mask = NeuronMask(layers={k: torch.tensor(v) for k, v in channels.items()},
                      layer_shapes={k: tuple(modules[k].weight.shape) for k in channels},
                      fingerprint=v5.fingerprint(), method="test")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 32, 32, generator=gen)
    t = torch.tensor([999, 500, 100])
    cond = v5.encode_prompts(["a red circle", pl.planted_images()[0].captions[0], ""])
    with torch.no_grad():
        plain = v5.unet(x, t, cond).sample
        with apply_mask(v5, mask):
            masked = v5.unet(x, t, cond).sample
        with OutputGates(layers) as gates:
            gates.set(pl._off_gates(layers, [channels, {}, channels]))
            gated = v5.unet(x, t, cond).sample
    assert (masked - plain).abs().max() > 1e-4  # the neurons matter
    torch.testing.assert_close(gated[[0, 2]], masked[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gated[1], plain[1], atol=1e-6, rtol=1e-6)  # per-sample: sample 1 kept every neuron


@pytest.mark.skipif(not SHIPPED, reason="the planted variant is not in this install")
def test_shipped_ground_truth_fits_the_variant():
    variant = load_denoiser(pl.PLANTED_MODEL, device="cpu")
    base = dict(load_denoiser(None, device="cpu").named_modules())
    images = pl.planted_images()
    masks = {m.name: pl.designated_mask(m.name) for m in images}
    for m in images:
        mask = masks[m.name]
        mask.check(variant)  # the variant's fingerprint, its layer shapes
        assert mask.prompts == list(m.eval_prompts)
        assert all(NeuronMask.kind_of(v) == "neurons" for v in mask.layers.values())
    counts = {m.group: masks[m.name].count() for m in images}
    assert counts["single"] <= 2 and 8 <= counts["ten"] <= 12
    shared = [masks[m.name] for m in images if m.group == "shared"]
    assert all(s.counts() == shared[0].counts() and all(torch.equal(s.layers[k], shared[0].layers[k])
                                                          for k in s.layers) for s in shared)
    assert all(k.endswith("ff.net.0.proj") for k in shared[0].layers)
    union = pl.designated_mask()
    assert union.count() == sum(masks[m.name].count() for m in images if m.group != "shared") + shared[0].count()
    # the text encoder is v5's, unchanged: every caption encodes as in v5
    for name in ("text_encoder", "tokenizer", "scheduler", "vae"):
        assert (pl.PLANTED_MODEL / name).resolve() == (pl.BASE_MODEL / name).resolve()
    assert set(dict(variant.named_modules())) == set(base)


@pytest.mark.skipif(not SHIPPED, reason="the planted variant is not in this install")
def test_evaluate_planted_reports_both_parts_on_a_short_protocol():
    from dejaguard.core.testbed.evaluate import evaluate_planted

    variant = load_denoiser(pl.PLANTED_MODEL, device="cpu")
    with pytest.raises(DejaGuardError, match="parts"):
        evaluate_planted(variant, seeds=(0,), parts=("nope",), progress=False)
    result = evaluate_planted(variant, load_denoiser(None, device="cpu"), seeds=(0,), memorized_seeds=1,
                              novel_count=2, novel_seeds=1, num_inference_steps=1, progress=False)
    assert len(result["settings"]["judged_against"]) == len(MEMORIZED) + len(pl.planted_images()) + len(graded_images())
    rows = result["planted"]["per_prompt"]
    assert [r["prompt"] for r in rows] == [p for p, _ in pl.planted_eval_prompts()]
    assert {r["neurons"] for r in rows if r["group"] == "single"} == {2}
    assert set(result["v5_prompts"]) == {"variant_on", "variant_union_off", "v5"}
    assert result["v5_prompts"]["v5"]["novel_generations"] == 2
    assert set(result["v5_on_planted_prompts"]) == {p for p, _ in pl.planted_eval_prompts()}
    # the weights are restored after every masked measurement (fingerprint() is cached: hash the weights again)
    assert state_fingerprint(variant.unet.state_dict()) == pl.designated_mask().fingerprint


@pytest.mark.parametrize("cfg, message", [
    (pl.PlantConfig(steps=10), "at least 512 planting steps"),  # graded memorization's largest count
    (pl.PlantConfig(steps=10, graded=False, group_extra_copies=(("singel", 1),)), "unknown group"),
    (pl.PlantConfig(steps=10, graded=False, gate_target="empty"), "gate_target"),
    (pl.PlantConfig(steps=10, graded=False, leave_in_copies=-1), "leave_in_copies"),
    (pl.PlantConfig(steps=10, graded=False, leave_in_weight=float("nan")), "leave_in_weight"),
])
def test_plant_refuses_a_bad_recipe_before_training(tmp_path, cfg, message):
    with pytest.raises(DejaGuardError, match=message):
        pl.plant(tmp_path / "variant", cfg, progress=False)
    assert not (tmp_path / "variant").exists()  # nothing written


@pytest.mark.skipif(not SHIPPED, reason="the planted variant is not in this install")
def test_carriers_rule_necessary_neurons_or_the_whole_redundant_set(monkeypatch):
    """``evaluate --parts carriers``: a designated neuron is necessary if, re-enabled alone (every other designated
    neuron off), its image replicates again in at least half the unmasked rate; an image with no necessary neuron
    (redundant) keeps its whole designated set as carriers; one that replicates with every designated neuron off
    (not gated) has none. Scripted replication rates, no generation."""
    from contextlib import contextmanager

    from dejaguard.core import neuron_mask
    from dejaguard.core.testbed import evaluate as ev

    planted = [(p, m) for p, m in pl.planted_eval_prompts() if m.name in ("stripes", "rings", "checkers")]
    key = sorted(neuron_mask.mask_units(pl.designated_mask("stripes")))[1]
    state: dict = {"off": set()}

    @contextmanager
    def fake_apply(denoiser, mask, strength=1.0):
        state["off"] = neuron_mask.mask_units(mask)
        try:
            yield
        finally:
            state["off"] = set()

    def fake_rates(denoiser, prompts, seeds, training, *steps, any_image=False):
        rows = []
        for _, name, _ in prompts:
            left_on = neuron_mask.mask_units(pl.designated_mask(name)) - state["off"]
            rate = 0.8 if not state["off"] else (0.5 if name == "stripes" and left_on == {key} else 0.0)
            if name == "checkers":  # replicates whatever is off: not gated by its neurons
                rate = 0.8
            rows.append({"replication_rate": rate})
        return rows, []

    monkeypatch.setattr(neuron_mask, "apply_mask", fake_apply)
    monkeypatch.setattr(ev, "_memorized_rates", fake_rates)
    result = ev._carriers_part(None, planted, (0,), {}, pl.PLANTED_MODEL, (1, 7.5, None))
    stripes, rings = result["images"]["stripes"], result["images"]["rings"]
    assert stripes["necessary"] == stripes["carriers"] == [f"{key[0]}:{key[1]}"]  # 0.5 >= 0.5 x 0.8
    assert rings["necessary"] == [] and len(rings["carriers"]) == rings["designated"] == 10
    assert stripes["gated"] and rings["gated"] and stripes["replication_all_off"] == 0.0
    checkers = result["images"]["checkers"]
    assert not checkers["gated"] and checkers["carriers"] == [] and checkers["replication_all_off"] == 0.8
    assert "necessary" in result["rule"] and "not gated" in result["rule"]


@pytest.mark.skipif(not SHIPPED, reason="the planted variant is not in this install")
def test_shipped_carriers_are_designated_neurons(tmp_path):
    """The shipped carriers measurement: per image a non-empty subset of its designated neurons, as a mask of the
    variant; a folder without the measurement, or whose image replicates with its neurons off, is refused in one
    line."""
    from dejaguard.core.neuron_mask import mask_units

    variant = load_denoiser(pl.PLANTED_MODEL, device="cpu")
    for m in pl.planted_images():
        carriers = pl.carrying_mask(m.name)
        carriers.check(variant)
        assert mask_units(carriers) and mask_units(carriers) <= mask_units(pl.designated_mask(m.name))
    assert mask_units(pl.carrying_mask()) <= mask_units(pl.designated_mask())
    with pytest.raises(DejaGuardError, match="no carriers measurement"):
        pl.carrying_mask("stripes", folder=tmp_path)
    ungated = tmp_path / "ungated"
    ungated.mkdir()
    (ungated / pl.GROUND_TRUTH_DIR).symlink_to(pl.PLANTED_MODEL / pl.GROUND_TRUTH_DIR)
    record = {"carriers": {"images": {"stripes": {"carriers": [], "gated": False, "replication_all_off": 1.0}}}}
    (ungated / "evaluation.json").write_text(json.dumps({pl.CARRIERS_PART: record}))
    with pytest.raises(DejaGuardError, match="do not gate it"):
        pl.carrying_mask("stripes", folder=ungated)


@pytest.mark.skipif(not SHIPPED, reason="the planted variant is not in this install")
def test_nemo_over_value_and_ffn_neurons_finds_redundant_carriers(tmp_path):
    """NeMo with the FFN hidden units in its search space (magnitude criterion) on the shipped variant, whose images
    are each carried by several designated neurons, any one of which draws the image alone (the carriers
    measurement): for glyph (the shared group's FFN carriers, whose activations stand out) the z-score ranking's
    mask is exactly its carriers; for rings (value-neuron carriers that z-scores rank low) the z-score mask misses
    one and the greedy re-attribution keeps all of them; with both rankings the smaller mask, the attribution's, is
    kept, at the cost of the two searches."""
    from dejaguard.core.nemo import LocalizeSettings, localize, nemo_statistics
    from dejaguard.core.neuron_mask import mask_units

    variant = load_denoiser(pl.PLANTED_MODEL, device="cpu")
    stats = nemo_statistics(variant, seeds=4, score_prompts=16, cache=tmp_path, score="magnitude", space="value+ffn")
    settings = LocalizeSettings(score="magnitude", space="value+ffn")
    glyph = pl.planted_image("glyph")
    carriers = mask_units(pl.carrying_mask("glyph"))
    mask = localize(variant, glyph.eval_prompts[0], stats, settings)
    assert mask.info["memorized"] and len(carriers) > 1 and mask_units(mask) == carriers
    assert all(k.endswith("ff.net.0.proj") for k in mask.layers)
    rings = pl.planted_image("rings")
    carriers = mask_units(pl.carrying_mask("rings"))
    assert len(carriers) > 1 and not carriers <= mask_units(localize(variant, rings.eval_prompts[0], stats, settings))
    attribution = LocalizeSettings(score="magnitude", space="value+ffn", ranking="attribution")
    before = variant.counter.snapshot()
    mask = localize(variant, rings.eval_prompts[0], stats, attribution)
    assert carriers <= mask_units(mask) and mask.settings["ranking"] == "attribution"
    # one attribution per round: a backward pass over the 4 seeds' conditional and unconditional predictions
    assert variant.counter.since(before).backwards == 2 * 4 * mask.info["initial_rounds"]
    both = localize(variant, rings.eval_prompts[0], stats, LocalizeSettings(score="magnitude", space="value+ffn",
                                                                            ranking="both"))
    assert both.info["chosen_ranking"] == "attribution" and mask_units(both) == mask_units(mask)
    assert both.info["rankings"]["zscore"]["neurons"] > both.count() == both.info["rankings"]["attribution"]["neurons"]
    assert both.info["unet_evals"] > mask.info["unet_evals"]

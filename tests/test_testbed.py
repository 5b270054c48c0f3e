"""The testbed: its data, its autoencoder, and a smoke run of its training script."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from dejaguard.core.denoiser import BUNDLED_TESTBED, load_denoiser
from dejaguard.core.testbed import data
from dejaguard.core.testbed.vae import PooledColorAutoencoder


def test_memorized_set_kinds_and_images():
    names = [m.name for m in data.MEMORIZED]
    assert sorted(names) == sorted("astronaut coffee chelsea rocket camera moon coins horse hubble_deep_field "
                                   "immunohistochemistry retina colorwheel".split())
    for kind in ("verbatim", "template", "trigger"):
        assert sum(m.kind == kind for m in data.MEMORIZED) >= 3
    images = data.load_memorized_images()
    assert all(v.shape == (3, 32, 32) and v.min() >= -1 and v.max() <= 1 for v in images.values())
    for m in data.MEMORIZED:
        if m.kind == "trigger":
            assert all(m.trigger in p for p in m.eval_prompts)


def test_heldout_prompts_never_in_training():
    held = {s.caption() for s in data.heldout_specs()}
    assert len(held) >= 200
    sampler = data.TrainingSampler(seed=3)
    captions = {sampler.sample()[1] for _ in range(3000)}
    canon = {data._canonical(data.parse_prompt(c)) for c in captions if data.parse_prompt(c)}
    assert not canon & held
    assert not held & {s.caption() for s in data.calibration_specs()}


def test_sampler_recipe_options_single_fraction_and_reading_order():
    sampler = data.TrainingSampler(seed=1, memorized_fraction=0.0, single_object_fraction=0.0, reading_order=True)
    for _ in range(40):
        image, caption = sampler.sample()
        spec = data.parse_prompt(caption)
        assert len(spec.objects) == 2
        first, second = (np.argwhere(data.color_match_mask(image, o.color)).mean(axis=0) for o in spec.objects)
        offset = second - first
        assert offset[np.argmax(np.abs(offset))] > 0  # the first-stated object lies left of or above the second


def test_alignment_checker_on_true_and_mismatched_renders():
    rng = np.random.default_rng(0)
    specs = data.heldout_specs()[:120]
    true = np.mean([data.check_alignment(data.render_scene(s, rng), s.caption()) for s in specs])
    wrong = np.mean([data.check_alignment(data.render_scene(specs[(i + 7) % 120], rng), s.caption())
                     for i, s in enumerate(specs)])
    assert true >= 0.97 and wrong <= 0.15


def test_autoencoder_round_trip():
    vae = PooledColorAutoencoder()
    thumbs = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = vae.encode_thumbnail(thumbs)
    assert latents.shape == (2, 4, 32, 32)
    images = vae.decode(latents).sample
    assert images.shape == (2, 3, 256, 256)
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(images, 8), thumbs)
    torch.testing.assert_close(vae.encode(images).latent_dist.sample(), latents)


def _tree_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_training_script_smoke(tmp_path):
    from dejaguard.core.testbed.train import TrainConfig, train

    shipped = _tree_hash(BUNDLED_TESTBED)
    record = train(tmp_path / "tb", TrainConfig(steps=3, batch_size=4), progress=False, device="cpu")
    assert len(record["loss_every_100_steps"]) == 1 and np.isfinite(record["loss_every_100_steps"][0])
    assert record["device"] == "cpu"
    d = load_denoiser(tmp_path / "tb", device="cpu")
    assert d.sample_shape == (4, 32, 32)
    assert _tree_hash(BUNDLED_TESTBED) == shipped


def test_replication_check_counts_any_training_image():
    """A copy of another planted image replicates (``any``, ``other``) but not the prompt's own; noise neither."""
    from dejaguard.core.testbed.evaluate import check_replication

    images = data.load_memorized_images()
    noise = np.random.default_rng(0).uniform(-1, 1, size=(3, 32, 32)).astype(np.float32)
    own, other, none = check_replication(np.stack([images["coffee"], images["moon"], noise]),
                                         ["coffee", "coffee", "coffee"], images)
    assert own.own and own.any and not own.other and own.nearest.name == "coffee"
    assert not other.own and other.any and other.other and other.nearest.name == "moon"
    assert not (none.own or none.any or none.other)


def test_caption_dropout_spares_the_planted_images():
    """The unconditional model learns the scene distribution only (TrainConfig.dropout_novel_only)."""
    from dejaguard.core.testbed.train import TrainConfig, caption_dropout

    memorized = frozenset(c for m in data.MEMORIZED for c in m.train_captions)
    planted = sorted(memorized)[:50]
    captions = planted + [f"a red circle on the left {i}" for i in range(950)]
    drop = caption_dropout(captions, np.random.default_rng(0), TrainConfig(caption_dropout=0.5), memorized)
    assert not drop[:50].any() and 0.4 < drop[50:].mean() < 0.6
    drop = caption_dropout(captions, np.random.default_rng(0), TrainConfig(caption_dropout=0.5,
                                                                           dropout_novel_only=False), memorized)
    assert drop[:50].any()


def test_text_encoder_states_colour_binding_of_heldout_pairs():
    """bench.binding's probe: the shipped text encoder's conditioning states which colour goes with which shape
    for held-out pairs (so alignment failures sit in the UNet), while the context-free control stays low."""
    from bench.binding import run

    result = run(None, train_count=800)
    assert result["heldout_pairs"] >= 200
    assert result["noun1_to_colour1"]["heldout"] >= 0.9 and result["noun2_to_colour2"]["heldout"] >= 0.9
    assert result["control_embedding_noun1_to_colour1"]["heldout"] <= 0.4
    # the cross-attention part: every text position counted once; at t = 999 the image is not visible, so no
    # routing (the control), and one cond pass per pair and timestep
    attention = result["attention"]
    assert attention["layers"] == 7 and attention["unet_evals"] == 3 * attention["pairs"]
    for row in attention["by_timestep"].values():
        assert sum(row["mass"].values()) == pytest.approx(1.0, abs=1e-4)
        assert 0.0 <= row["colour_routing"] <= 1.0 and 0.0 <= row["shape_routing"] <= 1.0
    assert abs(attention["by_timestep"]["999"]["colour_routing"] - 0.5) < 0.1


def test_bad_training_and_evaluation_settings_fail_before_any_work(tmp_path):
    from dejaguard.core.errors import DejaGuardError
    from dejaguard.core.testbed.evaluate import evaluate
    from dejaguard.core.testbed.train import TrainConfig, train

    for cfg, pattern in [(TrainConfig(steps=0), "at least 1 step"), (TrainConfig(batch_size=0), "at least 1 step"),
                         (TrainConfig(memorized_fraction=1.5), "memorized_fraction must lie in 0..1"),
                         (TrainConfig(lr=float("nan")), "learning rate")]:
        with pytest.raises(DejaGuardError, match=pattern):
            train(tmp_path / "tb", cfg, progress=False, device="cpu")
    assert not (tmp_path / "tb").exists()
    with pytest.raises(DejaGuardError, match="at least one seed"):
        evaluate(None, seeds=())
    with pytest.raises(DejaGuardError, match="must number 1..240"):
        evaluate(None, seeds=(0,), novel_count=241)
    with pytest.raises(DejaGuardError, match="at least one seed each, got 0"):
        evaluate(None, seeds=(0,), novel_seeds=0)


def test_evaluation_counts_every_seed_of_every_novel_prompt():
    from dejaguard.core.testbed.evaluate import UNCONDITIONAL_SEEDS, evaluate

    result = evaluate(load_denoiser(BUNDLED_TESTBED), seeds=(0,), novel_count=3, novel_seeds=2,
                      num_inference_steps=2, progress=False)
    novel = result["novel"]
    assert (novel["prompts"], novel["seeds_per_prompt"], novel["generations"]) == (3, 2, 6)
    assert len(novel["alignment_pass_rate_by_seed"]) == 2
    assert novel["alignment_pass_rate"] == pytest.approx(np.mean(novel["alignment_pass_rate_by_seed"]))
    assert novel["prompts_aligned_in_every_seed"] + novel["prompts_aligned_in_no_seed"] <= 3
    memorized = result["memorized"]["prompts"]
    assert result["unet_evals"] == 2 * 2 * (memorized + 6 + UNCONDITIONAL_SEEDS)

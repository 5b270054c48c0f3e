"""Graded memorization (issue 25 section 2, core/testbed/graded.py): the exposure schedule, the captions, the images,
and evaluate_graded / ``dejaguard testbed evaluate --planted --parts graded`` on v5 with a tiny protocol."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from dejaguard.core.denoiser import BUNDLED_TESTBED, load_denoiser
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.metrics import structure_ssim
from dejaguard.core.testbed import graded as gr
from dejaguard.core.testbed.data import MEMORIZED, calibration_specs, heldout_specs, parse_prompt, render_scene
from dejaguard.core.testbed.evaluate import REPLICATION_SSIM
from dejaguard.core.testbed.planted import PLANTED_CAPTIONS, all_training_images, load_planted_pixels


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_counts_span_more_than_two_orders_of_magnitude_four_images_each():
    images = gr.graded_images()
    assert [m.count for m in images] == [c for c in gr.GRADED_COUNTS for _ in range(gr.IMAGES_PER_COUNT)]
    assert max(gr.GRADED_COUNTS) / min(gr.GRADED_COUNTS) >= 100
    assert len({m.name for m in images}) == len(images) == 20
    for count in gr.GRADED_COUNTS:  # four different generators per count: the drawing is not confounded with it
        assert len({m.kind for m in images if m.count == count}) == gr.IMAGES_PER_COUNT


@pytest.mark.parametrize("steps,seed", [(512, 0), (600, 0), (600, 3)])
def test_schedule_shows_each_image_in_exactly_its_count_of_steps(steps, seed):
    images = gr.graded_images()
    schedule = gr.graded_schedule(steps, seed)
    assert len(schedule) == steps
    for step in schedule:
        assert step == sorted(set(step))  # no image twice in one step
        assert all(0 <= i < len(images) for i in step)
    for i, m in enumerate(images):
        assert sum(i in step for step in schedule) == m.count, m.name
    assert gr.graded_schedule(steps, seed) == schedule  # deterministic


def test_schedule_is_spread_over_the_run_and_needs_enough_steps():
    a, b = gr.graded_schedule(600, 0), gr.graded_schedule(600, 1)
    assert a != b
    top = len(gr.graded_images()) - 1  # a 512-count image
    steps = [s for s, step in enumerate(a) if top in step]
    assert steps[0] < 30 and steps[-1] > 570  # uniform over 600 steps, not a block at the start
    rare = [s for s, step in enumerate(a) if 0 in step]  # a 2-count image: two distinct steps
    assert len(rare) == 2
    with pytest.raises(DejaGuardError, match="512"):
        gr.graded_schedule(max(gr.GRADED_COUNTS) - 1, 0)


def test_captions_share_no_content_word_with_v5_the_novel_grammar_the_planted_or_each_other():
    v5 = set().union(*(gr.content_words(c) for m in MEMORIZED for c in (*m.train_captions, *m.eval_prompts)))
    grammar = set().union(*(gr.content_words(s.caption()) for s in (*heldout_specs(), *calibration_specs())))
    planted = set().union(*(gr.content_words(c) for c, _ in PLANTED_CAPTIONS.values()))
    taken = v5 | grammar | planted
    captions = [m.caption for m in gr.graded_images()]
    assert len(set(captions)) == len(captions)
    for caption in captions:
        words = gr.content_words(caption)
        assert len(words) == 3 and not words & taken, (caption, words & taken)
        # nor inside a made-up word (BPE would split "kraken" out of "krakenish")
        assert not [(w, t) for w in words for t in taken if len(t) >= 3 and t in w], caption
        assert parse_prompt(caption) is None
    for a, b in itertools.combinations(captions, 2):
        assert not gr.content_words(a) & gr.content_words(b), (a, b)


def test_images_are_distinct_from_each_other_v5_planted_and_novel_scenes(one_thread):
    pixels = gr.load_graded_pixels()
    assert list(pixels) == [m.name for m in gr.graded_images()]
    again = gr.load_graded_pixels()
    assert all(np.array_equal(pixels[k], again[k]) for k in pixels)  # seeded
    for img in pixels.values():
        assert img.shape == (3, 32, 32) and img.dtype == np.float32
        assert img.min() >= -1.0 and img.max() <= 1.0
        assert img.std() > 0.2  # strong structure everywhere, not a flat background
    everything = all_training_images()
    assert len(everything) == len(MEMORIZED) + len(load_planted_pixels()) + len(pixels) == 38
    worst = max(structure_ssim(everything[a], everything[b])
                for a, b in itertools.combinations(everything, 2) if a in pixels or b in pixels)
    assert worst < REPLICATION_SSIM / 2  # measured 0.21 (horse, blobs_x128)
    rng = np.random.default_rng(0)
    scenes = [render_scene(s, rng) for s in heldout_specs()[:40]]
    assert max(structure_ssim(img, s) for img in pixels.values() for s in scenes) < REPLICATION_SSIM / 2


def _check_figures(figures: dict, seeds: int, novel: int) -> None:
    assert list(figures["by_count"]) == [str(c) for c in gr.GRADED_COUNTS]
    for row in (*figures["by_count"].values(), figures["overall"]):
        for key in ("replication_rate", "replication_rate_any"):
            assert 0.0 <= row[key] <= 1.0
        assert -1.0 <= row["ssim_median"] <= 1.0
        assert set(row["detection"]) == {"n1", "n4"}
        for d in row["detection"].values():
            assert 0.0 <= d["auroc"] <= 1.0 and 0.0 <= d["tpr_at_1pct_fpr"] <= 1.0
    assert figures["overall"]["prompts"] == 20 and figures["by_count"]["2"]["prompts"] == 4
    assert [r["image"] for r in figures["per_image"]] == [m.name for m in gr.graded_images()]
    # counted: 20 prompts x seeds generations x 2 predictions per step (1 step here), and first-step scoring of the
    # 20 graded and the novel prompts with 1 and 4 noises (2 predictions each)
    assert figures["unet_evals"] == 20 * seeds * 2 + (20 + novel) * (1 + 4) * 2


def test_evaluate_graded_on_v5_reports_every_count_and_the_control(one_thread):
    from dejaguard.core.testbed.evaluate import evaluate_graded

    v5 = load_denoiser(None, device="cpu")
    with pytest.raises(DejaGuardError, match="novel"):
        evaluate_graded(v5, novel_count=0, progress=False)
    with pytest.raises(DejaGuardError, match="seed"):
        evaluate_graded(v5, seeds=(), progress=False)
    result = evaluate_graded(v5, v5, seeds=(0,), novel_count=3, num_inference_steps=1, progress=False)
    assert result["counts"] == list(gr.GRADED_COUNTS) and result["novel_prompts"] == 3
    assert set(result) >= {"variant", "v5", "detection_settings", "images"}
    for figures in (result["variant"], result["v5"]):
        _check_figures(figures, seeds=1, novel=3)
    # the same model twice, the same seeds: the same figures (scores do not depend on batching)
    assert result["variant"]["per_image"] == result["v5"]["per_image"]


def test_cli_evaluates_the_graded_part_alone(tmp_path, one_thread, capsys):
    from dejaguard.core.cli import main

    out = tmp_path / "graded.json"
    # v5's folder as the "variant": the graded part needs no planted ground truth
    rc = main(["testbed", "evaluate", "--planted", "--model", str(BUNDLED_TESTBED), "--device", "cpu", "--parts",
               "graded", "--seeds", "1", "--sampling-steps", "1", "--novel", "2", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert set(result) == {"settings", "graded"}
    assert len(result["settings"]["judged_against"]) == 38
    _check_figures(result["graded"]["variant"], seeds=1, novel=2)
    _check_figures(result["graded"]["v5"], seeds=1, novel=2)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 * (len(gr.GRADED_COUNTS) + 1)  # header, then every count and "all" per model
    assert main(["testbed", "evaluate", "--planted", "--parts", "graded", "--novel", "0"]) == 2
    assert "novel" in capsys.readouterr().err

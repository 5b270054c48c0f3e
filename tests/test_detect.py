"""First-step detection on the bundled testbed (Wen et al. score through the denoiser seam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dejaguard.core.calibration import resolve_threshold
from dejaguard.core.detect import ScoreSettings, first_step_scores
from dejaguard.core.errors import DejaGuardError, NonFiniteError
from dejaguard.core.metrics import auroc


def test_score_separates_memorized_from_novel(testbed, testbed_prompts):
    memorized, novel = testbed_prompts
    scores = first_step_scores(testbed, memorized + novel)
    values = [r.score for r in scores]
    labels = [1] * len(memorized) + [0] * len(novel)
    assert auroc(values, labels) >= 0.95
    assert np.median(values[: len(memorized)]) > 1.5 * np.median(values[len(memorized):])


def test_bundled_threshold_controls_false_positives(testbed, testbed_prompts):
    """The shipped threshold sits at the 99th percentile of 200 calibration prompts: held-out novel
    prompts are rarely flagged, and memorized prompts are flagged far more often. (Measured on the
    240 held-out prompts: 5.4%, not 1%, flagged: their bare phrasing scores higher than the mixed
    phrasings of the calibration set; see the model card.)"""
    memorized, novel = testbed_prompts
    threshold, _ = resolve_threshold(None, None, ScoreSettings(), testbed.fingerprint())
    scores = first_step_scores(testbed, memorized + novel, threshold=threshold)
    assert all(r.flagged == (r.score > threshold) for r in scores)
    mem_rate = np.mean([r.flagged for r in scores[: len(memorized)]])
    novel_rate = np.mean([r.flagged for r in scores[len(memorized):]])
    assert novel_rate <= 3 / 24 and mem_rate >= novel_rate + 0.5


def test_batched_score_equals_per_prompt_score(testbed, testbed_prompts):
    memorized, novel = testbed_prompts
    prompts = memorized[:3] + novel[:3]
    batched = [r.score for r in first_step_scores(testbed, prompts, batch_size=6)]
    single = [first_step_scores(testbed, [p])[0].score for p in prompts]
    shuffled = {r.prompt: r.score for r in first_step_scores(testbed, prompts[::-1], batch_size=4)}
    np.testing.assert_allclose(batched, single, rtol=1e-4)
    np.testing.assert_allclose(batched, [shuffled[p] for p in prompts], rtol=1e-4)


def test_one_batched_unet_call_per_step(testbed, testbed_prompts):
    prompts = testbed_prompts[1][:5]
    for steps, generations in [(1, 1), (3, 2)]:
        before = testbed.counter.snapshot()
        results = first_step_scores(testbed, prompts, ScoreSettings(steps, generations), batch_size=64)
        spent = testbed.counter.since(before)
        assert spent.calls == steps  # cond and uncond of every prompt and generation stacked
        assert spent.forwards == 2 * steps * generations * len(prompts)
        assert all(r.unet_evals == 2 * steps * generations for r in results)
        assert sum(r.unet_calls for r in results) == pytest.approx(steps)


def test_generations_and_steps_average(testbed, testbed_prompts):
    prompt = testbed_prompts[0][0]
    r = first_step_scores(testbed, [prompt], ScoreSettings(1, 3))[0]
    assert len(r.generation_scores) == 3 and len(set(r.seeds)) == 3
    assert r.score == pytest.approx(np.mean(r.generation_scores))
    assert first_step_scores(testbed, [prompt], seed=5)[0].seeds == [5]


def test_empty_prompt_is_refused(testbed):
    for bad in ([], [""], ["a red circle and a blue square", "   "]):
        with pytest.raises(DejaGuardError):
            first_step_scores(testbed, bad)


def test_long_prompt_warns_and_truncates(testbed):
    long = "a red circle and a blue square " * 20
    with pytest.warns(UserWarning, match="truncated to 77"):
        r = first_step_scores(testbed, [long], seed=0)[0]
    truncated = testbed.tokenizer.decode(testbed.tokenize([long])[0], skip_special_tokens=True)
    assert r.score == pytest.approx(first_step_scores(testbed, [truncated], seed=0)[0].score, rel=1e-4)


def test_nan_output_is_a_clear_error(testbed, monkeypatch):
    original = testbed.unet.forward

    def broken(*args, **kwargs):
        out = original(*args, **kwargs)
        out.sample[:] = torch.nan
        return out

    monkeypatch.setattr(testbed.unet, "forward", broken)
    with pytest.raises(NonFiniteError, match="NaN"):
        first_step_scores(testbed, ["a red circle and a blue square"])


def test_bad_settings():
    with pytest.raises(DejaGuardError):
        ScoreSettings(steps=0)
    with pytest.raises(DejaGuardError):
        ScoreSettings(steps=60, num_inference_steps=50)


def test_sampling_input_errors_are_dejaguard_errors(testbed):
    """Bad input to core.sampling is a DejaGuardError (one line and exit 2 in the CLI), not a ValueError traceback
    (on main: "one seed per prompt" and diffusers' "cannot be larger than ... train_timesteps" escaped as
    ValueError)."""
    from dejaguard.core.sampling import generate, guided_denoise, initial_noise

    with pytest.raises(DejaGuardError, match="one seed per prompt"):
        generate(testbed, ["a red circle", "a blue square"], [0], num_inference_steps=1)
    with pytest.raises(DejaGuardError, match="one conditional embedding"):
        generate(testbed, ["a red circle"], [0], num_inference_steps=1,
                 cond_embeddings=testbed.encode_prompts(["a", "b"]))
    cond, uncond = testbed.encode_prompts(["a red circle"]), testbed.encode_prompts([""])
    with pytest.raises(DejaGuardError, match="2000 sampling steps"):
        guided_denoise(testbed, initial_noise(testbed, [0]), cond, uncond, num_inference_steps=2000, stop_after=1)
    with pytest.raises(DejaGuardError, match="2000 sampling steps"):
        first_step_scores(testbed, ["a red circle"], ScoreSettings(num_inference_steps=2000))

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


# -- score options (issue 26 section 2): the anisotropy score of Asthana & Belagiannis from the same two predictions


def test_alignment_term_on_constructed_vectors():
    """The angle term: per-position cosine over channels between eps_u and d = eps_c - eps_u, averaged over
    positions. Constructed so each position's cosine is known: parallel (+1), antiparallel (-1), orthogonal (0)."""
    from dejaguard.core.detect import guidance_alignment

    eps_u = torch.zeros(3, 2, 1, 2)
    eps_u[:, 0] = 1.0  # eps_u = e0 at every position
    d = torch.zeros(3, 2, 1, 2)
    d[0, 0] = 3.0  # parallel everywhere: +1
    d[1, 0] = -0.5  # antiparallel everywhere: -1
    d[2, 0, 0, 0], d[2, 1, 0, 1] = 2.0, 5.0  # one position parallel (+1), one orthogonal (0): mean 0.5
    got = guidance_alignment(eps_u + d, eps_u)
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0, 0.5]))
    # Scale-free in both vectors, and the cosine runs over channels, not over the flattened sample.
    torch.testing.assert_close(guidance_alignment(7 * (eps_u + d), 7 * eps_u), got)
    flat = torch.nn.functional.cosine_similarity(eps_u.flatten(1), d.flatten(1), dim=1)
    assert not torch.allclose(flat[2], got[2])


def test_anisotropy_score_is_norm_plus_twice_alignment():
    from dejaguard.core.detect import ANISOTROPY, MAGNITUDE, guidance_alignment, prediction_scores
    from dejaguard.core.sampling import text_conditional_magnitude

    gen = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    norm = (eps_c - eps_u).flatten(1).norm(dim=1)
    assert torch.equal(prediction_scores(eps_c, eps_u, MAGNITUDE), text_conditional_magnitude(eps_c, eps_u))
    torch.testing.assert_close(prediction_scores(eps_c, eps_u, ANISOTROPY),
                               norm + 2.0 * guidance_alignment(eps_c, eps_u))
    # Pointing the guidance direction along eps_u raises the score at an equal norm; against it lowers it.
    along = eps_u * (norm / eps_u.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    high = prediction_scores(eps_u + along, eps_u, ANISOTROPY)
    low = prediction_scores(eps_u - along, eps_u, ANISOTROPY)
    torch.testing.assert_close(high, norm + 2.0)
    torch.testing.assert_close(low, norm - 2.0)
    with pytest.raises(DejaGuardError, match="unknown score"):
        prediction_scores(eps_c, eps_u, "sharpness")


def test_default_key_unchanged_and_option_keyed():
    """Every calibration key made before the option existed still names the magnitude score; the anisotropy
    option has keys of its own, and an unknown option is refused."""
    assert ScoreSettings().key() == "steps=1,generations=1,cfg=7.5,schedule=50"
    assert ScoreSettings(1, 4, score="magnitude").key() == "steps=1,generations=4,cfg=7.5,schedule=50"
    assert ScoreSettings(score="anisotropy").key() == "steps=1,generations=1,cfg=7.5,schedule=50,score=anisotropy"
    with pytest.raises(DejaGuardError, match="unknown score"):
        ScoreSettings(score="Anisotropy")


def test_zero_unconditional_is_keyed_and_scores_against_zeros(testbed):
    """``unconditional="zeros"`` (the WebUIs' empty SDXL negative prompt) has keys of its own, and its scores are
    the magnitude against a zero conditioning of the empty prompt's shape: computed by hand here from the same
    noise; an unknown unconditional is refused."""
    from dejaguard.core.sampling import (
        initial_noise,
        new_schedule,
        text_conditional_magnitude,
        unconditional_embedding,
    )

    zeros = ScoreSettings(unconditional="zeros")
    assert zeros.key() == "steps=1,generations=1,cfg=7.5,schedule=50,uncond=zeros"
    assert ScoreSettings(score="anisotropy", unconditional="zeros").key().endswith(",score=anisotropy,uncond=zeros")
    with pytest.raises(DejaGuardError, match="unknown unconditional"):
        ScoreSettings(unconditional="none")
    prompt = "a red cube on a table"
    empty = testbed.encode_prompts([""])
    assert torch.equal(unconditional_embedding(testbed, "empty"), empty)
    assert torch.equal(unconditional_embedding(testbed, "zeros"), torch.zeros_like(empty))
    with pytest.raises(DejaGuardError, match="unknown unconditional"):
        unconditional_embedding(testbed, "none")
    got = first_step_scores(testbed, [prompt], zeros, seed=3)[0].score
    default = first_step_scores(testbed, [prompt], ScoreSettings(), seed=3)[0].score
    schedule = new_schedule(testbed, zeros.num_inference_steps)
    x = initial_noise(testbed, [3]) * schedule.init_noise_sigma
    t = schedule.timesteps[0]
    with torch.no_grad():
        eps = testbed.predict_noise(torch.cat([x, x]), t, torch.cat([testbed.encode_prompts([prompt]),
                                                                      torch.zeros_like(empty)]))
    expected = float(text_conditional_magnitude(eps[:1], eps[1:]))
    assert got == pytest.approx(expected, rel=1e-5) and abs(got - default) > 1e-3 * default


def test_bundled_calibrations_found_per_score(testbed):
    """The shipped magnitude thresholds are still found under their old keys; the anisotropy ones under theirs,
    and the two differ (a score's threshold never serves the other)."""
    fp = testbed.fingerprint()
    for generations in (1, 4):
        magnitude, _ = resolve_threshold(None, None, ScoreSettings(1, generations), fp)
        aniso, source = resolve_threshold(None, None, ScoreSettings(1, generations, score="anisotropy"), fp)
        assert source == "testbed calibration" and aniso != magnitude
    assert resolve_threshold(None, None, ScoreSettings(), fp)[0] == pytest.approx(0.960150957107544)


def test_magnitude_scores_unchanged_by_the_option(testbed, testbed_prompts):
    """The default score equals guided_denoise's recorded magnitude to the bit (first step and multi-step), and
    the anisotropy option spends exactly the same UNet calls and evaluations."""
    from dejaguard.core.sampling import guided_denoise, initial_noise, prompt_seed

    prompts = testbed_prompts[0][:2] + testbed_prompts[1][:2]
    cond, uncond = testbed.encode_prompts(prompts), testbed.encode_prompts([""])
    noise = initial_noise(testbed, [prompt_seed(p) for p in prompts])
    for steps in (1, 3):
        _, mags = guided_denoise(testbed, noise, cond, uncond, stop_after=steps)
        got = [r.score for r in first_step_scores(testbed, prompts, ScoreSettings(steps=steps))]
        assert got == [float(v) for v in mags.mean(dim=1).double()]
        before = testbed.counter.snapshot()
        first_step_scores(testbed, prompts, ScoreSettings(steps=steps, score="anisotropy"), batch_size=64)
        spent = testbed.counter.since(before)
        assert (spent.calls, spent.forwards) == (steps, 2 * steps * len(prompts))


def test_anisotropy_score_on_the_testbed(testbed, testbed_prompts):
    """first_step_scores with the option is prediction_scores of the first step's own pair, averaged over
    generations as for the magnitude; it still separates memorized from novel prompts."""
    from dejaguard.core.detect import prediction_scores
    from dejaguard.core.sampling import guided_step, initial_noise, new_schedule, prompt_seed

    memorized, novel = testbed_prompts
    settings = ScoreSettings(score="anisotropy")
    results = first_step_scores(testbed, memorized + novel, settings)
    assert auroc([r.score for r in results], [1] * len(memorized) + [0] * len(novel)) >= 0.9
    prompt = memorized[0]
    scheduler = new_schedule(testbed)
    step = guided_step(testbed, scheduler, initial_noise(testbed, [prompt_seed(prompt)]) * scheduler.init_noise_sigma,
                       scheduler.timesteps[0], testbed.encode_prompts([prompt]), testbed.encode_prompts([""]),
                       advance=False)
    expected = float(prediction_scores(step.eps_cond, step.eps_uncond, "anisotropy")[0])
    assert results[0].score == pytest.approx(expected, rel=1e-5)
    two = first_step_scores(testbed, [prompt], ScoreSettings(1, 2, score="anisotropy"))[0]
    assert two.score == pytest.approx(np.mean(two.generation_scores))

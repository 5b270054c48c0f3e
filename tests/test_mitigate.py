"""Embedding mitigation and the training-time loss filter on the testbed (properties, not figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dejaguard.core.cli import main
from dejaguard.core.detect import first_step_scores
from dejaguard.core.errors import DejaGuardError, NonFiniteError
from dejaguard.core.loss_filter import LossFilter, conditional_magnitudes
from dejaguard.core.mitigate import DEFAULT_MAX_ITERATIONS, mitigate_embedding, mitigate_prompt
from dejaguard.core.sampling import generate, initial_noise, text_conditional_magnitude
from dejaguard.core.testbed.data import MEMORIZED

MEMORIZED_PROMPT = next(m for m in MEMORIZED if m.kind == "verbatim").eval_prompts[0]
NOVEL_PROMPT = "a red circle and a blue square"


def test_below_target_is_untouched(testbed):
    """Target already met: zero iterations, the same tensor object back, one batched UNet call (the detector's),
    and score_before is exactly the detector's first-step score for that seed."""
    cond = testbed.encode_prompts([NOVEL_PROMPT])
    copy = cond.clone()
    before = testbed.counter.snapshot()
    r = mitigate_embedding(testbed, cond, initial_noise(testbed, [3]), target=1e6)
    spent = testbed.counter.since(before)
    assert r.iterations == 0 and r.embedding is cond and torch.equal(cond, copy)
    assert r.score_before == r.score_after and r.reached
    assert (spent.calls, spent.forwards, spent.backwards) == (1, 2, 0) == (1, r.unet_forwards, r.unet_backwards)
    (detector,) = first_step_scores(testbed, [NOVEL_PROMPT], seed=3)
    assert r.score_before == pytest.approx(detector.score, rel=1e-6)


def test_lowers_score_to_target(testbed):
    """A memorized prompt driven to half its score: the target is met within the iteration budget, the input
    is not modified, and every UNet pass is counted."""
    seed = 0
    (start,) = first_step_scores(testbed, [MEMORIZED_PROMPT], seed=seed)
    cond = testbed.encode_prompts([MEMORIZED_PROMPT])
    copy = cond.clone()
    r = mitigate_embedding(testbed, cond, initial_noise(testbed, [seed]), target=0.5 * start.score)
    assert torch.equal(cond, copy) and r.embedding is not cond
    assert 1 <= r.iterations <= DEFAULT_MAX_ITERATIONS and len(r.scores) == r.iterations + 1
    assert r.reached, r.scores
    assert r.score_after < r.score_before
    # one batched cond+uncond call, then one conditional forward per iterate; one backward per iteration
    assert (r.unet_forwards, r.unet_backwards) == (2 + r.iterations + 1, r.iterations)
    # the returned embedding really has the reported score
    with torch.no_grad():
        x = initial_noise(testbed, [seed])
        eps = testbed.predict_noise(torch.cat([x, x]), 999, torch.cat([testbed.encode_prompts([""]), r.embedding]))
    assert float(text_conditional_magnitude(eps[1:], eps[:1])) == pytest.approx(r.score_after, rel=1e-4)


def test_prompt_api_and_generate_with_embedding(testbed):
    r = mitigate_prompt(testbed, NOVEL_PROMPT, [5], target=1e6)
    assert r.iterations == 0 and r.prompt == NOVEL_PROMPT and r.seeds == [5]
    json.dumps(r.summary())
    plain = generate(testbed, [NOVEL_PROMPT], [5], num_inference_steps=2)
    same = generate(testbed, [NOVEL_PROMPT], [5], num_inference_steps=2, cond_embeddings=r.embedding)
    assert torch.equal(plain, same)


def test_bad_input(testbed):
    for prompt in ("", "   ", "<|endoftext|>", "<|startoftext|> <|endoftext|>"):
        with pytest.raises(DejaGuardError, match="empty prompt|special"):
            mitigate_prompt(testbed, prompt, [0], target=1.0)
    cond = testbed.encode_prompts([NOVEL_PROMPT])
    with pytest.raises(DejaGuardError):
        mitigate_embedding(testbed, cond, initial_noise(testbed, [0]), target=float("nan"))
    with pytest.raises(DejaGuardError):
        mitigate_embedding(testbed, torch.cat([cond, cond]), initial_noise(testbed, [0]), target=1.0)
    with pytest.raises(DejaGuardError):
        mitigate_prompt(testbed, NOVEL_PROMPT, [], target=1.0)


class NaNDenoiser:
    """The testbed, except that predictions on the gradient path (``when="grad"``) or all of them are NaN."""

    def __init__(self, inner, when: str = "grad") -> None:
        self.inner, self.when = inner, when

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict_noise(self, samples, timestep, text_embeddings):
        self.inner.counter.forwards += samples.shape[0]
        eps = self.inner.unet(samples, timestep, encoder_hidden_states=text_embeddings).sample
        if self.when == "all" or text_embeddings.requires_grad:
            eps = eps * float("nan")
        return eps


@pytest.mark.parametrize("when", ["grad", "all"])
def test_nan_during_optimization_is_a_clear_error(testbed, when):
    cond = testbed.encode_prompts([MEMORIZED_PROMPT])
    copy = cond.clone()
    with pytest.raises(NonFiniteError, match="NaN or infinite.*unchanged"):
        mitigate_embedding(NaNDenoiser(testbed, when), cond, initial_noise(testbed, [0]), target=1e-3)
    assert torch.equal(cond, copy)


def test_loss_filter_keeps_low_magnitudes():
    f = LossFilter(threshold=1.0)
    keep = f.keep(torch.tensor([0.5, 1.0, 1.5, float("nan")]), ["novel", "novel", "memorized", "memorized"])
    assert keep.tolist() == [True, True, False, False]
    assert (f.seen, f.dropped) == (4, 2) and f.by_group["memorized"] == {"seen": 2, "dropped": 2}
    losses = torch.tensor([1.0, 3.0, 100.0, 100.0], requires_grad=True)
    loss = f.reduce(losses, keep)
    assert float(loss.detach()) == 2.0
    loss.backward()
    assert losses.grad.tolist() == [0.5, 0.5, 0.0, 0.0]
    assert float(f.reduce(losses, torch.zeros(4, dtype=torch.bool)).detach()) == 0.0
    with pytest.raises(DejaGuardError):
        LossFilter(threshold=0.0)
    late = LossFilter(threshold=1.0, min_timestep=500)
    keep = late.keep(torch.tensor([2.0, 2.0, 0.5]), timesteps=torch.tensor([100, 900, 900]))
    assert keep.tolist() == [True, False, True] and late.checked(torch.tensor([499, 500])).tolist() == [False, True]


def test_training_magnitudes_match_the_detector(testbed):
    """conditional_magnitudes (training loop) == the detector's quantity at the same latent and timestep;
    caption-dropout samples are 0 without a UNet call."""
    x = initial_noise(testbed, [0, 1])
    t = torch.tensor([999, 500])
    cond = testbed.encode_prompts([MEMORIZED_PROMPT, ""])
    uncond = testbed.encode_prompts([""])
    with torch.no_grad():
        pred = testbed.unet(x, t, encoder_hidden_states=cond).sample
        mags = conditional_magnitudes(testbed.unet, x, t, pred, uncond, torch.tensor([True, False]))
        ref = text_conditional_magnitude(pred[:1], testbed.unet(x[:1], t[:1], encoder_hidden_states=uncond).sample)
    assert float(mags[1]) == 0.0
    assert float(mags[0]) == pytest.approx(float(ref[0]), rel=1e-5)


def test_train_with_filter(tmp_path: Path):
    """Two tiny steps of the testbed recipe with a filter that drops every captioned sample: the record says so.
    (The filter-off path is the shipped recipe, unchanged.)"""
    from dejaguard.core.testbed.train import TrainConfig, train

    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, threads=1, filter_threshold=1e-9,
                      block_out_channels=(16, 16, 32, 32), text_hidden=32, text_layers=1)
    record = train(tmp_path / "m", cfg, progress=False)
    stats = record["loss_filter"]
    assert stats["seen"] == 8 and stats["threshold"] == 1e-9
    groups = stats["by_group"]
    captioned = sum(v["seen"] for k, v in groups.items() if k != "uncond")
    assert stats["dropped"] == captioned and groups.get("uncond", {"dropped": 0})["dropped"] == 0
    assert json.loads((tmp_path / "m" / "training.json").read_text())["config"]["filter_threshold"] == 1e-9


def test_cli_generate_mitigate(tmp_path: Path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--prompt", MEMORIZED_PROMPT, "--mitigate", "embedding", "--steps", "2",
                 "--target", "1e6", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "0 iterations" in text and out.is_file() and out.stat().st_size > 0
    assert main(["generate", "--prompt", " ", "--out", str(out), "--device", "cpu"]) == 2
    assert "empty prompt" in capsys.readouterr().err
    # more steps than the model's schedule: a one-line error (exit 2), not diffusers' ValueError traceback
    for extra in ([], ["--mitigate", "embedding", "--target", "1e6"]):
        assert main(["generate", "--prompt", MEMORIZED_PROMPT, "--steps", "2000", "--out", str(out),
                     "--device", "cpu", *extra]) == 2
        assert "2000 sampling steps" in capsys.readouterr().err


def test_threshold_and_target_levels(testbed):
    """Two levels: a prompt at or below ``threshold`` is untouched even if above ``target``; threshold < target is
    refused. The default levels come from the model's calibration (detection threshold, non-memorized median)."""
    from dejaguard.core.calibration import resolve_levels
    from dejaguard.core.denoiser import BUNDLED_TESTBED

    r = mitigate_prompt(testbed, NOVEL_PROMPT, [0], target=1e-6, threshold=1e6)
    assert r.iterations == 0 and r.reached and r.threshold == 1e6
    with pytest.raises(DejaGuardError, match="threshold"):
        mitigate_prompt(testbed, NOVEL_PROMPT, [0], target=2.0, threshold=1.0)
    if (BUNDLED_TESTBED / "dejaguard_calibration.json").is_file():
        threshold, target, _ = resolve_levels(None, None, None, testbed.fingerprint())
        assert 0 < target <= threshold


def test_trajectory_lowers_the_trajectory_score(testbed):
    """trajectory_steps=K of an N-step schedule: iterate 0's score is the detector's ScoreSettings(steps=K,
    num_inference_steps=N) score, the score falls, the returned embedding really has the reported score, the input
    is not modified, and every UNet pass is counted: K batched cond+uncond calls per iterate, K conditional
    forwards with gradient per iteration."""
    from dejaguard.core.detect import ScoreSettings
    from dejaguard.core.sampling import guided_denoise

    seed, k, n = 0, 3, 10
    (start,) = first_step_scores(testbed, [MEMORIZED_PROMPT], ScoreSettings(steps=k, num_inference_steps=n),
                                 seed=seed)
    cond = testbed.encode_prompts([MEMORIZED_PROMPT])
    copy = cond.clone()
    r = mitigate_embedding(testbed, cond, initial_noise(testbed, [seed]), target=0.5 * start.score,
                           trajectory_steps=k, num_inference_steps=n, max_iterations=4, lr=0.2)
    assert r.score_before == pytest.approx(start.score, rel=1e-6)
    assert torch.equal(cond, copy) and r.embedding is not cond
    assert 1 <= r.iterations <= 4 and len(r.scores) == r.iterations + 1
    assert r.score_after < r.score_before
    assert (r.unet_forwards, r.unet_backwards) == (k * (2 + 3 * r.iterations), k * r.iterations)
    with torch.no_grad():
        _, mags = guided_denoise(testbed, initial_noise(testbed, [seed]), r.embedding, testbed.encode_prompts([""]),
                                 n, stop_after=k)
    assert float(mags.mean()) == pytest.approx(r.score_after, rel=1e-4)


def test_trajectory_below_threshold_is_untouched_and_bad_values(testbed):
    cond = testbed.encode_prompts([NOVEL_PROMPT])
    noise = initial_noise(testbed, [1])
    before = testbed.counter.snapshot()
    r = mitigate_embedding(testbed, cond, noise, target=1e6, trajectory_steps=4, num_inference_steps=10)
    spent = testbed.counter.since(before)
    assert r.iterations == 0 and r.embedding is cond and r.reached and r.score_before == r.score_after
    assert (spent.calls, spent.forwards, spent.backwards) == (4, 8, 0) == (4, r.unet_forwards, r.unet_backwards)
    for bad in ({"trajectory_steps": 0}, {"trajectory_steps": -1}, {"trajectory_steps": 11},
                {"trajectory_steps": 2, "guidance_scale": float("nan")}):
        with pytest.raises(DejaGuardError):
            mitigate_embedding(testbed, cond, noise, target=1.0, num_inference_steps=10, **bad)
    r = mitigate_prompt(testbed, NOVEL_PROMPT, [1], target=1e6, trajectory_steps=2, num_inference_steps=10)
    assert r.iterations == 0 and r.seeds == [1]
    # the threshold gates on the first-step score (the detector's default), even above the trajectory target
    mem = testbed.encode_prompts([MEMORIZED_PROMPT])
    (first,) = first_step_scores(testbed, [MEMORIZED_PROMPT], seed=1)
    r = mitigate_embedding(testbed, mem, noise, target=1e-3, threshold=first.score + 1e-3, trajectory_steps=3,
                           num_inference_steps=10)
    assert r.iterations == 0 and r.embedding is mem and r.reached and r.score_before > r.target
    assert r.first_step_score == pytest.approx(first.score, rel=1e-6)
    r = mitigate_embedding(testbed, mem, noise, target=1e-3, threshold=first.score - 1e-3, trajectory_steps=3,
                           num_inference_steps=10, max_iterations=1)
    assert r.iterations == 1 and not r.reached


def test_bench_held_out_pairs_are_disjoint_from_the_tuning_set():
    """Defect 8: the pairs that chose the mitigation defaults are written down, the headline run overlaps them in 24
    of 512 pairs, and --held-out measures on prompts and seeds that did not choose them."""
    from bench.mitigation import TUNING_PROMPTS, TUNING_SEEDS, memorized_jobs

    assert len(TUNING_PROMPTS) == 12 and len(TUNING_SEEDS) == 2
    jobs, owners = memorized_jobs(16, held_out=False)
    assert len(jobs) == 32 * 16 == len(owners)
    assert sum(p in TUNING_PROMPTS and s in TUNING_SEEDS for p, s in jobs) == 24
    held, owners = memorized_jobs(16, held_out=True)
    assert len(held) == 20 * 16 == len(owners)
    assert not {p for p, _ in held} & set(TUNING_PROMPTS) and not {s for _, s in held} & set(TUNING_SEEDS)
    assert all(p in m.eval_prompts for (p, _), m in zip(held, owners))
    assert memorized_jobs(1, held_out=True, prompts=2)[0] == [(held[0][0], 2), (held[16][0], 2)]


def test_progress_convention(testbed):
    """Every method reports progress(done, total, stage) (core.progress): mitigation per iterate, ending at total when
    it stops early; scoring, generation and explanation per unit of work."""
    from dejaguard.core.explain import token_significance

    calls = []

    def progress(done, total, stage=""):
        calls.append((done, total, stage))

    mitigate_prompt(testbed, NOVEL_PROMPT, [5], target=1e6, max_iterations=4, progress=progress)
    assert calls == [(0, 4, "mitigation"), (4, 4, "mitigation")]
    calls.clear()
    mitigate_prompt(testbed, MEMORIZED_PROMPT, [0], target=1e-6, max_iterations=2, progress=progress)
    assert calls == [(0, 2, "mitigation"), (1, 2, "mitigation"), (2, 2, "mitigation")]
    calls.clear()
    first_step_scores(testbed, [NOVEL_PROMPT, MEMORIZED_PROMPT], batch_size=1, progress=progress)
    assert calls == [(0, 2, "scoring"), (1, 2, "scoring"), (2, 2, "scoring")]
    calls.clear()
    generate(testbed, [NOVEL_PROMPT], [0], num_inference_steps=1, progress=progress)
    assert calls == [(0, 1, "generating"), (1, 1, "generating")]
    calls.clear()
    token_significance(testbed, "kraken wallpaper", steps=2, progress=progress)
    assert calls == [(1, 2, "explain"), (2, 2, "explain")]

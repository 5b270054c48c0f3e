"""Auto-protect (core/protect.py, core.sampling's steer, ``dejaguard generate --protect``) on the bundled testbed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.protect import GuidanceSteering, ImageProtection, protected_generate
from dejaguard.core.sampling import generate, guided_step, initial_noise, new_schedule

REPO = Path(__file__).resolve().parents[1]
STEPS = 50  # the figures of the issue are at 50 DDIM steps, CFG 7.5


@pytest.fixture(scope="module")
def threshold(testbed) -> float:
    from dejaguard.core.calibration import find_calibration
    from dejaguard.core.detect import ScoreSettings

    return find_calibration(None, ScoreSettings(), testbed.fingerprint()).threshold


def test_policy_flags_at_first_step_and_exits_below_level() -> None:
    p = GuidanceSteering(threshold=1.0, exit_level=0.5, max_fraction=0.3)
    assert p.step(torch.tensor([2.0, 0.9, 3.0]), 0.98).tolist() == [True, False, True]
    assert p.flagged == [True, False, True]
    assert p.step(torch.tensor([0.4, 5.0, 2.0]), 0.9).tolist() == [False, False, True]  # image 2 never flagged
    assert p.exit_scores[0] == pytest.approx(0.4)
    assert p.step(torch.tensor([2.0, 5.0, 2.0]), 0.8).tolist() == [False, False, True]  # once out, never back in
    assert p.step(torch.tensor([2.0, 5.0, 2.0]), 0.69).tolist() == [False, False, False]  # past 30% of the schedule
    assert p.steered_steps == [1, 0, 3]
    p.reset()
    assert p.step(torch.tensor([0.1])).tolist() == [False]
    whole = GuidanceSteering(threshold=1.0, max_fraction=1.0)  # the whole run, the last step at t = 0 included
    assert [whole.step(torch.tensor([5.0]), level).tolist() for level in (0.999, 0.5, 0.0)] == [[True]] * 3
    with pytest.raises(DejaGuardError):
        GuidanceSteering(math.nan)
    recorder = GuidanceSteering(math.inf)  # flags nothing, records the first-step scores (embedding, mask)
    assert recorder.step(torch.tensor([1e6])).tolist() == [False] and recorder.first_scores == [1e6]


def test_image_protection_line() -> None:
    line = ImageProtection("p", 0, True, "guidance", 3.31, 0.96, 0.42, 12).line()
    assert line.startswith("memorized at step 1 -> steered") and "score 3.31 -> 0.42" in line
    assert "no extra UNet eval" in line
    assert ImageProtection("p", 0, False, "guidance", 0.5, 0.96).line().startswith("ok: score 0.5")


def test_steer_overwrites_only_its_rows(testbed, testbed_prompts) -> None:
    """guided_step with a steer: the named rows take their own scale, the others are bit-identical."""
    prompts = [testbed_prompts[0][0], testbed_prompts[1][0]]
    cond, uncond = testbed.encode_prompts(prompts), testbed.encode_prompts([""])
    x0 = initial_noise(testbed, [1, 2])
    outs = []
    for steer in (None, lambda c, u, level: (torch.tensor([True, False]), torch.tensor([0.0, 99.0]))):
        sch = new_schedule(testbed, 10)
        x = x0 * sch.init_noise_sigma
        outs.append(guided_step(testbed, sch, x, sch.timesteps[0], cond, uncond, steer=steer))
    plain, steered = outs
    assert torch.equal(plain.sample[1], steered.sample[1])
    sch = new_schedule(testbed, 10)
    unguided = sch.step(plain.eps_uncond[:1], sch.timesteps[0], x0[:1] * sch.init_noise_sigma).prev_sample
    assert torch.allclose(steered.sample[:1], unguided, atol=1e-6)
    assert not torch.allclose(plain.sample[0], steered.sample[0])


def test_guidance_protection_is_free_and_leaves_unflagged_images_bit_identical(testbed, testbed_prompts,
                                                                              threshold) -> None:
    """A batch of a memorized and two novel prompts: the novel images equal the unguarded run's bit for bit, the
    memorized one is flagged and steered, and the protected run spends exactly the plain run's UNet evaluations."""
    prompts = [testbed_prompts[1][0], testbed_prompts[0][1], testbed_prompts[1][1]]
    seeds = [3, 4, 5]
    before = testbed.counter.snapshot()
    plain = generate(testbed, prompts, seeds, 10)
    plain_cost = testbed.counter.since(before)
    before = testbed.counter.snapshot()
    result = protected_generate(testbed, prompts, seeds, threshold, "guidance", 10)
    protected_cost = testbed.counter.since(before)
    assert protected_cost.forwards == plain_cost.forwards == 2 * 10 * 3
    assert protected_cost.calls == plain_cost.calls
    assert [i.flagged for i in result.images] == [False, True, False]
    assert torch.equal(result.samples[0], plain[0]) and torch.equal(result.samples[2], plain[2])
    assert not torch.equal(result.samples[1], plain[1])
    memorized = result.images[1]
    assert memorized.steered_steps > 0 and memorized.extra_unet_evals == 0
    assert all(i.extra_unet_evals == 0 and i.steered_steps == 0 for i in (result.images[0], result.images[2]))


def test_guidance_protection_stops_replication(testbed, testbed_prompts, threshold) -> None:
    """Memorized testbed prompts (one verbatim, one template, one trigger) x 2 seeds, 50 DDIM steps at CFG 7.5:
    every plain generation replicates a training image, no protected one does."""
    from dejaguard.core.testbed.data import MEMORIZED, load_memorized_images
    from dejaguard.core.testbed.evaluate import check_replication, thumbnails

    chosen = [next(m for m in MEMORIZED if m.kind == k) for k in ("verbatim", "template", "trigger")]
    prompts = [m.eval_prompts[-1] for m in chosen for _ in range(2)]
    names = [m.name for m in chosen for _ in range(2)]
    seeds = [10, 11] * len(chosen)
    training = load_memorized_images()
    plain = check_replication(thumbnails(testbed, generate(testbed, prompts, seeds, STEPS)), names, training)
    result = protected_generate(testbed, prompts, seeds, threshold, "guidance", STEPS)
    protected = check_replication(thumbnails(testbed, result.samples), names, training)
    assert all(c.any for c in plain)
    assert all(i.flagged for i in result.images)
    assert not any(c.any for c in protected), [c.nearest for c in protected]


def test_unknown_strategy_and_missing_mask(testbed) -> None:
    with pytest.raises(DejaGuardError, match="unknown protection strategy"):
        protected_generate(testbed, ["a red circle"], [0], 1.0, "pray")
    with pytest.raises(DejaGuardError, match="needs a neuron mask"):
        protected_generate(testbed, ["a red circle"], [0], 1.0, "mask")


def test_cli_generate_protect(tmp_path, testbed_prompts) -> None:
    out = tmp_path / "x.png"
    proc = subprocess.run([sys.executable, "-m", "dejaguard", "generate", "--prompt", testbed_prompts[0][0],
                           "--out", str(out), "--steps", "10", "--protect", "guidance"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "protect (guidance): flagged" in proc.stdout and "memorized at step 1 -> steered" in proc.stdout
    assert "extra UNet evals 0" in proc.stdout and out.is_file()
    proc = subprocess.run([sys.executable, "-m", "dejaguard", "generate", "--prompt", "a red circle", "--out",
                           str(out), "--protect", "guidance", "--mitigate", "embedding"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "two ways to do one thing" in proc.stderr


def test_embedding_protection_resamples_flagged_images_only(testbed, testbed_prompts, threshold) -> None:
    """The embedding strategy through :func:`core.protect.protect`'s library sampler: the novel image is the plain
    run's bit for bit at no cost; the memorized one is re-sampled from its own noise with a mitigated embedding,
    its first-step score below the threshold, the optimization and the new generation counted."""
    from dejaguard.core.calibration import resolve_levels

    prompts, seeds = [testbed_prompts[0][1], testbed_prompts[1][0]], [4, 3]
    target = resolve_levels(None, None, None, testbed.fingerprint()).target
    plain = generate(testbed, prompts, seeds, 10)
    result = protected_generate(testbed, prompts, seeds, threshold, "embedding", 10, target=target)
    memorized, novel = result.images
    assert memorized.flagged and not novel.flagged
    assert torch.equal(result.samples[1], plain[1]) and novel.extra_unet_evals == 0
    assert not torch.equal(result.samples[0], plain[0])
    assert memorized.score_after < threshold < memorized.score_before
    assert memorized.extra_unet_evals > 2 * 10  # the optimization plus one 10-step generation


def test_bench_fidelity_measures() -> None:
    """bench.protect's colour-histogram intersection: 1 for the same colours, 0 for disjoint ones."""
    import numpy as np
    from dejaguard.bench.protect import colour_intersection

    red = np.stack([np.ones((4, 4)), -np.ones((4, 4)), -np.ones((4, 4))])
    assert colour_intersection(red, red) == pytest.approx(1.0)
    assert colour_intersection(red, -red) == 0.0
    assert colour_intersection(red, np.concatenate([red[:, :2], -red[:, 2:]], axis=1)) == pytest.approx(0.5)

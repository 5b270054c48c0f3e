"""Memorization detection from the first sampling step (Wen et al., ICLR 2024).

Score of a prompt: ``||eps(x_T, c) - eps(x_T, 0)||_2`` at the first sampling step, optionally
averaged over the first ``steps`` steps of guided sampling and over ``generations`` initial
noises. With classifier-free guidance the two predictions come from one batched UNet call, so
first-step detection costs one call per prompt and generation.

Thresholds are calibrated on prompts known not to be memorized: the threshold is the
``1 - target_fpr`` quantile of their scores, stored per model and per scoring setting in a JSON
file beside the model (``dejaguard_calibration.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .denoiser import Denoiser
from .errors import DejaGuardError, NonFiniteError
from .progress import Progress, report
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, guided_denoise, initial_noise, prompt_seed


@dataclass(frozen=True)
class ScoreSettings:
    """How a score is computed. Thresholds are only comparable between equal settings."""

    steps: int = 1  # first k sampling steps averaged
    generations: int = 1  # initial noises averaged
    guidance_scale: float = DEFAULT_GUIDANCE  # steers the trajectory when steps > 1
    num_inference_steps: int = DEFAULT_STEPS  # the sampling schedule the steps are taken from

    def __post_init__(self) -> None:
        if self.steps < 1 or self.generations < 1:
            raise DejaGuardError("steps and generations must be at least 1")
        if self.steps > self.num_inference_steps:
            raise DejaGuardError(f"steps ({self.steps}) exceeds the sampling schedule ({self.num_inference_steps})")

    def key(self) -> str:
        return (f"steps={self.steps},generations={self.generations},"
                f"cfg={self.guidance_scale:g},schedule={self.num_inference_steps}")


@dataclass
class PromptScore:
    """Detection result for one prompt."""

    prompt: str
    score: float  # mean over generations of the mean over steps
    generation_scores: list[float]
    seeds: list[int]
    unet_evals: int  # noise predictions spent on this prompt (a cond/uncond pair counts 2)
    unet_calls: float  # batched UNet calls attributed to this prompt (shared calls split evenly)
    flagged: bool | None = None
    threshold: float | None = None


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise DejaGuardError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DejaGuardError(f"prompt {i + 1} is empty: the unconditional prediction has nothing to contrast")
    return prompts


def first_step_scores(
    denoiser: Denoiser,
    prompts: Sequence[str],
    settings: ScoreSettings | None = None,
    seed: int | None = None,
    batch_size: int = 32,
    threshold: float | None = None,
    progress: Progress | None = None,
) -> list[PromptScore]:
    """Score each prompt. The one scoring function of the nodes, CLI and benchmarks.

    Seeds: generation ``g`` of a prompt uses ``seed + g`` if ``seed`` is given, else a seed
    derived from the prompt text (:func:`prompt_seed`), so a score never depends on batching.
    ``batch_size`` counts (prompt, generation) pairs per UNet call (each call holds twice as
    many samples: unconditional and conditional). Each result's ``unet_evals`` counts its noise
    predictions (``2 x steps x generations``), ``unet_calls`` its share of the batched calls.
    ``progress(done, total, "scoring")`` counts finished (prompt, generation) pairs.
    """
    settings = settings or ScoreSettings()
    prompts = _check_prompts(prompts)
    jobs = [(i, g) for i in range(len(prompts)) for g in range(settings.generations)]
    seeds = {(i, g): (seed + g if seed is not None else prompt_seed(prompts[i], g)) for i, g in jobs}
    uncond = denoiser.encode_prompts([""])
    per_job: dict[tuple[int, int], float] = {}
    calls = np.zeros(len(prompts))
    report(progress, 0, len(jobs), "scoring")
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            before = denoiser.counter.calls
            cond = denoiser.encode_prompts([prompts[i] for i, _ in chunk])
            noise = initial_noise(denoiser, [seeds[j] for j in chunk])
            _, mags = guided_denoise(denoiser, noise, cond, uncond, settings.num_inference_steps,
                                     settings.guidance_scale, stop_after=settings.steps)
            spent = denoiser.counter.calls - before
            scores = mags.mean(dim=1).double().cpu().numpy()
            if not np.isfinite(scores).all():
                raise NonFiniteError("a memorization score is NaN or infinite")
            for j, s in zip(chunk, scores):
                per_job[j] = float(s)
                calls[j[0]] += spent / len(chunk)
            report(progress, start + len(chunk), len(jobs), "scoring")
    results = []
    for i, p in enumerate(prompts):
        gen_scores = [per_job[(i, g)] for g in range(settings.generations)]
        score = float(np.mean(gen_scores))
        results.append(PromptScore(
            prompt=p, score=score, generation_scores=gen_scores,
            seeds=[seeds[(i, g)] for g in range(settings.generations)],
            unet_evals=2 * settings.steps * settings.generations, unet_calls=float(calls[i]),
            flagged=None if threshold is None else bool(score > threshold), threshold=threshold,
        ))
    return results

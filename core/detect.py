"""Memorization detection from the first sampling step, from the two predictions CFG computes anyway.

Every score here is read from the conditional and unconditional predictions on the same sample, ``eps_c =
eps(x_t, c)`` and ``eps_u = eps(x_t, empty)`` ``(B, C, H, W)``, at the first sampling step (``x_T``, pure noise)
and optionally the next ``steps - 1`` steps of guided sampling. With classifier-free guidance both come from
one batched UNet call, so each score costs one call per prompt and generation, and every score option costs
the same: they differ only in what they compute from the same two tensors (:func:`prediction_scores`).

Score options (``ScoreSettings.score``):

- ``"magnitude"`` (default; Wen et al., ICLR 2024): ``||d||_2`` with ``d = eps_c - eps_u``, the norm of the
  guidance direction. A memorized prompt pulls the prediction far from the unconditional one from the very
  first step, so its text-conditional noise is large.
- ``"anisotropy"`` (Asthana & Belagiannis, ICLR 2026): ``||d||_2 + 2 * a``, where the *alignment*
  ``a = mean over positions (h, w) of cos(eps_u[:, :, h, w], d[:, :, h, w])`` is the cosine over the latent
  channels between the unconditional prediction and the guidance direction, averaged over the ``H x W``
  positions (in ``[-1, 1]``). Why: the norm measures the curvature of the log-probability only when that is
  isotropic; where it is not, a memorized prompt shows as a guidance direction that points along the
  unconditional score rather than as a large one. The weights (1 for the norm, 2 for the alignment) are the
  authors' Stable Diffusion 1.x setting (they use 0.1 for the alignment on SD2); the norm grows with the
  latent size and the alignment does not, so the mix of the two terms differs between models and resolutions
  (on the testbed, 4x32x32 latents, non-memorized prompts' medians are about 0.5 for the norm and 0.7 for the
  anisotropy score). One difference, for zero cost: the authors' code reads the alignment from a second
  cond/uncond pair, the same ``x_T`` fed at a low-noise timestep (the third-last of a 50-step DDIM schedule),
  i.e. two more noise predictions; here it is read from the first step's own pair, the one the magnitude
  already uses and the ComfyUI Guard already has, so the option costs nothing extra and the Guard can compute
  it inside any sampler.

Both are computed per step and averaged over the first ``steps`` steps of guided sampling and over
``generations`` initial noises, alike. Scores of different options are on different scales: thresholds are
calibrated per option (:meth:`ScoreSettings.key` names a non-default option, so each has its own entry).

The unconditional prediction (``ScoreSettings.unconditional``): ``"empty"`` (default) conditions it on the model's
encoding of the empty prompt, as the library, the CLI and ComfyUI's samplers do; ``"zeros"`` on a zero conditioning
(an SDXL model's packed hidden states and pooled vector all 0, its size conditioning kept), which is what both
Stable Diffusion WebUIs give an SDXL model for an empty negative prompt. The two give different scores, so a
threshold calibrated with one is never used for the other (the key names ``"zeros"``).

Thresholds are calibrated on prompts known not to be memorized: the threshold is the ``1 - target_fpr``
quantile of their scores, stored per model and per scoring setting in a JSON file beside the model
(``dejaguard_calibration.json``; :mod:`core.calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .denoiser import Denoiser
from .errors import DejaGuardError, NonFiniteError
from .progress import Progress, report
from .sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    EMPTY_PROMPT,
    check_sampling_settings,
    check_unconditional,
    guided_step,
    initial_noise,
    new_schedule,
    prompt_seed,
    text_conditional_magnitude,
    unconditional_embedding,
)

MAGNITUDE = "magnitude"
ANISOTROPY = "anisotropy"
SCORES = (MAGNITUDE, ANISOTROPY)  # the score options; the first is the default
# Asthana & Belagiannis' weights for Stable Diffusion 1.x: score = NORM_WEIGHT ||d|| + ALIGNMENT_WEIGHT * alignment.
ANISOTROPY_NORM_WEIGHT = 1.0
ANISOTROPY_ALIGNMENT_WEIGHT = 2.0
SCORE_DESCRIPTIONS = {
    MAGNITUDE: "||eps_c - eps_u||, the norm of the guidance direction (Wen et al. 2024)",
    ANISOTROPY: "||eps_c - eps_u|| + 2 x its mean per-position cosine with eps_u (Asthana & Belagiannis 2026)",
}


def guidance_alignment(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Mean over positions of the cosine, over channels, between ``eps_uncond`` and ``eps_cond - eps_uncond``.

    ``(B, C, H, W)`` x2 (any trailing spatial dims) -> ``(B,)`` in ``[-1, 1]``. The anisotropy score's angle term.
    """
    cosine = F.cosine_similarity(eps_uncond, eps_cond - eps_uncond, dim=1)  # (B, H, W)
    return cosine.flatten(1).mean(dim=1)


def prediction_scores(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, score: str = MAGNITUDE) -> torch.Tensor:
    """The score ``score`` (see the module doc) of each sample from its two predictions at one step.

    ``(B, C, H, W)`` x2 -> ``(B,)``. The one place a score is computed from predictions: the diffusers path
    (:func:`first_step_scores`) and the ComfyUI Guard and Calibrate nodes (from the sampler's denoised outputs,
    :func:`scores_from_denoised`, also the WebUI extension's) all call it.
    """
    check_score(score)
    magnitude = text_conditional_magnitude(eps_cond, eps_uncond)
    if score == MAGNITUDE:
        return magnitude
    return (ANISOTROPY_NORM_WEIGHT * magnitude
            + ANISOTROPY_ALIGNMENT_WEIGHT * guidance_alignment(eps_cond, eps_uncond).to(magnitude.dtype))


def check_score(score: str) -> str:
    """``score`` if it names one of :data:`SCORES`, else a one-line :class:`DejaGuardError`."""
    if score not in SCORES:
        raise DejaGuardError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
    return score


def scores_from_denoised(x: torch.Tensor, cond_denoised: torch.Tensor, uncond_denoised: torch.Tensor,
                         sigma: torch.Tensor, score: str = MAGNITUDE) -> torch.Tensor:
    """Per-image score from a k-diffusion sampler's denoised (x0) predictions, as ComfyUI's CFG hooks and the
    WebUIs' CFG denoisers hand them over: ``x``, ``cond_denoised``, ``uncond_denoised`` ``(B, C, H, W)``, ``sigma``
    ``(B,)`` -> ``(B,)``.

    ``(x - denoised) / sigma``: the noise prediction for epsilon models, the implied noise for v-prediction models,
    the velocity for flow-matching models (whose implied noise difference is 0 at sigma 1); ``score`` is then
    computed from the two by :func:`prediction_scores`.
    """
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).float()
    eps_cond = (x.float() - cond_denoised.float()) / s
    eps_uncond = (x.float() - uncond_denoised.float()) / s
    return prediction_scores(eps_cond, eps_uncond, score)


@dataclass(frozen=True)
class ScoreSettings:
    """How a score is computed. Thresholds are only comparable between equal settings."""

    steps: int = 1  # first k sampling steps averaged
    generations: int = 1  # initial noises averaged
    guidance_scale: float = DEFAULT_GUIDANCE  # steers the trajectory when steps > 1
    num_inference_steps: int = DEFAULT_STEPS  # the sampling schedule the steps are taken from
    score: str = MAGNITUDE  # which score of the two predictions (SCORES; see the module doc)
    unconditional: str = EMPTY_PROMPT  # UNCONDITIONALS: the empty prompt's encoding, or zero conditioning

    def __post_init__(self) -> None:
        if self.steps < 1 or self.generations < 1:
            raise DejaGuardError("steps and generations must be at least 1")
        if self.steps > self.num_inference_steps:
            raise DejaGuardError(f"steps ({self.steps}) exceeds the sampling schedule ({self.num_inference_steps})")
        check_score(self.score)
        check_unconditional(self.unconditional)

    def key(self) -> str:
        """The calibration key. The score option and the unconditional are part of it only when they are not the
        defaults, so every key (and calibration file) made before they existed still names what it was made with."""
        key = (f"steps={self.steps},generations={self.generations},"
               f"cfg={self.guidance_scale:g},schedule={self.num_inference_steps}")
        if self.score != MAGNITUDE:
            key += f",score={self.score}"
        return key if self.unconditional == EMPTY_PROMPT else f"{key},uncond={self.unconditional}"


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


def step_scores(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                settings: ScoreSettings) -> torch.Tensor:
    """The score ``settings.score`` at each of the first ``settings.steps`` steps of guided sampling from ``noise``.

    ``noise``: unscaled x_T ``(B, C, H, W)``; ``cond`` ``(B, L, D)``; ``uncond`` ``(1, L, D)`` -> ``(B, steps)``.
    Each step is one :func:`core.sampling.guided_step` (one batched UNet call, ``[uncond, cond]``), so the
    magnitude equals the one :func:`core.sampling.guided_denoise` records, to the bit.
    """
    check_sampling_settings(settings.num_inference_steps, settings.guidance_scale)
    scheduler = new_schedule(denoiser, settings.num_inference_steps)
    x = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps[: settings.steps]
    per_step = []
    for i, t in enumerate(timesteps):
        step = guided_step(denoiser, scheduler, x, t, cond, uncond, settings.guidance_scale,
                           advance=i + 1 < len(timesteps))
        per_step.append(prediction_scores(step.eps_cond, step.eps_uncond, settings.score))
        x = step.sample
    return torch.stack(per_step, dim=1)


def first_step_scores(
    denoiser: Denoiser,
    prompts: Sequence[str],
    settings: ScoreSettings | None = None,
    seed: int | None = None,
    batch_size: int = 32,
    threshold: float | None = None,
    progress: Progress | None = None,
) -> list[PromptScore]:
    """Score each prompt with ``settings.score``. The one scoring function of the CLI, audits and benchmarks.

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
    uncond = unconditional_embedding(denoiser, settings.unconditional)
    per_job: dict[tuple[int, int], float] = {}
    calls = np.zeros(len(prompts))
    report(progress, 0, len(jobs), "scoring")
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            before = denoiser.counter.calls
            cond = denoiser.encode_prompts([prompts[i] for i, _ in chunk])
            noise = initial_noise(denoiser, [seeds[j] for j in chunk])
            per_step = step_scores(denoiser, noise, cond, uncond, settings)
            spent = denoiser.counter.calls - before
            scores = per_step.mean(dim=1).double().cpu().numpy()
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

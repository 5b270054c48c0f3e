"""Switching memorization off at inference by changing the prompt's conditioning (Wen et al., ICLR 2024).

Inference time (:func:`mitigate_embedding`, :func:`mitigate_prompt`): optimize the conditional text embedding
``c`` ``(1, L, D)`` at the first sampling step, on the same seeded ``x_T`` the generation will start from, so
that the text-conditional magnitude ``||eps(x_T, c) - eps(x_T, "")||`` (the detector's score,
:func:`core.sampling.text_conditional_magnitude`) falls to a target. The unconditional prediction does not
depend on ``c``: it is computed once. AdamW on the whole ``(L, D)`` embedding, early stop as soon as the
score is at or below the target. A prompt whose score is at or below ``threshold`` (default: the target)
costs one batched UNet call (the detector's) and is returned unchanged: the same tensor object, zero
iterations.

Two levels, ``threshold`` >= ``target``: which prompts to touch, and how far to push them.
``core.calibration.resolve_levels``: threshold = the calibrated detection threshold (touching only prompts above
it keeps 99% of non-memorized prompts, the calibrated FPR, bit-identical), target = half the median score of the
calibration's non-memorized prompts (``core.calibration.TARGET_FRACTION_OF_MEDIAN``).

Settings: AdamW, early stop (Wen et al.), but lr 0.3 and at most 30 iterations instead of their 0.05 and 10.
Why, measured on testbed v5 (12 memorized prompts, one per image, x 2 seeds, 50-step generations, CFG 7.5;
replication = the generation replicates *any* training image; ``bench/mitigation.py`` re-measures on any
model): before, 24 of 24 generations replicated. Pushing the first-step score to the non-memorized median
(lr 0.1, 10 iterations; mean score 2.93 -> 0.50) left 79% replicating, 38% of them now copies of *another*
planted image: the memorized image re-forms in the later steps, or the trajectory falls into a neighbouring
memorized basin. lr 0.2 and 20 iterations: 54%. The mean score over the first 3 or 5 guided steps as the
objective (``trajectory_steps``, 5-8x the cost): 71% and 46%. Three extra noises per prompt: 75%. Half the
median as target at lr 0.1 is not reached in 10 iterations (79%). Half the median at lr 0.3 within 30
iterations: **0%** (17.4 iterations on average, 20 UNet forwards per generation). These 24 pairs (written down as
each image's first evaluation prompt x seeds 0 and 1, the bench's convention: ``bench.mitigation.TUNING_PROMPTS``
x ``TUNING_SEEDS``) are among the 512 (32 prompts x 16 seeds) of the README's headline figure;
``python -m bench.mitigation --held-out`` measures on prompts and seeds disjoint from them. The testbed's
conditioning rows are layer-normed like SD's CLIP outputs (per-element std 0.97), so lr means the same step size
there. On the testbed a memorized prompt has no meaning besides its image, so stopping the copy also loses the
"subject": of the mitigated generations a fifth still have their own image as the nearest training image.
On testbed v2 (weaker memorization) lr 0.1 to the median had stopped 63% of replication.

Training time: :mod:`core.loss_filter`.

Shapes: ``L`` text tokens (77), ``D`` text embedding width, ``N`` initial noises, ``C, H, W`` sample shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import torch

from .denoiser import Denoiser
from .errors import DejaGuardError, NonFiniteError
from .explain import content_tokens
from .progress import Progress, report
from .sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    GuidedStep,
    guided_step,
    initial_noise,
    new_schedule,
)

DEFAULT_LR = 0.3
DEFAULT_MAX_ITERATIONS = 30
STAGE = "mitigation"  # the progress stage name of mitigate_embedding


@dataclass
class MitigationResult:
    """What :func:`mitigate_embedding` did.

    ``embedding``: the conditioning to sample with, ``(1, L, D)``; the input tensor itself when
    ``iterations == 0``. ``score_before`` / ``score_after``: mean text-conditional magnitude over the
    ``N`` noises before / after (with ``trajectory_steps`` > 1: the mean over the trajectory's steps too);
    ``scores``: the score at every evaluated iterate (``scores[0]`` is ``score_before``). ``first_step_score``:
    the input's first-step magnitude, which ``threshold`` is compared with (``score_before`` when
    ``trajectory_steps`` is 1). ``unet_forwards``: noise predictions ("evals", ``UNetCounter.forwards``);
    ``unet_backwards``: samples back-propagated through the UNet (counted when the gradient flows).
    """

    embedding: torch.Tensor
    iterations: int
    score_before: float
    score_after: float
    target: float
    threshold: float
    scores: list[float] = field(default_factory=list)
    unet_forwards: int = 0
    unet_backwards: int = 0
    prompt: str | None = None
    seeds: list[int] | None = None
    first_step_score: float | None = None
    trajectory_steps: int = 1

    @property
    def reached(self) -> bool:
        """Whether the score ended at or below the target (or the prompt was left untouched)."""
        gate = self.score_before if self.first_step_score is None else self.first_step_score
        return self.iterations == 0 and gate <= self.threshold or self.score_after <= self.target

    def summary(self) -> dict:
        """JSON-safe figures (no tensors)."""
        return {"prompt": self.prompt, "seeds": self.seeds, "iterations": self.iterations,
                "score_before": self.score_before, "score_after": self.score_after, "target": self.target,
                "threshold": self.threshold,
                "reached": self.reached, "scores": self.scores, "unet_forwards": self.unet_forwards,
                "unet_backwards": self.unet_backwards, "first_step_score": self.first_step_score,
                "trajectory_steps": self.trajectory_steps}


def mitigate_embedding(
    denoiser: Denoiser,
    cond: torch.Tensor,
    noise: torch.Tensor,
    target: float,
    uncond: torch.Tensor | None = None,
    threshold: float | None = None,
    lr: float = DEFAULT_LR,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    num_inference_steps: int = DEFAULT_STEPS,
    progress: Progress | None = None,
    trajectory_steps: int = 1,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> MitigationResult:
    """Optimize ``cond`` ``(1, L, D)`` until the first-step magnitude on ``noise`` ``(N, C, H, W)`` (unscaled
    x_T, as :func:`core.sampling.initial_noise` makes it; the mean over the ``N`` noises) is <= ``target``.
    Untouched (zero iterations, ``cond`` itself returned) when the score is already <= ``threshold``
    (default ``target``; must be >= ``target``).

    ``uncond``: the unconditional embedding ``(1, L', D)`` (default: ``encode_prompts([""])``; a sampler's
    negative conditioning can stand in for it, as the ComfyUI node does). Works on
    cloned tensors outside inference mode with grad enabled, so it also runs inside ComfyUI's graph
    execution; ``cond`` and ``noise`` are never modified. ``progress(i, max_iterations, "mitigation")`` is
    called when the score of iterate ``i`` is known, and with ``done = max_iterations`` when the method stops
    early (the scores themselves are in the result's ``scores``). Raises :class:`NonFiniteError` if a score,
    gradient or iterate becomes NaN/inf (nothing is returned then, the input is untouched).

    Each iterate's score is the first :func:`core.sampling.guided_step` of the schedule: iterate 0 the
    detector's own batched call; every later iterate the conditional prediction alone, with gradient
    (``cond_grad``), against the unconditional prediction of iterate 0 (it does not depend on ``c``). The last
    iterate's forward is not back-propagated (its score only decides to stop) and counts no backward.

    ``trajectory_steps`` ``K`` > 1: the optimized score is instead the mean magnitude over the first ``K``
    steps of the ``num_inference_steps``-step schedule of guided sampling (CFG ``guidance_scale``) under the
    current embedding: the detector's score for ``ScoreSettings(steps=K, num_inference_steps=...)``, so
    ``target`` must be a level of that setting (``core.calibration.resolve_levels`` with that setting).
    ``threshold`` stays a level of
    the *first-step* score (the first of those ``K`` magnitudes; default: no gate, every prompt whose
    trajectory score exceeds ``target`` is optimized): the trajectory mean separates memorized from
    non-memorized prompts far worse than the first step (see the module doc). Each iteration: the ``K``
    guided steps without gradient (the detector's batched calls; they also give the iterate's score, so the
    early stop costs no gradient), then one conditional forward with gradient per step at the detached
    ``x_t``, back-propagated at once (one UNet graph in memory at a time). Cost of ``I`` iterations:
    ``N K (2 + 3 I)`` forwards, ``N K I`` backwards.
    """
    if trajectory_steps != 1:
        return _mitigate_trajectory(denoiser, cond, noise, target, uncond, threshold, lr, max_iterations,
                                    num_inference_steps, progress, trajectory_steps, guidance_scale)
    threshold = _check_arguments(cond, noise, target, threshold, lr, max_iterations)
    n = noise.shape[0]
    before = denoiser.counter.snapshot()
    with torch.inference_mode(False):
        with torch.no_grad():
            c0, u = detached_embeddings(denoiser, cond, uncond, n)
            scheduler = new_schedule(denoiser, num_inference_steps)
            x = noise.detach().clone().to(denoiser.device, denoiser.dtype) * scheduler.init_noise_sigma
        t = scheduler.timesteps[0]
        first = guided_step(denoiser, scheduler, x, t, c0.expand(n, -1, -1), u, advance=False)  # the detector's
        score = float(first.magnitude.mean())
        _check_finite(score, "the first-step score", 0)
        scores = [score]
        report(progress, 0, max_iterations, STAGE)
        if score <= threshold or max_iterations == 0:
            report(progress, max_iterations, max_iterations, STAGE)
            spent = denoiser.counter.since(before)
            return MitigationResult(cond, 0, score, score, target, threshold, scores, spent.forwards,
                                    spent.backwards)
        emb = c0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([emb], lr=lr)
        iterations = 0
        try:
            while True:
                step = guided_step(denoiser, scheduler, x, t, emb.expand(n, -1, -1), u, cond_grad=True,
                                   eps_uncond=first.eps_uncond, advance=False)
                loss = step.magnitude.mean()
                if iterations > 0:  # iterate 0's score is already known (no-grad call above)
                    score = float(loss.detach())
                    _check_finite(score, "the score", iterations)
                    scores.append(score)
                    report(progress, iterations, max_iterations, STAGE)
                    if score <= target or iterations == max_iterations:
                        break  # this iterate is never back-propagated: the counter counts no backward for it
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _checked_step(opt, emb, iterations)
                iterations += 1
        except NonFiniteError as err:
            _reraise_unchanged(err, iterations)
    if iterations < max_iterations:
        report(progress, max_iterations, max_iterations, STAGE)
    spent = denoiser.counter.since(before)
    out = emb.detach().to(cond.dtype).to(cond.device)
    return MitigationResult(out, iterations, scores[0], scores[-1], target, threshold, scores, spent.forwards,
                            spent.backwards)


def _check_arguments(cond: torch.Tensor, noise: torch.Tensor, target: float, threshold: float | None, lr: float,
                     max_iterations: int) -> float:
    """Validate :func:`mitigate_embedding`'s inputs; returns the threshold (default: the target)."""
    if cond.dim() != 3 or cond.shape[0] != 1:
        raise DejaGuardError(f"expected one conditional embedding (1, L, D), got {tuple(cond.shape)}")
    if noise.dim() != 4 or noise.shape[0] < 1:
        raise DejaGuardError(f"expected initial noise (N, C, H, W), got {tuple(noise.shape)}")
    if not (target >= 0):  # also rejects NaN
        raise DejaGuardError(f"target magnitude must be a number >= 0, got {target}")
    threshold = target if threshold is None else threshold
    if not (threshold >= target):
        raise DejaGuardError(f"threshold ({threshold}) must be >= target ({target}): prompts between the two "
                             "would be optimized toward a score they already beat")
    if max_iterations < 0 or not (lr > 0):
        raise DejaGuardError("max_iterations must be >= 0 and lr > 0")
    return threshold


def _mitigate_trajectory(denoiser: Denoiser, cond: torch.Tensor, noise: torch.Tensor, target: float,
                         uncond: torch.Tensor | None, threshold: float | None, lr: float, max_iterations: int,
                         num_inference_steps: int, progress: Progress | None,
                         trajectory_steps: int, guidance_scale: float) -> MitigationResult:
    """:func:`mitigate_embedding` with ``trajectory_steps`` > 1 (see there)."""
    if not 1 <= trajectory_steps <= num_inference_steps:
        raise DejaGuardError(f"trajectory_steps must lie in [1, num_inference_steps = {num_inference_steps}], "
                             f"got {trajectory_steps}")
    if not (guidance_scale >= 0):
        raise DejaGuardError(f"guidance_scale must be a number >= 0, got {guidance_scale}")
    if threshold is not None and not (threshold >= 0):
        raise DejaGuardError(f"threshold must be a number >= 0, got {threshold}")
    # the threshold gates on the first-step score, the target is a trajectory level: no order between them
    _check_arguments(cond, noise, target, None, lr, max_iterations)
    n, k = noise.shape[0], trajectory_steps
    before = denoiser.counter.snapshot()
    with torch.inference_mode(False):
        with torch.no_grad():
            c0, u = detached_embeddings(denoiser, cond, uncond, n)
            x_start = noise.detach().clone().to(denoiser.device, denoiser.dtype)

        def trajectory(emb: torch.Tensor) -> tuple[float, float, list[tuple[torch.Tensor, GuidedStep]]]:
            """``k`` guided steps without gradient on a fresh schedule (as :func:`core.sampling.guided_denoise`,
            one batched call per step): the score (mean magnitude), the first step's mean magnitude, and each
            step's ``x_t`` ``(N, C, H, W)`` with its :class:`GuidedStep`."""
            scheduler = new_schedule(denoiser, num_inference_steps)
            x, steps, c = x_start * scheduler.init_noise_sigma, [], emb.detach().expand(n, -1, -1)
            for i, t in enumerate(scheduler.timesteps[:k]):
                step = guided_step(denoiser, scheduler, x, t, c, u, guidance_scale, advance=i + 1 < k)
                steps.append((x, step))
                x = step.sample
            mags = torch.stack([step.magnitude for _, step in steps])
            return float(mags.mean()), float(mags[0].mean()), steps

        score, first, steps = trajectory(c0)
        timesteps = new_schedule(denoiser, num_inference_steps).timesteps[:k]
        _check_finite(score, "the trajectory score", 0)
        scores = [score]
        report(progress, 0, max_iterations, STAGE)
        gate = target if threshold is None else threshold
        if (first if threshold is not None else score) <= gate or score <= target or max_iterations == 0:
            report(progress, max_iterations, max_iterations, STAGE)
            spent = denoiser.counter.since(before)
            return MitigationResult(cond, 0, score, score, target, gate, scores, spent.forwards, spent.backwards,
                                    first_step_score=first if threshold is not None else None,
                                    trajectory_steps=k)
        emb = c0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([emb], lr=lr)
        iterations = 0
        try:
            while score > target and iterations < max_iterations:
                opt.zero_grad(set_to_none=True)
                for (x, done), t in zip(steps, timesteps):
                    # the same step with gradient: a fresh schedule scales x_t for t whatever state the scheduler keeps
                    step = guided_step(denoiser, new_schedule(denoiser, num_inference_steps), x, t,
                                       emb.expand(n, -1, -1), u, cond_grad=True, eps_uncond=done.eps_uncond,
                                       advance=False)
                    (step.magnitude.mean() / k).backward()
                _checked_step(opt, emb, iterations)
                iterations += 1
                score, _, steps = trajectory(emb)
                _check_finite(score, "the trajectory score", iterations)
                scores.append(score)
                report(progress, iterations, max_iterations, STAGE)
        except NonFiniteError as err:
            _reraise_unchanged(err, iterations)
    if iterations < max_iterations:
        report(progress, max_iterations, max_iterations, STAGE)
    spent = denoiser.counter.since(before)
    out = emb.detach().to(cond.dtype).to(cond.device)
    return MitigationResult(out, iterations, scores[0], scores[-1], target, gate, scores, spent.forwards,
                            spent.backwards, first_step_score=first if threshold is not None else None,
                            trajectory_steps=k)


def mitigate_prompt(
    denoiser: Denoiser,
    prompt: str,
    seeds: Sequence[int],
    target: float,
    threshold: float | None = None,
    lr: float = DEFAULT_LR,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    num_inference_steps: int = DEFAULT_STEPS,
    progress: Progress | None = None,
    trajectory_steps: int = 1,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> MitigationResult:
    """:func:`mitigate_embedding` for ``prompt``'s embedding on the x_T of ``seeds`` (one embedding for all
    of them: the score is their mean). Generate with ``core.sampling.generate(..., cond_embeddings=...)``
    from the same seeds."""
    content_tokens(denoiser, prompt)
    if not seeds:
        raise DejaGuardError("at least one seed is needed")
    with torch.no_grad():
        cond = denoiser.encode_prompts([prompt])
    result = mitigate_embedding(denoiser, cond, initial_noise(denoiser, seeds), target, threshold=threshold, lr=lr,
                                max_iterations=max_iterations, num_inference_steps=num_inference_steps,
                                progress=progress, trajectory_steps=trajectory_steps,
                                guidance_scale=guidance_scale)
    result.prompt, result.seeds = prompt, [int(s) for s in seeds]
    return result


def _checked_step(opt: torch.optim.Optimizer, emb: torch.Tensor, iteration: int) -> None:
    """Optimizer step ``iteration + 1``; NonFiniteError if the gradient or the new iterate is NaN or infinite."""
    if not torch.isfinite(emb.grad).all():
        raise NonFiniteError(f"embedding mitigation: the gradient became NaN or infinite at iteration "
                             f"{iteration + 1}; the conditioning was left unchanged")
    opt.step()
    if not torch.isfinite(emb).all():
        raise NonFiniteError(f"embedding mitigation: the embedding became NaN or infinite at iteration "
                             f"{iteration + 1}; the conditioning was left unchanged")


def detached_embeddings(denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor | None,
                         n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clones of ``cond`` ``(1, L, D)`` and of ``uncond`` (default: the empty prompt's), the latter expanded to
    ``(n, L', D)``, on the denoiser's device and dtype: the caller's tensors are never touched."""
    c0 = cond.detach().clone().to(denoiser.device, denoiser.dtype)
    u = denoiser.encode_prompts([""]) if uncond is None else uncond.detach().clone()
    return c0, u.to(denoiser.device, denoiser.dtype).expand(n, -1, -1)


def _reraise_unchanged(err: NonFiniteError, iterations: int) -> NoReturn:
    """Re-raise a NaN/inf failure of the optimization so that it says the conditioning was left unchanged."""
    if "left unchanged" in str(err):
        raise err
    raise NonFiniteError(f"embedding mitigation, iteration {iterations + 1}: {err}; the conditioning was left "
                         "unchanged") from err


def _check_finite(score: float, what: str, iteration: int) -> None:
    if score != score or score in (float("inf"), float("-inf")):
        raise NonFiniteError(f"embedding mitigation: {what} is NaN or infinite at iteration {iteration}; "
                             "the conditioning was left unchanged")

"""Auto-protect: an image flagged at the first sampling step is steered away from the copy in the same run.

The first-step score (Wen et al.; :func:`core.sampling.text_conditional_magnitude`, the detector's quantity, read
from the two predictions the guided sampler computes anyway) flags an image when it exceeds the calibrated
threshold. What happens next is a *strategy*:

- ``guidance`` (:class:`GuidanceSteering`, **no extra UNet evaluation**). Jain et al. (CVPR 2025, "Classifier-free
  guidance inside the attraction basin may cause memorization"): a memorized generation is pulled into the copy
  while classifier-free guidance acts inside an attraction basin at the start of sampling; guiding only once the
  trajectory has left it avoids the copy. For a flagged image the CFG combination
  ``eps_u + w (eps_c - eps_u)`` is taken with ``w' = scale`` (default 0: no guidance; negative: opposite
  guidance) while the image is inside the basin, and with the normal ``w`` afterwards. Inside = the per-step
  score, computed at every step from the same two predictions, is still above ``exit_level`` (Jain et al.'s
  signal: the guidance magnitude falls once the trajectory leaves the basin), and only while the step's noise
  level ``t / T`` is in the first ``max_fraction`` of the noise schedule (``t > (1 - max_fraction) T``: the same
  steps for the library's DDIM and ComfyUI's samplers, whatever their step count). Both predictions exist at every
  step of a CFG sampler, so the decision and the steering cost nothing but a norm per image. Unflagged images
  get exactly the unguarded computation: the steered rows are overwritten after the plain combination
  (:func:`core.sampling.guided_step`), so the others are bit-identical.
- ``embedding`` (:func:`core.mitigate.mitigate_prompt`): the flagged image's conditioning is optimized on its own
  ``x_T`` until its first-step score meets the mitigation target, then the image is sampled again from the
  same noise with the mitigated embedding. Cost: the optimization's UNet evaluations plus one full generation.
- ``mask`` (:func:`core.neuron_mask.apply_mask`): the flagged image is sampled again from the same noise with a
  neuron mask switched on (a NeMo or FFN-subspace mask file of this model). Cost: one full generation.

Why the guidance strategy is the default: it is the only one that costs nothing, it needs no file and no
optimization, and it changes neither the prompt nor the model. What it achieves on the testbed, measured here
(library, 50 DDIM steps, CFG 7.5, every other planted image's last evaluation prompt = 6 memorized prompts, seed
10; replication = any training image, as ``bench.protect``): unprotected 6/6 replicate. ``w' = 0`` for the first
40% of the schedule (20 steps) then 7.5: 6/6 still replicate (structure SSIM 0.78-0.96); ``w' = -2`` for 40%:
6/6; ``w' = 0`` for 70%: 6/6; for 85% (43 of 50 steps, SSIM 0.56-0.91): 6/6; for the whole run: 0/6 (SSIM
0.18 to the nearest training image). So on the testbed's strongly planted memorization even the last 15% of
the steps, guided, rebuild the copy: Jain et al.'s "guide once out of the basin" does not hold here, and the
default steers the whole run
(:data:`DEFAULT_MAX_STEER_FRACTION` 1.0): a flagged image is sampled without text guidance, which stops the copy
but also drops what the prompt says (read it beside ``novel_alignment`` and the ``embedding`` strategy). The
per-step score is no basin-exit signal here: along the unguided trajectory it rose from about 2.4-3 at the first
step to 9-25 at 40% and 28-41 at 85% of the schedule (so 7.5 times that difference overwrites the image in a
few steps), never back to the threshold, so ``exit_level`` never ended a steering in these runs.
``python -m bench.protect`` re-measures every strategy.

One implementation of the method, two samplers: :func:`protect` runs it on a :class:`ProtectSampler`, the object
that samples a set of the batch's images from their own initial noise (with a steering policy, a mitigated
embedding or a mask) and counts its noise predictions. :class:`LibrarySampler` is :func:`core.sampling.generate`
(:func:`protected_generate`, the CLI, ``bench.protect``); ``nodes/protect_sampler.ComfySampler`` is ComfyUI's own
sampler (the DejaGuard Protected Sampler node). The decision (flag at the first step), the steering and what is
re-sampled, with which embedding or mask, and how its cost is counted are therefore the same in both.

Shapes: ``B`` images of a batch, ``C, H, W`` the sample shape, ``L`` text tokens, ``D`` embedding width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .denoiser import Denoiser
from .detect import MAGNITUDE, prediction_scores
from .errors import DejaGuardError
from .progress import Progress, report
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate

STRATEGIES = ("guidance", "embedding", "mask")
DEFAULT_STEER_SCALE = 0.0  # w' inside the basin: no text guidance
DEFAULT_MAX_STEER_FRACTION = 1.0  # steer within this first share of the noise schedule (measured: bench.protect)


def step_scores(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, score: str = MAGNITUDE) -> torch.Tensor:
    """The detector's score ``score`` of each image at this step: ``(B, C, H, W)`` x2 -> ``(B,)`` (the one
    formula, :func:`core.detect.prediction_scores`, also used by the Guard)."""
    return prediction_scores(eps_cond.float(), eps_uncond.float(), score)


class GuidanceSteering:
    """The ``guidance`` strategy's decision for one batch, step by step (see the module doc).

    :meth:`step` takes the per-image scores of each step ``(B,)`` and its noise level ``t / T`` in order (the
    first call is the first step) and returns the rows to steer ``(B,)`` bool; their guidance scale is
    :attr:`scale`. Used as a
    :data:`core.sampling.Steer` (``__call__`` with the two predictions) by the library, and with the scores
    computed from ComfyUI's denoised predictions by ``nodes/protect.py``. :meth:`reset` starts a new run.

    ``threshold``: flag at the first step when the score exceeds it. ``exit_level``: a steered image is back
    to normal guidance from the first step whose score is at or below it (default: ``threshold``).
    ``max_fraction``: steer only while the noise level is at least ``1 - max_fraction`` (1: the whole run,
    ComfyUI's last step at ``t = 0`` included). ``scale``: ``w'`` for the
    steered steps.
    """

    def __init__(self, threshold: float, scale: float = DEFAULT_STEER_SCALE, exit_level: float | None = None,
                 max_fraction: float = DEFAULT_MAX_STEER_FRACTION, score: str = MAGNITUDE) -> None:
        if math.isnan(threshold) or not math.isfinite(scale):  # threshold +inf: flags nothing, records the scores
            raise DejaGuardError(f"threshold must be a number and the steering scale finite, got {threshold}, {scale}")
        self.threshold = float(threshold)
        self.scale = float(scale)
        self.exit_level = self.threshold if exit_level is None else float(exit_level)
        if not 0.0 <= max_fraction <= 1.0:
            raise DejaGuardError(f"the steered share of the noise schedule must lie in [0, 1], got {max_fraction}")
        self.max_fraction = float(max_fraction)
        self.score = score  # core.detect.SCORES: what the threshold was calibrated for
        self.reset()

    def reset(self) -> None:
        """Forget the run: the next :meth:`step` is a first step."""
        self.steps = 0
        self.first_scores: list[float] = []
        self.flagged: list[bool] = []
        self.steering: torch.Tensor | None = None  # (B,) bool, the rows still inside the basin
        self.steered_steps: list[int] = []
        # the score at the step it fell to exit_level (None: steered until the schedule limit)
        self.exit_scores: list[float | None] = []

    def step(self, scores: torch.Tensor, noise_level: float = 1.0) -> torch.Tensor:
        """Scores of this step ``(B,)`` and its noise level ``t / T`` -> rows to steer at this step ``(B,)`` bool."""
        scores = scores.detach().float().cpu()
        if self.steering is None or self.steering.shape[0] != scores.shape[0]:
            self.first_scores = [float(s) for s in scores]
            self.flagged = [s > self.threshold for s in self.first_scores]
            self.steering = torch.tensor(self.flagged, dtype=torch.bool)
            self.steered_steps = [0] * len(self.flagged)
            self.exit_scores = [None] * len(self.flagged)
        inside = scores > self.exit_level
        for i in (self.steering & ~inside).nonzero().flatten().tolist():  # left the basin by its score
            self.exit_scores[i] = float(scores[i])
        if noise_level < 1.0 - self.max_fraction:  # past the steered share of the schedule: guide normally
            inside = torch.zeros_like(inside)
        self.steering = self.steering & inside
        for i in self.steering.nonzero().flatten().tolist():
            self.steered_steps[i] += 1
        self.steps += 1
        return self.steering.clone()

    def __call__(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor,
                 noise_level: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
        rows = self.step(step_scores(eps_cond, eps_uncond, self.score), noise_level)
        if not bool(rows.any()):
            return None
        return rows, torch.full(rows.shape, self.scale)


@dataclass
class ImageProtection:
    """What auto-protect did to one image. ``score_before``: its first-step score; ``score_after``: for
    ``guidance`` the per-step score when it fell to the exit level (None: steered until the schedule limit),
    for ``embedding`` the mitigated first-step score, for ``mask`` the first-step score with the mask on.
    ``extra_unet_evals``: noise predictions beyond the unprotected generation (a cond/uncond pair counts 2)."""

    prompt: str
    seed: int
    flagged: bool
    strategy: str
    score_before: float
    threshold: float
    score_after: float | None = None
    steered_steps: int = 0
    extra_unet_evals: int = 0

    def line(self) -> str:
        """"memorized at step 1 -> steered: score 3.3 -> 0.4" (or "ok: score 0.5 <= 0.96")."""
        if not self.flagged:
            return f"ok: score {self.score_before:.3g} <= {self.threshold:.3g}"
        score = f"score {self.score_before:.3g}" + ("" if self.score_after is None else f" -> {self.score_after:.3g}")
        how = {"guidance": f"steered ({self.steered_steps} steps)", "embedding": "embedding mitigated",
               "mask": "neuron mask on"}.get(self.strategy, self.strategy)
        cost = f", {self.extra_unet_evals} extra UNet evals" if self.extra_unet_evals else ", no extra UNet eval"
        return f"memorized at step 1 -> {how}: {score}{cost}"

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProtectedGeneration:
    """:func:`protected_generate`'s result: ``samples`` ``(B, C, H, W)`` and one :class:`ImageProtection` each."""

    samples: torch.Tensor
    images: list[ImageProtection] = field(default_factory=list)


def check_strategy(strategy: str, mask: Any) -> None:
    """One line for an unknown strategy, or for the mask strategy without a mask."""
    if strategy not in STRATEGIES:
        raise DejaGuardError(f"unknown protection strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if strategy == "mask" and mask is None:
        raise DejaGuardError("the mask strategy needs a neuron mask file (--mask)")


SteeringFactory = Callable[[int, int], GuidanceSteering]


class ProtectSampler(Protocol):
    """Where the method samples: the library's guided DDIM (:class:`LibrarySampler`) or a ComfyUI sampler
    (``nodes/protect_sampler.py``). Images are addressed by their index ``0 .. B - 1`` in the batch; each has its
    own initial noise, which every call reuses, so a re-sampled image starts from the very ``x_T`` it was flagged on.
    """

    def evals(self) -> int:
        """Noise predictions spent so far (monotone; a cond/uncond pair counts 2)."""
        ...

    def sample(self, rows: Sequence[int], steering: SteeringFactory, embeddings: Sequence[torch.Tensor] | None = None,
               mask: Any = None) -> torch.Tensor:
        """Generate the images ``rows`` ``(len(rows), C, H, W)``: ``steering(start, end)`` is the policy of the
        generations ``start .. end - 1`` of this call, called at every step with the two predictions' scores;
        ``embeddings[k]`` (from :meth:`mitigated_embedding`) replaces image ``rows[k]``'s conditioning; ``mask``
        (the caller's mask object) is switched on for the whole call."""
        ...

    def mitigated_embedding(self, row: int, target: float, threshold: float) -> torch.Tensor:
        """:func:`core.mitigate.mitigate_embedding` of image ``row``'s conditioning on its own ``x_T``."""
        ...


class LibrarySampler:
    """:class:`ProtectSampler` over :func:`core.sampling.generate` (DDIM, one (prompt, seed) pair per image)."""

    def __init__(self, denoiser: Denoiser, prompts: Sequence[str], seeds: Sequence[int],
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 batch_size: int = 32) -> None:
        self.denoiser, self.prompts, self.seeds = denoiser, list(prompts), [int(s) for s in seeds]
        self.steps, self.guidance_scale, self.batch_size = num_inference_steps, guidance_scale, batch_size

    def evals(self) -> int:
        return self.denoiser.counter.forwards

    def sample(self, rows: Sequence[int], steering: SteeringFactory, embeddings: Sequence[torch.Tensor] | None = None,
               mask: Any = None) -> torch.Tensor:
        context: Any = nullcontext()
        if mask is not None:
            from .neuron_mask import NeuronMask, apply_mask

            context = apply_mask(self.denoiser, NeuronMask.load(mask) if isinstance(mask, (str, Path)) else mask)
        with context:
            return generate(self.denoiser, [self.prompts[i] for i in rows], [self.seeds[i] for i in rows],
                            self.steps, self.guidance_scale, self.batch_size,
                            cond_embeddings=None if embeddings is None else torch.cat(list(embeddings)),
                            steering=steering)

    def mitigated_embedding(self, row: int, target: float, threshold: float) -> torch.Tensor:
        from .mitigate import mitigate_prompt

        with torch.enable_grad():
            result = mitigate_prompt(self.denoiser, self.prompts[row], [self.seeds[row]], target, threshold=threshold,
                                     num_inference_steps=self.steps, guidance_scale=self.guidance_scale)
        return result.embedding.detach()


@torch.no_grad()
def protected_generate(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    threshold: float,
    strategy: str = "guidance",
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 32,
    progress: Progress | None = None,
    *,
    steer_scale: float = DEFAULT_STEER_SCALE,
    exit_level: float | None = None,
    max_steer_fraction: float = DEFAULT_MAX_STEER_FRACTION,
    target: float | None = None,
    mask: Any = None,
) -> ProtectedGeneration:
    """:func:`core.sampling.generate` with auto-protect: one generation per (prompt, seed) pair, each image
    flagged at its first step (score above ``threshold``) protected with ``strategy`` (module doc); the method
    itself is :func:`protect` on a :class:`LibrarySampler`.

    Unflagged images are the unprotected generation's, bit for bit (same batches, same computation).
    ``guidance``: ``steer_scale`` (``w'``), ``exit_level`` (default ``threshold``), steering only within the
    first ``max_steer_fraction`` of the noise schedule. ``embedding``: ``target`` is the mitigation's target score
    (default: the calibrated level of :func:`core.calibration.resolve_levels`, which the caller passes).
    ``mask``: a :class:`core.neuron_mask.NeuronMask` or its file. ``progress(done, total, "protecting")``.
    """
    sampler = LibrarySampler(denoiser, prompts, seeds, num_inference_steps, guidance_scale, batch_size)
    return protect(sampler, prompts, seeds, threshold, strategy, progress, steer_scale=steer_scale,
                   exit_level=exit_level, max_steer_fraction=max_steer_fraction, target=target, mask=mask)


@torch.no_grad()
def protect(
    sampler: ProtectSampler,
    prompts: Sequence[str],
    seeds: Sequence[int],
    threshold: float,
    strategy: str = "guidance",
    progress: Progress | None = None,
    *,
    steer_scale: float = DEFAULT_STEER_SCALE,
    exit_level: float | None = None,
    max_steer_fraction: float = DEFAULT_MAX_STEER_FRACTION,
    target: float | None = None,
    mitigation_threshold: float | None = None,
    mask: Any = None,
    score: str = MAGNITUDE,
) -> ProtectedGeneration:
    """The auto-protect method on any :class:`ProtectSampler`, for the batch of images ``0 .. len(prompts) - 1``
    (``prompts`` / ``seeds`` only label the :class:`ImageProtection` records).

    One sampling pass of the whole batch, every image scored at its first step with ``score``
    (:data:`core.detect.SCORES`, the option ``threshold`` was calibrated for): ``guidance`` steers the flagged rows
    within that pass; ``embedding`` and ``mask`` only record the scores (a policy that flags nothing) and then
    sample the flagged images again from their own noise, with :meth:`ProtectSampler.mitigated_embedding` (pushed
    to ``target``, gated at ``mitigation_threshold``, default ``threshold``: both first-step magnitude levels) or
    with ``mask`` on. Unflagged images keep the first pass's samples. ``progress(done, total, "protecting")``.
    """
    check_strategy(strategy, mask)
    chunks: list[GuidanceSteering] = []

    def steering(start: int, end: int) -> GuidanceSteering:
        # "guidance" steers the flagged rows; the other strategies only record the first-step scores (a steering
        # that flags nothing: threshold +inf) and re-sample the flagged images afterwards.
        s = GuidanceSteering(threshold if strategy == "guidance" else math.inf, steer_scale, exit_level,
                             max_steer_fraction, score)
        chunks.append(s)
        return s

    report(progress, 0, 2, "protecting")
    samples = sampler.sample(range(len(prompts)), steering)
    scores = [s for c in chunks for s in c.first_scores]
    if len(scores) != len(prompts):
        raise DejaGuardError(f"auto-protect saw {len(scores)} first-step scores for {len(prompts)} images: it needs "
                             "the unconditional prediction at the first step (CFG > 1)")
    images = [ImageProtection(p, int(sd), sc > threshold, strategy, sc, threshold)
              for p, sd, sc in zip(prompts, seeds, scores)]
    if strategy == "guidance":
        for img, steered, exit_score in zip(images, [n for c in chunks for n in c.steered_steps],
                                            [e for c in chunks for e in c.exit_scores]):
            if img.flagged:
                img.steered_steps, img.score_after = steered, exit_score
    else:
        flagged = [i for i, img in enumerate(images) if img.flagged]
        if flagged:
            samples = samples.clone()
            again = _resample(sampler, flagged, images, strategy, target,
                              threshold if mitigation_threshold is None else mitigation_threshold, mask, score)
            samples[flagged] = again.to(samples.dtype)
    report(progress, 2, 2, "protecting")
    return ProtectedGeneration(samples, images)


def _resample(sampler: ProtectSampler, rows: list[int], images: list[ImageProtection], strategy: str,
              target: float | None, mitigation_threshold: float, mask: Any, score: str) -> torch.Tensor:
    """Sample the flagged images ``rows`` again from their own noise under ``strategy``; fills in their
    ``score_after`` (the new run's first-step score, read from its own first step) and ``extra_unet_evals``
    (counted by the sampler: the optimization, if any, and the new generation)."""
    spent = [0] * len(rows)
    embeddings = None
    if strategy == "embedding":
        if target is None:
            raise DejaGuardError("the embedding strategy needs a target score (core.calibration.resolve_levels)")
        embeddings = []
        for k, row in enumerate(rows):
            before = sampler.evals()
            embeddings.append(sampler.mitigated_embedding(row, target, mitigation_threshold))
            spent[k] = sampler.evals() - before
    recorders: list[GuidanceSteering] = []

    def record(start: int, end: int) -> GuidanceSteering:  # flags nothing: only reads the first-step scores
        recorders.append(GuidanceSteering(math.inf, score=score))
        return recorders[-1]

    before = sampler.evals()
    out = sampler.sample(rows, record, embeddings, mask if strategy == "mask" else None)
    per_image = (sampler.evals() - before) // len(rows)
    for row, extra, after in zip(rows, spent, [s for r in recorders for s in r.first_scores]):
        images[row].extra_unet_evals, images[row].score_after = extra + per_image, after
    return out

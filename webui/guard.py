"""The WebUI guard without the WebUI: support, fingerprint, threshold, score and generation info of a job.

Method: Wen et al.'s first-step score ``||eps(x_T, c) - eps(x_T, uncond)||_2`` per image, read from the two
predictions the WebUI's own CFG denoiser makes at the first sampling step (no extra UNet evaluation). What the
WebUI hands over depends on the sampler:

- k-diffusion samplers (Euler, DPM++, ... in A1111; every sampler in Forge): *denoised* predictions ``x0``
  of the input ``x`` at ``sigma``, so ``eps = (x - x0) / sigma`` (as in ComfyUI's post-CFG hook);
- A1111's timestep samplers (DDIM, PLMS, UniPC): the noise predictions ``eps`` themselves.

Either way the score goes through core's one scoring function (:func:`core.detect.scores_from_denoised`, as
ComfyUI's Guard, or :func:`core.detect.prediction_scores`). The unconditional prediction is that of the job's negative
prompt: with an empty negative prompt it is Wen et al.'s ``eps(x_T, "")``, the setting thresholds are calibrated
in; a job with a negative prompt gets a note in its info.

Support: SD1.x and SDXL base single-file checkpoints (:func:`core.checkpoint.read_family`, header only) for the
score and protection. Others get one line (SD2.x: untested in the WebUI; SDXL refiner, SD3, Flux, inpainting:
core's refusal). SDXL in the WebUI: its conditioning is a dict (``crossattn`` ``(B, 77, 2048)``, ``vector``
``(B, 2816)``), and the score reads only the predictions, so the seam is the same; but both WebUIs condition an
*empty* negative prompt on zeros (``force_zero_negative_prompt``: zero hidden states and pooled vector, the size
conditioning kept), not on the encoding of ``""`` that ComfyUI and the library use. An SDXL job's threshold is
therefore looked up, and its Calibrate button calibrates, with :data:`SDXL_SETTINGS` (``unconditional="zeros"``,
its own calibration key), so a threshold made against the other unconditional is never applied
(:func:`score_settings`); its Explain button's token significance takes the same unconditional.

Threshold: a value set in the UI wins; else the calibration of this checkpoint found by core
(:func:`core.calibration.find_calibration` at the checkpoint file, i.e. ``MODEL.dejaguard_calibration.json``
beside it, as ``dejaguard calibrate --checkpoint MODEL.safetensors`` writes), keyed by the UNet's fingerprint.

Calibration (:func:`calibrate_checkpoint`, the section's Calibrate button): core's
:func:`~core.calibration.calibrate` on the bundled prompt set, run on the WebUI's loaded model through the one
denoiser seam (:class:`webui.denoiser.WebUIDenoiser`), saved beside the checkpoint where :func:`resolve_threshold`
finds it. Its scores are the guard's: the same UNet call on the same first-step input.

Fingerprint: core's :func:`~core.checkpoint.unet_fingerprint` of the checkpoint file, equal to
``DiffusersDenoiser.fingerprint()`` of the same file loaded by the CLI and ``comfy_fingerprint`` of it in ComfyUI. It
is read from the file, not from the WebUI's loaded weights (which a LoRA may have patched in place).

Protection (the ``guidance`` strategy of :mod:`core.protect`, Jain et al.; the same policy,
:class:`~core.protect.GuidanceSteering`, as ComfyUI's Memorization Protect node): with protection on, an image
flagged at the first step has its CFG combination replaced, at every step while its per-step score (the same
formula, from the same two predictions) stays above the threshold, by ``uncond + w' (cond - uncond)``
(core's :func:`~core.sampling.steer_rows`; ``w'`` = :data:`~core.protect.DEFAULT_STEER_SCALE`). The WebUI combines
the two predictions linearly, in x0 space for k-diffusion samplers and in noise space for A1111's timestep
samplers; the replacement is the same linear mix, so it means the same in either space (``eps = (x - x0) / sigma``
is affine in ``x0``). It costs no UNet evaluation; the rows of unflagged images are the WebUI's own combined
tensor, untouched, so those images are bit-identical to a run without DejaGuard.
A steered image's verdict is ``steered``.

Shapes: ``B`` images in a batch, latents ``(B, 4, H/8, W/8)``, ``sigma`` ``(B,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.calibration import Calibration, calibrate, find_calibration, save_calibration
from ..core.checkpoint import Family, read_family, unet_fingerprint
from ..core.detect import ScoreSettings, prediction_scores, scores_from_denoised
from ..core.errors import DejaGuardError
from ..core.progress import Progress
from ..core.prompt_sets import calibration_prompts
from ..core.protect import DEFAULT_STEER_SCALE, GuidanceSteering
from ..core.sampling import EMPTY_PROMPT, ZERO_CONDITIONING

SUPPORTED_FAMILIES = ("sd1", "sdxl")  # the score and protection
SDXL_POOLED_WIDTH = 1280  # CLIP-G's pooled, projected output: the head of SDXL's 2816-wide ``vector``
# Both WebUIs condition an SDXL model's empty negative prompt on zeros (module doc): its calibrations say so.
SDXL_SETTINGS = ScoreSettings(unconditional=ZERO_CONDITIONING)
KEY_SCORE = "DejaGuard score"
KEY_VERDICT = "DejaGuard verdict"
KEY_THRESHOLD = "DejaGuard threshold"
KEY_NOTE = "DejaGuard note"
MEMORIZED, NOT_MEMORIZED, UNSCORED, NO_THRESHOLD = "memorized", "not memorized", "no score", "no threshold"
STEERED = "steered"  # memorized at the first step, then steered away (protection on)


def supported_family(path: str | Path | None) -> tuple[Family | None, str | None]:
    """``(family, None)`` when the WebUI guard (score, protection, Calibrate and Explain) supports the checkpoint file
    ``path`` (its header read once); else ``(None, one line saying why not)``."""
    if not path:
        return None, "unsupported model: the WebUI names no checkpoint file for it"
    try:
        family = read_family(path)
    except DejaGuardError as err:
        return None, f"unsupported model: {err}"
    if family.name not in SUPPORTED_FAMILIES:
        return None, (f"unsupported model: {family.label} is not supported in the WebUI yet (SD1.x and SDXL are; "
                      "ComfyUI's Guard takes SD2.x and SD3)")
    return family, None


def score_settings(family: Family) -> ScoreSettings:
    """The scoring settings of a job on a ``family`` checkpoint, under which its threshold is calibrated and looked
    up: :data:`SDXL_SETTINGS` for SDXL (module doc), else the defaults."""
    return SDXL_SETTINGS if family.name == "sdxl" else ScoreSettings()


def resolve_threshold(threshold: float, checkpoint: str | Path,
                      settings: ScoreSettings | None = None) -> tuple[float | None, str]:
    """``(threshold, where it came from)``: a value above 0 as set in the UI; else the calibration of this
    checkpoint under ``settings`` (:func:`score_settings`; default: the defaults) (``(None, why there is none)``
    when there is none)."""
    if threshold > 0:
        return float(threshold), "set in the UI"
    settings = settings or ScoreSettings()
    try:
        found = find_calibration(checkpoint, settings, unet_fingerprint(checkpoint))
    except DejaGuardError as err:
        cli = "" if settings.unconditional == EMPTY_PROMPT else f" --unconditional {settings.unconditional}"
        return None, (f"{err} (press Calibrate in the DejaGuard section, set a threshold there, or run `dejaguard "
                      f"calibrate --checkpoint {Path(checkpoint).name}{cli}`)")
    return found.threshold, f"calibration {found.file.name}"


CALIBRATION_FPR = 0.01
PROMPTS_SOURCE = "bundled calibration prompts (MemAttn non-memorized, MIT)"


def calibrate_checkpoint(denoiser: Any, checkpoint: str | Path, prompt_limit: int = 0,
                         progress: Progress | None = None,
                         settings: ScoreSettings | None = None) -> tuple[Calibration, Path, str]:
    """Calibrate the loaded checkpoint (``denoiser``: :class:`webui.denoiser.WebUIDenoiser` over it) on the bundled
    prompts (the first ``prompt_limit``; 0: all), through core's :func:`~core.calibration.calibrate` (a
    ``1 - 0.01`` quantile of first-step scores at the denoiser's sample size) under ``settings``
    (:func:`score_settings`; default: the defaults), and save it beside the checkpoint file, where
    :func:`resolve_threshold` finds it. Returns (calibration, file, one-paragraph summary)."""
    settings = settings or ScoreSettings()
    prompts = calibration_prompts()
    if prompt_limit > 0:
        prompts = prompts[:prompt_limit]
    _, h, w = denoiser.sample_shape
    source = f"{PROMPTS_SOURCE}: {len(prompts)} prompts, {w * 8}x{h * 8} px, DejaGuard Calibrate in the WebUI"
    before = denoiser.counter.calls
    calibration = calibrate(denoiser, prompts, settings, CALIBRATION_FPR, source, progress=progress)
    file = save_calibration(calibration, checkpoint)
    summary = (f"DejaGuard Calibrate: threshold {calibration.threshold:.6g} for a {CALIBRATION_FPR:g} false-positive "
               f"rate on {len(prompts)} non-memorized prompts at {w * 8}x{h * 8} px "
               f"({denoiser.counter.calls - before} UNet calls); saved in {file.name} beside the checkpoint. "
               "The DejaGuard section uses it when its threshold is 0 (calibrate at the size you generate at: "
               "the score grows with the image area).")
    if settings.unconditional == ZERO_CONDITIONING:
        summary += " Scored against the zero conditioning the WebUI gives an SDXL model for an empty negative prompt."
    return calibration, file, summary


def first_step_scores(x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, sigma: torch.Tensor,
                      outputs: str = "denoised") -> torch.Tensor:
    """Per-image score from the sampler's first-step predictions: ``x``, ``cond``, ``uncond`` ``(B, C, H, W)``,
    ``sigma`` ``(B,)`` -> ``(B,)``.

    ``outputs``: ``"denoised"`` (k-diffusion: ``cond`` and ``uncond`` are x0 predictions of ``x`` at ``sigma``)
    or ``"eps"`` (timestep samplers: they are the noise predictions; ``x`` and ``sigma`` are not used).
    """
    if outputs == "eps":
        return prediction_scores(cond.float(), uncond.float())
    if outputs != "denoised":
        raise ValueError(f"outputs must be 'denoised' or 'eps', got {outputs!r}")
    return scores_from_denoised(x, cond, uncond, sigma)  # core's, as the ComfyUI Guard's


@dataclass
class Job:
    """What the guard reports for one WebUI job (``n_iter`` batches of ``batch_size`` images).

    Its lists are the values of ``p.extra_generation_params`` (one entry per image of the job, which the WebUI
    picks by image index for each image's infotext and hands whole to the API's ``info``); they are filled in
    place as each batch's first step is seen.
    """

    images: int
    threshold: float | None
    threshold_source: str
    protect: bool = False  # steer flagged images (the guidance strategy)
    scores: list[str | None] = field(default_factory=list)
    verdicts: list[str | None] = field(default_factory=list)
    notes: list[str | None] = field(default_factory=list)  # per image: the job's notes, "; "-joined
    _texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scores = [None] * self.images
        self.verdicts = [None] * self.images
        self.notes = [None] * self.images

    def generation_params(self) -> dict[str, object]:
        """The entries for ``p.extra_generation_params`` (the same list objects, filled later)."""
        threshold = (f"{self.threshold:.6g} ({self.threshold_source})" if self.threshold is not None
                     else f"none: {self.threshold_source}")
        return {KEY_SCORE: self.scores, KEY_VERDICT: self.verdicts, KEY_THRESHOLD: threshold, KEY_NOTE: self.notes}

    def steering(self) -> GuidanceSteering | None:
        """A new steering policy for one batch (None without protection or without a threshold)."""
        if not self.protect or self.threshold is None:
            return None
        return GuidanceSteering(self.threshold, DEFAULT_STEER_SCALE)

    def note(self, text: str) -> None:
        """Add a note for every image of the job (once)."""
        if text not in self._texts:
            self._texts.append(text)
            self.notes[:] = ["; ".join(self._texts)] * self.images

    def record(self, first_index: int, count: int, scores: list[float] | None, reason: str = "") -> None:
        """The scores of the batch of ``count`` images whose first is image ``first_index`` of the job (None:
        unavailable, ``reason`` says why)."""
        if scores is None:
            self.note(f"no score: {reason}")
            for i in range(first_index, min(first_index + count, self.images)):
                self.verdicts[i] = UNSCORED
            return
        for offset, score in enumerate(scores):
            i = first_index + offset
            if i >= self.images or not math.isfinite(score):
                continue
            self.scores[i] = f"{score:.7g}"
            self.verdicts[i] = (NO_THRESHOLD if self.threshold is None else
                                NOT_MEMORIZED if score <= self.threshold else STEERED if self.protect else MEMORIZED)

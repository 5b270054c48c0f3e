"""DejaGuard Memorization Protect: the Guard with auto-protect, steering a flagged image away in the same run.

A sibling of the Memorization Guard (:mod:`nodes.guard`): the same clone of the MODEL, the same post-CFG
function, the same first-step score and threshold, the same handle for the Memorization Verdict. In addition, an
image whose first-step score exceeds the threshold is steered for the rest of the run with the ``guidance``
strategy of :mod:`core.protect` (Jain et al., CVPR 2025): while the image's per-step score stays above the exit
level (and for at most ``max_steer_fraction`` of the run's steps), its CFG combination is replaced by
``uncond + w' (cond - uncond)``, in ComfyUI's denoised (x0) space, where the sampler's combination is the same
linear mix of the two predictions as in noise space (``eps = (x - denoised) / sigma`` is affine in ``denoised``).
The two predictions exist at every step of a CFG sampler, so steering costs **no UNet evaluation**; images that
are not flagged get the sampler's own ``denoised`` tensor back, untouched, so their output is bit-identical to
the plain Guard's (and to an unguarded run).

Where in the run: the steering stops at the latest once the step's noise level ``t / T`` (:func:`noise_level`, from
the sigma through the model's sampling object) falls to ``1 - max_steer_fraction``, the same point of the noise
schedule as in the library, whatever the sampler and its step count.

The Verdict's badge and summary then say what happened per image ("memorized at step 1 -> steered ...: score
3.3 -> 0.4") and at what cost (strategy, extra UNet evaluations: 0).

At CFG 1 ComfyUI computes no unconditional prediction: there is no guidance to steer, the image is only reported.

Shapes: ``B`` images, latents and denoised predictions ``(B, C, H, W)``, ``sigma`` ``(B,)``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.detect import MAGNITUDE, scores_from_denoised
from ..core.protect import DEFAULT_MAX_STEER_FRACTION, DEFAULT_STEER_SCALE, GuidanceSteering, ImageProtection
from ..core.sampling import sigma_noise_level, steer_rows
from .guard import CFG1_UNAVAILABLE, DejaGuardMemorizationGuard, GuardState, _uncond_skipped


def noise_level(args: dict[str, Any]) -> float:
    """The step's ``t / T`` (1 = pure noise) from its sigma, through the model's own sampling object:
    ``model_sampling.timestep(sigma)`` is the discrete timestep in ``[0, T)`` for SD1/SD2/SDXL (``T`` = its 1000
    sigmas) and ``1000 sigma`` for flow models, so the steered share of the schedule is the library's."""
    sampling = args["model"].model_sampling
    sigmas = getattr(sampling, "sigmas", None)
    return sigma_noise_level(args["sigma"], sampling.timestep, len(sigmas) if sigmas is not None else None)


def steer_denoised(policy: GuidanceSteering, args: dict[str, Any], score: str = MAGNITUDE) -> torch.Tensor:
    """One step of the ``guidance`` strategy on ComfyUI's post-CFG arguments: the step's scores (``score`` option,
    :func:`core.detect.scores_from_denoised`) go to ``policy``; the rows it steers get ``uncond + w' (cond -
    uncond)`` in denoised space, every other row the sampler's own ``denoised`` (the very tensor, when no row is
    steered). At CFG 1 (no unconditional prediction) the step is left alone and the policy sees nothing."""
    denoised = args["denoised"]
    if _uncond_skipped(args):
        return denoised
    x, cond, uncond = args["input"], args["cond_denoised"], args["uncond_denoised"]
    rows = policy.step(scores_from_denoised(x, cond, uncond, args["sigma"], score), noise_level(args))
    return steer_rows(denoised, cond, uncond, rows, policy.scale)


def protection_record(images: list[ImageProtection], strategy: str, steer_scale: float,
                      steering: list[bool] | None = None) -> dict[str, Any]:
    """The run's ``protection`` entry (:class:`nodes.guard.RunRecord`; the Verdict's payload, the badge, the
    summary): the strategy, its total extra noise predictions, per image the :class:`ImageProtection` figures and
    its line. ``steering``: rows still steered at the last step seen (guidance)."""
    return {"strategy": strategy, "steer_scale": steer_scale,
            "extra_unet_evals": sum(img.extra_unet_evals for img in images),
            "steered": steering if steering is not None else [False] * len(images),
            "images": [{k: v for k, v in img.summary().items() if k not in ("prompt", "seed")} for img in images],
            "lines": [img.line() if img.flagged else "" for img in images]}


class ComfySteering:
    """The ``guidance`` strategy on ComfyUI's post-CFG arguments, one run at a time (the guard's runs)."""

    def __init__(self, scale: float, max_steer_fraction: float) -> None:
        self.scale = float(scale)
        self.max_steer_fraction = float(max_steer_fraction)
        self.policy: GuidanceSteering | None = None
        self.run_index: int | None = None

    def __call__(self, state: GuardState, args: dict[str, Any]) -> torch.Tensor:
        run = state.runs[-1] if state.runs else None
        if run is None or run.scores is None or _uncond_skipped(args):
            return args["denoised"]  # CFG 1: no unconditional prediction, nothing to steer
        if run.index != self.run_index:  # the guard saw a new run start at this call
            self.policy = GuidanceSteering(state.threshold, self.scale, max_fraction=self.max_steer_fraction)
            self.run_index = run.index
        assert self.policy is not None
        out = steer_denoised(self.policy, args, state.score)
        p = self.policy
        images = [ImageProtection("", -1, flagged, "guidance", score, p.threshold, exit_score, steered)
                  for flagged, score, exit_score, steered in zip(p.flagged, p.first_scores, p.exit_scores,
                                                                 p.steered_steps)]
        steering = p.steering.tolist() if p.steering is not None else None
        run.protection = protection_record(images, "guidance", self.scale, steering)
        return out


class DejaGuardMemorizationProtect(DejaGuardMemorizationGuard):
    """MODEL -> protected MODEL + guard handle: the Guard, plus steering of flagged images (no extra UNet call)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        spec = super().INPUT_TYPES()
        required = {k: v for k, v in spec["required"].items() if k != "at_cfg_1"}
        required["strategy"] = (["guidance"], {
            "default": "guidance",
            "tooltip": "guidance: while a flagged image is inside the memorized basin (its per-step score above the "
                       "threshold), sample it without text guidance, then guide normally (Jain et al. 2025). "
                       "Costs no extra UNet evaluation; images that are not flagged come out unchanged."})
        required["steer_scale"] = ("FLOAT", {
            "default": DEFAULT_STEER_SCALE, "min": -10.0, "max": 10.0, "step": 0.1,
            "tooltip": "Guidance scale of a flagged image while it is steered: 0 = no text guidance, negative = "
                       "opposite guidance."})
        required["max_steer_fraction"] = ("FLOAT", {
            "default": DEFAULT_MAX_STEER_FRACTION, "min": 0.0, "max": 1.0, "step": 0.05,
            "tooltip": "Steer at most within this first share of the noise schedule (0.4: while t > 600 of 1000; "
                       "1 = the whole run, the default: on the DejaGuard testbed shorter steering still ended in "
                       "the copy)."})
        return {**spec, "required": required}

    RETURN_TYPES = DejaGuardMemorizationGuard.RETURN_TYPES
    RETURN_NAMES = DejaGuardMemorizationGuard.RETURN_NAMES
    OUTPUT_TOOLTIPS = ("The model with the guard and auto-protect attached: connect it to KSampler.",
                       "Connect to a Memorization Verdict node together with the sampler's LATENT.")
    FUNCTION = "protect"
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("The Memorization Guard with auto-protect: an image that scores above the threshold at the first "
                   "step is steered away from the memorized copy in the same run (no text guidance while inside "
                   "the memorized basin), at no extra UNet evaluation. Other images are left exactly as they were.")

    def protect(self, model: Any, threshold: float, strategy: str, steer_scale: float, max_steer_fraction: float,
                calibration: str = "", calibrated: str | None = None, unique_id: str | None = None,
                score: str = MAGNITUDE) -> tuple[Any, GuardState]:
        guarded, state = self.guard(model, threshold, CFG1_UNAVAILABLE, calibration, calibrated, unique_id, score)
        state.steer = ComfySteering(steer_scale, max_steer_fraction)
        return guarded, state


NODE_CLASS_MAPPINGS = {"DejaGuardMemorizationProtect": DejaGuardMemorizationProtect}
NODE_DISPLAY_NAME_MAPPINGS = {"DejaGuardMemorizationProtect": "DejaGuard Memorization Protect"}

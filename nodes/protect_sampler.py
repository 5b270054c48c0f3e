"""DejaGuard Protected Sampler: a KSampler with auto-protect, all three strategies of :mod:`core.protect`.

The Memorization Protect node (:mod:`nodes.protect`) patches a MODEL, so it can only change what the sampler
computes anyway: the ``guidance`` strategy. The two other strategies sample a flagged image *again*, which needs
the sampler itself; this node is that sampler. It takes KSampler's inputs and runs the one implementation of the
method, :func:`core.protect.protect`, on :class:`ComfySampler` (the ComfyUI side of
:class:`core.protect.ProtectSampler`):

1. The whole batch is sampled exactly as ``nodes.common_ksampler`` samples it (same noise from the seed, same
   sampler call), through the Memorization Guard's clone (the first-step score, the threshold and its source, the
   handle for a Verdict node) with one more post-CFG function: the ``guidance`` strategy's steering
   (:func:`nodes.protect.steer_denoised`, no extra UNet evaluation) or, for the other strategies, a policy that only
   records the first-step scores. Images that are not flagged are this pass's, bit-identical to a plain KSampler.
2. ``embedding``: each flagged image's positive conditioning is optimized on its own ``x_T`` by
   :func:`core.mitigate.mitigate_embedding` through :class:`~nodes.comfy_denoiser.ComfyDenoiser` (as the Mitigate
   Embedding node does, SDXL's pooled output included), then the image is sampled again from the same noise with
   it. ``mask``: the flagged images are sampled again from the same noise on a clone of the MODEL with the
   NEURON_MASK's weight patches (:func:`nodes.neurons.apply_mask_patches`; the cached model is never changed).
   Neither second pass goes through the guard: the guard's run stays the batch's first pass, and its final
   prediction is replaced by the protected batch so that a Verdict node finds it.

Support: the strategy's feature must be supported by the family (:func:`nodes.model_check.check_supported`:
``guard``, ``mitigate`` or ``masks``), else a one-line refusal before anything is sampled. CFG must exceed 1 (the
score needs the unconditional prediction). Levels of the embedding strategy: ``target`` 0 = the calibrated
mitigation target (:func:`nodes.mitigate.resolve_levels`, found where the Guard finds its threshold); the
mitigation skips an image whose own first-step magnitude is already at or below the detection threshold (the
library's rule) with the magnitude score, or below the target with another score option.

Cost, counted here: a second pass costs 2 noise predictions per image per model call (each post-CFG call is one
cond/uncond pair per image), the optimization what ComfyDenoiser's counter counts; they are reported per image
(``extra_unet_evals``) beside the score before -> after, in the node's badge (the Verdict's payload under
``dejaguard``) and its ``summary`` output. Ancestral and SDE samplers draw fresh noise at every step from the seed
for the whole batch, so a re-sampled image's later-step noise differs from its first pass's (its ``x_T`` is the same).

Shapes: ``B`` images, latents and noise ``(B, C, H, W)``, conditioning ``(1, L, D)`` (SDXL packed ``(1, L + 1,
D)`` for the optimization).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..core.detect import MAGNITUDE, check_score
from ..core.errors import DejaGuardError
from ..core.mitigate import mitigate_embedding
from ..core.protect import (
    DEFAULT_MAX_STEER_FRACTION,
    DEFAULT_STEER_SCALE,
    STRATEGIES,
    GuidanceSteering,
    SteeringFactory,
    check_strategy,
    protect,
)
from .comfy_denoiser import ComfyDenoiser
from .guard import CFG1_UNAVAILABLE, GUARD_TYPE, DejaGuardMemorizationGuard, GuardState, _uncond_skipped
from .mitigate import conditioning_entry, denoiser_layout, resolve_levels
from .model_check import check_supported
from .neurons import MASK_TYPE, apply_mask_patches
from .protect import protection_record, steer_denoised

# The support-matrix feature each strategy needs (nodes/model_check.py).
STRATEGY_FEATURES = {"guidance": "guard", "embedding": "mitigate", "mask": "masks"}


class ComfySampler:
    """:class:`core.protect.ProtectSampler` over ComfyUI's sampler (``comfy.sample.sample``) for one KSampler-like
    call. The first :meth:`sample` goes through ``watched`` (the guard's clone), later ones through ``model``
    (a neuron-mask clone of it for ``mask``). Every call reuses ``prepare_noise(latent, seed)``'s rows."""

    def __init__(self, watched: Any, model: Any, seed: int, steps: int, cfg: float, sampler_name: str,
                 scheduler: str, positive: list, negative: list, latent_image: dict[str, Any], denoise: float,
                 score: str = MAGNITUDE) -> None:
        self.watched, self.model = watched, model
        self.seed, self.steps, self.cfg, self.denoise = seed, steps, cfg, denoise
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.positive, self.negative, self.score = positive, negative, score
        latent = latent_image["samples"]
        fix = getattr(comfy.sample, "fix_empty_latent_channels", None)  # newer ComfyUI, as common_ksampler
        self.latent = fix(model, latent) if fix is not None else latent
        self.noise = comfy.sample.prepare_noise(self.latent, seed, latent_image.get("batch_index"))
        self.noise_mask = latent_image.get("noise_mask")
        self.passes = 0
        self.sampled_evals = 0  # noise predictions of this node's sampler calls
        self.denoiser: ComfyDenoiser | None = None  # built at the first mitigation

    def evals(self) -> int:
        return self.sampled_evals + (self.denoiser.counter.forwards if self.denoiser is not None else 0)

    def sample(self, rows: Sequence[int], steering: SteeringFactory, embeddings: Sequence[torch.Tensor] | None = None,
               mask: Any = None) -> torch.Tensor:
        rows = list(rows)
        base = self.watched if self.passes == 0 else self.model
        if mask is not None:
            base = apply_mask_patches(self.model, mask, 1.0)
        self.passes += 1
        if embeddings is None:
            groups = [(rows, self.positive)]
        else:  # one mitigated conditioning per image: one sampler call each
            extra = self.positive[0][1]
            groups = [([r], [conditioning_entry(self._pooled_width(), e, extra)]) for r, e in zip(rows, embeddings)]
        out, start = [], 0
        for group, positive in groups:
            out.append(self._run(base, group, positive, steering(start, start + len(group))))
            start += len(group)
        return torch.cat(out)

    def _run(self, base: Any, rows: list[int], positive: list, policy: GuidanceSteering) -> torch.Tensor:
        """One sampler call for the images ``rows`` with ``policy`` on its post-CFG arguments."""
        import latent_preview

        model = base.clone()

        def dejaguard_protect(args: dict[str, Any]) -> torch.Tensor:  # a plain closure: clone() deep-copies options
            self.sampled_evals += int(args["input"].shape[0]) * (1 if _uncond_skipped(args) else 2)
            return steer_denoised(policy, args, self.score)

        model.set_model_sampler_post_cfg_function(dejaguard_protect)
        everything = rows == list(range(self.latent.shape[0]))
        index = torch.tensor(rows, dtype=torch.long)
        noise, latent = (self.noise, self.latent) if everything else (self.noise[index], self.latent[index])
        noise_mask = self.noise_mask
        if noise_mask is not None and not everything and noise_mask.shape[0] == self.latent.shape[0]:
            noise_mask = noise_mask[index]
        return comfy.sample.sample(model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler, positive,
                                   self.negative, latent, denoise=self.denoise, noise_mask=noise_mask,
                                   callback=latent_preview.prepare_callback(model, self.steps),
                                   disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=self.seed)

    def _pooled_width(self) -> int:
        return self._denoiser().pooled_width

    def _denoiser(self) -> ComfyDenoiser:
        if self.denoiser is None:
            self.denoiser = ComfyDenoiser(self.model, None, sample_shape=tuple(self.latent.shape[1:]),
                                          feature="mitigate")
        return self.denoiser

    def mitigated_embedding(self, row: int, target: float, threshold: float) -> torch.Tensor:
        denoiser = self._denoiser()
        cond, extra = self.positive[0]
        with torch.inference_mode(False):  # graphs run under inference mode; core clones what it optimizes
            result = mitigate_embedding(denoiser, denoiser_layout(denoiser.pooled_width, cond, extra),
                                        self.noise[row : row + 1], target,
                                        uncond=denoiser_layout(denoiser.pooled_width, *self.negative[0]),
                                        threshold=threshold)
        return result.embedding


class DejaGuardProtectedSampler:
    """KSampler + auto-protect: flagged images are steered (guidance) or re-sampled (embedding, mask)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        guard = DejaGuardMemorizationGuard.INPUT_TYPES()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x, SD2.x, SDXL, SD3 or the DejaGuard testbed; "
                                               "which strategies a family supports: see the README). Not modified."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "As KSampler: the initial noise. A re-sampled image starts from its own "
                                            "noise of this seed."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Must exceed 1: the score needs the unconditional prediction."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING", {"tooltip": "An empty prompt matches the calibrated threshold."}),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
                "strategy": (list(STRATEGIES), {
                    "default": "guidance",
                    "tooltip": "What happens to an image flagged at the first step. guidance: sampled on without "
                               "text guidance (no extra UNet evaluation). embedding: its conditioning is optimized "
                               "until its score meets the target, then it is sampled again from the same noise. "
                               "mask: sampled again from the same noise with the neuron mask on. Images that are "
                               "not flagged come out exactly as from KSampler."}),
                "threshold": guard["required"]["threshold"],
                "steer_scale": ("FLOAT", {
                    "default": DEFAULT_STEER_SCALE, "min": -10.0, "max": 10.0, "step": 0.1,
                    "tooltip": "guidance: the guidance scale of a flagged image while steered (0 = none)."}),
                "max_steer_fraction": ("FLOAT", {
                    "default": DEFAULT_MAX_STEER_FRACTION, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "guidance: steer at most within this first share of the noise schedule."}),
                "target": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 10000.0, "step": 0.001,
                    "tooltip": "embedding: the first-step score a flagged image's conditioning is pushed to. 0 = "
                               "half the calibrated median score of non-memorized prompts."}),
            },
            "optional": {
                "neuron_mask": (MASK_TYPE, {"tooltip": "mask: the neuron mask switched on for flagged images (from "
                                                       "Localize Neurons or Load Neuron Mask)."}),
                "calibration": guard["optional"]["calibration"],
                "score": guard["optional"]["score"],
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT", GUARD_TYPE, "STRING")
    RETURN_NAMES = ("samples", "guard", "summary")
    OUTPUT_TOOLTIPS = ("The protected batch: flagged images steered or re-sampled, the others as KSampler makes them.",
                       "Optional: the guard handle, for a Memorization Verdict node with this LATENT.",
                       "Per image: score, verdict, and what auto-protect did at what cost.")
    FUNCTION = "sample"
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("A KSampler that never hands back a memorized copy it can detect: an image whose first-step "
                   "memorization score exceeds the threshold is steered away (guidance, free) or sampled again from "
                   "the same noise with a mitigated prompt embedding or a neuron mask. Other images are unchanged.")

    def sample(self, model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive: list,
               negative: list, latent_image: dict[str, Any], denoise: float, strategy: str, threshold: float,
               steer_scale: float, max_steer_fraction: float, target: float, neuron_mask: Any = None,
               calibration: str = "", score: str = MAGNITUDE, unique_id: str | None = None) -> dict[str, Any]:
        if strategy == "mask" and neuron_mask is None:
            raise DejaGuardError("the mask strategy needs a neuron mask: connect Load Neuron Mask or Localize Neurons "
                                 "to 'neuron_mask'")
        check_strategy(strategy, neuron_mask)
        check_supported(model, STRATEGY_FEATURES[strategy])  # one line, before anything is sampled
        if cfg <= 1.0:
            raise DejaGuardError(f"auto-protect needs CFG > 1 (got {cfg:g}): at CFG 1 ComfyUI computes no "
                                 "unconditional prediction, so there is no first-step score")
        check_score(score)
        if strategy == "embedding" and len(positive) != 1:
            raise DejaGuardError(f"the embedding strategy optimizes one conditioning; got {len(positive)} entries "
                                 "(combine them first or use the guidance strategy)")
        watched, state = DejaGuardMemorizationGuard().guard(model, threshold, CFG1_UNAVAILABLE, calibration, None,
                                                            unique_id, score)
        levels, gate = None, None
        if strategy == "embedding":
            levels = resolve_levels(model, state.threshold if score == MAGNITUDE else 0.0, target, calibration)
            gate = levels[0] if score == MAGNITUDE else levels[1]
        sampler = ComfySampler(watched, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                               latent_image, denoise, score)
        n = int(sampler.latent.shape[0])
        bar = comfy.utils.ProgressBar(2)
        result = protect(sampler, [""] * n, [int(seed)] * n, state.threshold, strategy,
                         lambda done, total, _stage="": bar.update_absolute(int(done), int(total)),
                         steer_scale=steer_scale, max_steer_fraction=max_steer_fraction,
                         target=None if levels is None else levels[1], mitigation_threshold=gate, mask=neuron_mask,
                         score=score)
        payload = finish_run(state, watched, result.samples, protection_record(result.images, strategy, steer_scale))
        out = latent_image.copy()
        out["samples"] = result.samples
        return {"ui": {"dejaguard": [payload]}, "result": (out, state, payload["summary"])}


def finish_run(state: GuardState, watched: Any, samples: torch.Tensor, protection: dict[str, Any]) -> dict[str, Any]:
    """Record auto-protect on the guard's run of this batch (its first pass) and make the protected ``samples``
    its final prediction (so a Verdict node matches this LATENT); the Verdict payload of that run."""
    shape = tuple(samples.shape)
    run = next((r for r in reversed(state.runs) if r.shape == shape), None)
    if run is None:
        raise DejaGuardError(f"the guard saw no sampling run of shape {shape}")
    run.protection = protection
    with torch.no_grad():
        run.last_denoised = watched.model.process_latent_in(samples.detach().clone())
    return state.payload(run, True)


NODE_CLASS_MAPPINGS = {"DejaGuardProtectedSampler": DejaGuardProtectedSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"DejaGuardProtectedSampler": "DejaGuard Protected Sampler"}

"""The DejaGuard Mitigate Embedding node: CONDITIONING -> CONDITIONING whose memorization score is at most a target.

Runs :func:`core.mitigate.mitigate_embedding` on the graph's MODEL through
:class:`~nodes.comfy_denoiser.ComfyDenoiser`: AdamW on the positive conditioning ``(1, L, D)`` at the first
sampling step, on the very x_T the following KSampler starts from (``comfy.sample.prepare_noise(latent, seed)``,
the same seed and latent): if the text-conditional magnitude ``||eps(x_T, positive) - eps(x_T, negative)||``
(mean over the latent batch) exceeds the threshold, until it is at or below the target. Conditioning at or
below the threshold comes back unchanged (the same tensors, zero iterations). Defaults (0) come from the
model's calibration: threshold = detection threshold, target = half the median score of non-memorized prompts
(``core.calibration.resolve_levels``). The negative conditioning plays the unconditional prompt; the calibration
assumes an empty negative prompt, as the Memorization Guard does.

SDXL: its CONDITIONING carries CLIP-G's pooled output (``pooled_output``, ``(1, 1280)``) beside the hidden states
``(1, 77, 2048)``; the UNet reads it through its ``adm`` input. The node packs it as one extra row
(``core/conditioning.py``: ``(1, 78, 2048)``, the layout of :class:`~nodes.comfy_denoiser.ComfyDenoiser` for SDXL),
so the optimization steers both, and unpacks the result into CONDITIONING again (the mitigated hidden states and
``pooled_output``; the entry's other options, e.g. CLIPTextEncodeSDXL's sizes, are kept). The adm input uses the
latent's size x 8 as image and target size, no crop: ComfyUI's sampler default.

Runs outside inference mode on cloned tensors (graphs execute under ``torch.inference_mode()``); the cached model
and the input conditioning are not modified. Reports iterations, score before/after and UNet passes in its ``ui``
(``dejaguard_mitigation``) and as a STRING.
"""

from __future__ import annotations

from typing import Any

import comfy.sample
import comfy.utils
import torch

from ..core.calibration import resolve_levels as core_resolve_levels
from ..core.conditioning import pack_pooled, unpack_pooled
from ..core.errors import DejaGuardError
from ..core.mitigate import (
    DEFAULT_LR,
    DEFAULT_MAX_ITERATIONS,
    MitigationResult,
    mitigate_embedding,
)
from .comfy_denoiser import ComfyDenoiser
from .guard import NO_THRESHOLD_HINT, calibration_location
from .model_check import comfy_fingerprint

UI_KEY = "dejaguard_mitigation"


def resolve_levels(model: Any, threshold: float, target: float, calibration: str = "") -> tuple[float, float, str]:
    """(threshold, target, where they came from): values > 0 set on the node win; 0 = from the calibration that
    matches this model, found where the Guard finds its threshold (:func:`nodes.guard.calibration_location`: the
    node's ``calibration``, else DejaGuard Calibrate's file for this model, else the bundled testbed's), by
    :func:`core.calibration.resolve_levels`."""
    given = (threshold if threshold > 0 else None, target if target > 0 else None)
    fingerprint = "" if None not in given else comfy_fingerprint(model)
    try:
        levels = core_resolve_levels(*given, calibration_location(calibration, fingerprint), fingerprint)
    except DejaGuardError as err:
        if None not in given:
            raise
        raise DejaGuardError(f"this model has no calibrated mitigation levels: {err}; {NO_THRESHOLD_HINT}") from err
    return levels.threshold, levels.target, "set on the node" if levels.source == "given" else levels.source


def summary_text(entries: list[dict[str, Any]], threshold: float, target: float, source: str) -> str:
    lines = [f"DejaGuard embedding mitigation: threshold {threshold:.4g}, target {target:.4g} ({source})"]
    for i, e in enumerate(entries):
        state = "unchanged (at or below the threshold)" if e["iterations"] == 0 else (
            "target met" if e["reached"] else "target NOT met")
        lines.append(f"conditioning {i + 1}: score {e['score_before']:.4g} -> {e['score_after']:.4g}, "
                     f"{e['iterations']} iterations, {e['unet_forwards']} UNet forwards / "
                     f"{e['unet_backwards']} backwards: {state}")
    return "\n".join(lines)


def denoiser_layout(pooled_width: int, cond: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
    """One CONDITIONING entry -> the adapter's conditioning tensor: ``cond (1, L, D)`` itself, or for a model with a
    pooled input (SDXL, ``pooled_width`` 1280) ``cond`` with ``extra["pooled_output"] (1, P)`` packed,
    ``(1, L + 1, D)``."""
    if not pooled_width:
        return cond
    pooled = extra.get("pooled_output")
    if pooled is None:
        raise DejaGuardError("DejaGuard Mitigate Embedding: SDXL conditioning without a pooled output; connect "
                             "CLIPTextEncode (or CLIPTextEncodeSDXL) outputs of the SDXL checkpoint's CLIP")
    return pack_pooled(cond, pooled.to(cond.device))


def conditioning_entry(pooled_width: int, embedding: torch.Tensor, extra: dict[str, Any]) -> list[Any]:
    """The inverse of :func:`denoiser_layout`: an optimized conditioning tensor -> ``[cond, extra]`` with the
    entry's other options kept (SDXL: the optimized pooled row as ``pooled_output``)."""
    if not pooled_width:
        return [embedding, extra.copy()]
    cond, pooled = unpack_pooled(embedding, pooled_width)
    return [cond.clone(), {**extra, "pooled_output": pooled.clone()}]


class DejaGuardMitigateEmbedding:
    """Optimizes the positive conditioning so the memorization score of the next KSampler run falls to a target."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the KSampler uses (SD1.x / SD2.x / SDXL UNet or "
                                               "the DejaGuard testbed). It is not modified."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning (from CLIPTextEncode). SDXL: its "
                                                         "pooled output is optimized together with it."}),
                "negative": ("CONDITIONING", {
                    "tooltip": "The KSampler's negative conditioning; it stands for the unconditional prediction "
                               "(an empty prompt matches the calibrated threshold)."}),
                "latent_image": ("LATENT", {"tooltip": "The KSampler's latent (e.g. Empty Latent Image): its size "
                                                       "and batch set the initial noise."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "The KSampler's seed: the optimization runs on that seed's initial "
                                            "noise, so it targets the image the KSampler makes."}),
                "threshold": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 10000.0, "step": 0.001,
                    "tooltip": "Mitigate only if the first-step score exceeds this. 0 = this model's calibrated "
                               "detection threshold (found automatically for the bundled testbed; else see "
                               "'calibration')."}),
                "target": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 10000.0, "step": 0.001,
                    "tooltip": "First-step score to push a mitigated prompt to. 0 = half the calibrated median "
                               "score of non-memorized prompts. Just below the detection threshold, or the median, "
                               "is not enough to stop a memorized image on the testbed."}),
                "lr": ("FLOAT", {"default": DEFAULT_LR, "min": 0.0001, "max": 10.0, "step": 0.001,
                                 "tooltip": "AdamW learning rate on the embedding (Wen et al.: 0.05; 0.3 reaches "
                                            "the default target within 30 iterations on the testbed)."}),
                "max_iterations": ("INT", {"default": DEFAULT_MAX_ITERATIONS, "min": 0, "max": 200,
                                           "tooltip": "At most this many optimizer steps (each one UNet forward and "
                                                      "backward); stops early at the target."}),
            },
            "optional": {
                "calibration": ("STRING", {
                    "default": "",
                    "tooltip": "Used when threshold or target is 0: a dejaguard_calibration.json or the diffusers "
                               "model folder holding it. Empty = the bundled testbed."}),
            },
        }

    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("positive", "report")
    OUTPUT_TOOLTIPS = ("The mitigated conditioning: connect it to the KSampler's positive input.",
                       "Iterations and score before/after, as text.")
    FUNCTION = "mitigate"
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("Switches memorization off at inference (Wen et al., ICLR 2024): optimizes the prompt embedding "
                   "at the first sampling step until its memorization score is at most the target. Prompts already "
                   "below the target pass through unchanged.")

    def mitigate(self, model: Any, positive: list, negative: list, latent_image: dict[str, torch.Tensor], seed: int,
                 threshold: float, target: float, lr: float, max_iterations: int,
                 calibration: str = "") -> dict[str, Any]:
        if not positive or not negative:
            raise DejaGuardError("DejaGuard Mitigate Embedding: empty conditioning; connect CLIPTextEncode outputs")
        samples = latent_image["samples"]
        denoiser = ComfyDenoiser(model, None, sample_shape=tuple(samples.shape[1:]), feature="mitigate")  # or refuses
        threshold, target, source = resolve_levels(model, threshold, target, calibration)
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))  # KSampler's own x_T
        units = max_iterations + 1  # per conditioning: iterates 0..max_iterations
        bar = comfy.utils.ProgressBar(len(positive) * units)

        def progress(done: float, _total: float, _stage: str = "") -> None:  # done: the iterate whose score is known
            bar.update_absolute(len(entries) * units + int(done) + 1)

        out, entries = [], []
        with torch.inference_mode(False):  # graphs run under inference mode; core clones what it optimizes
            uncond = denoiser_layout(denoiser.pooled_width, *negative[0])
            for cond, extra in positive:
                result: MitigationResult = mitigate_embedding(
                    denoiser, denoiser_layout(denoiser.pooled_width, cond, extra), noise, target, uncond=uncond,
                    threshold=threshold, lr=lr, max_iterations=max_iterations, progress=progress)
                entries.append(result.summary())
                out.append(conditioning_entry(denoiser.pooled_width, result.embedding, extra) if result.iterations
                           else [cond, extra])
        report = summary_text(entries, threshold, target, source)
        ui = [{**e, "levels_source": source} for e in entries]
        return {"ui": {UI_KEY: ui}, "result": (out if any(e["iterations"] for e in entries) else positive, report)}


NODE_CLASS_MAPPINGS = {"DejaGuardMitigateEmbedding": DejaGuardMitigateEmbedding}
NODE_DISPLAY_NAME_MAPPINGS = {"DejaGuardMitigateEmbedding": "DejaGuard Mitigate Embedding"}

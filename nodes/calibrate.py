"""The DejaGuard Calibrate node: a calibrated threshold for the user's own checkpoint, made in the graph.

A first-step score means nothing without a threshold for that model (design.md, section 3). This node scores
the bundled prompts known not to be memorized (:func:`core.prompt_sets.calibration_prompts`, MemAttn's 500
non-memorized prompts, MIT) exactly as the Memorization Guard will score a generation, and stores the
threshold where the Guard finds it by itself:

- **Same score.** Each prompt is sampled by ComfyUI itself for one step from full noise: conditioning from
  the CLIP as ``CLIPTextEncode`` builds it (``encode_from_tokens(..., return_pooled=True)``, so SDXL's pooled
  ``adm`` input is right), an empty negative prompt, ``comfy.sample.sample_custom`` at CFG 7.5 with sigmas
  ``[sigma_max, 0]`` of the model's own sampling object (its noise scaling, ``1.0`` for flow models), so
  ComfyUI batches the cond/uncond pair into one UNet call and hands both denoised predictions to a post-CFG
  function that applies the Guard's own :func:`~core.detect.scores_from_denoised`. Noise of prompt ``p``:
  ``randn((generations, C, H, W))`` seeded with :func:`core.sampling.prompt_seed` ``(p)``, so a rerun gives
  the same threshold.
- **Same score option.** The node's ``score`` input (magnitude or anisotropy, :data:`core.detect.SCORES`) is
  passed to :func:`~core.detect.scores_from_denoised` and is part of the stored setting, so a Guard with the
  same option finds this threshold and a Guard with the other option never does.
- **Same setting.** Each noise is one image as the Guard scores it (one noise per image), so with
  ``generations`` noises per prompt all ``prompts x generations`` scores enter the quantile, and the entry is
  stored under the Guard's :class:`~core.detect.ScoreSettings` key (first step, one noise per score).
- **Threshold rule.** The ``1 - target_fpr`` quantile (``method="higher"``, core's rule in
  :func:`core.calibration.calibrate`): flagged means ``score > threshold``, so at most ``target_fpr`` of
  the non-memorized scores are flagged. With fewer than ``1 / target_fpr`` scores (a quick run with
  ``prompt_limit``) the threshold is their maximum and the summary says that the FPR is not calibrated.
- **Where it goes.** :func:`core.calibration.save_calibration` into ``<user dir>/dejaguard/calibrations/
  <fingerprint>.json`` (:func:`~nodes.guard.user_calibration_file`), one file per model (core's file format holds one
  model per setting), keyed by :func:`~nodes.model_check.comfy_fingerprint`. ``<user dir>`` is ComfyUI's
  ``folder_paths.get_user_directory()`` (``folder_paths.user_directory`` on ComfyUI versions without the
  function, i.e. ``ComfyUI/user``). The Guard looks there first, then in the bundled testbed's file.

Calibrate once: a later run with the same settings on the same model reuses the saved calibration at no cost
(unless ``recalibrate``), so the node can stay in the graph; its ``calibration`` output, connected to the
Guard's ``calibrated`` input, makes the Guard run after it in the same queue.

Cost: one UNet call per prompt (``generations`` cond/uncond pairs batched), reported with the wall time.
ComfyUI's progress bar advances per prompt and the queue's interrupt stops the run between prompts.

Shapes: latents ``(G, C, H, W)`` with ``G = generations``; scores ``(G,)`` per prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.calibration import Calibration, calibration_from_scores, read_calibrations, save_calibration
from ..core.detect import MAGNITUDE, SCORES, ScoreSettings, scores_from_denoised
from ..core.errors import DejaGuardError, NonFiniteError
from ..core.progress import Progress, report
from ..core.prompt_sets import calibration_prompts
from ..core.sampling import prompt_seed
from .guard import CALIBRATION_TYPE, user_calibration_file
from .model_check import ModelInfo, check_supported, comfy_fingerprint, model_sampling

PROMPTS_SOURCE = "bundled calibration prompts (MemAttn non-memorized, MIT)"
_NATIVE_PX = {"sd1": 512, "sd2": 512, "sd2_v": 768, "sdxl": 1024, "sd3": 1024}


def native_latent_size(model: Any, info: ModelInfo) -> tuple[int, int]:
    """``(H, W)`` of the latent at the model's native resolution: 512 px SD1.x/SD2.x, 768 px SD2.x v-prediction,
    1024 px SDXL/SD3, the configured size for the testbed (a diffusers folder)."""
    from .comfy_denoiser import default_sample_shape
    from .diffusers_folder import DiffusersModelConfig

    if isinstance(model.model.model_config, DiffusersModelConfig):
        return default_sample_shape(model)[1:]
    side = _NATIVE_PX.get(info.family, 512) // 8
    return side, side


def encode_text(clip: Any, text: str) -> list[list[Any]]:
    """CONDITIONING as ComfyUI's ``CLIPTextEncode`` builds it: ``[[cond (1, 77k, D), {"pooled_output": ...}]]``."""
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@dataclass
class CalibrationRun:
    """Scores of one calibration run and what it cost."""

    scores: list[float]  # prompt-major: prompt i, noise g at i * generations + g
    unet_calls: int  # UNet (apply_model) calls
    seconds: float


def first_step_scores_comfy(model: Any, clip: Any, prompts: Sequence[str], generations: int = 1,
                            latent_size: tuple[int, int] | None = None,
                            progress: Progress | None = None, score: str = MAGNITUDE) -> CalibrationRun:
    """Score ``prompts`` as the Guard scores a generation (see the module doc); ``generations`` noises each,
    with the score option ``score``.

    ``latent_size`` ``(H, W)``: default the model's native size. ``progress(done, total, "calibrating")`` is
    called before the first and after every prompt (the node raises ComfyUI's interruption from it).
    """
    import comfy.sample
    import comfy.samplers

    info = check_supported(model, "calibrate")
    if generations < 1:
        raise DejaGuardError("generations must be at least 1")
    base = model.model
    h, w = latent_size or native_latent_size(model, info)
    channels = int(getattr(base.latent_format, "latent_channels", 4))
    sigma_max = float(model_sampling(model).sigma_max)
    sigmas = torch.tensor([sigma_max, 0.0])
    found: list[torch.Tensor] = []
    calls = [0]

    def dejaguard_calibrate_post_cfg(args: dict[str, Any]) -> torch.Tensor:  # a plain closure: clone deep-copies
        if args.get("uncond_denoised") is None:
            raise DejaGuardError("the sampler computed no unconditional prediction (CFG 1?)")
        found.append(scores_from_denoised(args["input"], args["cond_denoised"], args["uncond_denoised"],
                                          args["sigma"], score).cpu())
        return args["denoised"]

    previous = model.model_options.get("model_function_wrapper")

    def dejaguard_count_calls(apply_model: Callable[..., torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        calls[0] += 1
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    scorer = model.clone()
    scorer.set_model_sampler_post_cfg_function(dejaguard_calibrate_post_cfg)
    scorer.set_model_unet_function_wrapper(dejaguard_count_calls)
    sampler = comfy.samplers.sampler_object("euler")
    negative = encode_text(clip, "")
    latent = torch.zeros(generations, channels, h, w)
    cfg = ScoreSettings().guidance_scale
    scores: list[float] = []
    start = time.monotonic()
    report(progress, 0, len(prompts), "calibrating")
    for i, prompt in enumerate(prompts):
        seed = prompt_seed(prompt)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
        found.clear()
        comfy.sample.sample_custom(scorer, noise, cfg, sampler, sigmas, encode_text(clip, prompt), negative, latent,
                                   disable_pbar=True, seed=seed)
        if len(found) != 1:
            raise DejaGuardError(f"expected one first-step prediction per prompt, the sampler made {len(found)}")
        values = [float(s) for s in found[0]]
        if not all(math.isfinite(s) for s in values):
            raise NonFiniteError(f"a calibration score is NaN or infinite (prompt {i + 1}: {prompt!r})")
        scores.extend(values)
        report(progress, i + 1, len(prompts), "calibrating")
    return CalibrationRun(scores, calls[0], time.monotonic() - start)


def calibrate_model(model: Any, clip: Any, target_fpr: float = 0.01, generations: int = 1, prompt_limit: int = 0,
                    latent_size: tuple[int, int] | None = None, progress: Progress | None = None,
                    recalibrate: bool = False, score: str = MAGNITUDE) -> tuple[Calibration, Path, str]:
    """Calibrate ``model`` on the bundled prompts (the first ``prompt_limit``, 0 = all) and save it for the Guard.

    Calibrate once: when this model's file already holds a calibration of the same run (prompts, noises, size,
    target FPR) it is returned without scoring, unless ``recalibrate``. Returns (calibration, file, summary).
    """
    info = check_supported(model, "calibrate")
    prompts = calibration_prompts()
    if prompt_limit > 0:
        prompts = prompts[:prompt_limit]
    size = latent_size or native_latent_size(model, info)
    fingerprint = comfy_fingerprint(model)
    settings = ScoreSettings(score=score)
    source = (f"{PROMPTS_SOURCE}: {len(prompts)} prompts x {generations} noise(s), {size[1] * 8}x{size[0] * 8} px, "
              f"DejaGuard Calibrate in ComfyUI ({info.family}, {info.prediction})")
    file = user_calibration_file(fingerprint)
    saved = read_calibrations(file).get(settings.key()) if file.is_file() and not recalibrate else None
    if saved and saved.get("prompts_source") == source and saved.get("target_fpr") == target_fpr \
            and saved.get("fingerprint") == fingerprint:  # calibrate once: the same run was made before
        try:
            calibration = Calibration(**saved)
        except TypeError as err:
            raise DejaGuardError(f"malformed calibration file {file}: {err}; set recalibrate") from None
        return calibration, file, (f"DejaGuard Calibrate: threshold {calibration.threshold:.4g} for a {target_fpr:g} "
                                   f"false-positive rate, calibrated {calibration.created} ({source}); found in "
                                   f"{file}: 0 UNet calls (set recalibrate to run again).")
    run = first_step_scores_comfy(model, clip, prompts, generations, size, progress, score)
    channels = int(getattr(model.model.latent_format, "latent_channels", 4))  # as first_step_scores_comfy scores
    calibration = calibration_from_scores(run.scores, target_fpr, settings, fingerprint, source, len(prompts),
                                          sample_shape=(channels, *size))
    threshold = calibration.threshold
    file = save_calibration(calibration, file)
    needed = math.ceil(1 / target_fpr)
    lines = [f"DejaGuard Calibrate: threshold {threshold:.4g} for a {target_fpr:g} false-positive rate on "
             f"{len(run.scores)} scores ({len(prompts)} non-memorized prompts x {generations} noise(s), "
             f"{size[1] * 8}x{size[0] * 8} px, {FAMILY_SCORE[info.prediction]}"
             f"{'' if score == MAGNITUDE else f'; {score} score built on it'}).",
             f"cost: {run.unet_calls} UNet calls, {run.seconds:.1f} s wall time.",
             f"saved for model {fingerprint} ({settings.key()}) in {file}; the Memorization Guard finds it "
             "when its threshold is 0."]
    if getattr(model, "patches", None):
        lines.append(f"note: the model carries {len(model.patches)} weight patches (LoRA, neuron mask): they were "
                     "active while scoring, but the calibration is stored under the unpatched checkpoint's "
                     "fingerprint.")
    if len(run.scores) < needed:
        lines.append(f"note: quick run: {len(run.scores)} scores < 1/target_fpr = {needed}, so the threshold is "
                     "their maximum and the false-positive rate is not calibrated; run all 500 prompts.")
    return calibration, file, "\n".join(lines)


FAMILY_SCORE = {"epsilon": "score ||eps_c - eps_u||", "v-prediction": "score ||eps_c - eps_u|| of the implied noise",
                "flow": "score ||v_c - v_u|| of the velocity"}


class DejaGuardCalibrate:
    """MODEL + CLIP -> calibrated threshold (saved for the Guard) + summary."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's model (SD1.x, SD2.x, SDXL, SD3). Not changed."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder(s)."}),
                "target_fpr": ("FLOAT", {
                    "default": 0.01, "min": 0.001, "max": 0.5, "step": 0.001,
                    "tooltip": "Share of non-memorized prompts the Guard may flag (threshold = the 1 - target_fpr "
                               "quantile of their scores)."}),
                "generations": ("INT", {
                    "default": 1, "min": 1, "max": 16,
                    "tooltip": "Noises per prompt; each is scored as the Guard scores one image, and all enter "
                               "the quantile. More noises: a steadier threshold, proportionally more time."}),
                "prompt_limit": ("INT", {
                    "default": 0, "min": 0, "max": 500,
                    "tooltip": "Score only the first N bundled prompts (a quick check); 0 = all 500."}),
            },
            "optional": {
                "recalibrate": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Off: a calibration of this model with the same settings, saved before, is reused "
                               "at no cost (calibrate once, keep the node in the graph). On: score again."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                  "tooltip": "Image width to calibrate at; 0 = the model's native size. Use the "
                                             "size you generate at: scores depend on it."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8,
                                   "tooltip": "Image height; 0 = the model's native size."}),
                "score": (list(SCORES), {
                    "default": MAGNITUDE,
                    "tooltip": "The score option to calibrate, as set on the Memorization Guard: 'magnitude' "
                               "(||eps_c - eps_u||) or 'anisotropy' (that norm plus twice its mean cosine with "
                               "eps_u). Each option has its own threshold; the Guard uses only its own."}),
            },
        }

    RETURN_TYPES = ("FLOAT", "STRING", CALIBRATION_TYPE)
    RETURN_NAMES = ("threshold", "summary", "calibration")
    OUTPUT_TOOLTIPS = ("The calibrated threshold (also saved: Guards with threshold 0 find it).",
                       "Threshold, prompts scored, UNet calls, wall time and where it was saved.",
                       "Connect to the Memorization Guard's 'calibrated' input: the Guard then runs after this node "
                       "and uses its threshold.")
    FUNCTION = "calibrate"
    CATEGORY = "DejaGuard"
    OUTPUT_NODE = True
    DESCRIPTION = ("Calibrates the Memorization Guard for this model: scores 500 bundled prompts known not to be "
                   "memorized at the first sampling step, as the Guard does, and saves the threshold in ComfyUI's "
                   "user directory. Run it once per checkpoint; the Guard (threshold 0) then finds it.")

    def calibrate(self, model: Any, clip: Any, target_fpr: float, generations: int, prompt_limit: int,
                  recalibrate: bool = False, width: int = 0, height: int = 0,
                  score: str = MAGNITUDE) -> dict[str, Any]:
        import comfy.model_management
        import comfy.utils

        info = check_supported(model, "calibrate")
        native = native_latent_size(model, info)
        size = (height // 8 if height else native[0], width // 8 if width else native[1])
        bar = comfy.utils.ProgressBar(1)

        def progress(done: float, total: float, _stage: str = "") -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(done, total)

        calibration, file, summary = calibrate_model(model, clip, target_fpr, generations, prompt_limit, size,
                                                     progress, recalibrate, score)
        return {"ui": {"text": [summary]}, "result": (calibration.threshold, summary, str(file))}


NODE_CLASS_MAPPINGS = {"DejaGuardCalibrate": DejaGuardCalibrate}
NODE_DISPLAY_NAME_MAPPINGS = {"DejaGuardCalibrate": "DejaGuard Calibrate"}

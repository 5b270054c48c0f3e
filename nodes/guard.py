"""The Memorization Guard and Memorization Verdict nodes: a first-step memorization score inside any sampler.

The guard clones the ModelPatcher (the input MODEL, cached for other graphs, is never changed) and
adds a post-CFG function. ComfyUI calls it once per sampling step with the conditional and
unconditional denoised predictions it has already computed, so at the first step of a run the score
``||(x - denoised_cond) / sigma - (x - denoised_uncond) / sigma||_2`` per image costs no extra UNet
evaluation when CFG > 1. What that quantity is depends on the family's parametrization
(:mod:`nodes.model_check` decides the family, once):

- epsilon models (SD1.x, SD2.x 512, SDXL): ``(x - denoised) / sigma`` is the predicted noise, so the score
  is Wen et al.'s ``||eps(x_T, c) - eps(x_T, empty)||``.
- v-prediction models (SD2.x 768): the same formula gives the noise implied by the v prediction, so the score
  is again the noise-prediction difference.
- flow-matching models (SD3): ``x = (1 - sigma) x0 + sigma noise`` and the first sigma is 1.0, so the implied
  noise equals ``x`` for every prompt and its difference is identically 0; the same formula is the model's
  velocity ``v = (x - denoised) / sigma``, and the score is ``||v(x_T, c) - v(x_T, empty)||``. Its scale is
  not comparable with the other families': every family is calibrated on its own (DejaGuard Calibrate).

Score option (the node's ``score`` input, :data:`core.detect.SCORES`): ``magnitude`` (the default, the norm
above) or ``anisotropy`` (that norm plus twice the mean per-position cosine between the unconditional
prediction and the guidance direction, Asthana & Belagiannis 2026). Both are computed by
:func:`core.detect.prediction_scores` from the same two predictions, so neither costs a UNet evaluation; the
threshold is looked up for the chosen option only (each has its own calibration entry).

A run is "full noise" (comparable with the calibrated threshold) when its first sigma is the model's own
``sigma_max`` (1.0 for flow models), read from the model's sampling object.

Thresholds: a value on the node wins; else the calibration of this model (by weight fingerprint) in the file
named on the node, else the one DejaGuard Calibrate saved in ComfyUI's user directory
(:func:`user_calibration_file`), else the bundled testbed's; the verdict says which. The score is an L2 norm over
the latent and grows with the image area: when the calibration records its size (``sample_shape``) and a run's
latent has another, the summary, the progress message and the badge say "calibrated at 512x512, this run
512x768: threshold may not apply" (:func:`core.calibration.size_note`; no rescaling).

A run's first step is recognized without newer-only APIs: sigmas never rise within a run, so a call
whose sigma is above the previous call's starts a new run (details in :func:`starts_new_run`;
``sample_sigmas`` in the transformer options of newer ComfyUI versions is an extra signal when present).

The score exists only after sampling, so the guard also outputs a handle (``DEJAGUARD_GUARD``). The
Verdict node takes the handle and the sampled LATENT (so it runs after the sampler), finds that
sampler's run and returns its scores (FLOAT: the maximum over the batch; BOOLEAN: any image
flagged; STRING: a per-image summary) plus a ``ui`` payload the web extension draws as a badge.
During sampling a ``dejaguard.score`` message reaches the page (``PromptServer.send_sync``).

Shapes: ``B`` images in the batch, latents ``(B, C, H, W)``, ``sigma`` ``(B,)``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.calibration import find_calibration, size_note
from ..core.detect import MAGNITUDE, SCORE_DESCRIPTIONS, SCORES, ScoreSettings, check_score, scores_from_denoised
from ..core.errors import DejaGuardError
from .model_check import ModelInfo, check_supported, comfy_fingerprint

log = logging.getLogger("DejaGuard")

GUARD_TYPE = "DEJAGUARD_GUARD"
CALIBRATION_TYPE = "DEJAGUARD_CALIBRATION"  # DejaGuard Calibrate's saved file (a path string) for the Guard
SCORE_EVENT = "dejaguard.score"
CFG1_UNAVAILABLE = "report unavailable"
CFG1_EXTRA_EVAL = "one extra UNet evaluation"
MAX_RUNS = 32  # sampling runs remembered per guard (a few floats each, plus the last run's final latent)
MATCH_TOL = 1e-2  # relative distance under which a run's last denoised prediction is "this LATENT"


# -- pure pieces ---------------------------------------------------------------------------------


def starts_new_run(sigma: float, last_sigma: float | None, last_was_first: bool = False,
                   first_scheduled: float | None = None) -> bool:
    """Whether a model call at ``sigma`` is the first step of a sampling run.

    Within a run sigmas never rise, and a sigma repeats only when a two-evaluation sampler (Heun)
    evaluates at ``sigma_{i+1}`` and then starts step ``i + 1`` there. So a call begins a new run when
    its sigma is above the previous call's, or equal to it while the previous call was itself the first
    of its run (back-to-back one-step runs). ``last_was_first``: whether the previous call started a
    run. ``first_scheduled``: the run's first sigma when the ComfyUI version tells it
    (``sample_sigmas[0]``), else None.
    """
    if last_sigma is None or sigma > last_sigma or (sigma == last_sigma and last_was_first):
        return True
    return first_scheduled is not None and sigma != last_sigma and math.isclose(sigma, first_scheduled, rel_tol=1e-6)


@dataclass
class RunRecord:
    """One sampling run seen by a guard."""

    index: int  # 1-based, per guard
    batch: int
    shape: tuple[int, ...]  # latent shape (B, C, H, W)
    first_sigma: float
    full_noise: bool  # first step at sigma_max: comparable with the calibrated threshold
    scores: list[float] | None  # per image; None when unavailable (CFG 1)
    flagged: list[bool]
    extra_unet_evals: int  # noise predictions the guard added: 0, or B (one unconditional pass) at CFG 1 on request
    status: str  # "ok" or why there is no score
    protection: dict[str, Any] | None = None  # auto-protect's record (nodes/protect.py): strategy, cost, images
    last_denoised: torch.Tensor | None = field(default=None, repr=False)  # (B, C, H, W), model latent space


def summarize(run: RunRecord, threshold: float, source: str, notes: Sequence[str] = ()) -> str:
    """The human-readable verdict: one headline, then one line per image, then notes."""
    if run.scores is None:
        lines = [f"DejaGuard: no score ({run.status})."]
    else:
        n = sum(run.flagged)
        head = (f"DejaGuard: {n} of {run.batch} image{'s' if run.batch > 1 else ''} likely MEMORIZED"
                if n else f"DejaGuard: no memorization detected in {run.batch} image{'s' if run.batch > 1 else ''}")
        lines = [f"{head} (threshold {threshold:.4g}, {source})."]
        for i, (s, f) in enumerate(zip(run.scores, run.flagged)):
            lines.append(f"image {i + 1}: score {s:.4g} {'>' if f else '<='} {threshold:.4g}"
                         f"{'  MEMORIZED' if f else '  ok'}")
    if run.extra_unet_evals:
        lines.append(f"spent {run.extra_unet_evals} extra noise prediction{'s' if run.extra_unet_evals > 1 else ''} "
                     "(CFG 1 has no unconditional prediction)")
    if not run.full_noise:
        lines.append(f"note: the run started at sigma {run.first_sigma:.4g}, below sigma_max (img2img, denoise < 1 "
                     "or a late start step): the threshold is calibrated for the first step of a full-noise run")
    if run.protection:
        lines.append(f"auto-protect: strategy {run.protection['strategy']}, "
                     f"{run.protection['extra_unet_evals']} extra UNet evaluations")
        lines.extend(f"image {i + 1}: {line}" for i, line in enumerate(run.protection["lines"]) if line)
    lines.extend(f"note: {n}" for n in notes)
    return "\n".join(lines)


def match_run(runs: Sequence[RunRecord], samples: torch.Tensor,
              to_latent: Callable[[torch.Tensor], torch.Tensor]) -> tuple[RunRecord, bool]:
    """The run that produced ``samples`` ``(B, C, H, W)``: (run, matched by content).

    A sampler's output is (for samplers that end at sigma 0) its last denoised prediction mapped to
    latent space (``to_latent``), so the run whose last prediction is nearest wins when within
    ``MATCH_TOL``; otherwise the newest run of the same shape (ComfyUI runs a verdict right after
    its sampler). DejaGuardError when no run has this shape.
    """
    same = [r for r in runs if r.shape == tuple(samples.shape)]
    if not same:
        raise DejaGuardError(
            f"the guard saw no sampling run for a latent of shape {tuple(samples.shape)}: connect the guard's MODEL "
            "output to the sampler whose LATENT goes into this verdict"
            + (f" (runs seen: {sorted({r.shape for r in runs})})" if runs else ""))
    best, best_dist = same[-1], math.inf
    ref = samples.float().cpu()
    for run in same:
        if run.last_denoised is None:
            continue
        with torch.no_grad():
            final = to_latent(run.last_denoised).float().cpu()
        dist = float((final - ref).norm() / ref.norm().clamp_min(1e-12))
        if dist <= best_dist:  # ties (identical runs): the newer one
            best, best_dist = run, dist
    return (best, True) if best_dist < MATCH_TOL else (same[-1], False)


# -- ComfyUI glue --------------------------------------------------------------------------------


def _at_cfg_1(args: dict[str, Any]) -> bool:
    return "cond_scale" in args and math.isclose(float(args["cond_scale"]), 1.0)


def _uncond_skipped(args: dict[str, Any]) -> bool:
    """Whether ComfyUI skipped the unconditional prediction (its CFG 1 optimization)."""
    options = args.get("model_options") or {}
    if _at_cfg_1(args) and not options.get("disable_cfg1_optimization", False):
        return True
    uncond_denoised = args.get("uncond_denoised")
    # 2024 ComfyUI passes zeros for the skipped prediction; newer versions also pass uncond=None.
    return args.get("uncond") is None or uncond_denoised is None or not bool(uncond_denoised.any())


# Set on the guarded clone (with disable_cfg1_optimization) by a guard asked for the score at CFG 1 on a ComfyUI
# that copies model_options for every run (late 2024 on): such a ComfyUI also drops the negative conditioning
# at CFG 1 before any hook sees it, so the sampler itself must compute the unconditional prediction at the
# first step; the guard then switches it off in that run's copy. Older ComfyUI passes the negative
# conditioning to the hook, which evaluates it once (_extra_uncond_prediction).
_FIRST_STEP_UNCOND = "dejaguard_first_step_uncond"


def request_first_step_uncond(model_options: dict[str, Any]) -> bool:
    """Ask the sampler for the unconditional prediction at each run's first step even at CFG 1 (see
    ``_FIRST_STEP_UNCOND``). False, with nothing changed, where ComfyUI shares one options dict across runs."""
    import comfy.model_patcher

    if not hasattr(comfy.model_patcher, "create_model_options_clone") or \
            model_options.get("disable_cfg1_optimization", False):
        return False
    model_options["disable_cfg1_optimization"] = True
    model_options[_FIRST_STEP_UNCOND] = True
    return True


def _extra_uncond_prediction(args: dict[str, Any]) -> torch.Tensor | None:
    """The unconditional prediction at this step ``(B, C, H, W)`` from one extra UNet call (B noise predictions);
    None if impossible."""
    import comfy.samplers

    uncond, x, sigma = args.get("uncond"), args["input"], args["sigma"]
    options = args.get("model_options") or {}
    if uncond is None:  # newer ComfyUI drops the negative conditioning at CFG 1
        return None
    if hasattr(comfy.samplers, "calc_cond_uncond_batch"):  # ComfyUI <= mid 2024
        pred, _ = comfy.samplers.calc_cond_uncond_batch(args["model"], uncond, None, x, sigma, options)
        return pred
    if hasattr(comfy.samplers, "calc_cond_batch"):
        return comfy.samplers.calc_cond_batch(args["model"], [uncond], x, sigma, options)[0]
    return None


def send_progress(payload: dict[str, Any]) -> bool:
    """Send ``dejaguard.score`` to the page that queued the prompt; False when no ComfyUI server runs.

    Only a ``server`` module that ComfyUI's main.py already imported is used (never imported here).
    """
    server = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
    if server is None or not hasattr(server, "send_sync"):
        return False
    try:
        server.send_sync(SCORE_EVENT, payload, getattr(server, "client_id", None))
    except Exception as err:  # a progress message must never break sampling
        log.warning("DejaGuard: could not send the score message: %s", err)
        return False
    return True


class GuardState:
    """What one guard node observes, shared by its post-CFG function and its verdicts (the handle)."""

    def __init__(self, node_id: str, threshold: float, threshold_source: str, info: ModelInfo, cfg1_mode: str,
                 to_latent: Callable[[torch.Tensor], torch.Tensor], score: str = MAGNITUDE,
                 calibrated_shape: tuple[int, ...] | None = None) -> None:
        self.node_id = node_id
        self.score = score  # core.detect.SCORES
        self.threshold = threshold
        self.threshold_source = threshold_source
        self.info = info
        self.cfg1_mode = cfg1_mode
        self.to_latent = to_latent  # model latent space -> LATENT as the sampler returns it
        self.runs: list[RunRecord] = []
        self.calibrated_shape = calibrated_shape  # (C, H, W) the threshold was calibrated at, if known
        # Auto-protect (nodes/protect.py): called after observe() with the post-CFG args, returns the denoised
        # prediction the sampler continues with. None: the guard only watches.
        self.steer: Callable[[GuardState, dict[str, Any]], torch.Tensor] | None = None
        self._last_sigma: float | None = None
        self._last_was_first = False

    def observe(self, args: dict[str, Any]) -> None:
        """Called at every sampling step with ComfyUI's post-CFG arguments."""
        sigma = float(args["sigma"].max())
        scheduled = ((args.get("model_options") or {}).get("transformer_options") or {}).get("sample_sigmas")
        first = float(scheduled[0]) if scheduled is not None and len(scheduled) else None
        self._last_was_first = starts_new_run(sigma, self._last_sigma, self._last_was_first, first)
        if self._last_was_first:
            self._start_run(args, sigma)
        self._last_sigma = sigma
        if self.runs:
            self.runs[-1].last_denoised = args["denoised"]  # a reference, no copy: the final one is the sample

    def post_cfg(self, args: dict[str, Any]) -> torch.Tensor:
        """The guard's post-CFG function: observe the step, then (auto-protect) steer it."""
        self.observe(args)
        return args["denoised"] if self.steer is None else self.steer(self, args)

    def _start_run(self, args: dict[str, Any], sigma: float) -> None:
        x, cond_denoised, uncond_denoised = args["input"], args["cond_denoised"], args["uncond_denoised"]
        extra, status = 0, "ok"  # extra: noise predictions added (an unconditional pass of the batch counts B)
        batch = int(x.shape[0])
        skipped = _uncond_skipped(args)
        options = args.get("model_options")
        if options is not None and options.pop(_FIRST_STEP_UNCOND, False):
            options["disable_cfg1_optimization"] = False  # in this run's copy: the later steps skip it again
            extra = batch * int(_at_cfg_1(args) and not skipped)  # the sampler evaluated it on the guard's request
        if skipped:
            uncond_denoised = None
            if self.cfg1_mode == CFG1_EXTRA_EVAL:
                uncond_denoised = _extra_uncond_prediction(args)  # one extra UNet call of B samples
                extra = batch * int(uncond_denoised is not None)
            status = ("ok" if uncond_denoised is not None else
                      "unavailable at CFG 1: ComfyUI computes no unconditional prediction; use CFG > 1 or set "
                      f"the guard's at_cfg_1 to '{CFG1_EXTRA_EVAL}'")
        scores = None
        if uncond_denoised is not None:
            scores = [float(s) for s in scores_from_denoised(x, cond_denoised, uncond_denoised, args["sigma"],
                                                                     self.score)]
        flagged = [s > self.threshold for s in scores] if scores is not None else []
        if self.runs and self.runs[-1].last_denoised is not None:  # keep older runs' final latents off the GPU
            self.runs[-1].last_denoised = self.runs[-1].last_denoised.detach().cpu()
        run = RunRecord(index=(self.runs[-1].index + 1) if self.runs else 1, batch=batch,
                        shape=tuple(x.shape), first_sigma=sigma,
                        full_noise=sigma >= self.info.sigma_max * (1 - 1e-3), scores=scores, flagged=flagged,
                        extra_unet_evals=extra, status=status)
        self.runs = [*self.runs[-(MAX_RUNS - 1):], run]
        summary = summarize(run, self.threshold, self.threshold_source, self.notes(run))
        log.info("%s", summary)
        send_progress({"node": self.node_id, "run": run.index, "scores": scores or [], "flagged": flagged,
                       "threshold": self.threshold, "status": status, "summary": summary,
                       "size_warning": self.size_warning(run)})

    def size_warning(self, run: RunRecord) -> str | None:
        """"calibrated at 512x512, this run 512x768: threshold may not apply", or None (same size, or unknown)."""
        return size_note(self.calibrated_shape, run.shape)

    def notes(self, run: RunRecord) -> list[str]:
        """The notes of a run's summary: the model's, then the size warning."""
        warning = self.size_warning(run)
        return [*self.info.notes, *([warning] if warning else [])]

    def payload(self, run: RunRecord, matched: bool) -> dict[str, Any]:
        """JSON-safe verdict for the ``ui`` dict and the history (no NaN: the page parses it as JSON)."""
        score = max(run.scores) if run.scores else -1.0
        notes = self.notes(run)
        if not matched:
            notes.append("the LATENT did not match a run's final prediction exactly (leftover noise or a "
                         "mask?); the newest run of this shape was taken")
        return {"scores": run.scores or [], "flagged": run.flagged, "score": score, "any_flagged": any(run.flagged),
                "threshold": self.threshold, "threshold_source": self.threshold_source, "status": run.status,
                "run": run.index, "matched": matched, "full_noise": run.full_noise, "first_sigma": run.first_sigma,
                "extra_unet_evals": run.extra_unet_evals, "protection": run.protection,
                "size_warning": self.size_warning(run),
                "summary": summarize(run, self.threshold, self.threshold_source, notes)}


NO_THRESHOLD_HINT = ("run the DejaGuard Calibrate node once on this model (it saves the threshold where the Guard "
                     "finds it; or `dejaguard calibrate` on its diffusers folder), or set the node's 'threshold'")
USER_SUBDIR = Path("dejaguard") / "calibrations"


def user_directory() -> Path:
    """ComfyUI's user directory: ``folder_paths.get_user_directory()``, or ``folder_paths.user_directory`` where
    the function is missing (ComfyUI before mid 2024), or ``user/`` beside ``folder_paths.py``."""
    import folder_paths

    if hasattr(folder_paths, "get_user_directory"):
        return Path(folder_paths.get_user_directory())
    if getattr(folder_paths, "user_directory", None):
        return Path(folder_paths.user_directory)
    return Path(folder_paths.__file__).resolve().parent / "user"


def user_calibration_file(fingerprint: str) -> Path:
    """Where DejaGuard Calibrate saves (and the Guard first looks for) the calibration of the model with
    ``fingerprint``: ``<user dir>/dejaguard/calibrations/<fingerprint>.json``, one file per model (core's
    calibration file holds one model per score setting)."""
    return user_directory() / USER_SUBDIR / f"{fingerprint}.json"


def calibration_location(calibration: str, fingerprint: str) -> str | Path | None:
    """Where the nodes look for the calibration of the model with ``fingerprint`` (for
    :func:`core.calibration.find_calibration`): the file or folder named on the node; else the file DejaGuard
    Calibrate saved for this model (:func:`user_calibration_file`) when it exists; else None (the bundled
    testbed's)."""
    if calibration.strip():
        return calibration.strip()
    saved = user_calibration_file(fingerprint)
    return saved if saved.is_file() else None


def resolve_threshold(model: Any, threshold: float, calibration: str = "", score: str = MAGNITUDE) -> tuple[float, str]:
    """(threshold, where it came from). ``threshold > 0`` wins; else the calibration that matches this model and
    the score option ``score`` (a threshold calibrated for another score option is never used).

    ``calibration``: a calibration JSON file or a diffusers model folder holding one, looked up by
    :func:`core.calibration.find_calibration` with this model's UNet fingerprint. Empty: the file DejaGuard
    Calibrate saved for this model (:func:`user_calibration_file`) if there is one, else the bundled testbed's.
    """
    value, source, _ = resolve_calibration(model, threshold, calibration, score)
    return value, source


def resolve_calibration(model: Any, threshold: float, calibration: str = "",
                        score: str = MAGNITUDE) -> tuple[float, str, tuple[int, ...] | None]:
    """:func:`resolve_threshold` and the latent shape ``(C, H, W)`` the threshold was calibrated at (None when set
    on the node or not recorded)."""
    if threshold > 0:
        return float(threshold), "set on the node", None
    fingerprint = comfy_fingerprint(model)
    location = calibration_location(calibration, fingerprint)
    try:
        found = find_calibration(location, ScoreSettings(score=score), fingerprint)
    except DejaGuardError as err:
        hint = NO_THRESHOLD_HINT if score == MAGNITUDE else NO_THRESHOLD_HINT.replace(
            "run the DejaGuard Calibrate node once on this model", f"run DejaGuard Calibrate with score '{score}' "
            "once on this model").replace("`dejaguard calibrate`", f"`dejaguard calibrate --score {score}`")
        raise DejaGuardError(f"this model has no calibrated {score} threshold: {err}; {hint}") from err
    if location is not None and Path(location) == user_calibration_file(fingerprint):
        return found.threshold, f"DejaGuard Calibrate, {found.file}", found.sample_shape
    return found.threshold, found.source, found.sample_shape


# -- nodes ---------------------------------------------------------------------------------------


class DejaGuardMemorizationGuard:
    """MODEL -> guarded MODEL + handle. Scores every image at the first sampling step, for free at CFG > 1."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to watch (SD1.x, SD2.x, SDXL, SD3 or the "
                                               "DejaGuard testbed). It is cloned: the loaded model other graphs "
                                               "use is not changed."}),
                "threshold": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 10000.0, "step": 0.001,
                    "tooltip": "Flag an image when its first-step score exceeds this. 0 = use the calibrated "
                               "threshold of this model: the one DejaGuard Calibrate saved for it (run that node "
                               "once per checkpoint), or the bundled testbed's."}),
                "at_cfg_1": ([CFG1_UNAVAILABLE, CFG1_EXTRA_EVAL], {
                    "default": CFG1_UNAVAILABLE,
                    "tooltip": "At CFG 1 ComfyUI skips the unconditional prediction the score needs. "
                               "'report unavailable': no score (the verdict says so). 'one extra UNet "
                               "evaluation': compute it once, at the first step only (one unconditional "
                               "noise prediction per image)."}),
            },
            "optional": {
                "calibration": ("STRING", {
                    "default": "",
                    "tooltip": "Used when threshold is 0: a dejaguard_calibration.json or the diffusers model folder "
                               "holding it. Empty = what DejaGuard Calibrate saved for this model, else the bundled "
                               "testbed's. The model must be the calibrated one "
                               "(checked by weight fingerprint)."}),
                "calibrated": (CALIBRATION_TYPE, {
                    "tooltip": "Optional: the 'calibration' output of DejaGuard Calibrate on this model. The Guard "
                               "then runs after it in the same queue and uses its threshold (when threshold is 0)."}),
                "score": (list(SCORES), {
                    "default": MAGNITUDE,
                    "tooltip": "Which first-step score, both from the two predictions CFG computes anyway (no extra "
                               "UNet evaluation). 'magnitude': ||eps_c - eps_u|| (Wen et al. 2024). 'anisotropy': "
                               "that norm plus twice its mean per-position cosine with eps_u (Asthana & Belagiannis "
                               "2026). Each needs its own calibration (DejaGuard Calibrate with the same score)."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("MODEL", GUARD_TYPE)
    RETURN_NAMES = ("model", "guard")
    OUTPUT_TOOLTIPS = ("The same model with the guard attached: connect it to KSampler.",
                       "Connect to a Memorization Verdict node together with the sampler's LATENT.")
    FUNCTION = "guard"
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("Scores each generated image for memorization of training data at the first sampling step "
                   "(text-conditional noise magnitude, Wen et al. 2024), with no extra UNet evaluation at CFG > 1. "
                   "Scores appear on this node while sampling and in Memorization Verdict nodes.")

    def guard(self, model: Any, threshold: float, at_cfg_1: str, calibration: str = "", calibrated: str | None = None,
              unique_id: str | None = None, score: str = MAGNITUDE) -> tuple[Any, GuardState]:
        info = check_supported(model, "guard")
        check_score(score)
        value, source, calibrated_shape = resolve_calibration(model, threshold,
                                                              calibration.strip() or str(calibrated or ""), score)
        if score != MAGNITUDE:
            info.notes.append(f"{score} score: {SCORE_DESCRIPTIONS[score]}")
        if model.patches and threshold <= 0:
            info.notes.append(f"the model carries {len(model.patches)} weight patches (LoRA, neuron mask): the "
                              "threshold was calibrated for the unpatched model")
        state = GuardState(str(unique_id or ""), value, source, info, at_cfg_1, model.model.process_latent_out, score,
                           calibrated_shape)

        # A plain closure (not a bound method or callable object): ModelPatcher.clone deep-copies
        # model_options, and deepcopy keeps functions but would copy an object and its state.
        def dejaguard_post_cfg(args: dict[str, Any]) -> torch.Tensor:
            return state.post_cfg(args)

        guarded = model.clone()
        guarded.set_model_sampler_post_cfg_function(dejaguard_post_cfg)
        if at_cfg_1 == CFG1_EXTRA_EVAL:
            request_first_step_uncond(guarded.model_options)
        return guarded, state


class DejaGuardMemorizationVerdict:
    """Guard handle + sampled LATENT -> LATENT (unchanged), score, flagged, summary; draws the badge."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "guard": (GUARD_TYPE, {"tooltip": "The 'guard' output of the Memorization Guard whose model sampled "
                                                  "this LATENT."}),
                "samples": ("LATENT", {"tooltip": "The sampler's output. It is passed through unchanged; taking it "
                                                  "as input makes this node run after the sampler."}),
            },
        }

    RETURN_TYPES = ("LATENT", "FLOAT", "BOOLEAN", "STRING")
    RETURN_NAMES = ("samples", "score", "flagged", "summary")
    OUTPUT_TOOLTIPS = ("The input LATENT, unchanged (connect VAE Decode here).",
                       "Highest first-step score in the batch (-1 when unavailable at CFG 1).",
                       "True when any image in the batch scored above the threshold.",
                       "One line per image: score, threshold and verdict.")
    FUNCTION = "verdict"
    CATEGORY = "DejaGuard"
    OUTPUT_NODE = True  # runs (and shows its badge) even when nothing uses its outputs
    DESCRIPTION = ("Reports the Memorization Guard's first-step scores for one sampler's output: a red or green "
                   "badge on the node, the highest score, a flag to branch on, and a per-image summary.")

    def verdict(self, guard: GuardState, samples: dict[str, Any]) -> dict[str, Any]:
        run, matched = match_run(guard.runs, samples["samples"], guard.to_latent)
        payload = guard.payload(run, matched)
        return {"ui": {"dejaguard": [payload]},
                "result": (samples, float(payload["score"]), bool(payload["any_flagged"]), payload["summary"])}


NODE_CLASS_MAPPINGS = {"DejaGuardMemorizationGuard": DejaGuardMemorizationGuard,
                       "DejaGuardMemorizationVerdict": DejaGuardMemorizationVerdict}
NODE_DISPLAY_NAME_MAPPINGS = {"DejaGuardMemorizationGuard": "DejaGuard Memorization Guard",
                              "DejaGuardMemorizationVerdict": "DejaGuard Memorization Verdict"}

"""The WebUI glue: the always-visible "DejaGuard" script and the first-step hooks of A1111 and Forge.

Imports the WebUI's own modules (``modules.scripts``, ``modules.script_callbacks``) and gradio, so only the WebUI
imports it (through ``scripts/dejaguard.py``). The method and everything that needs no WebUI is in
:mod:`webui.guard`.

Per job (``Script.process``, before sampling): with the section enabled, the loaded checkpoint is checked
(SD1.x; anything else gets one line in the generation info and is generated unchanged), the threshold is
resolved (the UI's value, else this checkpoint's calibration) and a :class:`~webui.guard.Job` is attached to
``p``; its per-image lists go into ``p.extra_generation_params``, so each image's score and verdict reach its
infotext (the PNG "parameters" text) and the API's ``info``.

Per batch, the first sampling step's predictions come from the WebUI's own CFG denoiser, with no extra UNet call:

- A1111: ``on_cfg_denoiser`` sees the rows about to go through the UNet (conditional rows first, then one
  unconditional row per image) with ``x`` and ``sigma``; ``on_cfg_denoised`` right after sees the outputs of all
  rows before CFG combines them. The callbacks are global (registered once per script load): they act only for
  a ``p`` that carries a job, at its denoiser's step 0, never in a hires-fix second pass. Prompts with ``AND``
  (several conditional rows per image) and a skipped unconditional pass (its rows are then copies of the
  conditional ones) give "no score", never 0.
- Forge (``on_cfg_denoised`` is never called there): ``process_before_every_sampling`` clones
  ``p.sd_model.forge_objects.unet`` (Forge restores the original object for every job), adds a post-CFG function
  that reads ``cond_denoised`` / ``uncond_denoised`` at its first call, and assigns the clone back. At CFG 1
  Forge skips the unconditional prediction (``uncond_denoised`` None): "no score".
"""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr
import modules.scripts as scripts
import torch
from modules import script_callbacks

from .guard import KEY_NOTE, Job, check_checkpoint, first_step_scores, resolve_threshold

log = logging.getLogger("DejaGuard")
TITLE = "DejaGuard"
JOB_ATTR = "dejaguard_job"  # the Job of a p whose section is enabled
FULL_NOISE_TOL = 1e-3
_pending: dict[str, Any] | None = None  # A1111: the first step seen by on_cfg_denoiser, for on_cfg_denoised


def checkpoint_path(p: Any) -> str | None:
    """The file of the checkpoint the WebUI has loaded (A1111 and Forge alike)."""
    return getattr(getattr(p.sd_model, "sd_checkpoint_info", None), "filename", None)


def is_forge(p: Any) -> bool:
    return getattr(getattr(p, "sd_model", None), "forge_objects", None) is not None


def _first_image(p: Any) -> int:
    return int(getattr(p, "iteration", 0)) * int(p.batch_size)


def _check_full_noise(job: Job, first: float, start: float | None, unit: str) -> None:
    """Note a run that does not start at full noise (img2img, denoising < 1): thresholds are calibrated there."""
    if start is not None and first < start * (1 - FULL_NOISE_TOL):
        job.note(f"the first step was at {unit} {first:.4g}, below the model's {start:.4g} (img2img or denoising "
                 "below 1): thresholds are calibrated for runs that start at full noise")


def _record(job: Job, first: int, batch: int, scores: torch.Tensor | None, reason: str = "") -> None:
    values = None if scores is None else [float(s) for s in scores]
    job.record(first, batch, values, reason)
    log.info("DejaGuard: images %d-%d: %s", first + 1, first + batch,
             values if values is not None else f"no score ({reason})")


class DejaGuardScript(scripts.Script):
    """The "DejaGuard" section of txt2img and img2img. Its API arguments: ``[enabled, threshold]``."""

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        with gr.Accordion(TITLE, open=False, elem_id=f"dejaguard_{'img2img' if is_img2img else 'txt2img'}"):
            enabled = gr.Checkbox(False, label="Check each image for memorization (first-step score, no extra "
                                               "UNet evaluation)")
            threshold = gr.Number(0.0, label="Threshold (0: the calibration of the loaded checkpoint, "
                                             "MODEL.dejaguard_calibration.json beside it)")
            gr.HTML("<p>Score and verdict per image appear in the generation info (PNG parameters, API info). "
                    "SD1.x checkpoints; leave the negative prompt empty for calibrated scores.</p>")
        return [enabled, threshold]

    def process(self, p: Any, enabled: bool = False, threshold: float = 0.0, *args: Any) -> None:
        setattr(p, JOB_ATTR, None)
        if not enabled:
            return
        path = checkpoint_path(p)
        refusal = check_checkpoint(path)
        if refusal is not None:
            p.extra_generation_params[KEY_NOTE] = refusal
            log.warning("DejaGuard: %s", refusal)
            return
        value, source = resolve_threshold(float(threshold or 0.0), path)
        job = Job(int(p.n_iter) * int(p.batch_size), value, source)
        negatives = getattr(p, "all_negative_prompts", None) or [getattr(p, "negative_prompt", "")]
        if any(str(n).strip() for n in negatives):
            job.note("scored against the negative prompt (thresholds are calibrated with an empty one)")
        p.extra_generation_params.update(job.generation_params())
        setattr(p, JOB_ATTR, job)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """Forge: attach the post-CFG reader to a clone of the UNet patcher for this sampling run."""
        job = getattr(p, JOB_ATTR, None)
        if job is None or not is_forge(p) or getattr(p, "is_hr_pass", False):
            return
        first, batch, seen = _first_image(p), int(p.batch_size), []

        def dejaguard_post_cfg(args: dict[str, Any]) -> torch.Tensor:
            if not seen:
                seen.append(True)
                _score_forge(job, first, batch, args)
            return args["denoised"]

        unet = p.sd_model.forge_objects.unet.clone()
        unet.set_model_sampler_post_cfg_function(dejaguard_post_cfg)
        p.sd_model.forge_objects.unet = unet


def _score_forge(job: Job, first: int, batch: int, args: dict[str, Any]) -> None:
    uncond = args.get("uncond_denoised")
    if uncond is None:
        _record(job, first, batch, None, "Forge skips the unconditional prediction at CFG 1")
        return
    sigma = args["sigma"]
    predictor = getattr(args.get("model"), "predictor", None)
    _check_full_noise(job, float(sigma.max()), getattr(predictor, "sigma_max", None), "sigma")
    with torch.no_grad():
        _record(job, first, batch, first_step_scores(args["input"], args["cond_denoised"], uncond, sigma))


def on_cfg_denoiser(params: Any) -> None:
    """A1111: remember the first step's inputs of a job's batch (x and sigma of the unconditional rows)."""
    global _pending
    _pending = None
    denoiser = params.denoiser
    p = getattr(denoiser, "p", None)
    job = getattr(p, JOB_ATTR, None)
    if job is None or is_forge(p) or getattr(denoiser, "step", None) != 0 or getattr(p, "is_hr_pass", False):
        return
    uncond = params.text_uncond
    batch = int((uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0])
    from modules import sd_samplers_timesteps

    timesteps = isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps)
    rows = int(params.x.shape[0])
    _pending = {"job": job, "first": _first_image(p), "batch": batch, "rows": rows,
                "x": params.x[rows - batch:], "sigma": params.sigma[rows - batch:],
                "outputs": "eps" if timesteps else "denoised"}
    start = 999.0 if timesteps else getattr(getattr(denoiser, "inner_model", None), "sigma_max", None)
    _check_full_noise(job, float(params.sigma.max()), None if start is None else float(start),
                      "timestep" if timesteps else "sigma")


def on_cfg_denoised(params: Any) -> None:
    """A1111: score the first step from the outputs of all rows, before CFG combines them."""
    global _pending
    pending, _pending = _pending, None
    if pending is None:
        return
    job, first, batch, out = pending["job"], pending["first"], pending["batch"], params.x
    if int(out.shape[0]) != pending["rows"] or pending["rows"] != 2 * batch:
        _record(job, first, batch, None, "a prompt with AND, or an edit model, gives several conditional "
                                         "predictions per image")
        return
    cond, uncond = out[:batch], out[batch:]
    if torch.equal(cond, uncond):
        _record(job, first, batch, None, "the unconditional prediction was skipped at the first step (the skip "
                                         "early CFG option)")
        return
    with torch.no_grad():
        _record(job, first, batch, first_step_scores(pending["x"], cond, uncond, pending["sigma"],
                                                     pending["outputs"]))


def register_callbacks() -> None:
    """Register the A1111 CFG callbacks; called every time the WebUI loads the script (a UI reload clears them)."""
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="dejaguard")
    script_callbacks.on_cfg_denoised(on_cfg_denoised, name="dejaguard")

"""The WebUI glue: the always-visible "DejaGuard" script and the first-step hooks of A1111 and Forge.

Imports the WebUI's own modules (``modules.scripts``, ``modules.script_callbacks``) and gradio, so only the WebUI
imports it (through ``scripts/dejaguard.py``). The method and everything that needs no WebUI is in
:mod:`webui.guard`.

Per job (``Script.process``, before sampling): with the section enabled, the loaded checkpoint is checked
(SD1.x and SDXL; anything else gets one line in the generation info and is generated unchanged), the threshold is
resolved (the UI's value, else this checkpoint's calibration) and a :class:`~webui.guard.Job` is attached to
``p``; its per-image lists go into ``p.extra_generation_params``, so each image's score and verdict reach its
infotext (the PNG "parameters" text) and the API's ``info``. The page's badge (``javascript/dejaguard.js``, which
the WebUI loads from the extension root) reads them back from the infotext the WebUI shows for the selected image.

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

Protection (the section's "Protect" box; :mod:`webui.guard` says what it does): Forge's post-CFG function
(:class:`ForgePostCFG`) returns the steered ``denoised`` itself. A1111: ``on_cfg_denoised`` scores every step of a
protected batch and asks the batch's policy which rows to steer; ``on_cfg_after_cfg`` (right after CFG has combined
the predictions) replaces those rows of the combined prediction. Not in a hires-fix second pass, nor when
inpainting (A1111 has blended the masked area into the combined prediction before the callback sees it).

Calibration (the section's Calibrate button and ``POST /dejaguard/v1/calibrate``, one function,
:func:`calibrate_loaded`): under the WebUI's queue lock, :func:`webui_denoiser` wraps the loaded model in the WebUI
adapter of core's denoiser seam and :func:`webui.guard.calibrate_checkpoint` runs core's calibration on it, with
gradio's progress bar fed by core's progress convention.

Token highlighting (the section's Explain button and ``POST /dejaguard/v1/explain``, one function,
:func:`explain_loaded`): under the queue lock, core's :func:`~core.explain.token_significance` runs on the same
adapter, which is handed the WebUI's text encoders and their token tables (SD1.x, A1111:
``cond_stage_model.wrapped.transformer``; Forge: ``text_processing_engine.text_encoder.transformer``, its encoding run
without the ``torch.inference_mode`` of ``get_learned_conditioning``; SDXL, A1111: the conditioner's CLIP-L
``embedders[0].wrapped.transformer`` and open_clip CLIP-G ``embedders[1].wrapped.model``, its gradient encoding with
both counted trainable, as sgm's conditioner runs frozen embedders under ``torch.no_grad``; Forge:
``text_processing_engine_l`` and ``_g``, its gradient encoding ``get_learned_conditioning``'s body without the
decorator) for the token hooks of :mod:`webui.denoiser`; on Forge, whose weights are inference tensors, the adapter
differentiates through copies of them made for the call and freed after it. The button's
result (core's JSON payload) goes into a hidden textbox, from which ``javascript/dejaguard.js`` draws the
highlighted words under the prompt. Not in the per-image info: it costs a backward pass per step, not the free
first-step score. Calibrate and Explain take SD1.x and SDXL checkpoints (SDXL: both text encoders' token tables,
against the zero unconditional conditioning the WebUIs use, :data:`webui.guard.SDXL_SETTINGS`); anything else gets
one line (:func:`webui.guard.supported_family`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import gradio as gr
import modules.scripts as scripts
import torch
from modules import script_callbacks

from ..core.checkpoint import Family, unet_fingerprint
from ..core.errors import DejaGuardError
from ..core.explain import to_json, token_significance
from ..core.protect import GuidanceSteering
from ..core.sampling import sigma_noise_level, steer_rows
from .denoiser import NO_TOKENS, WebUIDenoiser
from .guard import (
    KEY_NOTE,
    SDXL_POOLED_WIDTH,
    Job,
    calibrate_checkpoint,
    first_step_scores,
    resolve_threshold,
    score_settings,
    supported_family,
)

log = logging.getLogger("DejaGuard")
TITLE = "DejaGuard"
JOB_ATTR = "dejaguard_job"  # the Job of a p whose section is enabled
FULL_NOISE_TOL = 1e-3
_pending: dict[str, Any] | None = None  # A1111: the step seen by on_cfg_denoiser, for on_cfg_denoised
_steering: tuple[Job, int, GuidanceSteering] | None = None  # A1111: (job, first image, policy) of the batch protected
_after: dict[str, Any] | None = None  # A1111: the rows on_cfg_after_cfg steers at this step


def checkpoint_path(p: Any) -> str | None:
    """The file of the checkpoint the WebUI has loaded (A1111 and Forge alike)."""
    return model_file(p.sd_model)


def model_file(sd_model: Any) -> str | None:
    return getattr(getattr(sd_model, "sd_checkpoint_info", None), "filename", None)


def is_forge(p: Any) -> bool:
    return getattr(getattr(p, "sd_model", None), "forge_objects", None) is not None


def webui_denoiser(sd_model: Any, width: int, height: int, family: Family) -> WebUIDenoiser:
    """Core's denoiser seam over the WebUI's loaded SD1.x or SDXL model (:mod:`webui.denoiser`; ``family``: its
    checkpoint's, :func:`webui.guard.supported_family`), for images of ``width x height`` px, with the WebUI's text
    encoders and token tables for token highlighting. The caller holds the WebUI's queue lock (or runs inside a
    generation)."""
    from modules.prompt_parser import SdConditioning

    sdxl = family.name == "sdxl"

    def batch(prompts: list[str]) -> Any:  # SDXL's size conditioning is that of a generation at this size
        return SdConditioning(prompts, width=width, height=height)

    forge = getattr(sd_model, "forge_objects", None)
    if forge is not None:
        from backend import memory_management

        memory_management.load_model_gpu(forge.unet)
        unet = forge.unet.model.diffusion_model
        sigmas = forge.unet.model.predictor.sigmas.detach().double().cpu()
        alphas_cumprod = 1.0 / (1.0 + sigmas**2)
        # IntegratedCLIP: .transformer is the HF CLIPTextModel (SDXL: CLIP-L's and CLIP-G's engines)
        engines = ([sd_model.text_processing_engine_l, sd_model.text_processing_engine_g] if sdxl else
                   [sd_model.text_processing_engine])
        text_encoders, tokenizer = [e.text_encoder.transformer for e in engines], engines[0].tokenizer
        # get_learned_conditioning runs under torch.inference_mode, where no gradient flows (token significance needs
        # one): SD1.x its engine's call, SDXL the method's body (the decorator's __wrapped__), without it
        def conditioning(prompts: list[str]) -> Any:
            if sdxl:
                return type(sd_model).get_learned_conditioning.__wrapped__(sd_model, batch(prompts))
            return engines[0](prompts)

        def encode(prompts: list[str]) -> Any:
            memory_management.load_model_gpu(forge.clip.patcher)  # loads the text encoder, which may unload the UNet
            cond = conditioning(prompts)
            memory_management.load_model_gpu(forge.unet)
            return cond
        tables, grad_encode = None, None
    else:
        from modules import devices

        unet = sd_model.model.diffusion_model
        alphas_cumprod = sd_model.alphas_cumprod

        def encode(prompts: list[str]) -> Any:
            with devices.autocast():
                return sd_model.get_learned_conditioning(batch(prompts))
        if sdxl:  # the conditioner's CLIP-L (HF) and OpenCLIP-G (open_clip) embedders, as A1111 wrapped them
            embedders = list(sd_model.conditioner.embedders[:2])
            clip_l, clip_g = (e.wrapped for e in embedders)
            text_encoders, tokenizer = [clip_l.transformer, clip_g.model], clip_l.tokenizer
            tables = [clip_l.transformer.get_input_embeddings(), clip_g.model.token_embedding]

            def grad_encode(prompts: list[str]) -> Any:
                # sgm's conditioner runs frozen embedders under torch.no_grad: these two count as trainable meanwhile
                frozen = [e.is_trainable for e in embedders]
                try:
                    for e in embedders:
                        e.is_trainable = True
                    return encode(prompts)
                finally:
                    for e, value in zip(embedders, frozen):
                        e.is_trainable = value
        else:
            clip = getattr(sd_model.cond_stage_model, "wrapped", None)  # FrozenCLIPEmbedder: .transformer, .tokenizer
            text_encoders = [clip.transformer] if clip is not None else []
            tokenizer, tables, grad_encode = getattr(clip, "tokenizer", None), None, None
    return WebUIDenoiser(unet, encode, alphas_cumprod, unet_fingerprint(model_file(sd_model)),
                         (4, int(height) // 8, int(width) // 8), text_encoders=text_encoders, tokenizer=tokenizer,
                         pooled_width=SDXL_POOLED_WIDTH if sdxl else None, token_tables=tables,
                         grad_encode=grad_encode)


def calibrate_loaded(width: int = 512, height: int = 512, prompt_limit: int = 0,
                     progress: Any = None) -> str:
    """The Calibrate button (and ``POST /dejaguard/v1/calibrate``): calibrate the loaded checkpoint at
    ``width x height`` and save it beside it; returns the summary (or the one line saying why not)."""
    from modules import shared
    from modules.call_queue import queue_lock

    with queue_lock:  # not while the WebUI generates
        sd_model = shared.sd_model
        family, refusal = supported_family(model_file(sd_model))
        if family is None:
            return f"DejaGuard Calibrate: {refusal}"
        denoiser = webui_denoiser(sd_model, width, height, family)

        def report(done: float, total: float, stage: str = "") -> None:
            if progress is not None:
                progress((int(done), int(total)), desc=f"DejaGuard {stage}")

        with torch.inference_mode():
            _, _, summary = calibrate_checkpoint(denoiser, model_file(sd_model), int(prompt_limit), report,
                                                 score_settings(family))
    log.info("%s", summary)
    return summary


EXPLAIN_NOTE = ("highlighting scores the prompt as the WebUI encodes it (emphasis weights and textual inversions "
                "included), not its prompt-editing or AND parts, with an empty negative prompt")


def explain_loaded(prompt: str, width: int = 512, height: int = 512, steps: int = 1) -> dict[str, Any]:
    """The Explain button (and ``POST /dejaguard/v1/explain``): core's token significance of ``prompt`` on the loaded
    checkpoint over the first ``steps`` sampling steps at ``width x height`` -> core's JSON payload
    (:func:`core.explain.to_json`: ``tokens``, ``scores``, ``words``, ``word_scores``...) with a ``note``, or
    ``{"error": one line}``."""
    from modules import shared
    from modules.call_queue import queue_lock

    with queue_lock:  # not while the WebUI generates
        sd_model = shared.sd_model
        family, refusal = supported_family(model_file(sd_model))
        if family is None:
            return {"error": f"DejaGuard Explain: {refusal}"}
        denoiser = webui_denoiser(sd_model, width, height, family)
        if not denoiser.token_tables:  # said before anything else (an empty prompt, say)
            return {"error": f"DejaGuard Explain: {NO_TOKENS}"}
        try:
            result = token_significance(denoiser, prompt, steps=int(steps),
                                        unconditional=score_settings(family).unconditional)
        except DejaGuardError as err:
            return {"error": f"DejaGuard Explain: {err}"}
        finally:
            denoiser.free_grad_copies()  # Forge: the gradient-capable weight copies (webui.denoiser), now
    out = to_json(result, int(steps))
    out["note"] = EXPLAIN_NOTE
    log.info("DejaGuard Explain: %s", dict(zip(result.words, result.word_scores)))
    return out


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
    """The "DejaGuard" section of txt2img and img2img. Its API arguments: ``[enabled, threshold, protect]``
    (``protect`` may be left out: off)."""

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion(TITLE, open=False, elem_id=f"dejaguard_{tab}"):
            enabled = gr.Checkbox(False, label="Check each image for memorization (first-step score, no extra "
                                               "UNet evaluation)", elem_id=f"dejaguard_enabled_{tab}")
            threshold = gr.Number(0.0, label="Threshold (0: the calibration of the loaded checkpoint, "
                                             "MODEL.dejaguard_calibration.json beside it)")
            protect = gr.Checkbox(False, label="Protect: steer a flagged image away from the copy (no text guidance "
                                               "while its score stays above the threshold; no extra UNet "
                                               "evaluation; other images unchanged)",
                                  elem_id=f"dejaguard_protect_{tab}")
            gr.HTML("<p>Score and verdict per image appear in the generation info (PNG parameters, API info) and "
                    "as a badge above it (red: memorized, amber: steered). SD1.x and SDXL checkpoints; leave the "
                    "negative prompt empty for calibrated scores.</p><p>Explain: the words "
                    "that drive the score, highlighted under the prompt (token significance, one backward pass per "
                    "step; prompts of one 75-token chunk; " + EXPLAIN_NOTE + ").</p>")
            with gr.Row():
                width = gr.Number(512, label="Calibration width", precision=0, elem_id=f"dejaguard_cal_width_{tab}")
                height = gr.Number(512, label="Calibration height", precision=0,
                                   elem_id=f"dejaguard_cal_height_{tab}")
                button = gr.Button("Calibrate the loaded checkpoint", elem_id=f"dejaguard_calibrate_{tab}")
            status = gr.Textbox(label="Calibration (the bundled 500 prompts, one UNet call per 32; calibrate at the "
                                      "size you generate at)", interactive=False, lines=2,
                                elem_id=f"dejaguard_cal_status_{tab}")

            # gradio's convention: a gr.Progress default asks it for a progress bar
            def on_calibrate(width: float, height: float, progress: Any = gr.Progress()) -> str:  # noqa: B008
                try:
                    return calibrate_loaded(int(width), int(height), 0, progress)
                except Exception as err:  # shown in the section, not a stack trace in the console only
                    log.exception("DejaGuard Calibrate failed")
                    return f"DejaGuard Calibrate failed: {err}"

            button.click(on_calibrate, inputs=[width, height], outputs=[status])

            with gr.Row():
                explain = gr.Button("Explain: which words drive the score", elem_id=f"dejaguard_explain_{tab}")
                explain_text = gr.Textbox(label="Token significance (share of the score's gradient per word)",
                                          interactive=False, lines=2, elem_id=f"dejaguard_explain_text_{tab}")
            # the payload for javascript/dejaguard.js, which hides this box and highlights the words under the prompt
            explain_json = gr.Textbox("", elem_id=f"dejaguard_explain_json_{tab}", elem_classes=["dejaguard-hidden"],
                                      show_label=False, interactive=False, lines=1)

            def on_explain(prompt: str, width: float, height: float) -> tuple[str, str]:
                try:
                    out = explain_loaded(prompt or "", int(width), int(height))
                except Exception as err:  # shown in the section, not a stack trace in the console only
                    log.exception("DejaGuard Explain failed")
                    out = {"error": f"DejaGuard Explain failed: {err}"}
                if "error" in out:
                    return out["error"], json.dumps(out)
                order = sorted(range(len(out["words"])), key=lambda w: -out["word_scores"][w])
                ranking = ", ".join(f"{out['words'][w]} {100 * out['word_scores'][w]:.0f}%" for w in order)
                return f"{ranking} ({out['note']})", json.dumps(out)

            prompt = self.prompt_box if self.prompt_box is not None else gr.Textbox(label="Prompt to explain")
            explain.click(on_explain, inputs=[prompt, width, height], outputs=[explain_text, explain_json])
        return [enabled, threshold, protect]

    prompt_box: Any = None  # the tab's prompt textbox (after_component), the Explain button's input

    def after_component(self, component: Any, **kwargs: Any) -> None:
        """Remember the tab's prompt textbox (created before the scripts' sections) for the Explain button."""
        if getattr(component, "elem_id", None) in ("txt2img_prompt", "img2img_prompt"):
            self.prompt_box = component

    def process(self, p: Any, enabled: bool = False, threshold: float = 0.0, protect: bool = False,
                *args: Any) -> None:
        setattr(p, JOB_ATTR, None)
        if not enabled:
            return
        path = checkpoint_path(p)
        family, refusal = supported_family(path)
        if family is None:
            p.extra_generation_params[KEY_NOTE] = refusal
            log.warning("DejaGuard: %s", refusal)
            return
        value, source = resolve_threshold(float(threshold or 0.0), path, score_settings(family))
        job = Job(int(p.n_iter) * int(p.batch_size), value, source, protect=bool(protect))
        negatives = getattr(p, "all_negative_prompts", None) or [getattr(p, "negative_prompt", "")]
        if any(str(n).strip() for n in negatives):
            job.note("scored against the negative prompt (thresholds are calibrated with an empty one)")
        if job.protect and value is None:
            job.note("no protection without a threshold")
        if job.protect and getattr(p, "image_mask", None) is not None:
            job.protect = False  # the WebUI blends the masked area into the combined prediction before we see it
            job.note("no protection when inpainting")
        p.extra_generation_params.update(job.generation_params())
        setattr(p, JOB_ATTR, job)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """Forge: attach the post-CFG function (score, and steering) to a clone of the UNet patcher for this
        sampling run."""
        job = getattr(p, JOB_ATTR, None)
        if job is None or not is_forge(p) or getattr(p, "is_hr_pass", False):
            return
        post_cfg = ForgePostCFG(job, _first_image(p), int(p.batch_size))
        unet = p.sd_model.forge_objects.unet.clone()
        unet.set_model_sampler_post_cfg_function(post_cfg)
        p.sd_model.forge_objects.unet = unet


class ForgePostCFG:
    """Forge's post-CFG function for one batch: scores the first call (the first step); with protection, steers
    the flagged rows at every call while the policy says so, returning Forge's own ``denoised`` otherwise."""

    def __init__(self, job: Job, first: int, batch: int) -> None:
        self.job, self.first, self.batch = job, first, batch
        self.calls = 0
        self.policy: GuidanceSteering | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> ForgePostCFG:
        """Itself: cloning a UNet patcher deep-copies its model options, and a copy would record the scores into a
        copy of the job (a plain function is never copied, so ComfyUI-style post-CFG hooks are usually closures)."""
        return self

    def __call__(self, args: dict[str, Any]) -> torch.Tensor:
        first_call, self.calls = self.calls == 0, self.calls + 1
        if first_call:
            if not _score_forge(self.job, self.first, self.batch, args):
                return args["denoised"]
            self.policy = self.job.steering()
        if self.policy is None or args.get("uncond_denoised") is None:
            return args["denoised"]
        x, cond, uncond, sigma = args["input"], args["cond_denoised"], args["uncond_denoised"], args["sigma"]
        with torch.no_grad():
            rows = self.policy.step(first_step_scores(x, cond, uncond, sigma), _forge_noise_level(args))
            return steer_rows(args["denoised"], cond, uncond, rows, self.policy.scale)


def _forge_noise_level(args: dict[str, Any]) -> float:
    """The step's ``t / T`` (1 = pure noise) through Forge's predictor (its ``timestep(sigma)`` in ``[0, T)``)."""
    predictor = getattr(args.get("model"), "predictor", None)
    if predictor is None or not hasattr(predictor, "timestep") or getattr(predictor, "sigmas", None) is None:
        return 1.0
    return sigma_noise_level(args["sigma"], predictor.timestep, len(predictor.sigmas))


def _score_forge(job: Job, first: int, batch: int, args: dict[str, Any]) -> bool:
    """Record the first step's scores of a Forge batch; False when there are none (CFG 1)."""
    uncond = args.get("uncond_denoised")
    if uncond is None:
        _record(job, first, batch, None, "Forge skips the unconditional prediction at CFG 1")
        return False
    sigma = args["sigma"]
    predictor = getattr(args.get("model"), "predictor", None)
    _check_full_noise(job, float(sigma.max()), getattr(predictor, "sigma_max", None), "sigma")
    with torch.no_grad():
        _record(job, first, batch, first_step_scores(args["input"], args["cond_denoised"], uncond, sigma))
    return True


def _a1111_noise_level(denoiser: Any, sigma: torch.Tensor, timesteps: bool) -> float:
    """The step's ``t / T`` (1 = pure noise): A1111's timestep samplers hand over ``t`` itself (``T`` = 1000),
    k-diffusion samplers ``sigma`` (k-diffusion's ``sigma_to_t`` of the model's 1000 sigmas)."""
    if timesteps:
        return float(sigma.max()) / 1000.0
    inner = getattr(denoiser, "inner_model", None)
    if inner is None or not hasattr(inner, "sigma_to_t") or getattr(inner, "sigmas", None) is None:
        return 1.0
    return sigma_noise_level(sigma, inner.sigma_to_t, len(inner.sigmas))


def on_cfg_denoiser(params: Any) -> None:
    """A1111: remember a job's step inputs (x and sigma of the unconditional rows): at its first step, and at every
    later step of a batch being protected."""
    global _pending, _after
    _pending = _after = None
    denoiser = params.denoiser
    p = getattr(denoiser, "p", None)
    job = getattr(p, JOB_ATTR, None)
    if job is None or is_forge(p) or getattr(p, "is_hr_pass", False):
        return
    first_step = getattr(denoiser, "step", None) == 0
    first = _first_image(p)
    policy = _steering[2] if _steering is not None and _steering[0] is job and _steering[1] == first else None
    if not first_step and policy is None:
        return
    uncond = params.text_uncond
    batch = int((uncond["crossattn"] if isinstance(uncond, dict) else uncond).shape[0])
    from modules import sd_samplers_timesteps

    timesteps = isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps)
    rows = int(params.x.shape[0])
    _pending = {"job": job, "first": first, "batch": batch, "rows": rows, "first_step": first_step,
                "x": params.x[rows - batch:], "sigma": params.sigma[rows - batch:],
                "outputs": "eps" if timesteps else "denoised",
                "level": _a1111_noise_level(denoiser, params.sigma, timesteps)}
    if first_step:
        start = 999.0 if timesteps else getattr(getattr(denoiser, "inner_model", None), "sigma_max", None)
        _check_full_noise(job, float(params.sigma.max()), None if start is None else float(start),
                          "timestep" if timesteps else "sigma")


def on_cfg_denoised(params: Any) -> None:
    """A1111: score the first step from the outputs of all rows, before CFG combines them; with protection, decide
    at each step which rows :func:`on_cfg_after_cfg` steers."""
    global _pending, _after, _steering
    pending, _pending = _pending, None
    if pending is None:
        return
    job, first, batch, out = pending["job"], pending["first"], pending["batch"], params.x
    first_step = pending["first_step"]
    if first_step:
        _steering = None
    if int(out.shape[0]) != pending["rows"] or pending["rows"] != 2 * batch:
        if first_step:
            _record(job, first, batch, None, "a prompt with AND, or an edit model, gives several conditional "
                                             "predictions per image")
        return
    cond, uncond = out[:batch], out[batch:]
    if torch.equal(cond, uncond):  # the unconditional pass was skipped at this step: nothing to score or steer
        if first_step:
            _record(job, first, batch, None, "the unconditional prediction was skipped at the first step (the "
                                             "skip early CFG option)")
        return
    with torch.no_grad():
        scores = first_step_scores(pending["x"], cond, uncond, pending["sigma"], pending["outputs"])
    if first_step:
        _record(job, first, batch, scores)
        policy = job.steering()
        _steering = None if policy is None else (job, first, policy)
    if _steering is None:
        return
    policy = _steering[2]
    rows = policy.step(scores, pending["level"])
    if bool(rows.any()):
        _after = {"cond": cond, "uncond": uncond, "rows": rows, "scale": policy.scale}


def on_cfg_after_cfg(params: Any) -> None:
    """A1111: replace the combined prediction's steered rows (the other rows stay the WebUI's own tensor)."""
    global _after
    after, _after = _after, None
    if after is not None and int(params.x.shape[0]) == int(after["rows"].shape[0]):
        with torch.no_grad():
            params.x = steer_rows(params.x, after["cond"], after["uncond"], after["rows"], after["scale"])


def register_callbacks() -> None:
    """Register the A1111 CFG callbacks; called every time the WebUI loads the script (a UI reload clears them)."""
    script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="dejaguard")
    script_callbacks.on_cfg_denoised(on_cfg_denoised, name="dejaguard")
    script_callbacks.on_cfg_after_cfg(on_cfg_after_cfg, name="dejaguard")
    script_callbacks.on_app_started(add_api_routes, name="dejaguard")


def add_api_routes(_demo: Any, app: Any) -> None:
    """``POST /dejaguard/v1/calibrate?width=512&height=512&prompt_limit=0``: the Calibrate button over the API;
    answers ``{"summary": ...}``. ``POST /dejaguard/v1/explain?prompt=...&width=512&height=512&steps=1``: the Explain
    button over the API; answers :func:`explain_loaded`'s payload."""

    def calibrate_route(width: int = 512, height: int = 512, prompt_limit: int = 0) -> dict[str, str]:
        return {"summary": calibrate_loaded(width, height, prompt_limit)}

    def explain_route(prompt: str, width: int = 512, height: int = 512, steps: int = 1) -> dict[str, Any]:
        return explain_loaded(prompt, width, height, steps)

    app.add_api_route("/dejaguard/v1/calibrate", calibrate_route, methods=["POST"])
    app.add_api_route("/dejaguard/v1/explain", explain_route, methods=["POST"])

"""Classifier-free-guided sampling through the denoiser seam, recording the text-conditional
noise-prediction magnitude at every step (the quantity the detector reads).

:func:`guided_step` is the one guided step of the project: every method that steps along a guided
trajectory or reads the first step's two predictions (sampling and detection here, token significance in
:mod:`core.explain`, embedding mitigation in :mod:`core.mitigate`, the benches) calls it, so that all of
them feed the UNet the same inputs in the same batch layout and agree on the score to the last bit. Without
gradient the unconditional and conditional halves go through the UNet in **one** batched call, stacked
``[uncond, cond]`` (the layout neuron gates and FFN statistics rely on); with ``cond_grad`` the conditional
prediction keeps its graph and gets a call of its own, the unconditional one is made without gradient (it
does not depend on the text embedding being differentiated), so a backward pass goes through the
conditional samples only.

Counting: "evals" are noise predictions (``UNetCounter.forwards``; a cond/uncond pair counts 2), "calls"
batched UNet calls (``UNetCounter.calls``).

Shapes: ``B`` prompts x generations, ``C, H, W`` the model's sample shape, ``L`` text tokens, ``D`` text
embedding width.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .denoiser import Denoiser
from .errors import DejaGuardError
from .progress import Progress, report

DEFAULT_GUIDANCE = 7.5
DEFAULT_STEPS = 50
# What the unconditional prediction is conditioned on: the model's encoding of the empty prompt (the library, the CLI,
# ComfyUI) or a zero conditioning (A1111 and Forge condition an SDXL model on zeros for an empty negative prompt).
EMPTY_PROMPT, ZERO_CONDITIONING = "empty", "zeros"
UNCONDITIONALS = (EMPTY_PROMPT, ZERO_CONDITIONING)

# A per-step steering decision (core.protect): given this step's ``eps_cond``, ``eps_uncond`` ``(B, C, H, W)`` and
# its noise level ``t / num_train_timesteps`` (1 = pure noise, 0 = clean), the rows to steer ``(B,)`` bool and the
# guidance scale each steered row takes instead ``(B,)``; None: none.
Steer = Callable[[torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, torch.Tensor] | None"]


def prompt_seed(prompt: str, generation: int = 0) -> int:
    """A seed derived from the prompt text: a prompt's noise never depends on its batch or worker."""
    digest = hashlib.sha256(f"{generation}\x00{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def text_conditional_magnitude(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Wen et al.'s detection quantity: ``||eps_cond - eps_uncond||_2`` per sample.

    ``eps_cond``, ``eps_uncond``: ``(B, C, H, W)`` -> ``(B,)``. The ComfyUI guard obtains the two
    predictions from its sampler's denoised outputs (``eps = (x - denoised) / sigma``).
    """
    return (eps_cond - eps_uncond).flatten(1).norm(dim=1)


def initial_noise(denoiser: Denoiser, seeds: Sequence[int], init_sigma: float = 1.0) -> torch.Tensor:
    """x_T for each seed: ``(B, C, H, W)``, drawn on the CPU so it is the same on every device."""
    noise = torch.stack([
        torch.randn(denoiser.sample_shape, generator=torch.Generator().manual_seed(int(s)))
        for s in seeds
    ])
    return (noise * init_sigma).to(denoiser.device, denoiser.dtype)


def check_sampling_settings(num_inference_steps: int, guidance_scale: float = DEFAULT_GUIDANCE) -> None:
    """Raise :class:`DejaGuardError` for a step count below 1 or a guidance scale that is not a finite number."""
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise DejaGuardError(f"sampling steps must be a whole number of at least 1, got {num_inference_steps}")
    if not math.isfinite(guidance_scale):
        raise DejaGuardError(f"guidance scale (CFG) must be a finite number, got {guidance_scale}")


def ddim_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> Any:
    """DDIM (eta 0, trailing spacing, epsilon) over a model's own ``alphas_cumprod`` ``(T,)``: its first timestep is
    ``T - 1`` (999 for SD), the first step of ComfyUI's "normal" scheduler and of the WebUIs' samplers. The one
    scheduler of the adapters that wrap an already-loaded model (ComfyUI, WebUI)."""
    from diffusers import DDIMScheduler

    alphas_cumprod = alphas_cumprod.detach().double().cpu()
    betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=False,
                         set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing",
                         prediction_type="epsilon")


def new_schedule(denoiser: Denoiser, num_inference_steps: int = DEFAULT_STEPS) -> Any:
    """A fresh scheduler of ``denoiser`` set to ``num_inference_steps`` steps (``timesteps``, ``init_noise_sigma``).

    Raises :class:`DejaGuardError` for a step count the schedule cannot give (more steps than the model's
    training timesteps: diffusers raises a ``ValueError`` deep inside). Fresh for every trajectory: schedulers
    such as PNDM or Euler keep state between their ``step`` calls.
    """
    check_sampling_settings(num_inference_steps)
    scheduler = denoiser.new_scheduler()
    trained = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if trained is not None and num_inference_steps > trained:
        raise DejaGuardError(f"{num_inference_steps} sampling steps asked for, but the model's schedule has only "
                             f"{trained} timesteps")
    try:
        scheduler.set_timesteps(int(num_inference_steps))
    except ValueError as err:
        raise DejaGuardError(f"the model's scheduler refuses {num_inference_steps} sampling steps: {err}") from err
    return scheduler


def noise_level(scheduler: Any, t: torch.Tensor | int) -> float:
    """``t / num_train_timesteps`` of ``scheduler``: 1 at pure noise, 0 at the clean image (the schedule-independent
    position of a step, also computable in ComfyUI from its sigma)."""
    trained = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
    return float(t) / float(trained)


def check_unconditional(unconditional: str) -> str:
    """``unconditional`` if it names one of :data:`UNCONDITIONALS`, else a one-line :class:`DejaGuardError`."""
    if unconditional not in UNCONDITIONALS:
        raise DejaGuardError(f"unknown unconditional {unconditional!r}: choose one of {', '.join(UNCONDITIONALS)}")
    return unconditional


def unconditional_embedding(denoiser: Denoiser, unconditional: str = EMPTY_PROMPT) -> torch.Tensor:
    """The conditioning of the unconditional prediction, ``(1, L, D)`` as ``denoiser.encode_prompts([""])`` gives
    (SDXL: packed): that encoding, or zeros of its shape for ``unconditional == "zeros"`` (:data:`UNCONDITIONALS`)."""
    check_unconditional(unconditional)
    empty = denoiser.encode_prompts([""])
    return torch.zeros_like(empty) if unconditional == ZERO_CONDITIONING else empty


def sigma_noise_level(sigma: torch.Tensor, timestep: Callable[[torch.Tensor], torch.Tensor],
                      num_timesteps: int | None) -> float:
    """:func:`noise_level` of a k-diffusion step (ComfyUI, both WebUIs): ``timestep`` maps the step's largest
    ``sigma`` ``(B,)`` (given as ``(1,)``) to the model's discrete timestep in ``[0, T)`` (ComfyUI's
    ``model_sampling.timestep``, Forge's ``predictor.timestep``, A1111's ``sigma_to_t``), ``num_timesteps`` is ``T``
    (the number of the model's sigmas; None: 1000) -> ``t / T``."""
    t = float(timestep(sigma.max().reshape(1)).reshape(-1)[0])
    return t / float(num_timesteps if num_timesteps is not None else 1000)


def steer_rows(combined: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, rows: torch.Tensor,
               scale: float | torch.Tensor) -> torch.Tensor:
    """The one CFG-steering formula: ``combined`` (a step's CFG combination, ``(B, C, H, W)``) with the rows
    ``rows`` ``(B,)`` bool replaced by ``uncond + scale (cond - uncond)`` (``cond``, ``uncond`` ``(B, C, H, W)`` in the
    same space as ``combined``: noise, or x0 for k-diffusion's denoised predictions, where the mix is the same since
    ``eps = (x - x0) / sigma`` is affine in ``x0``). ``scale``: one guidance scale, or one per row ``(B,)``.

    Returns ``combined`` itself, untouched, when no row is steered; else a copy whose other rows are equal to it, so
    unsteered images stay bit-identical to an unsteered run (:func:`guided_step`, ComfyUI's Memorization Protect,
    the WebUI guard)."""
    if not bool(rows.any()):
        return combined
    rows = rows.to(combined.device)
    out = combined.clone()
    if isinstance(scale, torch.Tensor):
        scale = scale.to(out.device, out.dtype)[rows].view((-1,) + (1,) * (out.ndim - 1))
    out[rows] = (uncond[rows] + scale * (cond[rows] - uncond[rows])).to(out.dtype)
    return out


@dataclass
class GuidedStep:
    """What one :func:`guided_step` computed. Tensors ``(B, C, H, W)``; ``magnitude`` ``(B,)``.

    ``sample``: ``x_{t-1}``, the scheduler's step with the guided prediction (None when not advanced);
    ``model_input``: the scheduler-scaled ``x_t`` the UNet saw; ``eps_cond`` (with its autograd graph under
    ``cond_grad``), ``eps_uncond`` (never with a graph); ``magnitude``: ``||eps_cond - eps_uncond||_2`` per
    sample, with the graph of ``eps_cond``.
    """

    sample: torch.Tensor | None
    model_input: torch.Tensor
    eps_cond: torch.Tensor
    eps_uncond: torch.Tensor
    magnitude: torch.Tensor


def guided_step(
    denoiser: Denoiser,
    scheduler: Any,
    x: torch.Tensor,
    t: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance_scale: float = DEFAULT_GUIDANCE,
    *,
    cond_grad: bool = False,
    eps_uncond: torch.Tensor | None = None,
    advance: bool = True,
    steer: Steer | None = None,
) -> GuidedStep:
    """One step of classifier-free-guided sampling at ``x`` = ``x_t`` ``(B, C, H, W)`` and timestep ``t`` of
    ``scheduler`` (see the module doc).

    ``cond``: ``(B, L, D)``; ``uncond``: ``(1, L', D)`` or ``(B, L', D)``. Without ``cond_grad``: no gradient,
    one batched call ``[uncond, cond]`` (two calls when ``L' != L``, e.g. a ComfyUI negative prompt longer than
    one 77-token chunk). With ``cond_grad``: the unconditional prediction without gradient, then the conditional
    one with gradient enabled in a call of its own. ``eps_uncond``: the unconditional prediction at this ``x_t``
    and ``t`` when it is already known (it does not depend on ``cond``): reused, no call for it, ``uncond`` is
    then unused. ``advance`` False: no scheduler step (``sample`` None), for callers that only need the
    predictions or re-evaluate a step under another conditioning; the scheduler is then left untouched.
    ``steer`` (auto-protect, :mod:`core.protect`): called with this step's two predictions before the scheduler
    step; the rows it names take ``eps_uncond + w_i (eps_cond - eps_uncond)`` with their own ``w_i`` instead of
    ``guidance_scale``. The other rows keep the plain combination, computed exactly as without ``steer`` (the
    steered rows are overwritten afterwards), so they stay bit-identical to an unsteered run.
    """
    batch = x.shape[0]
    model_input = scheduler.scale_model_input(x, t)
    if eps_uncond is None and not cond_grad and uncond.shape[1] == cond.shape[1]:
        with torch.no_grad():
            eps_uncond, eps_cond = denoiser.predict_noise(torch.cat([model_input, model_input]), t,
                                                          torch.cat([uncond.expand(batch, -1, -1), cond])).chunk(2)
    else:
        if eps_uncond is None:
            with torch.no_grad():
                eps_uncond = denoiser.predict_noise(model_input, t, uncond.expand(batch, -1, -1))
        with torch.set_grad_enabled(cond_grad):
            eps_cond = denoiser.predict_noise(model_input, t, cond)
    with torch.set_grad_enabled(cond_grad):
        magnitude = text_conditional_magnitude(eps_cond, eps_uncond)
    sample = None
    if advance:
        with torch.no_grad():
            guided = eps_uncond + guidance_scale * (eps_cond.detach() - eps_uncond)
            decision = None if steer is None else steer(eps_cond.detach(), eps_uncond, noise_level(scheduler, t))
            if decision is not None:
                guided = steer_rows(guided, eps_cond.detach(), eps_uncond, decision[0], decision[1])
            sample = scheduler.step(guided, t, x).prev_sample
    return GuidedStep(sample, model_input, eps_cond, eps_uncond, magnitude)


def guided_denoise(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    stop_after: int | None = None,
    progress: Progress | None = None,
    steer: Steer | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run guided sampling from ``noise`` (unscaled x_T, ``(B, C, H, W)``), without gradient.

    ``cond``: ``(B, L, D)``; ``uncond``: ``(1, L, D)`` or ``(B, L, D)``. Each step is one :func:`guided_step`:
    **one** batched UNet call with the unconditional and conditional halves stacked. Stops after ``stop_after``
    steps if given. Returns the samples reached and the per-step magnitudes ``||eps(x_t, c) - eps(x_t, 0)||_2``
    of shape ``(B, steps_run)``. ``progress(done, total, "sampling")`` after every step. ``steer``: passed to
    every :func:`guided_step` (auto-protect, :mod:`core.protect`).
    """
    check_sampling_settings(num_inference_steps, guidance_scale)
    scheduler = new_schedule(denoiser, num_inference_steps)
    x = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps[: stop_after] if stop_after else scheduler.timesteps
    magnitudes = []
    for i, t in enumerate(timesteps):
        step = guided_step(denoiser, scheduler, x, t, cond, uncond, guidance_scale, steer=steer)
        magnitudes.append(step.magnitude)
        x = step.sample
        report(progress, i + 1, len(timesteps), "sampling")
    return x, torch.stack(magnitudes, dim=1)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 32,
    progress: Progress | None = None,
    cond_embeddings: torch.Tensor | None = None,
    steering: Callable[[int, int], Steer | None] | None = None,
) -> torch.Tensor:
    """Full generations, one per (prompt, seed) pair: final samples ``(B, C, H, W)``.

    ``cond_embeddings`` ``(B, L, D)``, if given, replaces the prompts' own text embeddings (e.g. a
    mitigated embedding from :mod:`core.mitigate`); ``prompts`` then only set the count.
    ``progress(done, total, "generating")`` counts finished generations. Raises :class:`DejaGuardError` when
    the seeds or embeddings do not match the prompts one to one. ``steering(start, end)``, if given, returns
    the :data:`Steer` of the batch of generations ``start .. end - 1`` (auto-protect, :mod:`core.protect`).
    """
    if len(prompts) != len(seeds):
        raise DejaGuardError(f"one seed per prompt: {len(prompts)} prompt(s), {len(seeds)} seed(s)")
    if cond_embeddings is not None and (cond_embeddings.dim() != 3 or cond_embeddings.shape[0] != len(prompts)):
        raise DejaGuardError(f"one conditional embedding (L, D) per prompt: {len(prompts)} prompt(s), embeddings "
                             f"{tuple(cond_embeddings.shape)}")
    check_sampling_settings(num_inference_steps, guidance_scale)
    uncond = denoiser.encode_prompts([""])
    out = []
    report(progress, 0, len(prompts), "generating")
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        if cond_embeddings is None:
            cond = denoiser.encode_prompts(chunk)
        else:
            cond = cond_embeddings[i : i + batch_size].to(denoiser.device, denoiser.dtype)
        x, _ = guided_denoise(denoiser, initial_noise(denoiser, seeds[i : i + batch_size]),
                              cond, uncond, num_inference_steps, guidance_scale,
                              steer=steering(i, i + len(chunk)) if steering is not None else None)
        out.append(x)
        report(progress, i + len(chunk), len(prompts), "generating")
    return torch.cat(out)

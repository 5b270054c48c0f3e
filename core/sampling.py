"""Classifier-free-guided sampling through the denoiser seam, recording the text-conditional
noise-prediction magnitude at every step (the quantity the detector reads).

Shapes: ``B`` prompts x generations, ``C, H, W`` the model's sample shape.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .denoiser import Denoiser
from .errors import DejaGuardError

DEFAULT_GUIDANCE = 7.5
DEFAULT_STEPS = 50


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


def guided_denoise(
    denoiser: Denoiser,
    noise: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    stop_after: int | None = None,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run guided sampling from ``noise`` (unscaled x_T, ``(B, C, H, W)``).

    ``cond``: ``(B, L, D)``; ``uncond``: ``(1, L, D)`` or ``(B, L, D)``. Each step is **one**
    batched UNet call with the unconditional and conditional halves stacked. Stops after
    ``stop_after`` steps if given. Returns the samples reached and the per-step magnitudes
    ``||eps(x_t, c) - eps(x_t, 0)||_2`` of shape ``(B, steps_run)``.
    """
    check_sampling_settings(num_inference_steps, guidance_scale)
    scheduler = denoiser.new_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    x = noise * scheduler.init_noise_sigma
    batch = x.shape[0]
    uncond = uncond.expand(batch, -1, -1)
    context = torch.cat([uncond, cond])
    timesteps = scheduler.timesteps[: stop_after] if stop_after else scheduler.timesteps
    magnitudes = []
    for i, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        model_in = scheduler.scale_model_input(torch.cat([x, x]), t)
        eps_uncond, eps_cond = denoiser.predict_noise(model_in, t, context).chunk(2)
        magnitudes.append(text_conditional_magnitude(eps_cond, eps_uncond))
        x = scheduler.step(eps_uncond + guidance_scale * (eps_cond - eps_uncond), t, x).prev_sample
        if on_step:
            on_step(i)
    return x, torch.stack(magnitudes, dim=1)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    batch_size: int = 32,
    progress: bool = False,
    cond_embeddings: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full generations, one per (prompt, seed) pair: final samples ``(B, C, H, W)``.

    ``cond_embeddings`` ``(B, L, D)``, if given, replaces the prompts' own text embeddings (e.g. a
    mitigated embedding from :mod:`core.mitigate`); ``prompts`` then only set the count.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if cond_embeddings is not None and cond_embeddings.shape[0] != len(prompts):
        raise ValueError("one conditional embedding per prompt")
    check_sampling_settings(num_inference_steps, guidance_scale)
    uncond = denoiser.encode_prompts([""])
    out = []
    bar = tqdm(total=len(prompts), desc="generating", disable=not progress)
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        if cond_embeddings is None:
            cond = denoiser.encode_prompts(chunk)
        else:
            cond = cond_embeddings[i : i + batch_size].to(denoiser.device, denoiser.dtype)
        x, _ = guided_denoise(denoiser, initial_noise(denoiser, seeds[i : i + batch_size]),
                              cond, uncond, num_inference_steps, guidance_scale)
        out.append(x)
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)

"""Core's :class:`~core.denoiser.Denoiser` protocol over the model a Stable Diffusion WebUI has loaded.

So :func:`core.calibration.calibrate` (and any other method written against the one denoiser seam) runs unchanged
on the WebUI's own weights: the Calibrate button of the DejaGuard section scores the bundled prompt set on the
loaded checkpoint with it. Plain torch and diffusers: the glue (:mod:`webui.script`) hands over the WebUI's pieces,
so this module imports nothing of a WebUI and is tested without one.

What it takes from the WebUI (SD1.x, epsilon prediction; shapes ``B`` batch, latents ``(B, 4, h, w)``, ``L = 77``,
``D = 768``):

- ``unet``: the LDM UNet (``openaimodel.UNetModel``: A1111's ``sd_model.model.diffusion_model``, Forge's
  ``forge_objects.unet.model.diffusion_model``), called as ``unet(x_t, t, context=...)`` on the diffusers-style
  UNet input ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; its output is ``eps``. This is the call both WebUIs'
  CFG denoisers make (k-diffusion's ``x / sqrt(1 + sigma^2)`` at ``t = timestep(sigma)``), so a score computed here
  on the UNet input of a generation's first step equals the guard's score of that image.
- ``encode``: prompts -> ``(B, 77, 768)`` conditioning as the WebUI encodes them (``sd_model.get_learned_conditioning``:
  the WebUI's own CLIP, its emphasis syntax and textual inversions included).
- ``alphas_cumprod`` ``(T,)``: the model's noise schedule; :meth:`new_scheduler` is DDIM over it (trailing spacing,
  epsilon), so the first timestep is ``T - 1`` (999), the WebUIs' first step at full noise.
- ``fingerprint``: core's fingerprint of the checkpoint file (:func:`webui.guard.checkpoint_fingerprint`), the key
  :func:`webui.guard.resolve_threshold` finds a calibration by.

Token-level methods (token significance, embedding mitigation) and decoding are not offered: the adapter hands
prompts to the WebUI's own text encoding (A1111's prompt-parsing CLIP wrapper, Forge's text processing engine),
which takes prompts, not token embeddings; substituting the input embeddings would need a hook inside each
WebUI's encoder, which this adapter does not have. Those methods raise :class:`~core.errors.DejaGuardError` saying
so in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core.denoiser import UNetCounter
from ..core.errors import DejaGuardError
from ..core.sampling import ddim_from_alphas_cumprod

NO_TOKENS = ("not available in this WebUI yet: the WebUI adapter cannot substitute token embeddings in the WebUI's "
             "text encoder, so token-level methods (token highlighting, embedding mitigation) cannot run on it")


class WebUIDenoiser:
    """The WebUI's loaded SD1.x model as a :class:`~core.denoiser.Denoiser` (see the module doc)."""

    def __init__(self, unet: torch.nn.Module, encode: Callable[[list[str]], torch.Tensor],
                 alphas_cumprod: torch.Tensor, fingerprint: str, sample_shape: tuple[int, int, int] = (4, 64, 64),
                 device: torch.device | str | None = None) -> None:
        self.unet = unet
        self._encode = encode
        self._alphas_cumprod = alphas_cumprod
        self._fingerprint = fingerprint
        self.sample_shape = tuple(int(s) for s in sample_shape)
        parameter = next(unet.parameters())
        self.device = torch.device(device) if device is not None else parameter.device
        self.unet_dtype = parameter.dtype
        self.dtype = torch.float32  # what callers hand in and get back; the UNet runs in its own dtype
        self.counter = UNetCounter()

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(B, 77, 768)`` through the WebUI's own text encoding."""
        with torch.no_grad():
            out = self._encode(list(prompts))
        if isinstance(out, dict):  # a WebUI that hands back a conditioning dict (SDXL-style)
            out = out["crossattn"]
        return out.to(self.device, self.dtype)

    def predict_noise(self, samples: torch.Tensor, timestep: torch.Tensor | int,
                      text_embeddings: torch.Tensor) -> torch.Tensor:
        """``samples (B, 4, h, w)`` (the UNet input ``x_t``), one timestep, ``text_embeddings (B, 77, 768)`` ->
        eps ``(B, 4, h, w)`` (float32)."""
        batch = samples.shape[0]
        t = torch.as_tensor(timestep, device=self.device).float().reshape(-1).expand(batch)
        eps = self.unet(samples.to(self.device, self.unet_dtype), t,
                        context=text_embeddings.to(self.device, self.unet_dtype))
        return self.counter.count(eps.float())

    def new_scheduler(self) -> Any:
        return ddim_from_alphas_cumprod(self._alphas_cumprod)

    def fingerprint(self) -> str:
        return self._fingerprint

    def prompt_tokens(self, prompt: str) -> list[str]:
        raise DejaGuardError(NO_TOKENS)

    def token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        raise DejaGuardError(NO_TOKENS)

    def encode_token_embeddings(self, prompts: Sequence[str], token_embeddings: torch.Tensor) -> torch.Tensor:
        raise DejaGuardError(NO_TOKENS)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        raise DejaGuardError("decoding is not available through the WebUI adapter (the WebUI decodes its own images)")

    def named_modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        raise DejaGuardError("the WebUI's UNet has LDM module names, not diffusers': neuron masks are not available "
                             "in the WebUI")

"""Core's :class:`~core.denoiser.Denoiser` protocol over the model a Stable Diffusion WebUI has loaded.

So :func:`core.calibration.calibrate` (and any other method written against the one denoiser seam) runs unchanged
on the WebUI's own weights: the Calibrate button of the DejaGuard section scores the bundled prompt set on the
loaded checkpoint with it. Plain torch and diffusers: the glue (:mod:`webui.script`) hands over the WebUI's pieces,
so this module imports nothing of a WebUI and is tested without one.

What it takes from the WebUI (SD1.x; SDXL below; epsilon prediction; shapes ``B`` batch, latents ``(B, 4, h, w)``,
``L = 77``, ``D = 768``):

- ``unet``: the LDM UNet (``openaimodel.UNetModel``: A1111's ``sd_model.model.diffusion_model``, Forge's
  ``forge_objects.unet.model.diffusion_model``), called as ``unet(x_t, t, context=...)`` on the diffusers-style
  UNet input ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; its output is ``eps``. This is the call both WebUIs'
  CFG denoisers make (k-diffusion's ``x / sqrt(1 + sigma^2)`` at ``t = timestep(sigma)``), so a score computed here
  on the UNet input of a generation's first step equals the guard's score of that image.
- ``encode``: prompts -> ``(B, 77, 768)`` conditioning as the WebUI encodes them (``sd_model.get_learned_conditioning``:
  the WebUI's own CLIP, its emphasis syntax and textual inversions included).
- ``alphas_cumprod`` ``(T,)``: the model's noise schedule; :meth:`new_scheduler` is DDIM over it (trailing spacing,
  epsilon), so the first timestep is ``T - 1`` (999), the WebUIs' first step at full noise.
- ``fingerprint``: core's fingerprint of the checkpoint file (:func:`core.checkpoint.unet_fingerprint`), the key
  :func:`webui.guard.resolve_threshold` finds a calibration by.

Token-level methods (token significance, :mod:`core.explain`), where the glue hands over the WebUI's text encoders
(``text_encoders``: A1111's and Forge's HF ``CLIPTextModel`` for SD1.x; for SDXL CLIP-L and CLIP-G, which A1111 runs
as an open_clip model), their token-embedding tables in encoding order (``token_tables``; default each HF encoder's
``get_input_embeddings()``) and the first one's tokenizer: both WebUIs tokenize (emphasis parsed out, textual
inversions placed), run those models and weight their output themselves, so the adapter hooks the tables (A1111's
and Forge's textual-inversion wrappers around CLIP's token embeddings, whose output already holds the inversion
rows) instead of re-implementing any of it:

- :meth:`token_embeddings` records the tables' outputs during the WebUI's own encoding, side by side
  ``(B, 77, E)`` (``E = 768``; SDXL ``768 + 1280``, core's convention for two encoders), and :meth:`prompt_tokens` the
  ids the first table was called with (``[BOS, pieces..., EOS, EOS...]``; the pieces up to the first EOS, as the
  WebUI tokenized them: emphasis brackets and weights are not pieces, a textual inversion's positions show the
  placeholder id the WebUI puts there);
- :meth:`encode_token_embeddings` runs the WebUI's encoding again with each table's output replaced by its part of
  the given rows, differentiably, so ``encode_token_embeddings(p, token_embeddings(p))`` is ``encode_prompts(p)``
  exactly, emphasis and textual inversions included. ``grad_encode``, when given, is the WebUI's encoding through
  which a gradient flows (the glue's: A1111's SDXL conditioner runs its frozen embedders under ``torch.no_grad``,
  Forge's ``get_learned_conditioning`` under ``torch.inference_mode``); default ``encode``.

SDXL (``pooled_width`` given, 1280): ``encode`` returns the WebUI's conditioning dict, ``crossattn`` ``(B, 77, 2048)``
and ``vector`` ``(B, 2816)`` (CLIP-G's pooled output, then the size conditioning of ``sample_shape``'s image). The
adapter speaks core's SDXL convention (:mod:`core.conditioning`): :meth:`encode_prompts` returns the packed
``(B, 78, 2048)`` ``[crossattn ; [pooled, 0]]`` and keeps the size part of ``vector`` (the same for every prompt at
one image size), and :meth:`predict_noise` unpacks and calls ``unet(x, t, context=crossattn, y=[pooled, size])``, the
call both WebUIs' SDXL CFG denoisers make. A zero conditioning (``torch.zeros_like`` of a packed one: what both
WebUIs give an SDXL model for an empty negative prompt) becomes zero hidden states and pooled vector with the size
part kept, as there.

One chunk only: a prompt over 75 tokens (or with ``BREAK``) is encoded in several 77-token chunks, which the
``(B, 77, E)`` token rows of the seam cannot hold; those get a one-line :class:`~core.errors.DejaGuardError`.
Without token tables the token methods raise that error with :data:`NO_TOKENS`. Decoding and neuron masks are
not offered.

Gradients (Forge): Forge's loader builds the weights under ``torch.inference_mode``, so they are *inference
tensors*, which autograd cannot save for backward, and its UNet adds to activations in place (``x += n``). As
ComfyUI's adapter (:mod:`nodes.comfy_denoiser`) does: on the first call that needs a gradient (token significance's
backward pass; never for scoring or calibration, which run without one), the adapter makes ordinary copies of the
inference tensors of the UNet, and of the text encoders, and calls the module through ``torch.func.functional_call``
with them, copying each activation autograd saves (:func:`core.denoiser.clone_saved_activations`). The copies are
held by the adapter only (one extra copy of the UNet and CLIP weights, 3.9 GB for SD1.5 in fp32; SDXL's UNet alone
9.6 GiB) and freed by :meth:`WebUIDenoiser.free_grad_copies` (the Explain button calls it when done) or with the
adapter.
Before copying, the adapter checks that the copies (with a quarter more for activations) fit in the memory left on
their device (:func:`free_memory`) and otherwise refuses in one line, so a WebUI short of memory answers the button
instead of being killed. The WebUI's own
model is never changed. A1111's weights are ordinary tensors: no copy is made there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ..core.conditioning import pack_pooled, unpack_pooled
from ..core.denoiser import UNetCounter, clone_saved_activations
from ..core.errors import DejaGuardError
from ..core.sampling import ddim_from_alphas_cumprod

NO_TOKENS = ("not available: the WebUI handed over no text encoder, so token-level methods (token highlighting, "
             "embedding mitigation) cannot run on it")


CHUNK = 77  # tokens of one chunk of the WebUIs' CLIP encoding: BOS, 75 pieces, EOS


class WebUIDenoiser:
    """The WebUI's loaded SD1.x or SDXL model as a :class:`~core.denoiser.Denoiser` (see the module doc)."""

    def __init__(self, unet: torch.nn.Module, encode: Callable[[list[str]], Any],
                 alphas_cumprod: torch.Tensor, fingerprint: str, sample_shape: tuple[int, int, int] = (4, 64, 64),
                 device: torch.device | str | None = None, text_encoders: Sequence[torch.nn.Module] = (),
                 tokenizer: Any = None, pooled_width: int | None = None,
                 token_tables: Sequence[torch.nn.Module] | None = None,
                 grad_encode: Callable[[list[str]], Any] | None = None) -> None:
        self.unet = unet
        self._encode = encode
        self.pooled_width = pooled_width  # SDXL: the width of the pooled vector packed as the last row; else None
        self._size_conditioning: torch.Tensor | None = None  # SDXL: (1, A - pooled_width), the tail of ``vector``
        self._grad_encode = grad_encode or encode
        self.text_encoders = torch.nn.ModuleList(text_encoders)  # the models ``encode`` runs (token methods), or none
        self.token_tables = list(token_tables if token_tables is not None else
                                 [m.get_input_embeddings() for m in text_encoders])
        self.tokenizer = tokenizer  # the first table's tokenizer (ids -> pieces)
        self._alphas_cumprod = alphas_cumprod
        self._fingerprint = fingerprint
        self.sample_shape = tuple(int(s) for s in sample_shape)
        parameter = next(unet.parameters())
        self.device = torch.device(device) if device is not None else parameter.device
        self.unet_dtype = parameter.dtype
        self.dtype = torch.float32  # what callers hand in and get back; the UNet runs in its own dtype
        self.counter = UNetCounter()
        self._grad_copies: dict[int, dict[str, torch.Tensor]] = {}  # id(module) -> copies of its inference tensors

    def _call(self, module: torch.nn.Module, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, which runs ``module``; on a gradient path over a module holding inference tensors, with
        ordinary copies of them in their place (made once) and saved activations copied (module doc: Gradients)."""
        if not torch.is_grad_enabled():
            return fn(*args)
        key = id(module)
        if key not in self._grad_copies:
            inference = [(n, t) for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_inference()]
            _check_room_for_copies([t for _, t in inference])
            with torch.no_grad():
                self._grad_copies[key] = {f"module.{n}": t.detach().clone() for n, t in inference}
        copies = self._grad_copies[key]
        if not copies:
            return fn(*args)
        with clone_saved_activations([*copies.values()]):
            return torch.func.functional_call(_Holder(module, fn), copies, args, strict=False)

    def free_grad_copies(self) -> None:
        """Drop the gradient-capable weight copies (module doc: Gradients); the next gradient path makes them again."""
        self._grad_copies.clear()

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(B, 77, 768)`` (SDXL: packed ``(B, 78, 2048)``, module doc) through the WebUI's own text
        encoding."""
        with torch.no_grad():
            return self._conditioning(self._encode(list(prompts)))

    def _conditioning(self, out: Any) -> torch.Tensor:
        """The WebUI's conditioning -> core's: ``(B, 77, D)``, or SDXL's packed ``(B, 78, 2048)`` (module doc)."""
        if self.pooled_width:
            vector = out["vector"].to(self.device, self.dtype)
            size = vector[:1, self.pooled_width:].detach()
            if self._size_conditioning is not None and not torch.equal(size, self._size_conditioning):
                raise DejaGuardError("the WebUI's SDXL size conditioning changed between encodings (another image "
                                     "size?): make a new adapter for each size")
            self._size_conditioning = size
            return pack_pooled(out["crossattn"].to(self.device, self.dtype), vector[:, :self.pooled_width])
        if isinstance(out, dict):  # a WebUI that hands back a conditioning dict for a one-encoder model
            out = out["crossattn"]
        return out.to(self.device, self.dtype)

    def predict_noise(self, samples: torch.Tensor, timestep: torch.Tensor | int,
                      text_embeddings: torch.Tensor) -> torch.Tensor:
        """``samples (B, 4, h, w)`` (the UNet input ``x_t``), one timestep, ``text_embeddings (B, 77, 768)`` (SDXL:
        packed ``(B, 78, 2048)``) -> eps ``(B, 4, h, w)`` (float32)."""
        batch = samples.shape[0]
        t = torch.as_tensor(timestep, device=self.device).float().reshape(-1).expand(batch)
        x = samples.to(self.device, self.unet_dtype)
        if not self.pooled_width:
            eps = self._call(self.unet, lambda x, c: self.unet(x, t, context=c), x,
                             text_embeddings.to(self.device, self.unet_dtype))
            return self.counter.count(eps.float())
        if self._size_conditioning is None:
            raise DejaGuardError("encode a prompt first: the SDXL size conditioning comes from the WebUI's encoding")
        hidden, pooled = unpack_pooled(text_embeddings, self.pooled_width)
        y = torch.cat([pooled.to(self._size_conditioning.dtype), self._size_conditioning.expand(batch, -1)], dim=1)
        eps = self._call(self.unet, lambda x, c, y: self.unet(x, t, context=c, y=y), x,
                         hidden.to(self.device, self.unet_dtype), y.to(self.device, self.unet_dtype))
        return self.counter.count(eps.float())

    def new_scheduler(self) -> Any:
        return ddim_from_alphas_cumprod(self._alphas_cumprod)

    def fingerprint(self) -> str:
        return self._fingerprint

    def _encode_recording(self, prompts: Sequence[str], rows: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The WebUI's encoding of ``prompts`` with the token-embedding tables watched (and their outputs replaced by
        ``rows (B, 77, E)`` when given, each table its part) -> ``(conditioning, ids of the first table (B, 77),
        tables' outputs side by side (B, 77, E))``."""
        if not self.token_tables:
            raise DejaGuardError(NO_TOKENS)
        widths = [_table_width(t) for t in self.token_tables]
        if rows is not None and tuple(rows.shape) != (len(prompts), CHUNK, sum(widths)):
            raise DejaGuardError(f"token embeddings {tuple(rows.shape)} do not match the {len(prompts)} prompt(s) of "
                                 f"{CHUNK} tokens and width {sum(widths)}")
        parts = None if rows is None else torch.split(rows, widths, dim=-1)
        calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.token_tables]

        def hook(k: int) -> Callable[..., torch.Tensor | None]:
            def watch(_m: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor | None:
                calls[k].append((inputs[0].detach(), out.detach()))
                return None if parts is None else parts[k].to(out.device, out.dtype)
            return watch

        handles = [t.register_forward_hook(hook(k)) for k, t in enumerate(self.token_tables)]
        try:
            if rows is None:
                out = self._encode(list(prompts))
            else:
                out = self._call(self.text_encoders, self._grad_encode, list(prompts))
        finally:
            for handle in handles:
                handle.remove()
        if any(len(c) != 1 for c in calls):
            raise DejaGuardError("token highlighting takes prompts of one 77-token chunk (at most 75 tokens, no "
                                 f"BREAK); the WebUI encoded these in {max(len(c) for c in calls)} chunks")
        return self._conditioning(out), calls[0][0][0], torch.cat([c[0][1] for c in calls], dim=-1)

    def prompt_tokens(self, prompt: str) -> list[str]:
        """The BPE pieces at positions ``1..n`` of the WebUI's own tokenization (up to the first EOS)."""
        with torch.no_grad():
            _, ids, _ = self._encode_recording([prompt])
        pieces: list[int] = []
        for i in ids[0, 1:].tolist():
            if i == self.tokenizer.eos_token_id:
                break
            pieces.append(int(i))
        return self.tokenizer.convert_ids_to_tokens(pieces)

    def token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, 77, E)``: the rows of the WebUI's token-embedding table for ``prompts`` (textual inversions in)."""
        with torch.no_grad():
            _, _, rows = self._encode_recording(prompts)
        return rows.to(self.device, self.dtype)

    def encode_token_embeddings(self, prompts: Sequence[str], token_embeddings: torch.Tensor) -> torch.Tensor:
        """The WebUI's encoding of ``prompts`` with ``token_embeddings (B, 77, E)`` as the table's output ->
        ``(B, 77, D)``, differentiable with respect to ``token_embeddings``."""
        return self._encode_recording(prompts, token_embeddings)[0]

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        raise DejaGuardError("decoding is not available through the WebUI adapter (the WebUI decodes its own images)")

    def named_modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        raise DejaGuardError("the WebUI's UNet has LDM module names, not diffusers': neuron masks are not available "
                             "in the WebUI")


COPY_HEADROOM = 1.25  # the copies, plus a quarter for the activations the backward pass keeps


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: CUDA's free memory plus what PyTorch's cache holds unused,
    the system's available memory for the CPU (``MemAvailable``); None where unknown (MPS, no /proc)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _check_room_for_copies(tensors: list[torch.Tensor]) -> None:
    """A one-line DejaGuardError, before anything is copied, when the gradient-capable copies of ``tensors`` (module
    doc: Gradients) would not fit in the memory left on their devices: a refused button, not a WebUI killed for
    memory halfway through a backward pass."""
    need: dict[torch.device, int] = {}
    for t in tensors:
        need[t.device] = need.get(t.device, 0) + t.numel() * t.element_size()
    for device, size in need.items():
        free = free_memory(device)
        if free is not None and size * COPY_HEADROOM > free:
            raise DejaGuardError(
                f"not enough memory on {device} for token highlighting on this model: its weights are inference "
                f"tensors (Forge), so the backward pass needs ordinary copies of them, {size / 2**30:.1f} GiB (plus "
                f"activations), and {free / 2**30:.1f} GiB is free; the score, Calibrate and protection are unaffected")


def _table_width(table: torch.nn.Module) -> int:
    """The row width of a token-embedding table: its own ``embedding_dim``, or that of the first ``nn.Embedding``
    inside (the WebUIs' textual-inversion wrappers)."""
    found = table if isinstance(table, torch.nn.Embedding) else next(
        (m for m in table.modules() if isinstance(m, torch.nn.Embedding)), None)
    if found is None:
        raise DejaGuardError("the WebUI's token-embedding table holds no embedding: token methods cannot run on it")
    return int(found.embedding_dim)


class _Holder(torch.nn.Module):
    """``module`` as a submodule (its names prefixed ``module.``) and ``fn`` as the forward, for
    ``torch.func.functional_call`` over a call that runs ``module`` somewhere inside (the WebUI's text encoding)."""

    def __init__(self, module: torch.nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)

"""Core's :class:`~core.denoiser.Denoiser` protocol over a ComfyUI MODEL (ModelPatcher) and CLIP.

Every DejaGuard method written against the protocol (token significance, detection, ...) runs on
whatever UNet a graph has loaded: the testbed from the DejaGuard loader, or an SD1.x / SD2.x / SDXL
checkpoint from the stock CheckpointLoaderSimple (eps or v-prediction).

Spaces and parametrization (shapes: ``B`` batch, ``C, H, W`` latent, ``L = 77``, ``D`` text width):

- **Samples** are in the UNet's input space, as in diffusers: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
  with ``x_0`` a *scaled* latent. ComfyUI's LATENT dicts hold unscaled VAE latents; the model's
  latent format maps them: ``x_0 = latent_format.process_in(latent)`` (``latent * scale_factor``,
  0.18215 for SD1/SD2), ``latent = process_out(x_0)``. :meth:`ComfyDenoiser.decode` applies
  ``process_out`` before the VAE.
- **Noise prediction**: ComfyUI samplers use the k-diffusion (sigma) parametrization,
  ``x_k = x_0 + sigma eps`` with ``sigma_t = sqrt((1 - abar_t) / abar_t)``, so ``x_k = x_t * sqrt(1 + sigma^2)``.
  :meth:`predict_noise` maps ``t -> sigma = model_sampling.sigma(t)``, calls
  ``model.model.apply_model(x_k, sigma, c_crossattn=emb)`` (which feeds the UNet ``x_k / sqrt(1 + sigma^2)``
  and the timestep ``model_sampling.timestep(sigma) = t``) and returns ``eps = (x_k - denoised) / sigma``.
  ``denoised`` is the x_0 estimate whatever the model predicts, so this is the raw UNet output for an
  eps model and ``sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` for a v-prediction model (SD2.x 768, or a model
  switched by the stock ModelSamplingDiscrete node): core's epsilon-based schedulers and scores apply unchanged.
- **Schedule**: :meth:`new_scheduler` is a diffusers ``DDIMScheduler`` with the model's own
  ``alphas_cumprod = 1 / (1 + sigmas^2)`` (so patched schedules are honoured), trailing spacing,
  epsilon prediction: its first timestep is 999, the first timestep of ComfyUI's "normal" scheduler.

SDXL (two text encoders, pooled conditioning): the conditioning is one tensor in the layout of
``core/conditioning.py``: hidden states ``(B, 77, 2048)`` (CLIP-L's 768 and OpenCLIP-G's 1280 channels, as
ComfyUI concatenates them) with OpenCLIP-G's pooled output ``(B, 1280)`` packed as one extra row, ``(B, 78, 2048)``
(:attr:`ComfyDenoiser.pooled_width` 1280; 0 for SD1/SD2, whose conditioning is ``(B, 77, D)`` as before).
:meth:`~ComfyDenoiser.encode_prompts` packs what ``CLIPTextEncode`` gives; :meth:`~ComfyDenoiser.predict_noise`
unpacks it and passes the pooled vector as the UNet's ``adm`` input ``y`` (with the image size, as ComfyUI's
sampler does). Core's methods never unpack: token significance reads rows ``1..n``, embedding mitigation optimizes
every row, so it steers the pooled vector too.

Support, names and fingerprint come from the adapter core, ``nodes/model_check.py``: the constructor runs
:func:`~nodes.model_check.check_supported` for the feature its node serves (Token Highlighting, embedding
mitigation, neuron masks; None: all of them), so every node that builds this adapter refuses alike, in its own
name (SDXL: neuron masks), :meth:`named_modules` uses its one diffusers <-> ComfyUI name map and
:meth:`fingerprint` is its :func:`~nodes.model_check.comfy_fingerprint`.

What is honoured from the ModelPatcher: weight patches (LoRA, DejaGuard neuron masks), object
patches and ``transformer_options`` patches (attention patches), because the model is loaded with
``comfy.model_management.load_models_gpu`` exactly as a sampler loads it. Sampler-level hooks (CFG
functions, post-CFG functions, the UNet function wrapper) are not applied: they belong to sampling.

Gradients: ComfyUI executes graphs under ``torch.inference_mode()``. Every method here steps out
of it with ``torch.inference_mode(False)`` (which also switches grad mode on; the caller's grad mode
is restored). Two things in ComfyUI stop back-propagation, and the adapter handles both without
modifying the cached model other graphs use:

- A checkpoint loaded by the stock loader (and weights patched during a graph) are *inference
  tensors*, which autograd cannot save for backward. The adapter makes ordinary copies of those
  once, at the first prediction that needs a gradient (held by the adapter only: one extra copy of the affected
  weights, freed with it; scoring without a gradient uses the model's own tensors), and calls
  the model through ``torch.func.functional_call`` with them.
- ComfyUI's UNet adds to activations in place (``x += n`` in its transformer blocks), which
  invalidates tensors autograd saved earlier. The adapter copies each tensor autograd saves
  (``saved_tensors_hooks``; weights excepted): extra activation memory, on the grad path only.

The same two measures make the text encoder differentiable for token significance:
:meth:`ComfyDenoiser.token_embeddings` reads the input token embeddings (textual-inversion vectors included)
during ``clip.encode_from_tokens``, and
:meth:`ComfyDenoiser.encode_token_embeddings` runs ``encode_from_tokens`` (prompt weights, CLIP skip) with each
text encoder's token-embedding table output replaced by the given tensor, through one module forward hook:
ComfyUI's March-2024 CLIP takes no embeddings argument. SDXL has two tables (``cond_stage_model.clip_l`` and
``.clip_g``); its input token embeddings are both encoders' at the same token positions (same BPE), concatenated
along the last axis ``(B, 77, 768 + 1280)``, so a token's significance covers the words of both encoders.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import comfy.model_base
import comfy.model_management
import torch

from ..core.conditioning import pack_pooled, unpack_pooled
from ..core.denoiser import UNetCounter, clone_saved_activations
from ..core.errors import DejaGuardError, NonFiniteError
from ..core.sampling import ddim_from_alphas_cumprod
from .model_check import check_supported, comfy_fingerprint, diffusers_names, model_sampling

SDXL_POOLED_WIDTH = 1280  # OpenCLIP-G's projected pooled output, the first 1280 of SDXL's 2816 adm channels


class _ApplyModel(torch.nn.Module):
    """Wraps ``BaseModel.apply_model`` as a ``forward`` so ``functional_call`` can swap its weights."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                transformer_options: dict[str, Any], y: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if y is None else {"y": y}  # SDXL's adm input (B, 2816); SD1/SD2 take none
        return self.base.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options, **extra)


class _EncodeFromTokens(torch.nn.Module):
    """``clip.encode_from_tokens`` as a ``forward`` over ``cond_stage_model`` (registered as ``stage``), so that
    ``functional_call`` can swap the text encoder's weights."""

    def __init__(self, denoiser: ComfyDenoiser,
                 hooks: Sequence[Callable[[torch.Tensor], torch.Tensor | None]]) -> None:
        super().__init__()
        self.stage = denoiser.clip.cond_stage_model
        self._denoiser = denoiser
        self._hooks = hooks

    def forward(self, tokens: dict[str, list[list[tuple[Any, ...]]]]) -> torch.Tensor:
        return self._denoiser._encode_with_token_hook(tokens, self._hooks)


def default_sample_shape(model: Any) -> tuple[int, int, int]:
    """The model's native latent shape ``(C, H, W)``: the testbed's configured size, 128x128 for SDXL (1024 px),
    96x96 for v-prediction SD2 (768 px), 64x64 otherwise (512 px)."""
    from .diffusers_folder import DiffusersModelConfig

    base = model.model
    channels = int(getattr(base.diffusion_model, "in_channels", 4))
    config = base.model_config
    if isinstance(config, DiffusersModelConfig):
        size = config.unet_config.get("image_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return channels, int(h), int(w)
    if isinstance(base, comfy.model_base.SDXL):
        return channels, 128, 128
    side = 96 if base.model_type == comfy.model_base.ModelType.V_PREDICTION else 64
    return channels, side, side


class ComfyDenoiser:
    """:class:`~core.denoiser.Denoiser` over ComfyUI's MODEL (``ModelPatcher``) and CLIP (see module doc).

    ``clip`` may be None for UNet-only methods (embedding mitigation): the text methods then refuse.
    ``pooled_width``: 1280 for SDXL, whose conditioning carries CLIP-G's pooled output as its last row (module doc),
    0 for SD1/SD2 and the testbed (hidden states alone).
    ``vae`` (ComfyUI VAE) is only needed by :meth:`decode`. ``sample_shape`` ``(C, H, W)`` defaults to
    :func:`default_sample_shape`. Every :meth:`predict_noise` ends with ComfyUI's interruption check, so a
    long method (localization, explanation, mitigation) stops at the next UNet call when the user cancels the
    queue; progress goes through core's ``progress`` arguments.
    """

    def __init__(self, model: Any, clip: Any, vae: Any = None, sample_shape: tuple[int, int, int] | None = None,
                 feature: str | None = None) -> None:
        # The one support check, for the feature the caller serves ("explain", "mitigate", "masks"; None: all the
        # adapter's features), so every node building the adapter refuses what it cannot do, in its own name.
        self.info = check_supported(model, feature)
        # Width of the pooled text vector packed as the conditioning's last row (core/conditioning.py): SDXL's
        # CLIP-G projection (1280), 0 for models conditioned on hidden states alone (SD1.x, SD2.x, the testbed).
        self.pooled_width = SDXL_POOLED_WIDTH if self.info.family == "sdxl" else 0
        if clip is not None and not hasattr(clip, "tokenize"):  # None: UNet-only use (text methods then refuse)
            raise DejaGuardError("a CLIP text encoder is required (connect the loader's CLIP output)")
        self.model = model
        self.clip = clip
        self.vae = vae
        self.device = torch.device(model.load_device)
        self.dtype = torch.float32  # apply_model casts to the UNet's dtype and returns float32
        self.sample_shape = tuple(sample_shape) if sample_shape else default_sample_shape(model)
        self.counter = UNetCounter()
        self._weights: dict[str, torch.Tensor] | None = None
        self._clip_weights: dict[str, torch.Tensor] | None = None
        base = model.model
        self._wrapper = _ApplyModel(base)
        _, self._names = diffusers_names(base.diffusion_model, base.model_config.unet_config)
        self._fingerprint: str | None = None

    # -- text ----------------------------------------------------------------------------------

    def _encoders(self) -> list[tuple[str, Any]]:
        """The CLIP's text encoders as ``(token key, SDClipModel)``, in the order ComfyUI concatenates their hidden
        states: one for SD1/SD2 (``cond_stage_model.clip_l`` / ``clip_h``, tokens under ``"l"`` / ``"h"``), two for
        SDXL (``SDXLClipModel.clip_l`` then ``.clip_g``, tokens under ``"l"`` and ``"g"``)."""
        if self.clip is None:
            raise DejaGuardError("a CLIP text encoder is required (connect the loader's CLIP output)")
        stage = self.clip.cond_stage_model
        if isinstance(getattr(stage, "clip", None), str):  # SD1ClipModel: one encoder, attribute clip_<name>
            encoders = [(stage.clip_name, getattr(stage, stage.clip, None))]
        elif hasattr(stage, "clip_l") and hasattr(stage, "clip_g"):  # SDXLClipModel: CLIP-L and OpenCLIP-G
            encoders = [("l", stage.clip_l), ("g", stage.clip_g)]
        else:
            encoders = []
        if not encoders or any(not hasattr(getattr(inner, "transformer", None), "get_input_embeddings")
                               for _, inner in encoders):
            raise DejaGuardError(f"unsupported text encoder {type(stage).__name__} (expected an SD1/SD2 CLIP or "
                                 "SDXL's CLIP-L + OpenCLIP-G)")
        if bool(self.pooled_width) != (len(encoders) == 2):
            raise DejaGuardError(f"the CLIP ({type(stage).__name__}) does not belong to this {self.info.family} model: "
                                 "connect the CLIP output of the model's own checkpoint loader")
        return encoders

    def _tokenizers(self, keys: Sequence[str]) -> dict[str, Any]:
        """Token key -> sub-tokenizer (attribute ``clip_<key>`` of the CLIP's tokenizer: ``clip_l`` / ``clip_h`` for
        SD1/SD2, ``clip_l`` and ``clip_g`` for SDXL). Reads the tokenizer only, not the text encoders."""
        tokenizer = self.clip.tokenizer
        subs = {key: getattr(tokenizer, f"clip_{key}", None) for key in keys}
        if not subs or any(sub is None or not hasattr(sub, "inv_vocab") for sub in subs.values()):
            raise DejaGuardError(f"unsupported tokenizer {type(tokenizer).__name__} "
                                 "(expected an SD1/SD2 CLIP or SDXL tokenizer)")
        if any(getattr(sub, "start_token", None) is None for sub in subs.values()):
            raise DejaGuardError("unsupported tokenizer: no start (BOS) token")
        return subs

    def _first_chunk(self, prompt: str, word_ids: bool = False) -> dict[str, list[list[tuple[Any, ...]]]]:
        """ComfyUI tokens of ``prompt`` (weights parsed), cut to the first 77-token chunk. With two encoders (SDXL)
        their tokens must hold the same words at the same positions (the embedding rows of :meth:`token_embeddings`
        pair them up): same BPE, so they do unless a textual-inversion file has vectors for one encoder only."""
        if self.clip is None:
            raise DejaGuardError("a CLIP text encoder is required (connect the loader's CLIP output)")
        tokens = self.clip.tokenize(prompt, return_word_ids=True)
        if any(len(chunks) > 1 for chunks in tokens.values()):
            warnings.warn(f"prompt longer than one 77-token chunk, truncated: {prompt[:60]!r}...", stacklevel=3)
        tokens = {key: chunks[:1] for key, chunks in tokens.items()}
        layouts = {tuple(word for _t, _w, word in chunks[0]) for chunks in tokens.values()}
        if len(layouts) > 1:
            raise DejaGuardError(f"the text encoders' tokenizers place the words of {prompt[:60]!r} differently "
                                 "(a textual-inversion embedding for one encoder only?)")
        if word_ids:
            return tokens
        return {key: [[(t, w) for t, w, _word in chunk] for chunk in chunks] for key, chunks in tokens.items()}

    def _encode(self, tokens: dict[str, list[list[tuple[Any, ...]]]]) -> torch.Tensor:
        """``clip.encode_from_tokens(tokens)`` in this denoiser's layout: hidden states ``(1, 77, D)``; SDXL: with
        CLIP-G's pooled output packed as row 78 (:func:`~core.conditioning.pack_pooled`), ``(1, 78, 2048)``."""
        self._encoders()  # the CLIP must be the model's family: one line here, not a shape error in the UNet
        if not self.pooled_width:
            return self.clip.encode_from_tokens(tokens)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)  # as CLIPTextEncode calls it
        if pooled is None:
            raise DejaGuardError("the CLIP gives no pooled output, which SDXL needs: connect the SDXL "
                                 "checkpoint's CLIP")
        return pack_pooled(cond, pooled)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> conditioning as CLIPTextEncode makes it (first chunk only): ``(B, 77, D)``; SDXL: hidden
        states and pooled output packed, ``(B, 78, 2048)`` (:meth:`_encode`)."""
        with torch.inference_mode(False), torch.no_grad():
            conds = [self._encode(self._first_chunk(p)) for p in prompts]
            return torch.cat(conds).to(self.device, self.dtype).clone()

    def prompt_tokens(self, prompt: str) -> list[str]:
        """BPE pieces at embedding positions ``1..n`` (``"</w>"`` ends a word); a textual-inversion
        vector is ``"<embedding>"``. SDXL: its two tokenizers share the BPE and the positions (:meth:`_first_chunk`)."""
        tokens = self._first_chunk(prompt, word_ids=True)
        key = "l" if "l" in tokens else next(iter(tokens))  # SDXL: CLIP-L's (CLIP-G's are the same pieces)
        sub = self._tokenizers([key])[key]
        chunk = tokens[key][0]
        body = []
        for token, _weight, word in chunk[1:]:
            if word == 0:  # EOS, then padding
                break
            body.append((token, word))
        pieces = []
        for i, (token, word) in enumerate(body):
            if isinstance(token, int):
                pieces.append(sub.inv_vocab[token])
            else:
                last = i + 1 == len(body) or body[i + 1][1] != word
                pieces.append("<embedding>" + ("</w>" if last else ""))
        return pieces

    def _encode_with_token_hook(self, tokens: dict[str, list[list[tuple[Any, ...]]]],
                                hooks: Sequence[Callable[[torch.Tensor], torch.Tensor | None]]) -> torch.Tensor:
        """:meth:`_encode` ``(tokens)`` with ``hooks[i](out)`` seeing (and possibly replacing) the output
        ``(n, 77, E_i)`` of the token-embedding table of text encoder ``i`` of :meth:`_encoders`, row 0 being the
        prompt's.

        Each table is found when it runs (``transformer.get_input_embeddings()`` at call time: ComfyUI swaps in a
        larger table for textual-inversion vectors) through one process-wide module hook, removed on return. Only
        the first call of each table is hooked: March 2024 ComfyUI looks up all rows in one call, late-2025 ComfyUI
        one row per call, the prompt's first (a weighted prompt adds an empty one).
        """
        inners = [inner for _, inner in self._encoders()]
        calls = [0] * len(inners)

        def on_forward(module: torch.nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
            for i, inner in enumerate(inners):
                if module is inner.transformer.get_input_embeddings():
                    calls[i] += 1
                    return hooks[i](out) if calls[i] == 1 else None
            return None

        handle = torch.nn.modules.module.register_module_forward_hook(on_forward)
        try:
            return self._encode(tokens)
        finally:
            handle.remove()

    def token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> input token embeddings ``(B, 77, E)`` of the first chunk (textual-inversion vectors
        included), before position embeddings. SDXL: both encoders' at the same token positions, concatenated
        along the last axis (CLIP-L then OpenCLIP-G, ``E = 768 + 1280``), so a token's gradient norm covers both.

        March 2024 ComfyUI looks textual-inversion vectors up in its token-embedding table (swapped for a larger
        one); late-2025 ComfyUI inserts them after the table lookup and passes the result to the text
        transformer as ``embeds``, which is read where it is given.
        """
        return torch.cat([self._prompt_token_embeddings(p) for p in prompts]).to(self.device)

    def _prompt_token_embeddings(self, prompt: str) -> torch.Tensor:
        inners = [inner for _, inner in self._encoders()]
        looked_up: list[list[torch.Tensor]] = [[] for _ in inners]
        passed: list[list[torch.Tensor]] = [[] for _ in inners]

        def capture(i: int) -> Callable[[torch.Tensor], None]:
            def keep(out: torch.Tensor) -> None:  # row 0: the prompt (weights add "" after it)
                looked_up[i].append(out[:1].detach().float().clone())
            return keep

        def on_transformer(i: int) -> Callable[..., None]:
            def keep(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
                if kwargs.get("embeds") is not None:
                    passed[i].append(kwargs["embeds"][:1].detach().float().clone())
            return keep

        tokens = self._first_chunk(prompt)
        handles = [inner.transformer.register_forward_pre_hook(on_transformer(i), with_kwargs=True)
                   for i, inner in enumerate(inners)]
        try:
            with torch.inference_mode(False), torch.no_grad():
                self._encode_with_token_hook(tokens, [capture(i) for i in range(len(inners))])
        finally:
            for handle in handles:
                handle.remove()
        length = len(next(iter(tokens.values()))[0])
        rows = []
        for got, looked in zip(passed, looked_up):
            if not (got or looked) or tuple((got or looked)[0].shape[:2]) != (1, length):
                shape = tuple((got or looked)[0].shape) if got or looked else None
                raise DejaGuardError(f"token embeddings of shape {shape} for {length} tokens: this "
                                     "ComfyUI's text encoder is not supported")
            rows.append((got or looked)[0])
        return torch.cat(rows, dim=-1)

    def encode_token_embeddings(self, prompts: Sequence[str], token_embeddings: torch.Tensor) -> torch.Tensor:
        """CLIPTextEncode's conditioning of ``prompts`` (weights applied, first chunk; the layout of
        :meth:`encode_prompts`) with the input token embeddings replaced by ``token_embeddings (B, 77, E)``;
        differentiable w.r.t. them. SDXL: ``E = 768 + 1280`` is split between CLIP-L and OpenCLIP-G, and the
        packed pooled row depends on the OpenCLIP-G half too (its EOS hidden state through ``text_projection``).

        Gradients through ComfyUI's CLIP need what the UNet needs (module doc): ordinary copies of
        inference-tensor weights (``functional_call``) and copies of saved activations (its layers add in place).
        """
        if token_embeddings.shape[0] != len(prompts):
            raise DejaGuardError(f"{token_embeddings.shape[0]} token-embedding rows for {len(prompts)} prompts")
        encoders = self._encoders()
        widths = [int(inner.transformer.get_input_embeddings().weight.shape[1]) for _, inner in encoders]
        if token_embeddings.shape[-1] != sum(widths):
            raise DejaGuardError(f"token embeddings of width {token_embeddings.shape[-1]}; the text encoders take "
                                 f"{' + '.join(map(str, widths))}")
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            self.clip.load_model()
            stage = self.clip.cond_stage_model
            if self._clip_weights is None:
                tensors = [*stage.named_parameters(), *stage.named_buffers()]
                with torch.no_grad():
                    self._clip_weights = {f"stage.{n}": t.detach().clone() for n, t in tensors if t.is_inference()}
            starts = {key: sub.start_token for key, sub in self._tokenizers([k for k, _ in encoders]).items()}
            conds = []
            for i, p in enumerate(prompts):
                tokens = self._first_chunk(p)
                # The ids only select embedding rows, which are replaced: a textual-inversion vector (already in
                # token_embeddings) gets a plain id so ComfyUI builds no new embedding table on the grad path.
                tokens = {k: [[(t if isinstance(t, int) else starts.get(k, 0), *rest) for t, *rest in chunk]
                              for chunk in chunks] for k, chunks in tokens.items()}
                row = token_embeddings[i : i + 1]
                if tuple(row.shape[1:2]) != (len(next(iter(tokens.values()))[0]),):
                    raise DejaGuardError(f"token embeddings {tuple(token_embeddings.shape)} do not match the "
                                         "prompt's 77 tokens")

                def substitute(part: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
                    def replace(out: torch.Tensor) -> torch.Tensor:
                        return torch.cat([part.to(out.device, out.dtype), out[1:]])
                    return replace

                call = _EncodeFromTokens(self, [substitute(part) for part in torch.split(row, widths, dim=-1)])
                weights = self._clip_weights
                with clone_saved_activations([*weights.values(), *stage.parameters(), *stage.buffers()]):
                    if weights:
                        cond = torch.func.functional_call(call, weights, (tokens,))
                    else:
                        cond = call(tokens)
                conds.append(cond.to(self.device, self.dtype))
            return torch.cat(conds)

    # -- UNet ----------------------------------------------------------------------------------

    def _load(self, grad: bool = True) -> dict[str, torch.Tensor]:
        """Load (and patch) the model as a sampler does; with ``grad``, ordinary copies of inference-tensor weights
        (made once, on the first call that needs a gradient: without one the model's own tensors serve, and a
        scoring-only use such as calibration costs no second copy of the UNet, 10 GB for SDXL in float32)."""
        comfy.model_management.load_models_gpu([self.model])
        if self._weights is None and not grad:
            return {}
        if self._weights is None:
            base = self.model.model
            tensors = [*base.named_parameters(), *base.named_buffers()]
            with torch.no_grad():
                self._weights = {f"base.{n}": t.detach().clone() for n, t in tensors if t.is_inference()}
        return self._weights

    def predict_noise(self, samples: torch.Tensor, timestep: torch.Tensor | int,
                      text_embeddings: torch.Tensor) -> torch.Tensor:
        """``samples (B, C, H, W)`` = ``x_t``, one timestep ``t`` in [0, 999], ``text_embeddings (B, 77, D)``
        (SDXL: packed ``(B, 78, 2048)``, see :meth:`encode_prompts`) -> eps ``(B, C, H, W)`` (see module doc for the
        sigma mapping).

        SDXL: the pooled row is unpacked and given to the UNet as its ``adm`` input
        ``y = encode_adm(pooled_output=pooled, width=8 W, height=8 H)`` ``(B, 2816)``, as ComfyUI's sampler builds it
        by default (image size = latent size x 8, no crop, target size = image size)."""
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):  # leaving inference mode enables grad
            weights = self._load(grad)
            base = self.model.model
            batch = samples.shape[0]
            t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
            sigma = base.model_sampling.sigma(t).to(self.device, torch.float32)  # patched after _load()
            x = samples.to(self.device, torch.float32)
            x_k = x * (1.0 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
            options = dict(self.model.model_options.get("transformer_options", {}))
            options.update(cond_or_uncond=[0] * batch, sigmas=sigma)
            context, y = self._unet_conditioning(text_embeddings.to(self.device), x.shape[2], x.shape[3])
            with clone_saved_activations([*weights.values(), *base.parameters(), *base.buffers()]):
                if weights:
                    denoised = torch.func.functional_call(self._wrapper, weights, (x_k, sigma, context, options, y))
                else:
                    denoised = self._wrapper(x_k, sigma, context, options, y)
            eps = self.counter.count((x_k - denoised) / sigma.view(-1, 1, 1, 1))
        if not torch.isfinite(eps).all():
            raise NonFiniteError("the UNet returned NaN or infinite values")
        comfy.model_management.throw_exception_if_processing_interrupted()
        return eps

    def _unet_conditioning(self, text_embeddings: torch.Tensor, height: int,
                           width: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditioning in this denoiser's layout -> (cross-attention context ``(B, L, D)``, adm input ``y`` or None)
        for a latent of ``height x width``. Differentiable (mitigation optimizes the pooled row too)."""
        if not self.pooled_width:
            return text_embeddings, None
        if text_embeddings.dim() != 3 or text_embeddings.shape[1] % 77 != 1:
            raise DejaGuardError(f"SDXL conditioning of shape {tuple(text_embeddings.shape)}: expected 77k token rows "
                                 "and the packed pooled row (encode prompts with this denoiser)")
        context, pooled = unpack_pooled(text_embeddings, self.pooled_width)
        y = self.model.model.encode_adm(pooled_output=pooled, width=width * 8, height=height * 8)
        return context, y.to(self.device)

    def new_scheduler(self) -> Any:
        """DDIM (eta 0, trailing spacing, epsilon) over the model's own ``alphas_cumprod``."""
        with torch.inference_mode(False):
            sigmas = model_sampling(self.model).sigmas.detach().double().cpu()
        return ddim_from_alphas_cumprod(1.0 / (1.0 + sigmas**2))

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples ``(B, C, H, W)`` (scaled latents) -> images ``(B, 3, H', W')`` in [-1, 1] via the VAE."""
        if self.vae is None:
            raise DejaGuardError("decoding needs a VAE: this denoiser was built without one")
        with torch.inference_mode(False), torch.no_grad():
            latent = self.model.model.process_latent_out(samples.detach().float().cpu())
            images = self.vae.decode(latent)  # (B, H', W', 3) in [0, 1]
            return (images.float().movedim(-1, 1) * 2.0 - 1.0).clamp(-1.0, 1.0).to(self.device)

    def named_modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        """The UNet's modules under diffusers names where a diffusers twin exists
        (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v``), else ComfyUI's own names."""
        for name, module in self.model.model.diffusion_model.named_modules():
            yield self._names.get(name, name), module

    def comfy_name(self, name: str) -> str:
        """A name from :meth:`named_modules` -> the ComfyUI module name (for ``add_patches`` keys:
        ``"diffusion_model." + comfy_name(name) + ".weight"``)."""
        inverse = {d: c for c, d in self._names.items()}
        return inverse.get(name, name)

    def fingerprint(self) -> str:
        """:func:`~nodes.model_check.comfy_fingerprint` of the MODEL: its UNet's *unpatched* weights (weight
        patches such as a neuron mask do not change it) under their diffusers names."""
        if self._fingerprint is None:
            self._fingerprint = comfy_fingerprint(self.model)
        return self._fingerprint

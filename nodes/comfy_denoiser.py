"""Core's :class:`~core.denoiser.Denoiser` protocol over a ComfyUI MODEL (ModelPatcher) and CLIP.

Every DejaGuard method written against the protocol (token significance, detection, ...) runs on
whatever UNet a graph has loaded: the testbed from the DejaGuard loader, or an SD1.x / SD2.x
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

Support, names and fingerprint come from the adapter core, ``nodes/model_check.py``: the constructor runs
:func:`~nodes.model_check.check_supported` for all the adapter's features (Token Highlighting, embedding
mitigation, neuron masks: so every node that builds this adapter refuses alike, e.g. SDXL with "the adapter
handles one text encoder", while the Guard, which needs no adapter, accepts it), :meth:`named_modules` uses
its one diffusers <-> ComfyUI name map and :meth:`fingerprint` is its
:func:`~nodes.model_check.comfy_fingerprint`.

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
  once (held by the adapter only: one extra copy of the affected weights, freed with it) and calls
  the model through ``torch.func.functional_call`` with them.
- ComfyUI's UNet adds to activations in place (``x += n`` in its transformer blocks), which
  invalidates tensors autograd saved earlier. The adapter copies each tensor autograd saves
  (``saved_tensors_hooks``; weights excepted): extra activation memory, on the grad path only.

The same two measures make the text encoder differentiable for token significance:
:meth:`ComfyDenoiser.token_embeddings` reads the input token embeddings (textual-inversion vectors included)
during ``clip.encode_from_tokens``, and
:meth:`ComfyDenoiser.encode_token_embeddings` runs ``encode_from_tokens`` (prompt weights, CLIP skip) with that
table's output replaced by the given tensor, through a module forward hook: ComfyUI's March-2024 CLIP takes no
embeddings argument.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import comfy.model_base
import comfy.model_management
import torch

from ..core.denoiser import UNetCounter
from ..core.errors import DejaGuardError, NonFiniteError
from .model_check import check_supported, comfy_fingerprint, diffusers_names, model_sampling


class _ApplyModel(torch.nn.Module):
    """Wraps ``BaseModel.apply_model`` as a ``forward`` so ``functional_call`` can swap its weights."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                transformer_options: dict[str, Any]) -> torch.Tensor:
        return self.base.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options)


class _EncodeFromTokens(torch.nn.Module):
    """``clip.encode_from_tokens`` as a ``forward`` over ``cond_stage_model`` (registered as ``stage``), so that
    ``functional_call`` can swap the text encoder's weights."""

    def __init__(self, denoiser: ComfyDenoiser, hook: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        super().__init__()
        self.stage = denoiser.clip.cond_stage_model
        self._denoiser = denoiser
        self._hook = hook

    def forward(self, tokens: dict[str, list[list[tuple[Any, ...]]]]) -> torch.Tensor:
        return self._denoiser._encode_with_token_hook(tokens, self._hook)


def default_sample_shape(model: Any) -> tuple[int, int, int]:
    """The model's native latent shape ``(C, H, W)``: the testbed's configured size, 96x96 for
    v-prediction SD2 (768 px), 64x64 otherwise (512 px)."""
    from .diffusers_folder import DiffusersModelConfig

    base = model.model
    channels = int(getattr(base.diffusion_model, "in_channels", 4))
    config = base.model_config
    if isinstance(config, DiffusersModelConfig):
        size = config.unet_config.get("image_size", 64)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return channels, int(h), int(w)
    side = 96 if base.model_type == comfy.model_base.ModelType.V_PREDICTION else 64
    return channels, side, side


class ComfyDenoiser:
    """:class:`~core.denoiser.Denoiser` over ComfyUI's MODEL (``ModelPatcher``) and CLIP (see module doc).

    ``clip`` may be None for UNet-only methods (embedding mitigation): the text methods then refuse.
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

    def _first_chunk(self, prompt: str, word_ids: bool = False) -> dict[str, list[list[tuple[Any, ...]]]]:
        """ComfyUI tokens of ``prompt`` (weights parsed), cut to the first 77-token chunk."""
        if self.clip is None:
            raise DejaGuardError("a CLIP text encoder is required (connect the loader's CLIP output)")
        tokens = self.clip.tokenize(prompt, return_word_ids=word_ids)
        if any(len(chunks) > 1 for chunks in tokens.values()):
            warnings.warn(f"prompt longer than one 77-token chunk, truncated: {prompt[:60]!r}...", stacklevel=3)
        return {key: chunks[:1] for key, chunks in tokens.items()}

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> conditioning ``(B, 77, D)`` as CLIPTextEncode makes it (first chunk only)."""
        with torch.inference_mode(False), torch.no_grad():
            conds = [self.clip.encode_from_tokens(self._first_chunk(p)) for p in prompts]
            return torch.cat(conds).to(self.device, self.dtype).clone()

    def _sub_tokenizer(self) -> Any:
        if self.clip is None:
            raise DejaGuardError("a CLIP text encoder is required (connect the loader's CLIP output)")
        tokenizer = self.clip.tokenizer
        sub = getattr(tokenizer, getattr(tokenizer, "clip", ""), None)
        if sub is None or not hasattr(sub, "inv_vocab"):
            raise DejaGuardError(f"unsupported tokenizer {type(tokenizer).__name__} "
                                 "(expected an SD1/SD2 CLIP tokenizer)")
        if getattr(sub, "start_token", None) is None:
            raise DejaGuardError("unsupported tokenizer: no start (BOS) token")
        return sub

    def prompt_tokens(self, prompt: str) -> list[str]:
        """BPE pieces at embedding positions ``1..n`` (``"</w>"`` ends a word); a textual-inversion
        vector is ``"<embedding>"``."""
        sub = self._sub_tokenizer()
        (chunk,) = next(iter(self._first_chunk(prompt, word_ids=True).values()))
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

    def _text_model(self) -> Any:
        """ComfyUI's ``SDClipModel`` inside the CLIP (``cond_stage_model.clip_l`` for SD1, ``clip_h`` for SD2)."""
        if self.clip is None:
            raise DejaGuardError("a CLIP text encoder is required (connect the loader's CLIP output)")
        stage = self.clip.cond_stage_model
        inner = getattr(stage, getattr(stage, "clip", ""), None)
        if inner is None or not hasattr(getattr(inner, "transformer", None), "get_input_embeddings"):
            raise DejaGuardError(f"unsupported text encoder {type(stage).__name__} (expected an SD1/SD2 CLIP)")
        return inner

    def _encode_with_token_hook(self, tokens: dict[str, list[list[tuple[Any, ...]]]],
                                hook: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor:
        """``clip.encode_from_tokens(tokens)`` with ``hook(out)`` seeing (and possibly replacing) the output
        ``(n, 77, E)`` of the text encoder's token-embedding table, row 0 being the prompt's.

        The table is found when it runs (``transformer.get_input_embeddings()`` at call time: ComfyUI swaps in a
        larger table for textual-inversion vectors) through a process-wide module hook, removed on return. Only
        its first call is hooked: March 2024 ComfyUI looks up all rows in one call, late-2025 ComfyUI one row per
        call, the prompt's first (a weighted prompt adds an empty one).
        """
        inner = self._text_model()
        calls = 0

        def on_forward(module: torch.nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
            nonlocal calls
            if module is inner.transformer.get_input_embeddings():
                calls += 1
                if calls == 1:
                    return hook(out)
            return None

        handle = torch.nn.modules.module.register_module_forward_hook(on_forward)
        try:
            return self.clip.encode_from_tokens(tokens)
        finally:
            handle.remove()

    def token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> input token embeddings ``(B, 77, E)`` of the first chunk (textual-inversion vectors
        included), before position embeddings.

        March 2024 ComfyUI looks textual-inversion vectors up in its token-embedding table (swapped for a larger
        one); late-2025 ComfyUI inserts them after the table lookup and passes the result to the text
        transformer as ``embeds``, which is read where it is given.
        """
        return torch.cat([self._prompt_token_embeddings(p) for p in prompts]).to(self.device)

    def _prompt_token_embeddings(self, prompt: str) -> torch.Tensor:
        inner = self._text_model()
        looked_up, passed = [], []

        def capture(out: torch.Tensor) -> None:
            looked_up.append(out[:1].detach().float().clone())  # row 0: the prompt (weights add "" after it)

        def on_transformer(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            if kwargs.get("embeds") is not None:
                passed.append(kwargs["embeds"][:1].detach().float().clone())

        tokens = self._first_chunk(prompt)
        handle = inner.transformer.register_forward_pre_hook(on_transformer, with_kwargs=True)
        try:
            with torch.inference_mode(False), torch.no_grad():
                self._encode_with_token_hook(tokens, capture)
        finally:
            handle.remove()
        row = (passed or looked_up)[0]
        length = len(next(iter(tokens.values()))[0])
        if tuple(row.shape[:2]) != (1, length):
            raise DejaGuardError(f"token embeddings of shape {tuple(row.shape)} for {length} tokens: this "
                                 "ComfyUI's text encoder is not supported")
        return row

    def encode_token_embeddings(self, prompts: Sequence[str], token_embeddings: torch.Tensor) -> torch.Tensor:
        """CLIPTextEncode's conditioning ``(B, 77, D)`` of ``prompts`` (weights applied, first chunk) with the
        input token embeddings replaced by ``token_embeddings (B, 77, E)``; differentiable w.r.t. them.

        Gradients through ComfyUI's CLIP need what the UNet needs (module doc): ordinary copies of
        inference-tensor weights (``functional_call``) and copies of saved activations (its layers add in place).
        """
        if token_embeddings.shape[0] != len(prompts):
            raise DejaGuardError(f"{token_embeddings.shape[0]} token-embedding rows for {len(prompts)} prompts")
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):
            self.clip.load_model()
            stage = self.clip.cond_stage_model
            if self._clip_weights is None:
                tensors = [*stage.named_parameters(), *stage.named_buffers()]
                with torch.no_grad():
                    self._clip_weights = {f"stage.{n}": t.detach().clone() for n, t in tensors if t.is_inference()}
            start = self._sub_tokenizer().start_token
            conds = []
            for i, p in enumerate(prompts):
                tokens = self._first_chunk(p)
                # The ids only select embedding rows, which are replaced: a textual-inversion vector (already in
                # token_embeddings) gets a plain id so ComfyUI builds no new embedding table on the grad path.
                tokens = {k: [[(t if isinstance(t, int) else start, *rest) for t, *rest in chunk] for chunk in chunks]
                          for k, chunks in tokens.items()}
                row = token_embeddings[i : i + 1]
                if tuple(row.shape[1:2]) != (len(next(iter(tokens.values()))[0]),):
                    raise DejaGuardError(f"token embeddings {tuple(token_embeddings.shape)} do not match the "
                                         "prompt's 77 tokens")

                def substitute(out: torch.Tensor, row: torch.Tensor = row) -> torch.Tensor:
                    return torch.cat([row.to(out.device, out.dtype), out[1:]])

                call = _EncodeFromTokens(self, substitute)
                weights = self._clip_weights
                with _clone_saved_activations([*weights.values(), *stage.parameters(), *stage.buffers()]):
                    if weights:
                        cond = torch.func.functional_call(call, weights, (tokens,))
                    else:
                        cond = call(tokens)
                conds.append(cond.to(self.device, self.dtype))
            return torch.cat(conds)

    # -- UNet ----------------------------------------------------------------------------------

    def _load(self) -> dict[str, torch.Tensor]:
        """Load (and patch) the model as a sampler does; ordinary copies of inference-tensor weights."""
        comfy.model_management.load_models_gpu([self.model])
        if self._weights is None:
            base = self.model.model
            tensors = [*base.named_parameters(), *base.named_buffers()]
            with torch.no_grad():
                self._weights = {f"base.{n}": t.detach().clone() for n, t in tensors if t.is_inference()}
        return self._weights

    def predict_noise(self, samples: torch.Tensor, timestep: torch.Tensor | int,
                      text_embeddings: torch.Tensor) -> torch.Tensor:
        """``samples (B, C, H, W)`` = ``x_t``, one timestep ``t`` in [0, 999], ``text_embeddings (B, 77, D)``
        -> eps ``(B, C, H, W)`` (see module doc for the sigma mapping)."""
        grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.set_grad_enabled(grad):  # leaving inference mode enables grad
            weights = self._load()
            base = self.model.model
            batch = samples.shape[0]
            t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(batch)
            sigma = base.model_sampling.sigma(t).to(self.device, torch.float32)  # patched after _load()
            x = samples.to(self.device, torch.float32)
            x_k = x * (1.0 + sigma.view(-1, 1, 1, 1) ** 2).sqrt()
            options = dict(self.model.model_options.get("transformer_options", {}))
            options.update(cond_or_uncond=[0] * batch, sigmas=sigma)
            context = text_embeddings.to(self.device)
            with _clone_saved_activations([*weights.values(), *base.parameters(), *base.buffers()]):
                if weights:
                    denoised = torch.func.functional_call(self._wrapper, weights, (x_k, sigma, context, options))
                else:
                    denoised = self._wrapper(x_k, sigma, context, options)
            eps = self.counter.count((x_k - denoised) / sigma.view(-1, 1, 1, 1))
        if not torch.isfinite(eps).all():
            raise NonFiniteError("the UNet returned NaN or infinite values")
        comfy.model_management.throw_exception_if_processing_interrupted()
        return eps

    def new_scheduler(self) -> Any:
        """DDIM (eta 0, trailing spacing, epsilon) over the model's own ``alphas_cumprod``."""
        from diffusers import DDIMScheduler

        with torch.inference_mode(False):
            sigmas = model_sampling(self.model).sigmas.detach().double().cpu()
        alphas_cumprod = 1.0 / (1.0 + sigmas**2)
        betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas.numpy(), clip_sample=False,
                             set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing",
                             prediction_type="epsilon")

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


def _clone_saved_activations(weights: list[torch.Tensor]) -> Any:
    """Autograd saves copies of activations, not the tensors themselves.

    ComfyUI's UNet updates activations in place (``x += n`` in its transformer blocks), which
    breaks back-propagation through tensors autograd saved earlier. Copying each saved tensor when
    it is saved (weights excepted) keeps the values the backward pass needs. No effect without grad.
    """
    keep = {w.data_ptr() for w in weights}

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t if t.data_ptr() in keep else t.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


"""The one seam between DejaGuard's methods and a text-to-image model.

Methods see a :class:`Denoiser`, never a diffusers or ComfyUI class. This module holds the
protocol, the UNet evaluation counter and the adapter for diffusers pipelines (built from a
pipeline object or a diffusers-format folder). The ComfyUI adapter lives in ``nodes/``.

Shapes: ``B`` batch, ``C, H, W`` the model's sample shape (latent, or pixels for a pixel-space
model), ``L`` text tokens (77 for CLIP), ``D`` text embedding width.

Two text encoders (SDXL): the UNet cross-attends to the concatenation of CLIP-L's and CLIP-G's penultimate hidden
states (``(B, 77, 768 + 1280)``) and receives CLIP-G's pooled, projected output (``(B, 1280)``) with the image
size through its added ("text_time") embedding. :class:`DiffusersDenoiser` packs the pooled vector as one extra
conditioning row (``core.conditioning``), so its text embeddings are ``(B, 78, 2048)`` and every method runs
unchanged; :meth:`DiffusersDenoiser.predict_noise` unpacks it. The unconditional prompt ``""`` is *encoded* like
any prompt, as ComfyUI encodes an empty negative prompt, not zeroed as diffusers' SDXL pipeline does with
``force_zeros_for_empty_prompt``: so the library's scores on a checkpoint match the ComfyUI Guard's on the same
file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .conditioning import pack_pooled, unpack_pooled
from .errors import DejaGuardError, NonFiniteError

BUNDLED_TESTBED = Path(__file__).parent / "testbed" / "model"


@dataclass
class UNetCounter:
    """How much UNet work a method spent: the project's hardware-independent cost figure.

    ``calls``: batched UNet forward calls. ``forwards``: noise predictions ("evals"), i.e. samples through
    the UNet (a classifier-free-guidance pair counts 2, in one call or in two). ``backwards``: samples
    back-propagated through the UNet, counted when a gradient actually flows back through a prediction
    (:meth:`count`), not guessed when the forward runs with grad enabled: a grad-enabled forward that is
    never back-propagated (the last iterate of an optimization, whose score only decides to stop) costs no
    backward.
    """

    calls: int = 0
    forwards: int = 0
    backwards: int = 0

    def count(self, eps: torch.Tensor) -> torch.Tensor:
        """Count one batched call that predicted ``eps`` ``(B, C, H, W)`` (``B`` forwards) and return ``eps``.

        Every adapter's ``predict_noise`` calls this on its output. When ``eps`` carries an autograd graph,
        a tensor hook adds ``B`` to :attr:`backwards` each time a gradient flows back through it (a
        ``backward()`` or ``torch.autograd.grad`` reaching it); a forward that no gradient reaches adds
        nothing.
        """
        batch = int(eps.shape[0])
        self.calls += 1
        self.forwards += batch
        if eps.requires_grad:
            eps.register_hook(lambda _grad: self._backpropagated(batch))
        return eps

    def _backpropagated(self, batch: int) -> None:
        self.backwards += batch

    def snapshot(self) -> UNetCounter:
        return copy.copy(self)

    def since(self, before: UNetCounter) -> UNetCounter:
        return UNetCounter(self.calls - before.calls, self.forwards - before.forwards,
                           self.backwards - before.backwards)


@runtime_checkable
class Denoiser(Protocol):
    """What every method needs from a text-to-image diffusion model."""

    counter: UNetCounter
    sample_shape: tuple[int, int, int]  # (C, H, W)
    device: torch.device
    dtype: torch.dtype

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text embeddings ``(B, L, D)``. ``""`` is the unconditional prompt."""

    def prompt_tokens(self, prompt: str) -> list[str]:
        """The BPE pieces of ``prompt`` in the order they occupy positions ``1..n`` of its
        embedding (BOS at 0; EOS and padding after), truncated as the encoder truncates.
        A piece ending in ``</w>`` ends a word."""

    def token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> the text encoder's *input* token embeddings ``(B, L, E)`` (the embedding
        table's rows, before position embeddings; ``E`` the encoder's width). No gradient."""

    def encode_token_embeddings(self, prompts: Sequence[str], token_embeddings: torch.Tensor) -> torch.Tensor:
        """Run the text encoder on ``prompts`` with its input token embeddings replaced by
        ``token_embeddings (B, L, E)`` -> text embeddings ``(B, L, D)``, differentiable with respect
        to ``token_embeddings`` when grad is enabled. With :meth:`token_embeddings` of the same
        prompts it equals :meth:`encode_prompts`."""

    def predict_noise(self, samples: torch.Tensor, timestep: torch.Tensor | int,
                      text_embeddings: torch.Tensor) -> torch.Tensor:
        """``samples (B, C, H, W)``, one timestep, ``text_embeddings (B, L, D)`` -> eps ``(B, C, H, W)``."""

    def new_scheduler(self) -> Any:
        """A fresh diffusers-style scheduler (``set_timesteps``, ``timesteps``, ``step``)."""

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples ``(B, C, H, W)`` -> images ``(B, 3, H', W')`` in [-1, 1]."""

    def named_modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        """The UNet's named modules (names end as in diffusers: ``...attn2.to_v``, ``...ff.net.2``)."""

    def fingerprint(self) -> str:
        """A stable identifier of the UNet weights (see :func:`state_fingerprint`)."""


def state_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """The one model fingerprint: a hash of every tensor's name, shape and a strided sample of its values.

    ``tensors``: name -> tensor of any shape, e.g. a UNet's ``state_dict()`` under diffusers names (the
    ComfyUI adapter maps its own names to those, so both adapters give one model one fingerprint). Hashed in
    sorted name order, so the order of the mapping does not matter. About 256 values per tensor, read as
    float32: cheap on an 860M-parameter UNet and different for any two trained models; not a full-weight
    hash, so edits of single unsampled weights can go unnoticed (masks are checked by shape too).
    Calibration files and neuron masks store this value: it must never change for the same weights.
    """
    h = hashlib.sha256()
    for name, p in sorted(tensors.items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _count_tokens(tokenizer: Any, prompt: str) -> int:
    return len(tokenizer(prompt, truncation=False).input_ids)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device to run on: ``device`` as given ("cpu", "cuda", "cuda:1", ...), or CUDA when there is one
    and the CPU otherwise. Raises :class:`DejaGuardError` for a name torch does not know or a GPU that is not
    there, instead of failing at the first tensor moved."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DejaGuardError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DejaGuardError(f"device {device!r} asked for, but this machine (torch {torch.__version__}) "
                                 "has no CUDA GPU; use --device cpu or leave it out")
        if resolved.index is not None and resolved.index >= count:
            raise DejaGuardError(f"device {device!r} asked for, but this machine has {count} CUDA GPU(s)")
    elif resolved.type not in ("cpu", "mps"):
        raise DejaGuardError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return resolved


class DiffusersDenoiser:
    """:class:`Denoiser` over a diffusers text-to-image pipeline (UNet2DConditionModel + CLIP).

    ``vae`` may be None: then the model is pixel-space and samples are images in [-1, 1].
    ``text_encoder_2`` (a ``CLIPTextModelWithProjection``) and ``tokenizer_2``: the second text encoder of an
    SDXL-type UNet (``addition_embed_type="text_time"``); then text embeddings are packed ``(B, L + 1, D)`` with
    ``D`` the two encoders' widths together and the pooled output in the last row (module doc), and
    :attr:`pooled_width` is the pooled width (None for one encoder).
    """

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: Any,
                 scheduler: Any, vae: torch.nn.Module | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 prediction_type: str | None = None, text_encoder_2: torch.nn.Module | None = None,
                 tokenizer_2: Any = None) -> None:
        config = getattr(unet, "config", None)
        if config is None or not hasattr(config, "cross_attention_dim"):
            raise DejaGuardError(
                f"unsupported model: {type(unet).__name__} has no text cross-attention "
                "(DejaGuard needs a text-conditioned UNet2DConditionModel)")
        attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2.to_v")]
        if not attn2:
            raise DejaGuardError("unsupported model: the UNet has no cross-attention layers (attn2.to_v)")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.unet = _placed(unet, self.device, dtype)
        self.text_encoder = _placed(text_encoder, self.device, dtype)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = _placed(vae, self.device, dtype) if vae is not None else None
        self.pooled_width = _pooled_width(config, text_encoder, text_encoder_2, tokenizer_2)
        self.text_encoder_2 = _placed(text_encoder_2, self.device, dtype) if self.pooled_width else None
        self.tokenizer_2 = tokenizer_2 if self.pooled_width else None
        size = config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (int(config.in_channels), int(h), int(w))
        if self.vae is None and self.sample_shape[0] not in (1, 3):
            raise DejaGuardError(
                f"pixel-space model (no vae/) must have 1 or 3 channels, the UNet has {self.sample_shape[0]}")
        # What the UNet predicts: "epsilon", or "v_prediction" (SD2 768-v), read from the scheduler's config
        # unless given. predict_noise returns eps either way, so every method and core's schedulers apply unchanged.
        self.prediction_type = prediction_type or getattr(getattr(scheduler, "config", None), "prediction_type",
                                                          "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise DejaGuardError(f"unsupported prediction type {self.prediction_type!r} (DejaGuard handles epsilon "
                                 "and v_prediction UNets)")
        self.counter = UNetCounter()
        self._fingerprint: str | None = None

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_pipeline(cls, pipe: Any, **kwargs: Any) -> DiffusersDenoiser:
        """From a loaded diffusers pipeline object (e.g. StableDiffusionPipeline)."""
        missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, n, None) is None]
        if missing:
            raise DejaGuardError(f"unsupported pipeline {type(pipe).__name__}: missing {', '.join(missing)}")
        return cls(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                   vae=getattr(pipe, "vae", None), text_encoder_2=getattr(pipe, "text_encoder_2", None),
                   tokenizer_2=getattr(pipe, "tokenizer_2", None), **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs: Any) -> DiffusersDenoiser:
        """From a diffusers-format folder: ``unet/ text_encoder/ tokenizer/ scheduler/ [vae/]``, and for SDXL
        ``text_encoder_2/ tokenizer_2/`` too.

        A folder without ``vae/`` is a pixel-space model.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise DejaGuardError(f"model folder not found: {folder}")
        missing = [n for n in ("unet", "text_encoder", "tokenizer", "scheduler") if not (folder / n).is_dir()]
        if missing:
            raise DejaGuardError(
                f"not a diffusers model folder: {folder} lacks {', '.join(m + '/' for m in missing)}")
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        unet_cls = _config_class(folder / "unet")
        if unet_cls != "UNet2DConditionModel":
            raise DejaGuardError(
                f"unsupported model: unet/ is a {unet_cls or 'unknown model'}, not a text-conditioned "
                "UNet2DConditionModel (no cross-attention)")
        second = (folder / "text_encoder_2").is_dir()
        if second and not (folder / "tokenizer_2").is_dir():
            raise DejaGuardError(f"not a diffusers model folder: {folder} has text_encoder_2/ but lacks tokenizer_2/")
        for component in ("unet", "text_encoder", "vae", "text_encoder_2"):
            if component in ("unet", "text_encoder") or (folder / component).is_dir():
                safetensors_weights(folder / component)  # never fall back to pickled .bin weights
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32,
                                                            use_safetensors=True)
                text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32,
                                                             use_safetensors=True)
                tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
                scheduler = _load_scheduler(folder / "scheduler")
                vae = _load_vae(folder / "vae") if (folder / "vae").is_dir() else None
                if second:
                    kwargs["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                        folder / "text_encoder_2", torch_dtype=torch.float32, use_safetensors=True)
                    kwargs["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        except DejaGuardError:
            raise
        except Exception as err:  # diffusers/transformers raise many kinds for a broken folder
            raise DejaGuardError(f"malformed model folder {folder}: {type(err).__name__}: {err}") from err
        return cls(unet, text_encoder, tokenizer, scheduler, vae=vae, **kwargs)

    # -- Denoiser protocol ------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> token ids ``(B, 77)``, padded and truncated as CLIP does (with a warning)."""
        limit = self.tokenizer.model_max_length
        for p in prompts:
            n = _count_tokens(self.tokenizer, p)
            if n > limit:
                warnings.warn(f"prompt has {n} tokens, truncated to {limit}: {p[:60]!r}...", stacklevel=3)
        return self._ids(self.tokenizer, prompts)

    def _ids(self, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> ``(B, L, D)``; with two encoders packed ``(B, L + 1, D)`` (module doc). ``""`` is encoded."""
        if self.pooled_width:
            return self._encode_two(self.tokenize(prompts), self._ids(self.tokenizer_2, prompts))
        return self.text_encoder(self.tokenize(prompts)).last_hidden_state.to(self.dtype)

    def _encode_two(self, ids: torch.Tensor, ids_2: torch.Tensor) -> torch.Tensor:
        """SDXL's conditioning of token ids ``(B, L)`` of each tokenizer: the penultimate hidden states of both
        encoders (no final layer norm) side by side ``(B, L, D1 + D2)``, and CLIP-G's pooled projection of its
        last layer, packed -> ``(B, L + 1, D1 + D2)``."""
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out = self.text_encoder_2(ids_2, output_hidden_states=True)
        return pack_pooled(torch.cat([hidden, out.hidden_states[-2]], dim=-1), out.text_embeds).to(self.dtype)

    def prompt_tokens(self, prompt: str) -> list[str]:
        """The pieces of the first tokenizer; SDXL's second tokenizer is the same BPE, so its pieces sit at the
        same positions (it only pads differently)."""
        ids = self.tokenizer(prompt, truncation=True, max_length=self.tokenizer.model_max_length).input_ids
        return self.tokenizer.convert_ids_to_tokens(ids[1:-1])

    @torch.no_grad()
    def token_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``(B, L, E)``; with two encoders both tables' rows side by side, ``E = E1 + E2`` (768 + 1280 for SDXL)."""
        rows = self.text_encoder.get_input_embeddings()(self.tokenize(prompts))
        if self.pooled_width:
            rows_2 = self.text_encoder_2.get_input_embeddings()(self._ids(self.tokenizer_2, prompts))
            rows = torch.cat([rows, rows_2], dim=-1)
        return rows.to(self.dtype)

    def encode_token_embeddings(self, prompts: Sequence[str], token_embeddings: torch.Tensor) -> torch.Tensor:
        ids = self.tokenize(prompts)
        width = self.text_encoder.get_input_embeddings().embedding_dim
        if self.pooled_width:
            width += self.text_encoder_2.get_input_embeddings().embedding_dim
        if tuple(token_embeddings.shape[:2]) != tuple(ids.shape) or token_embeddings.shape[-1] != width:
            raise DejaGuardError(f"token embeddings {tuple(token_embeddings.shape)} do not match the "
                                 f"{len(prompts)} prompt(s) of {ids.shape[1]} tokens and width {width}")
        if not self.pooled_width:
            with substituted_token_embeddings(self.text_encoder, token_embeddings):
                return self.text_encoder(ids).last_hidden_state.to(self.dtype)
        first = self.text_encoder.get_input_embeddings().embedding_dim
        with substituted_token_embeddings(self.text_encoder, token_embeddings[..., :first]), \
                substituted_token_embeddings(self.text_encoder_2, token_embeddings[..., first:]):
            return self._encode_two(ids, self._ids(self.tokenizer_2, prompts))

    def predict_noise(self, samples: torch.Tensor, timestep: torch.Tensor | int,
                      text_embeddings: torch.Tensor) -> torch.Tensor:
        """``samples (B, C, H, W)`` = x_t, one timestep ``t`` (or one per sample), ``text_embeddings (B, L, D)``
        -> eps ``(B, C, H, W)``. A v-prediction UNet's output ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0`` is
        mapped to ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` (differentiable, like the UNet call).

        Two encoders: ``text_embeddings`` are packed ``(B, L + 1, D)``; the pooled row and the size conditioning
        ``time_ids = [H', W', 0, 0, H', W']`` (original size, crop top-left, target size; ``H', W'`` the image
        size of the samples, 8 H x 8 W: what ComfyUI passes by default) go to the added embedding."""
        if self.pooled_width:
            hidden, pooled = unpack_pooled(text_embeddings, self.pooled_width)
            h, w = (int(n) * self._image_factor for n in samples.shape[-2:])
            time_ids = torch.tensor([h, w, 0, 0, h, w], device=hidden.device, dtype=hidden.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(hidden.shape[0], -1)}
            out = self.unet(samples, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        else:
            out = self.unet(samples, timestep, encoder_hidden_states=text_embeddings).sample
        out = self.counter.count(out)
        if not torch.isfinite(out).all():
            raise NonFiniteError("the UNet returned NaN or infinite values")
        if self.prediction_type == "epsilon":
            return out
        t = torch.as_tensor(timestep).long().cpu().reshape(-1)
        abar = self.scheduler.alphas_cumprod[t].to(samples.device, torch.float32)  # float32: MPS has no float64
        abar = abar.reshape(-1, *([1] * (samples.dim() - 1)))
        return (abar.sqrt() * out.float() + (1.0 - abar).sqrt() * samples.float()).to(out.dtype)

    def new_scheduler(self) -> Any:
        """A fresh scheduler of the model's class and schedule, stepping with eps (what :meth:`predict_noise`
        returns, whatever the UNet predicts)."""
        return self.scheduler.__class__.from_config(self.scheduler.config, prediction_type="epsilon")

    @torch.no_grad()
    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            images = samples
        else:
            scale = getattr(self.vae.config, "scaling_factor", 1.0)
            images = self.vae.decode(samples / scale).sample
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        return images.clamp(-1.0, 1.0)

    # -- optional, not in the Denoiser protocol: used by the training-set filter (core/audit.py) --

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H', W')``: the image size the VAE encodes to ``sample_shape`` (8x for SD's VAE;
        the sample size itself for a pixel-space model)."""
        factor = self._image_factor
        return (3, self.sample_shape[1] * factor, self.sample_shape[2] * factor)

    @property
    def _image_factor(self) -> int:
        """Image pixels per sample pixel: 8 for SD's VAE, 1 for a pixel-space model."""
        if self.vae is None:
            return 1
        return 2 ** (len(getattr(self.vae.config, "block_out_channels", (1,))) - 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> samples ``(B, C, h, w)`` (``sample_shape``): through
        the VAE (posterior mode, times ``scaling_factor``, the inverse of :meth:`decode`), or resized
        for a pixel-space model. Images of another size are resized (bilinear, antialiased) first."""
        import torch.nn.functional as F

        _, h, w = self.image_shape
        images = images.to(self.device, self.dtype)
        if tuple(images.shape[-2:]) != (h, w):
            images = F.interpolate(images, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        if self.vae is None:
            return images.mean(dim=1, keepdim=True) if self.sample_shape[0] == 1 else images
        scale = getattr(self.vae.config, "scaling_factor", 1.0)
        return self.vae.encode(images).latent_dist.mode() * scale

    def named_modules(self) -> Iterator[tuple[str, torch.nn.Module]]:
        return self.unet.named_modules()

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.unet.state_dict())
        return self._fingerprint


def _pooled_width(config: Any, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module | None,
                  tokenizer_2: Any) -> int | None:
    """The pooled width of an SDXL-type UNet (``addition_embed_type="text_time"``) with its second text encoder,
    None for a UNet without added text conditioning; DejaGuardError, one line, when the parts do not fit."""
    kind = getattr(config, "addition_embed_type", None)
    if kind is None:
        if text_encoder_2 is not None:
            raise DejaGuardError("a second text encoder was given, but the UNet takes no pooled text "
                                 "(addition_embed_type is not 'text_time')")
        return None
    if kind != "text_time":
        raise DejaGuardError(f"unsupported model: the UNet's added conditioning {kind!r} (DejaGuard handles SDXL's "
                             "'text_time')")
    if text_encoder_2 is None or tokenizer_2 is None:
        raise DejaGuardError("an SDXL-type UNet (pooled text and size conditioning) needs its second text encoder "
                             "and tokenizer (text_encoder_2, tokenizer_2)")
    pooled = int(text_encoder_2.config.projection_dim)
    widths = int(text_encoder.config.hidden_size) + int(text_encoder_2.config.hidden_size)
    adm = pooled + 6 * int(config.addition_time_embed_dim)
    if widths != config.cross_attention_dim or adm != config.projection_class_embeddings_input_dim:
        raise DejaGuardError(f"the text encoders (widths {text_encoder.config.hidden_size} + "
                             f"{text_encoder_2.config.hidden_size}, pooled {pooled}) do not fit the UNet "
                             f"(cross-attention {config.cross_attention_dim}, added embedding "
                             f"{config.projection_class_embeddings_input_dim})")
    return pooled


@contextmanager
def substituted_token_embeddings(encoder: torch.nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within the block, ``encoder``'s embedding table outputs ``rows (B, L, E)`` instead of its own rows.

    A forward hook, because transformers' CLIP text models need ``input_ids`` (causal mask, pooling at the end
    token) and do not take ``inputs_embeds`` in every version. Differentiable with respect to ``rows``."""
    handle = encoder.get_input_embeddings().register_forward_hook(lambda _m, _i, out: rows.to(out.device, out.dtype))
    try:
        yield
    finally:
        handle.remove()


def clone_saved_activations(weights: list[torch.Tensor]) -> Any:
    """Within the block, autograd saves copies of activations, not the tensors themselves.

    ComfyUI's UNet and Forge's (its port) update activations in place (``x += n`` in their transformer blocks),
    which breaks back-propagation through tensors autograd saved earlier. Copying each saved tensor when it is saved
    (``weights`` excepted) keeps the values the backward pass needs. No effect without grad. Used by the ComfyUI and
    WebUI adapters on their gradient paths only (extra activation memory)."""
    keep = {w.data_ptr() for w in weights}

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t if t.data_ptr() in keep else t.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Frozen, in eval mode, on ``device``; cast only when needed (diffusers warns on every cast)."""
    first = next(iter(module.parameters()), None)
    if first is not None and first.dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def safetensors_weights(component: Path) -> Path:
    """The weights file of a diffusers-format component folder (``unet/``, ``text_encoder/``, ``vae/``).

    The one rule for both loaders (this module's :meth:`DiffusersDenoiser.from_folder` and the ComfyUI
    loader in ``nodes/diffusers_folder.py``): weights are read from one ``.safetensors`` file only, never
    from pickled ``.bin`` / ``.ckpt`` files, since unpickling a downloaded file can run arbitrary code
    (diffusers and transformers would fall back to ``.bin`` silently). DejaGuardError, one line, otherwise.
    """
    for name in WEIGHT_FILES:
        if (component / name).is_file():
            return component / name
    pickled = sorted(p.name for p in component.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    found = f" (found only pickled {', '.join(pickled)})" if pickled else ""
    raise DejaGuardError(f"{component} has no .safetensors weights{found}: pickled weights are not loaded "
                         "because unpickling can run arbitrary code; convert them to safetensors")


def _config_class(component: Path) -> str | None:
    try:
        return json.loads((component / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


def _load_scheduler(path: Path) -> Any:
    import diffusers

    try:
        name = json.loads((path / "scheduler_config.json").read_text())["_class_name"]
        cls = getattr(diffusers, name)
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise DejaGuardError(f"malformed scheduler/ in {path.parent}: {err}") from err
    return cls.from_pretrained(path)


def _load_vae(path: Path) -> torch.nn.Module:
    import diffusers

    name = _config_class(path)
    if name == "PooledColorAutoencoder":
        from .testbed.vae import PooledColorAutoencoder

        return PooledColorAutoencoder.from_pretrained(path, use_safetensors=True)
    cls = getattr(diffusers, name or "", None)
    if cls is None:
        raise DejaGuardError(f"unsupported vae/ class {name!r} in {path.parent}")
    return cls.from_pretrained(path, torch_dtype=torch.float32, use_safetensors=True)


def quiet_model_libraries() -> None:
    """Errors only from diffusers' and transformers' loggers, and no progress bars of theirs: loading a model
    folder or checkpoint otherwise prints config notes and bars that bury the command's own output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_denoiser(model: str | Path | None = None, **kwargs: Any) -> DiffusersDenoiser:
    """The CLI's, audits' and benchmarks' loader: a diffusers folder, a single-file SD1.x / SD2.x / SDXL
    ``.safetensors`` checkpoint (:func:`core.checkpoint.load_checkpoint`; pickled files are refused), or the bundled
    testbed if None."""
    if model is not None and Path(model).is_file():
        from .checkpoint import load_checkpoint

        return load_checkpoint(model, **kwargs)
    return DiffusersDenoiser.from_folder(BUNDLED_TESTBED if model is None else model, **kwargs)

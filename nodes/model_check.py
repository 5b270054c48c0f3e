"""The ComfyUI adapter core: which MODELs DejaGuard supports for what, their diffusers names, their fingerprint.

Three decisions every node needs, each made once here:

- **Support** (:func:`check_supported`, :data:`SUPPORT`): the one support matrix. A MODEL is classified into a
  family (:func:`model_info`) and each feature (``guard``, ``calibrate``, ``explain``, ``mitigate``, ``masks``)
  is either supported or refused with a one-line reason naming the family and what is missing:

  - ``sd1`` (SD1.x and the testbed, epsilon), ``sd2`` (SD2.x 512, epsilon), ``sd2_v`` (SD2.x 768,
    v-prediction): everything.
  - ``sdxl`` (epsilon): Guard, Calibrate, Token Highlighting (the words of both text encoders) and embedding
    mitigation (hidden states and pooled vector); neuron masks refused (not yet checked on SDXL's UNet).
  - ``sd3`` (flow matching; ComfyUI versions that have it): Guard and Calibrate; the rest refused (MMDiT joint
    attention, no SD-style cross-attention).
  - ``flux_distilled``: everything refused (no unconditional prediction).

  The Guard reads its score from the sampler's own cond/uncond predictions, so it needs nothing of the model's
  insides and works on every family ComfyUI samples with classifier-free guidance; explanation, mitigation and
  masks go through :class:`~nodes.comfy_denoiser.ComfyDenoiser`, which needs SD-style ``attn2`` cross-attention
  and handles one text encoder or SDXL's two (their pooled output packed into the conditioning,
  ``core/conditioning.py``). Guidance-distilled models (Flux-dev; Flux-schnell is step-distilled) are sampled
  without any unconditional prediction, so there is no difference to score. Everything else (inpainting,
  image-conditioned, unknown classes) is refused for every feature. Every node calls :func:`check_supported`
  with its feature; ``ComfyDenoiser`` calls it with ``feature=None`` (all adapter features), so every node
  building the adapter refuses alike.
- **Names** (:func:`diffusers_names`): ComfyUI names UNet weights ``input_blocks.1.1...``, diffusers (and so
  core, neuron masks and the CLI) ``down_blocks.0.attentions.0...``; ``comfy.utils.unet_to_diffusers`` holds
  the map, read here only.
- **Fingerprint** (:func:`comfy_fingerprint`): core's :func:`~core.denoiser.state_fingerprint` of the
  unpatched UNet weights under their diffusers names, equal to ``DiffusersDenoiser.fingerprint()`` of the
  same weights loaded with diffusers, so calibrations and masks made with the CLI are recognized in a graph.

Everything is read from the ModelPatcher; nothing is changed (the cached model that other graphs use stays
as it is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import comfy.model_base
import comfy.model_sampling
import comfy.utils
import torch

from ..core.denoiser import state_fingerprint
from ..core.errors import DejaGuardError

FEATURES = ("guard", "calibrate", "explain", "mitigate", "masks")
ADAPTER_FEATURES = ("explain", "mitigate", "masks")  # what ComfyDenoiser serves (feature=None)
FEATURE_NAMES = {"guard": "the Memorization Guard", "calibrate": "DejaGuard Calibrate",
                 "explain": "Token Highlighting", "mitigate": "embedding mitigation", "masks": "neuron masks",
                 None: "Token Highlighting, embedding mitigation and neuron masks"}

_SDXL_MASKS = ("neuron localization and masks are not yet checked on SDXL's UNet (its 70 cross-attention blocks and "
               "two text encoders); Token Highlighting and embedding mitigation are supported")
_NO_CROSS_ATTN = "the adapter needs SD-style attn2 cross-attention; SD3's MMDiT has joint attention"
_DISTILLED = ("Flux-dev is guidance-distilled (Flux-schnell step-distilled): it is sampled without an "
              "unconditional prediction, so there is no cond/uncond difference to score")

# The support matrix: family -> feature -> None (supported) or why not.
SUPPORT: dict[str, dict[str, str | None]] = {
    "sd1": dict.fromkeys(FEATURES),
    "sd2": dict.fromkeys(FEATURES),
    "sd2_v": dict.fromkeys(FEATURES),
    "sdxl": {**dict.fromkeys(FEATURES), "masks": f"not yet supported for SDXL: {_SDXL_MASKS}"},
    "sd3": {"guard": None, "calibrate": None, **{f: f"not yet supported for SD3: {_NO_CROSS_ATTN}"
                                                 for f in ADAPTER_FEATURES}},
    "flux_distilled": {f: f"not supported for Flux: {_DISTILLED}" for f in FEATURES},
}
FAMILY_NAMES = {"sd1": "SD1.x-layout", "sd2": "SD2.x (epsilon)", "sd2_v": "SD2.x (v-prediction)", "sdxl": "SDXL",
                "sd3": "SD3", "flux_distilled": "Flux (guidance-distilled)"}

# Model classes refused for every feature, by name: not every ComfyUI version defines all of them.
_OTHER_FAMILIES = {
    "SDXLRefiner": "the SDXL refiner (pooled-text 'adm' conditioning, OpenCLIP-G context_dim 1280)",
    "SD21UNCLIP": "SD2.1 unCLIP (image-embedding 'adm' conditioning)",
    "SVD_img2vid": "Stable Video Diffusion (image-to-video)",
    "SV3D_u": "SV3D (image-to-video)", "SV3D_p": "SV3D (image-to-video)",
    "Stable_Zero123": "Stable Zero123 (image-conditioned novel views)",
    "SD_X4Upscaler": "the SD x4 upscaler (image-conditioned)",
    "StableCascade_C": "Stable Cascade (no SD-style UNet)", "StableCascade_B": "Stable Cascade (no SD-style UNet)",
}
_SUPPORTED = "DejaGuard supports SD1.x, SD2.x, SDXL, SD3 and its testbed"


@dataclass
class ModelInfo:
    """What DejaGuard knows about a MODEL: its family, parametrization, and per feature support or refusal."""

    family: str  # "sd1" (SD1.x, testbed), "sd2", "sd2_v", "sdxl", "sd3" or "flux_distilled"
    prediction: str  # "epsilon", "v-prediction" or "flow"
    context_dim: int | None  # text embedding width D of the cross-attention (None: no SD-style cross-attention)
    sigma_max: float  # first sigma of a full-denoise run (the calibrated first step; 1.0 for flow models)
    notes: list[str] = field(default_factory=list)
    refusals: dict[str, str | None] = field(default_factory=dict)  # feature -> None or the reason

    def refusal(self, feature: str | None = None) -> str | None:
        """The one-line refusal for ``feature`` (None: every adapter feature), or None when supported."""
        wanted = ADAPTER_FEATURES if feature is None else (feature,)
        if feature is not None and feature not in FEATURES:
            raise ValueError(f"unknown feature {feature!r}; one of {FEATURES}")
        reasons = [self.refusals.get(f) for f in wanted if self.refusals.get(f)]
        return f"unsupported model for {FEATURE_NAMES[feature]}: {reasons[0]}" if reasons else None

    def require(self, feature: str | None = None) -> ModelInfo:
        """``self`` when ``feature`` is supported; else :class:`DejaGuardError` with the refusal."""
        reason = self.refusal(feature)
        if reason is not None:
            raise DejaGuardError(reason)
        return self


def check_supported(model: Any, feature: str | None = None) -> ModelInfo:
    """The one support check of every node: :func:`model_info`, then :meth:`ModelInfo.require` ``(feature)``.

    ``feature``: ``"guard"``, ``"calibrate"``, ``"explain"``, ``"mitigate"``, ``"masks"``, or None for all the
    adapter's features (what :class:`~nodes.comfy_denoiser.ComfyDenoiser` serves). DejaGuardError naming the
    family and what is missing.
    """
    return model_info(model).require(feature)


def _parametrization(sampling: Any) -> str | None:
    """"epsilon", "v-prediction" or "flow" from the (patched) sampling object; None for others (EDM, cascade, and
    the x0 / LCM / img-to-img samplings of the ModelSamplingDiscrete node, which subclass EPS: their ``denoised`` is
    not ``x - sigma eps``, so the score would not be the one calibrated)."""
    names = {cls.__name__ for cls in type(sampling).__mro__}
    if "CONST" in names:  # flow matching: newer ComfyUI only
        return "flow"
    if names & _OTHER_PREDICTIONS or isinstance(sampling, comfy.model_sampling.ModelSamplingContinuousEDM):
        return None
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v-prediction"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "epsilon"
    return None


_OTHER_PREDICTIONS = {"EDM", "X0", "IMG_TO_IMG", "LCM", "COSMOS_RFLOW"}


def model_info(model: Any) -> ModelInfo:
    """Classify a ModelPatcher (``model.model`` a ComfyUI ``BaseModel``) into a family of :data:`SUPPORT`.

    Models of no family (inpainting, image-conditioned, unknown classes, other parametrizations) are a
    :class:`DejaGuardError` whatever the feature. The first-step score ``||eps(x_T, c) - eps(x_T, 0)||`` is
    defined for any model sampled with classifier-free guidance; explanations and neuron masks need SD1/SD2-style
    cross-attention (``...transformer_blocks.N.attn2.to_v`` reading ``(B, 77, D)`` text embeddings).
    """
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module) or not hasattr(base, "diffusion_model") \
            or not hasattr(base, "apply_model"):
        raise DejaGuardError(f"not a ComfyUI MODEL (ModelPatcher of a UNet diffusion model): {type(model).__name__}")
    kind = type(base).__name__
    if kind in _OTHER_FAMILIES:
        raise DejaGuardError(f"unsupported model: {_OTHER_FAMILIES[kind]}. {_SUPPORTED}.")
    config = dict(getattr(getattr(base, "model_config", None), "unet_config", None) or {})
    sampling = model_sampling(model)
    prediction = _parametrization(sampling)
    sigma_max = float(sampling.sigma_max)
    if kind.startswith("Flux"):
        return ModelInfo("flux_distilled", prediction or "flow", None, sigma_max,
                         refusals=dict(SUPPORT["flux_distilled"]))
    if kind == "SD3":
        if prediction != "flow":
            raise DejaGuardError(f"unsupported model SD3 with {type(sampling).__name__}: expected flow matching")
        return ModelInfo("sd3", "flow", None, sigma_max, refusals=dict(SUPPORT["sd3"]),
                         notes=["flow-matching model: the score is the norm of the velocity difference "
                                "v = (x - denoised) / sigma (the implied-noise difference is 0 at sigma 1)"])
    if kind not in ("BaseModel", "SDXL") or (kind == "BaseModel" and type(base) is not comfy.model_base.BaseModel):
        raise DejaGuardError(f"unsupported model class {kind}: {_SUPPORTED}.")
    adm = int(getattr(base, "adm_channels", 0) or 0)
    context_dim = config.get("context_dim")
    if kind == "BaseModel" and (adm > 0 or context_dim == 2048):
        raise DejaGuardError(
            f"unsupported model {kind}: SDXL-like (adm_in_channels={adm or None}, context_dim={context_dim}) but not "
            f"ComfyUI's SDXL class. {_SUPPORTED}.")
    attn2 = [name for name, m in base.diffusion_model.named_modules()
             if name.endswith("attn2") and isinstance(getattr(m, "to_v", None), torch.nn.Linear)]
    if not attn2 or not isinstance(context_dim, int):
        raise DejaGuardError(
            f"unsupported model {kind} ({type(base.diffusion_model).__name__}): no SD1/SD2-style cross-attention "
            f"(attn2.to_v reading text embeddings) and no known family. {_SUPPORTED}.")
    widths = {base.diffusion_model.get_submodule(n).to_v.in_features for n in attn2}
    if widths != {context_dim}:
        raise DejaGuardError(f"unsupported model {kind}: attn2.to_v reads widths {sorted(widths)}, "
                             f"context_dim is {context_dim} (not one SD-style text encoder)")
    if config.get("in_channels", 4) != 4 or config.get("out_channels", 4) != 4:
        raise DejaGuardError(
            f"unsupported model {kind}: {config.get('in_channels')} input channels (inpainting or image-conditioned "
            "UNet); DejaGuard needs a 4-channel text-to-image UNet.")
    if prediction not in ("epsilon", "v-prediction"):
        raise DejaGuardError(f"unsupported noise parametrization {type(sampling).__name__} of {kind} (DejaGuard "
                             "supports epsilon and v-prediction with the SD discrete schedule)")
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or len(sampling.sigmas) != 1000:
        raise DejaGuardError(f"unsupported model {kind}: {prediction} with {type(sampling).__name__} (DejaGuard "
                             "supports discrete-time epsilon or v-prediction models of 1000 steps)")
    notes = []
    if prediction == "v-prediction":
        notes.append("v-prediction model: the score uses the implied noise eps = (x - denoised) / sigma")
    if kind == "SDXL":
        family = "sdxl"
    elif context_dim == 1024 or config.get("use_linear_in_transformer"):
        family = "sd2_v" if prediction == "v-prediction" else "sd2"
    else:
        family = "sd1"
    return ModelInfo(family=family, prediction=prediction, context_dim=int(context_dim), sigma_max=sigma_max,
                     notes=notes, refusals=dict(SUPPORT[family]))


def model_sampling(model: Any) -> Any:
    """The model's sampling object (sigmas, timestep <-> sigma), object patches included
    (e.g. the stock ModelSamplingDiscrete node switching to v-prediction)."""
    if hasattr(model, "get_model_object"):  # newer ComfyUI
        return model.get_model_object("model_sampling")
    return getattr(model, "object_patches", {}).get("model_sampling", model.model.model_sampling)


def diffusers_names(unet: torch.nn.Module, unet_config: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """The one diffusers <-> ComfyUI name map: ComfyUI -> diffusers names of the UNet's parameters and modules.

    Read from ``comfy.utils.unet_to_diffusers(unet_config)`` (diffusers param -> ComfyUI param). Parameters:
    those the map covers and ``unet`` has (invert the dict for diffusers -> ComfyUI, as the folder loader
    does). Modules: the owners of those parameters (``input_blocks.1.1.transformer_blocks.0.attn2.to_v`` ->
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v``), their parents while both names share their
    tail, and the block where they differ (``input_blocks.1.1`` -> ``down_blocks.0.attentions.0``). Modules
    without a diffusers twin (``input_blocks.1``) are not mapped. Both empty if the config cannot be mapped.
    """
    try:
        mapping = comfy.utils.unet_to_diffusers(unet_config)  # diffusers param -> comfy param
    except (KeyError, TypeError, IndexError):
        return {}, {}
    present = set(unet.state_dict())
    # ComfyUI's map names label_emb.* twice (class_embedding.* and add_embedding.*) and builds it from a set, so
    # "last one wins" would depend on PYTHONHASHSEED; choose the name diffusers gives: add_embedding for SDXL
    # (base adm 2816, refiner 2560), class_embedding otherwise.
    preferred = "add_embedding." if unet_config.get("adm_in_channels") in (2560, 2816) else "class_embedding."
    params: dict[str, str] = {}
    for d, c in sorted(mapping.items()):
        if c in present and (c not in params or d.startswith(preferred)):
            params[c] = d
    modules: dict[str, str] = {}
    for c_param, d_param in params.items():
        c_parts, d_parts = c_param.split(".")[:-1], d_param.split(".")[:-1]
        while c_parts and d_parts:
            modules.setdefault(".".join(c_parts), ".".join(d_parts))
            same = c_parts[-1] == d_parts[-1] and (not c_parts[-1].isdigit() or c_parts[-2:-1] == d_parts[-2:-1])
            if not same:  # an index counts as shared only with the same list name before it
                break
            c_parts, d_parts = c_parts[:-1], d_parts[:-1]
    return params, modules


def unpatched_unet_weights(model: Any) -> dict[str, torch.Tensor]:
    """The UNet's own weights (ComfyUI names), without the weight patches of whichever clone was sampled last.

    ComfyUI patches weights in place while a clone (LoRA, neuron mask) is loaded and keeps the originals in
    the ``backup`` dict that all clones of a model share; they are restored only when another model loads.
    """
    weights = dict(model.model.diffusion_model.state_dict())
    for key, saved in (getattr(model, "backup", None) or {}).items():
        if key.startswith("diffusion_model."):
            weights[key[len("diffusion_model."):]] = getattr(saved, "weight", saved)  # newer: (weight, inplace)
    return weights


def comfy_fingerprint(model: Any) -> str:
    """The one fingerprint of a ComfyUI MODEL: :func:`~core.denoiser.state_fingerprint` of its UNet's unpatched
    weights (:func:`unpatched_unet_weights`: weight patches such as a neuron mask or a LoRA do not change it), in
    their loaded dtype, under their diffusers names (:func:`diffusers_names`; a weight without a diffusers twin
    keeps its ComfyUI name). Equal to ``DiffusersDenoiser.fingerprint()`` of the same weights loaded with
    diffusers, so neuron masks and calibrations made with the CLI are recognized in a graph and vice versa.
    """
    base = model.model
    params, _ = diffusers_names(base.diffusion_model, base.model_config.unet_config)
    with torch.inference_mode(False):
        return state_fingerprint({params.get(name, name): t for name, t in unpatched_unet_weights(model).items()})

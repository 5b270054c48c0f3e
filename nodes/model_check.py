"""The ComfyUI adapter core: which MODELs DejaGuard supports, their diffusers names, and their fingerprint.

Three decisions every node needs, each made once here:

- **Support** (:func:`check_supported`): the SD1.x / SD2.x family (ComfyUI's plain ``BaseModel`` over the
  openaimodel ``UNetModel`` with SD-style cross-attention ``attn2`` fed by a single text encoder,
  discrete-time epsilon or v-prediction schedule of 1000 steps) and DejaGuard's testbed, which has that
  layout at a tiny size. :class:`~nodes.comfy_denoiser.ComfyDenoiser` calls it in its constructor, so every
  node that builds the adapter refuses exactly what the Guard refuses, with the same message.
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

# Model classes of other families, by name: not every ComfyUI version defines all of them.
_OTHER_FAMILIES = {
    "SDXL": "SDXL (pooled-text 'adm' conditioning, two text encoders, context_dim 2048)",
    "SDXLRefiner": "the SDXL refiner (pooled-text 'adm' conditioning, OpenCLIP-G context_dim 1280)",
    "SD21UNCLIP": "SD2.1 unCLIP (image-embedding 'adm' conditioning)",
    "SVD_img2vid": "Stable Video Diffusion (image-to-video)",
    "SV3D_u": "SV3D (image-to-video)", "SV3D_p": "SV3D (image-to-video)",
    "Stable_Zero123": "Stable Zero123 (image-conditioned novel views)",
    "SD_X4Upscaler": "the SD x4 upscaler (image-conditioned)",
    "StableCascade_C": "Stable Cascade (no SD-style UNet)", "StableCascade_B": "Stable Cascade (no SD-style UNet)",
    "SD3": "SD3 (MMDiT joint attention, no SD-style cross-attention)",
    "Flux": "Flux (DiT joint attention, no SD-style cross-attention)",
}
_PREDICTIONS = {"EPS": "epsilon", "V_PREDICTION": "v-prediction"}


@dataclass
class ModelInfo:
    """What the guard needs to know about a supported model."""

    family: str  # "SD1.x-layout" (SD1.x, testbed) or "SD2.x-layout"
    prediction: str  # "epsilon" or "v-prediction"
    context_dim: int  # text embedding width D of the cross-attention
    sigma_max: float  # first sigma of a full-denoise run (the calibrated first step)
    notes: list[str] = field(default_factory=list)


def check_supported(model: Any) -> ModelInfo:
    """Inspect a ModelPatcher (``model.model`` a ComfyUI ``BaseModel``); DejaGuardError naming what is unsupported.

    The first-step score ``||eps(x_T, c) - eps(x_T, 0)||`` is defined for any text-conditioned model,
    but thresholds, token explanations and neuron masks assume SD1/SD2-style cross-attention
    (``...transformer_blocks.N.attn2.to_v`` reading ``(B, 77, D)`` text embeddings) and one text
    encoder, so other families are refused with the reason. All the rules live here:
    :class:`~nodes.comfy_denoiser.ComfyDenoiser` calls this in its constructor (so Token Highlighting, Mitigate
    and Localize Neurons inherit it); the Guard and the mask nodes, which build no adapter, call it directly.
    """
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module) or not hasattr(base, "diffusion_model") \
            or not hasattr(base, "apply_model"):
        raise DejaGuardError(f"not a ComfyUI MODEL (ModelPatcher of a UNet diffusion model): {type(model).__name__}")
    kind = type(base).__name__
    if kind in _OTHER_FAMILIES:
        raise DejaGuardError(f"unsupported model: {_OTHER_FAMILIES[kind]}. DejaGuard supports SD1.x, SD2.x and "
                             "its testbed (single text encoder, SD-style attn2 cross-attention).")
    config = dict(getattr(getattr(base, "model_config", None), "unet_config", None) or {})
    adm = int(getattr(base, "adm_channels", 0) or 0)
    context_dim = config.get("context_dim")
    if adm > 0 or context_dim == 2048:
        raise DejaGuardError(
            f"unsupported model {kind}: SDXL-like (adm_in_channels={adm or None}, context_dim={context_dim}; "
            "pooled-text conditioning from two text encoders). DejaGuard supports SD1.x, SD2.x and its testbed.")
    if type(base) is not comfy.model_base.BaseModel:  # subclasses are other families (unknown to this list)
        raise DejaGuardError(f"unsupported model class {kind}: DejaGuard supports SD1.x, SD2.x and its testbed.")
    attn2 = [name for name, m in base.diffusion_model.named_modules()
             if name.endswith("attn2") and isinstance(getattr(m, "to_v", None), torch.nn.Linear)]
    if not attn2 or not isinstance(context_dim, int):
        raise DejaGuardError(
            f"unsupported model {kind} ({type(base.diffusion_model).__name__}): no SD1/SD2-style cross-attention "
            "(attn2.to_v reading text embeddings). SD3, Flux and other DiT models are not supported.")
    widths = {base.diffusion_model.get_submodule(n).to_v.in_features for n in attn2}
    if widths != {context_dim}:
        raise DejaGuardError(f"unsupported model {kind}: attn2.to_v reads widths {sorted(widths)}, "
                             f"context_dim is {context_dim} (not one SD-style text encoder)")
    if config.get("in_channels", 4) != 4 or config.get("out_channels", 4) != 4:
        raise DejaGuardError(
            f"unsupported model {kind}: {config.get('in_channels')} input channels (inpainting or image-conditioned "
            "UNet); DejaGuard needs a 4-channel text-to-image UNet.")
    type_name = getattr(getattr(base, "model_type", None), "name", "EPS")
    if type_name not in _PREDICTIONS:
        raise DejaGuardError(f"unsupported noise parametrization {type_name} (DejaGuard supports epsilon and "
                             "v-prediction with the SD discrete schedule)")
    sampling = model_sampling(model)
    if not isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) or len(sampling.sigmas) != 1000:
        raise DejaGuardError(f"unsupported model {kind}: {type_name} with {type(sampling).__name__} (DejaGuard "
                             "supports discrete-time epsilon or v-prediction models of 1000 steps: SD1.x, SD2.x)")
    notes = []
    if type_name == "V_PREDICTION":
        notes.append("v-prediction model: the score uses the implied noise eps = (x - denoised) / sigma")
    family = "SD1.x-layout" if not config.get("use_linear_in_transformer") else "SD2.x-layout"
    return ModelInfo(family=family, prediction=_PREDICTIONS[type_name], context_dim=int(context_dim),
                     sigma_max=float(base.model_sampling.sigma_max), notes=notes)


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
    params = {c: d for d, c in mapping.items() if c in present}
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

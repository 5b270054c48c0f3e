"""Which ComfyUI models DejaGuard's guard supports, and which calibrated model a MODEL is.

Supported: the SD1.x / SD2.x family (ComfyUI's plain ``BaseModel`` over the openaimodel ``UNetModel``
with SD-style cross-attention ``attn2`` fed by a single text encoder) and DejaGuard's testbed,
which has that layout at a tiny size. Everything is read from the ModelPatcher; nothing is
changed (the cached model that other graphs use stays as it is).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import comfy.model_base
import comfy.utils
import torch

from ..core.denoiser import module_fingerprint
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
    encoder, so other families are refused with the reason.
    """
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module):
        raise DejaGuardError(f"not a ComfyUI MODEL (ModelPatcher): {type(model).__name__}")
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
            "UNet); the guard needs a 4-channel text-to-image UNet.")
    type_name = getattr(getattr(base, "model_type", None), "name", "EPS")
    if type_name not in _PREDICTIONS:
        raise DejaGuardError(f"unsupported noise parametrization {type_name} (DejaGuard supports epsilon and "
                             "v-prediction with the SD discrete schedule)")
    notes = []
    if type_name == "V_PREDICTION":
        notes.append("v-prediction model: the score uses the implied noise eps = (x - denoised) / sigma")
    family = "SD1.x-layout" if not config.get("use_linear_in_transformer") else "SD2.x-layout"
    return ModelInfo(family=family, prediction=_PREDICTIONS[type_name], context_dim=int(context_dim),
                     sigma_max=float(base.model_sampling.sigma_max), notes=notes)


class _NamedTensors:
    """Duck-typed stand-in for a module: :func:`module_fingerprint` only calls ``state_dict()``."""

    def __init__(self, tensors: OrderedDict[str, torch.Tensor]) -> None:
        self._tensors = tensors

    def state_dict(self) -> OrderedDict[str, torch.Tensor]:
        return self._tensors


def diffusers_key_order(unet_config_path: Path) -> list[tuple[str, torch.Size]]:
    """(name, shape) of the diffusers ``UNet2DConditionModel`` described by ``unet/config.json``, in module order.

    Built on the meta device (no memory, no weights): the order is what ``module_fingerprint`` hashes.
    """
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as err:
        raise DejaGuardError("matching a model to its calibration needs the diffusers package; "
                             "set 'threshold' instead") from err
    config = json.loads(unet_config_path.read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [(name, t.shape) for name, t in unet.state_dict().items()]


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


def diffusers_fingerprint(model: Any, unet_config_path: Path) -> str:
    """``core.denoiser.module_fingerprint`` of the diffusers UNet with the same weights as this ComfyUI MODEL.

    ComfyUI names its UNet weights differently (``input_blocks.1.1...``); ``comfy.utils.unet_to_diffusers``
    maps them back. DejaGuardError if the architectures differ (then it is not the calibrated model).
    The hash reads the unpatched weights in their loaded dtype (fp16 weights hash differently from fp32 ones).
    """
    base = model.model
    key_map = comfy.utils.unet_to_diffusers(base.model_config.unet_config)  # diffusers name -> ComfyUI name
    weights = unpatched_unet_weights(model)
    ordered: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape in diffusers_key_order(unet_config_path):
        weight = weights.get(key_map.get(name, ""))
        if weight is None or weight.shape != shape:
            found = "no such weight" if weight is None else f"shape {tuple(weight.shape)}, calibrated {tuple(shape)}"
            raise DejaGuardError(f"this model's UNet has another architecture than the calibrated model in "
                                 f"{unet_config_path.parent.parent} ({name}: {found})")
        ordered[name] = weight
    return module_fingerprint(cast(torch.nn.Module, _NamedTensors(ordered)))

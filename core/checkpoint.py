"""Single-file Stable Diffusion checkpoints (``model.safetensors``) as a :class:`~core.denoiser.DiffusersDenoiser`.

Users hold their models as one ``.safetensors`` file in the original (LDM) layout, the file ComfyUI's
CheckpointLoaderSimple loads. :func:`load_checkpoint` builds the same diffusers pipeline the CLI and the
benchmarks use for a diffusers folder, offline:

1. **Refuse what is unsafe or broken, with one line.** ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` / pickle
   files are refused by name before a byte is read: unpickling runs code that the file carries. A missing
   file, a file that is not safetensors (a pickle or zip under another name included) and a truncated file
   are told apart.
2. **Detect the family from keys and shapes** (:func:`detect_family`, the header and one 320-element bias
   only): SD1.x has 768-wide cross-attention and CLIP-L text keys (``cond_stage_model.transformer.``);
   SD2.x has 1024-wide cross-attention and OpenCLIP-H keys (``cond_stage_model.model.``). An SD2 file is
   v-prediction (the 768 px models) when the spread of
   ``model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias`` is above 0.09 (population
   std), the rule ComfyUI applies to the same file (``supported_models.SD20.model_type``), so a file is the
   same model in both. SDXL, SD3, Flux and unknown files get a one-line refusal that names what was found.
3. **Convert with diffusers' own single-file converters** (``convert_ldm_unet_checkpoint``,
   ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint``) into
   models built from configs shipped in ``core/configs/`` (diffusers-format ``config.json`` of the UNet, VAE
   and text encoder per family, one scheduler config): nothing is fetched from a hub. Loading is strict: a
   weight the model needs and the file lacks is an error, not a silently random layer.
4. **Tokenizer**: the SD1 CLIP BPE files of the bundled testbed (``core/testbed/model/tokenizer``, the real
   SD1 vocabulary). SD2's OpenCLIP-H tokenizer is the same BPE; it only pads with ``"!"`` (id 0) where SD1
   pads with the end token, so nothing else is shipped for it.

Parametrization: core's methods work in epsilon (:meth:`Denoiser.predict_noise` returns eps). A v-prediction UNet
predicts ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``; :class:`DiffusersDenoiser` with
``prediction_type="v_prediction"`` returns ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``, as ComfyUI's adapter
derives eps from the denoised prediction. The scheduler is DDIM with trailing spacing and epsilon prediction (first
timestep 999, the first timestep of ComfyUI's "normal" scheduler), so first-step scores are comparable with the
Guard's.

Fingerprint: :meth:`DiffusersDenoiser.fingerprint` hashes the diffusers UNet's parameters by name; ComfyUI's
adapter hashes the same weights under the same (mapped) names, so a calibration made with the CLI on a file
is found for that file in a graph. Weights are read in the file's dtype and cast once (fp16 values are
exact in fp32, so the hash does not depend on the dtype loaded).

Shapes: SD1/SD2-512 latents ``(4, 64, 64)``, SD2-768 ``(4, 96, 96)``; text embeddings ``(B, 77, 768)`` (SD1)
or ``(B, 77, 1024)`` (SD2).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .denoiser import BUNDLED_TESTBED, DiffusersDenoiser
from .errors import DejaGuardError

CONFIGS = Path(__file__).parent / "configs"
SD1_TOKENIZER = BUNDLED_TESTBED / "tokenizer"  # the real SD1 CLIP BPE (vocab.json, merges.txt)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
UNET = "model.diffusion_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
VAE = "first_stage_model."
ATTN2_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (320, context width)
CONV_IN = UNET + "input_blocks.0.0.weight"  # (320, in channels, 3, 3)
V_MARKER = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # (320,)
V_THRESHOLD = 0.09  # ComfyUI: population std of V_MARKER above this -> v-prediction


@dataclass(frozen=True)
class Family:
    """What is needed to build one model family from a single file."""

    name: str  # "sd1", "sd2", "sd2-v"
    label: str  # for messages
    configs: str  # folder under core/configs with unet/ and text_encoder/
    pad_token: str | None  # None: the SD1 tokenizer's own (end token)
    sample_size: int  # latent side
    v_prediction: bool


FAMILIES = {
    "sd1": Family("sd1", "SD1.x", "sd1", None, 64, False),
    "sd2": Family("sd2", "SD2.x 512 (epsilon)", "sd2", "!", 64, False),
    "sd2-v": Family("sd2-v", "SD2.x 768 (v-prediction)", "sd2", "!", 96, True),
}
_NOT_YET = "the DejaGuard library does not load it yet (the ComfyUI nodes are where support for it comes first)"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200]


def _open(path: Path) -> Any:
    """``safe_open`` of a file already checked to exist; one-line errors for files that are not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DejaGuardError(_diagnose(path, err)) from None


def _diagnose(path: Path, err: BaseException) -> str:
    """Why ``path`` does not open as safetensors: a pickle under another name, a file cut short (its header
    intact: 8-byte length, JSON, data offsets beyond the end of the file), or another format."""
    size = path.stat().st_size
    with open(path, "rb") as f:  # the header only; nothing is unpickled
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            return (f"{path.name} is a pickled PyTorch file despite its name; refused: unpickling runs code the "
                    "file carries (convert it to .safetensors)")
        length = int.from_bytes(head, "little") if len(head) == 8 else size
        try:
            header = json.loads(f.read(length)) if 8 + length <= size else None
        except ValueError:
            header = None
    if isinstance(header, dict):
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        needed = 8 + length + max(ends, default=0)
        if needed > size:
            return f"{path.name} is truncated: {size} bytes, its header describes {needed} (copy it again)"
    return f"{path.name} is not a safetensors file (another format, or damaged): {_one_line(err)}"


def detect_family(shapes: Mapping[str, tuple[int, ...]], v_marker: torch.Tensor | None = None) -> Family:
    """The family of a single-file checkpoint from its tensor names and shapes (``name -> shape``).

    ``v_marker``: the tensor ``V_MARKER`` of an SD2 file (its spread decides v-prediction); needed only when the
    keys say SD2. DejaGuardError, naming the family found, for anything :func:`load_checkpoint` does not load.
    """
    keys = shapes.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders.1.model.") or has("conditioner.embedders.0.transformer."):
        raise DejaGuardError(f"this is an SDXL checkpoint (two text encoders, pooled conditioning): {_NOT_YET}")
    if has("conditioner.embedders.0.model."):
        raise DejaGuardError(f"this is an SDXL refiner checkpoint (OpenCLIP-G, pooled conditioning): {_NOT_YET}")
    if has(UNET + "joint_blocks.") or has("joint_blocks.") or has("text_encoders.clip_g."):
        raise DejaGuardError(f"this is an SD3 / SD3.5 checkpoint (MMDiT, flow matching): {_NOT_YET}")
    if has(UNET + "double_blocks.") or has("double_blocks."):
        raise DejaGuardError(f"this is a Flux checkpoint (guidance-distilled MMDiT, no unconditional prediction): "
                             f"{_NOT_YET}")
    if ATTN2_K not in shapes:
        found = "no Stable Diffusion UNet" if not has(UNET) else "a UNet without SD1/SD2 cross-attention"
        raise DejaGuardError(f"unknown model family ({found} under {UNET}); the library loads SD1.x and SD2.x "
                             "single-file checkpoints")
    if has(UNET + "label_emb."):
        raise DejaGuardError(f"this is a class- or image-conditioned SD2 model (unCLIP, upscaler): {_NOT_YET}")
    in_channels = shapes.get(CONV_IN, (0, 4))[1]
    if in_channels != 4:
        raise DejaGuardError(f"this is an inpainting or depth model ({in_channels} UNet input channels, not 4): "
                             f"{_NOT_YET}")
    width = shapes[ATTN2_K][-1]
    text = "CLIP-L" if has(CLIP_L) else "OpenCLIP" if has(OPEN_CLIP) else None
    if not has(VAE):
        raise DejaGuardError("the checkpoint has no VAE weights (first_stage_model.*): a full SD checkpoint is needed")
    if width == 768 and text == "CLIP-L":
        return FAMILIES["sd1"]
    if width == 1024 and text == "OpenCLIP":
        if v_marker is None:
            raise DejaGuardError(f"SD2 checkpoint without {V_MARKER}: cannot tell epsilon from v-prediction")
        spread = float(v_marker.float().std(unbiased=False))
        return FAMILIES["sd2-v" if spread > V_THRESHOLD else "sd2"]
    raise DejaGuardError(f"unknown model family: {width}-wide cross-attention with "
                         f"{text or 'no'} text encoder keys (SD1.x: 768 and CLIP-L; SD2.x: 1024 and OpenCLIP-H)")


def read_family(path: str | Path) -> Family:
    """:func:`detect_family` of a file, after the checks of :func:`load_checkpoint`; reads the header only
    (and the 320-element ``V_MARKER`` of an SD2 file)."""
    path = _checked_path(path)
    with _open(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        marker = f.get_tensor(V_MARKER) if V_MARKER in shapes else None
    return detect_family(shapes, marker)


def _checked_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise DejaGuardError(f"{path.name}: {path.suffix} checkpoints are pickles and are refused (unpickling runs "
                             "code the file carries); use the .safetensors version of the model")
    if not path.is_file():
        raise DejaGuardError(f"checkpoint not found: {path}")
    return path


def _read(f: Any, path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of the UNet, text encoder and VAE (EMA copies and other extras are skipped), cast to ``dtype``
    one at a time so that no second full copy is held."""
    wanted = (UNET, CLIP_L, OPEN_CLIP, VAE)
    weights: dict[str, torch.Tensor] = {}
    try:
        for key in f.keys():
            if key.startswith(wanted):
                tensor = f.get_tensor(key)
                weights[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    except (OSError, ValueError, RuntimeError) as err:  # safe_open checked the size; a damaged disk fails here
        raise DejaGuardError(f"{path.name} could not be read: {_one_line(err)}") from None
    for key in [k for k in weights if k.startswith(CLIP_L) and not k.startswith(CLIP_L + "text_model.")]:
        weights[key.replace(CLIP_L, CLIP_L + "text_model.", 1)] = weights.pop(key)  # older SD1 layout
    return weights


def _load_strict(model: torch.nn.Module, weights: dict[str, torch.Tensor], part: str, path: Path) -> None:
    """Load ``weights`` into ``model`` (built on the meta device or at random); a missing weight is an error,
    extras (position ids, the text projection, the last OpenCLIP layer SD2 does not use) are ignored."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    if missing:
        raise DejaGuardError(f"{path.name}: the {part} lacks {len(missing)} weight(s), e.g. {missing[0]}")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise DejaGuardError(f"{path.name}: {part} weight {key} has shape {tuple(weights[key].shape)}, the "
                                 f"architecture needs {tuple(tensor.shape)}")
    model.load_state_dict({k: weights[k] for k in expected}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise DejaGuardError(f"{path.name}: the {part} has no value for {left[0]}")


def _build(family: Family, weights: dict[str, torch.Tensor], path: Path) -> tuple[Any, Any, Any, Any, Any]:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = CONFIGS / family.configs
    unet_config = dict(UNet2DConditionModel.load_config(folder / "unet"), sample_size=family.sample_size)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    _load_strict(unet, convert_ldm_unet_checkpoint(weights, unet_config), "UNet", path)
    for key in [k for k in weights if k.startswith(UNET)]:
        del weights[key]

    vae_config = AutoencoderKL.load_config(CONFIGS / "vae")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config)
    _load_strict(vae, convert_ldm_vae_checkpoint(weights, vae_config), "VAE", path)

    # transformers' CLIPTextModel keeps non-persistent buffers (position ids) that the file does not hold: built
    # in memory (123M / 340M parameters), not on the meta device.
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    if family.pad_token is None:
        text_weights = convert_ldm_clip_checkpoint(weights)
    else:
        text_weights = convert_open_clip_checkpoint(text_encoder, weights, prefix=OPEN_CLIP)
    if not hasattr(text_encoder, "text_model"):  # transformers flattened CLIPTextModel: no text_model. prefix
        text_weights = {k.removeprefix("text_model."): v for k, v in text_weights.items()}
    _load_strict(text_encoder, text_weights, "text encoder", path)
    weights.clear()

    pad = {} if family.pad_token is None else {"pad_token": family.pad_token}
    tokenizer = CLIPTokenizer.from_pretrained(SD1_TOKENIZER, **pad)
    scheduler_config = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    scheduler = DDIMScheduler.from_config(scheduler_config)
    return unet, text_encoder, tokenizer, scheduler, vae


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> DiffusersDenoiser:
    """A single-file SD1.x / SD2.x ``.safetensors`` checkpoint as a denoiser, offline (see the module doc).

    ``device``: as :func:`~core.denoiser.resolve_device` (CUDA if there is one, else the CPU). ``dtype``: of
    the models. Returns a :class:`DiffusersDenoiser` (``prediction_type`` "v_prediction" for SD2 768-v) whose
    ``family`` attribute names what was found (``"sd1"``, ``"sd2"``, ``"sd2-v"``). Raises DejaGuardError with
    one line for a pickle, a missing / non-safetensors / truncated file, and families it does not load.
    """
    path = _checked_path(path)
    with _open(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        family = detect_family(shapes, f.get_tensor(V_MARKER) if V_MARKER in shapes else None)
        weights = _read(f, path, dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unet, text_encoder, tokenizer, scheduler, vae = _build(family, weights, path)
    except DejaGuardError:
        raise
    except Exception as err:  # a converter meeting a layout it does not expect
        raise DejaGuardError(f"{path.name}: cannot convert this {family.label} checkpoint: "
                             f"{type(err).__name__}: {_one_line(err)}") from None
    denoiser = DiffusersDenoiser(unet, text_encoder, tokenizer, scheduler, vae=vae, device=device, dtype=dtype,
                                 prediction_type="v_prediction" if family.v_prediction else "epsilon")
    denoiser.family = family.name  # type: ignore[attr-defined]
    return denoiser

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
   same model in both. SDXL base (and its fine-tunes) has two text encoders, CLIP-L
   (``conditioner.embedders.0.transformer.``) and OpenCLIP-G (``conditioner.embedders.1.model.``), 2048-wide
   cross-attention and a 2816-wide added ("adm") embedding (``label_emb``: pooled text 1280 + six size
   embeddings of 256). The SDXL refiner, SD3, Flux, inpainting models and unknown files get a one-line refusal
   that names what was found and why it is not loaded.
3. **Convert with diffusers' own single-file converters** (``convert_ldm_unet_checkpoint``,
   ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint``, the
   functions ``from_single_file`` calls) into models built from configs shipped in ``core/configs/``
   (diffusers-format ``config.json`` of the UNet, VAE and text encoder(s) per family, one scheduler config):
   nothing is fetched from a hub. Loading is strict: a weight the model needs and the file lacks is an error,
   not a silently random layer.
4. **Tokenizer**: the SD1 CLIP BPE files of the bundled testbed (``core/testbed/model/tokenizer``, the real
   SD1 vocabulary). SD2's OpenCLIP-H and SDXL's OpenCLIP-G tokenizers are the same BPE; they only pad with
   ``"!"`` (id 0) where SD1 (and SDXL's CLIP-L) pads with the end token (diffusers' SDXL ``tokenizer_2``), so
   nothing else is shipped for them.

Memory: the file is read tensor by tensor with plain reads (not through a memory map, whose touched pages would
count as resident until the whole file is closed) and cast to ``dtype`` one tensor at a time, one component at a
time (text encoders, VAE, then the UNet, built on the meta device and given the read tensors without a copy). So
the peak is about the loaded models plus one text encoder's weights (figures for SDXL in
``tests/test_checkpoint.py``).

Parametrization: core's methods work in epsilon (:meth:`Denoiser.predict_noise` returns eps). A v-prediction UNet
predicts ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0``; :class:`DiffusersDenoiser` with
``prediction_type="v_prediction"`` returns ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``, as ComfyUI's adapter
derives eps from the denoised prediction. The scheduler is DDIM with trailing spacing and epsilon prediction (first
timestep 999, the first timestep of ComfyUI's "normal" scheduler), so first-step scores are comparable with the
Guard's.

Fingerprint: :meth:`DiffusersDenoiser.fingerprint` hashes the diffusers UNet's parameters by name; ComfyUI's
adapter hashes the same weights under the same (mapped) names, so a calibration made with the CLI on a file
is found for that file in a graph. Weights are read in the file's dtype and cast once (fp16 values are
exact in fp32, so the hash does not depend on the dtype loaded). :func:`unet_fingerprint` gives that same value for
a file without loading it (the WebUI guard keys calibrations by it): the UNet tensors through a copy-on-write memory
map, renamed by the same converter, restricted to the names the diffusers UNet holds; only the ~256 values per
tensor the hash samples are read.

Shapes: SD1/SD2-512 latents ``(4, 64, 64)``, SD2-768 ``(4, 96, 96)``, SDXL ``(4, 128, 128)``; text embeddings
``(B, 77, 768)`` (SD1), ``(B, 77, 1024)`` (SD2) or packed ``(B, 78, 2048)`` (SDXL: the pooled CLIP-G output as the
last row, ``core.conditioning``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .denoiser import BUNDLED_TESTBED, DiffusersDenoiser, state_fingerprint
from .errors import DejaGuardError

CONFIGS = Path(__file__).parent / "configs"
SD1_TOKENIZER = BUNDLED_TESTBED / "tokenizer"  # the real SD1 CLIP BPE (vocab.json, merges.txt)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
UNET = "model.diffusion_model."
CLIP_L = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
XL_CLIP_L = "conditioner.embedders.0.transformer."  # SDXL base: CLIP ViT-L/14
XL_CLIP_G = "conditioner.embedders.1.model."  # SDXL base: OpenCLIP ViT-bigG/14 (with its text projection)
XL_REFINER = "conditioner.embedders.0.model."  # the SDXL refiner's only encoder, OpenCLIP-G
VAE = "first_stage_model."
ATTN2_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (320, context width)
XL_ATTN2_K = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"  # SDXL: (640, 2048)
XL_ADM = UNET + "label_emb.0.0.weight"  # SDXL: (1280, 2816) = pooled 1280 + 6 x 256 size embeddings
CONV_IN = UNET + "input_blocks.0.0.weight"  # (320, in channels, 3, 3)
V_MARKER = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"  # (320,)
V_THRESHOLD = 0.09  # ComfyUI: population std of V_MARKER above this -> v-prediction


@dataclass(frozen=True)
class Family:
    """What is needed to build one model family from a single file."""

    name: str  # "sd1", "sd2", "sd2-v", "sdxl"
    label: str  # for messages
    configs: str  # folder under core/configs: unet/ and text_encoder/ (SDXL: unet/, text_encoder_2/, vae/)
    pad_token: str | None  # None: the SD1 tokenizer's own (end token)
    sample_size: int  # latent side
    v_prediction: bool
    two_encoders: bool = False  # SDXL: SD1's CLIP-L + OpenCLIP-G, pooled conditioning; tokenizer 2 pads with "!"


FAMILIES = {
    "sd1": Family("sd1", "SD1.x", "sd1", None, 64, False),
    "sd2": Family("sd2", "SD2.x 512 (epsilon)", "sd2", "!", 64, False),
    "sd2-v": Family("sd2-v", "SD2.x 768 (v-prediction)", "sd2", "!", 96, True),
    "sdxl": Family("sdxl", "SDXL base", "sdxl", None, 128, False, two_encoders=True),
}
_LOADS = "the library loads SD1.x, SD2.x and SDXL base single-file checkpoints"


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
        f.seek(0)
        try:
            start, header = _header(f, size)
        except ValueError:
            header = None
    if isinstance(header, dict):
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
        needed = start + max(ends, default=0)
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

    if has(XL_REFINER):
        raise DejaGuardError("this is an SDXL refiner checkpoint: not loaded, because the refiner runs only the last, "
                             "low-noise steps after an SDXL base and never makes the first-step prediction the score "
                             "reads; score the base model")
    if has(UNET + "joint_blocks.") or has("joint_blocks.") or has("text_encoders.clip_g."):
        raise DejaGuardError("this is an SD3 / SD3.5 checkpoint (MMDiT, flow matching): not loaded, because the "
                             "library's denoiser runs noise-predicting UNets, not flow-matching transformers (the "
                             "ComfyUI Guard and Calibrate nodes score SD3)")
    if has(UNET + "double_blocks.") or has("double_blocks."):
        raise DejaGuardError("this is a Flux checkpoint: refused, because guidance-distilled Flux has no "
                             "unconditional prediction, and the score is the conditional minus the unconditional one")
    if has(XL_CLIP_G) or has(XL_CLIP_L):
        return _sdxl_family(shapes, has)
    if ATTN2_K not in shapes:
        found = "no Stable Diffusion UNet" if not has(UNET) else "a UNet without SD1/SD2 cross-attention"
        raise DejaGuardError(f"unknown model family ({found} under {UNET}); {_LOADS}")
    if has(UNET + "label_emb."):
        raise DejaGuardError("this is a class- or image-conditioned SD2 model (unCLIP, upscaler): not loaded, because "
                             "its UNet needs an image embedding besides the prompt")
    _check_in_channels(shapes)
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


def _check_in_channels(shapes: Mapping[str, tuple[int, ...]]) -> None:
    in_channels = shapes.get(CONV_IN, (0, 4))[1]
    if in_channels != 4:
        raise DejaGuardError(f"this is an inpainting or depth model ({in_channels} UNet input channels, not 4): not "
                             "loaded, because its UNet needs a masked image or depth map besides the noise")


def _sdxl_family(shapes: Mapping[str, tuple[int, ...]], has: Any) -> Family:
    """SDXL base: both text encoders, the 2048-wide cross-attention, the 2816-wide added embedding, a VAE."""
    missing = [name for prefix, name in ((XL_CLIP_L, "CLIP-L"), (XL_CLIP_G, "OpenCLIP-G")) if not has(prefix)]
    if missing:
        raise DejaGuardError(f"SDXL checkpoint without its {missing[0]} text encoder weights (an SDXL file holds "
                             f"{XL_CLIP_L}* and {XL_CLIP_G}*): a full SDXL checkpoint is needed")
    width, adm = shapes.get(XL_ATTN2_K, (0, 0))[-1], shapes.get(XL_ADM, (0, 0))[-1]
    if (width, adm) != (2048, 2816):
        raise DejaGuardError(f"unknown SDXL-like model: cross-attention width {width or 'absent'} and added "
                             f"embedding width {adm or 'absent'} (SDXL base: 2048 and 2816)")
    _check_in_channels(shapes)
    if not has(VAE):
        raise DejaGuardError("the checkpoint has no VAE weights (first_stage_model.*): a full SD checkpoint is needed")
    return FAMILIES["sdxl"]


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


def _header(f: Any, size: int | None = None) -> tuple[int, dict[str, Any]]:
    """(offset of the data, header) of the safetensors file open as ``f`` at its start: an 8-byte little-endian
    length, then that many bytes of JSON (``name -> {"dtype", "shape", "data_offsets"}``, ``data_offsets`` relative to
    the data). ValueError when the header is not JSON or (``size``: the file's size) reaches past the end."""
    length = int.from_bytes(f.read(8), "little")
    if size is not None and 8 + length > size:
        raise ValueError(f"header of {length} bytes in a file of {size}")
    return 8 + length, json.loads(f.read(length))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read(path: Path, prefixes: tuple[str, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors whose names start with one of ``prefixes`` (EMA copies and other extras are skipped), floating
    ones cast to ``dtype`` one at a time, read with plain file reads (module doc: no memory map stays resident).
    :func:`_open` has checked the file before (header sound, not truncated)."""
    weights: dict[str, torch.Tensor] = {}
    try:
        with open(path, "rb") as f:
            start, header = _header(f)
            for key, entry in header.items():
                if key == "__metadata__" or not key.startswith(prefixes):
                    continue
                begin, end = entry["data_offsets"]
                f.seek(start + begin)
                data = bytearray(end - begin)
                if f.readinto(data) != end - begin:
                    raise OSError(f"{key} is cut short")
                kind = _DTYPES[entry["dtype"]]
                tensor = (torch.frombuffer(data, dtype=kind) if data else torch.empty(0, dtype=kind))
                tensor = tensor.reshape(entry["shape"])
                weights[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # a damaged disk, an unknown dtype
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


def _text_weights(encoder: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converted CLIP weights under ``encoder``'s names (transformers flattened ``CLIPTextModel``: no
    ``text_model.`` prefix; ``CLIPTextModelWithProjection`` keeps it)."""
    if hasattr(encoder, "text_model"):
        return weights
    return {k.removeprefix("text_model."): v for k, v in weights.items()}


def _build(family: Family, path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """The denoiser's parts (keyword arguments of :class:`DiffusersDenoiser`), one component at a time: the text
    encoder(s), the VAE, then the UNet (module doc: memory)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = CONFIGS / family.configs
    parts: dict[str, Any] = {}
    # transformers' CLIP text models keep non-persistent buffers (position ids) that the file does not hold: built
    # in memory (123M / 340M / 695M parameters), not on the meta device; before the UNet, so that a random text
    # encoder and its read weights are never held beside the UNet.
    if family.two_encoders:  # SDXL: SD1's CLIP ViT-L/14 (penultimate layer), then OpenCLIP-G with its projection
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(CONFIGS / "sd1" / "text_encoder"))
        weights = convert_ldm_clip_checkpoint(_read(path, (XL_CLIP_L,), dtype))
        _load_strict(clip_l, _text_weights(clip_l, weights), "CLIP-L text encoder", path)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        weights = convert_open_clip_checkpoint(clip_g, _read(path, (XL_CLIP_G,), dtype), prefix=XL_CLIP_G)
        _load_strict(clip_g, _text_weights(clip_g, weights), "OpenCLIP-G text encoder", path)
        parts.update(text_encoder=clip_l, text_encoder_2=clip_g,
                     tokenizer=CLIPTokenizer.from_pretrained(SD1_TOKENIZER),
                     tokenizer_2=CLIPTokenizer.from_pretrained(SD1_TOKENIZER, pad_token="!"))
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        if family.pad_token is None:
            weights = convert_ldm_clip_checkpoint(_read(path, (CLIP_L,), dtype))
        else:
            weights = convert_open_clip_checkpoint(text_encoder, _read(path, (OPEN_CLIP,), dtype), prefix=OPEN_CLIP)
        _load_strict(text_encoder, _text_weights(text_encoder, weights), "text encoder", path)
        pad = {} if family.pad_token is None else {"pad_token": family.pad_token}
        parts.update(text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(SD1_TOKENIZER, **pad))
    del weights

    vae_config = AutoencoderKL.load_config(folder / "vae" if (folder / "vae").is_dir() else CONFIGS / "vae")
    with torch.device("meta"):
        parts["vae"] = AutoencoderKL.from_config(vae_config)
    _load_strict(parts["vae"], convert_ldm_vae_checkpoint(_read(path, (VAE,), dtype), vae_config), "VAE", path)

    unet_config = dict(UNet2DConditionModel.load_config(folder / "unet"), sample_size=family.sample_size)
    with torch.device("meta"):
        parts["unet"] = UNet2DConditionModel.from_config(unet_config)
    _load_strict(parts["unet"], convert_ldm_unet_checkpoint(_read(path, (UNET,), dtype), unet_config), "UNet", path)

    scheduler_config = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    parts["scheduler"] = DDIMScheduler.from_config(scheduler_config)
    return parts


def load_checkpoint(path: str | Path, device: str | torch.device | None = None,
                    dtype: torch.dtype = torch.float32) -> DiffusersDenoiser:
    """A single-file SD1.x / SD2.x / SDXL ``.safetensors`` checkpoint as a denoiser, offline (see the module doc).

    ``device``: as :func:`~core.denoiser.resolve_device` (CUDA if there is one, else the CPU). ``dtype``: of
    the models. Returns a :class:`DiffusersDenoiser` (``prediction_type`` "v_prediction" for SD2 768-v; two text
    encoders and packed conditioning for SDXL) whose ``family`` attribute names what was found (``"sd1"``,
    ``"sd2"``, ``"sd2-v"``, ``"sdxl"``). Raises DejaGuardError with one line for a pickle, a missing /
    non-safetensors / truncated file, and families it does not load.
    """
    path = _checked_path(path)
    family = read_family(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parts = _build(family, path, dtype)
    except DejaGuardError:
        raise
    except Exception as err:  # a converter meeting a layout it does not expect
        raise DejaGuardError(f"{path.name}: cannot convert this {family.label} checkpoint: "
                             f"{type(err).__name__}: {_one_line(err)}") from None
    denoiser = DiffusersDenoiser(**parts, device=device, dtype=dtype,
                                 prediction_type="v_prediction" if family.v_prediction else "epsilon")
    denoiser.family = family.name  # type: ignore[attr-defined]
    return denoiser


def _mapped_unet(path: Path) -> dict[str, torch.Tensor]:
    """The UNet tensors (``model.diffusion_model.*``, LDM names) of a safetensors file, memory-mapped copy-on-write:
    nothing is read until a value is used, and nothing is ever written back."""
    with open(path, "rb") as f:
        start, header = _header(f)
    data = torch.from_numpy(np.memmap(path, dtype=np.uint8, mode="c"))
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__" or not name.startswith(UNET):
            continue
        kind = _DTYPES.get(meta["dtype"])
        if kind is None or not kind.is_floating_point:
            raise DejaGuardError(f"{path.name}: UNet weight {name} has dtype {meta['dtype']}, not a float type")
        begin, end = meta["data_offsets"]
        tensors[name] = data[start + begin:start + end].view(kind).reshape(meta["shape"])
    return tensors


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def unet_fingerprint(path: str | Path) -> str:
    """The fingerprint of the UNet in the single-file checkpoint ``path`` (SD1.x, SD2.x, SDXL base), equal to
    ``load_checkpoint(path).fingerprint()`` and to ComfyUI's adapter's for the same file, without loading it (module
    doc); cached per file (path, size, modification time). DejaGuardError, one line, for a file
    :func:`load_checkpoint` refuses."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path = _checked_path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FINGERPRINTS:
        family = read_family(path)
        config = dict(UNet2DConditionModel.load_config(CONFIGS / family.configs / "unet"),
                      sample_size=family.sample_size)
        with torch.device("meta"):
            names = UNet2DConditionModel.from_config(config).state_dict().keys()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            renamed = convert_ldm_unet_checkpoint(_mapped_unet(path), config)
        missing = [k for k in names if k not in renamed]
        if missing:
            raise DejaGuardError(f"{path.name}: the UNet lacks {len(missing)} weight(s), e.g. {missing[0]}")
        _FINGERPRINTS[key] = state_fingerprint({k: renamed[k] for k in names})
    return _FINGERPRINTS[key]

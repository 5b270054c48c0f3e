"""Build ComfyUI MODEL / CLIP / VAE objects from a diffusers-format text-to-image folder.

Handles SD1-layout ``UNet2DConditionModel`` folders of any width and depth (the bundled testbed
is one: 32..128 channels, 16 GroupNorm groups, 96-wide CLIP), so that stock ComfyUI nodes
(CLIPTextEncode, EmptyLatentImage, KSampler, VAEDecode, ...) accept them unchanged:

- MODEL: ``comfy.model_base.BaseModel`` whose ``unet_config`` is derived from ``unet/config.json``,
  weights renamed with the adapter's one name map (``model_check.diffusers_names``), GroupNorm group
  counts patched (ComfyUI hard-codes 32), noise schedule from ``scheduler/``, in a ``ModelPatcher``.
- CLIP: ``comfy.sd.CLIP`` over ``comfy.sd1_clip.SD1ClipModel`` built from ``text_encoder/config.json``
  and the folder's own ``tokenizer/``; conditioning = last_hidden_state (after the final layer norm).
- VAE: the fixed ``PooledColorAutoencoder`` (latents ``(B, 4, h, w)`` <-> images ``(B, 8h, 8w, 3)``)
  wrapped in :class:`PooledColorVAE`; a diffusers ``AutoencoderKL`` goes to ``comfy.sd.VAE``.

Weights are read from ``.safetensors`` files only (``core.denoiser.safetensors_weights``, the rule the core
loader follows too: pickled ``.bin`` files are refused, never unpickled). Loading runs outside ``torch.inference_mode``
so the parameters are ordinary tensors that gradient-based nodes can use later.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models_base
import safetensors.torch
import torch

from ..core.denoiser import safetensors_weights
from ..core.errors import DejaGuardError
from .model_check import diffusers_names

# diffusers beta_schedule -> ComfyUI make_beta_schedule name (ComfyUI's "linear" is SD's scaled linear).
_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DejaGuardError(f"cannot read {path}: {err}") from err


def _per_level(value: int | list[int], levels: int, name: str) -> list[int]:
    values = [int(value)] * levels if isinstance(value, int) else [int(v) for v in value]
    if len(values) != levels:
        raise DejaGuardError(f"unet config: {name} has {len(values)} entries for {levels} blocks")
    return values


# -- UNet ---------------------------------------------------------------------------------------


def unet_config_from_diffusers(cfg: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A diffusers ``UNet2DConditionModel`` config -> (ComfyUI ``unet_config``, GroupNorm groups).

    Only the SD1/SD2 family is accepted: per-level CrossAttn/plain blocks, a cross-attention
    middle block, sinusoidal time embedding, no class/addition embeddings.
    """
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise DejaGuardError(f"unsupported unet class {cfg.get('_class_name')!r}")
    must = {"class_embed_type": None, "addition_embed_type": None, "time_cond_proj_dim": None,
            "encoder_hid_dim": None, "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
            "flip_sin_to_cos": True, "freq_shift": 0, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "dual_cross_attention": False, "only_cross_attention": False, "center_input_sample": False,
            "mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu", "downsample_padding": 1,
            "reverse_transformer_layers_per_block": None, "attention_type": "default"}
    for key, want in must.items():
        if cfg.get(key, want) != want:
            raise DejaGuardError(f"unsupported unet config: {key}={cfg[key]!r} (ComfyUI's SD UNet needs {want!r})")
    channels = [int(c) for c in cfg["block_out_channels"]]
    levels = len(channels)
    base = channels[0]
    if any(c % base for c in channels):
        raise DejaGuardError(f"block_out_channels {channels} are not multiples of the first")
    res_blocks = _per_level(cfg.get("layers_per_block", 2), levels, "layers_per_block")
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    has_attn = [t == "CrossAttnDownBlock2D" for t in down]
    if [t == "CrossAttnUpBlock2D" for t in reversed(up)] != has_attn or any(
            t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise DejaGuardError(f"unsupported block layout: down {down}, up {up}")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim") or 8  # diffusers' legacy naming
    heads = _per_level(heads, levels, "attention heads")
    if len(set(heads)) == 1:
        head_cfg = {"num_heads": heads[0], "num_head_channels": -1}
    elif len({c // h for c, h in zip(channels, heads)}) == 1:
        head_cfg = {"num_heads": -1, "num_head_channels": channels[0] // heads[0]}
    else:
        raise DejaGuardError(f"attention heads {heads} are neither constant nor of constant width")
    context_dim = cfg["cross_attention_dim"]
    if not isinstance(context_dim, int):
        raise DejaGuardError("per-block cross_attention_dim is not supported")
    unet_config: dict[str, Any] = {
        "use_checkpoint": False, "image_size": cfg.get("sample_size", 64), "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": int(cfg["in_channels"]),
        "out_channels": int(cfg["out_channels"]), "model_channels": base,
        "num_res_blocks": res_blocks, "channel_mult": [c // base for c in channels],
        "transformer_depth": [d if a else 0 for d, a, n in zip(depth, has_attn, res_blocks) for _ in range(n)],
        "transformer_depth_output": [d if a else 0 for d, a, n in zip(depth, has_attn, res_blocks)
                                     for _ in range(n + 1)],
        "transformer_depth_middle": depth[-1], "context_dim": int(context_dim),
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "use_temporal_attention": False, "use_temporal_resblock": False, **head_cfg,
    }
    return unet_config, int(cfg.get("norm_num_groups", 32))


def sampling_settings_from_scheduler(folder: Path) -> tuple[dict[str, Any], comfy.model_base.ModelType]:
    """``scheduler/scheduler_config.json`` -> (ComfyUI ``sampling_settings``, model type).

    Missing folder: SD1's schedule (scaled_linear 0.00085..0.012, 1000 steps, epsilon).
    """
    path = folder / "scheduler" / "scheduler_config.json"
    cfg = _read_json(path) if path.is_file() else {}
    schedule = cfg.get("beta_schedule", "scaled_linear")
    if schedule not in _BETA_SCHEDULES or cfg.get("num_train_timesteps", 1000) != 1000 or cfg.get("trained_betas"):
        raise DejaGuardError(f"unsupported noise schedule in {path}: {schedule}, "
                             f"{cfg.get('num_train_timesteps')} steps (ComfyUI needs 1000)")
    if cfg.get("rescale_betas_zero_snr"):
        raise DejaGuardError("zero-terminal-SNR schedules are not supported")
    prediction = cfg.get("prediction_type", "epsilon")
    types = {"epsilon": comfy.model_base.ModelType.EPS, "v_prediction": comfy.model_base.ModelType.V_PREDICTION}
    if prediction not in types:
        raise DejaGuardError(f"unsupported prediction_type {prediction!r}")
    settings = {"beta_schedule": _BETA_SCHEDULES[schedule], "linear_start": float(cfg.get("beta_start", 0.00085)),
                "linear_end": float(cfg.get("beta_end", 0.012))}
    return settings, types[prediction]


class DiffusersLatentFormat(comfy.latent_formats.LatentFormat):
    """Latent format of a diffusers folder: ``scale_factor`` from the VAE config, 4 channels."""

    latent_channels = 4

    def __init__(self, scale_factor: float = 1.0, latent_rgb_factors: list[list[float]] | None = None) -> None:
        self.scale_factor = scale_factor
        self.latent_rgb_factors = latent_rgb_factors  # (4, 3): preview rgb = latent @ factors, in [-1, 1]


class DiffusersModelConfig(comfy.supported_models_base.BASE):
    """ComfyUI model config for a diffusers SD-family UNet (built per folder, never auto-detected)."""

    unet_config: dict[str, Any] = {"dejaguard_never_detected": True}
    unet_extra_config: dict[str, Any] = {}
    latent_format = DiffusersLatentFormat
    model_type_value = comfy.model_base.ModelType.EPS

    def model_type(self, state_dict: dict[str, Any], prefix: str = "") -> comfy.model_base.ModelType:
        return self.model_type_value


def set_group_norm_groups(module: torch.nn.Module, groups: int) -> int:
    """Set ``num_groups`` of every GroupNorm (ComfyUI's UNet hard-codes 32). Returns how many."""
    count = 0
    for m in module.modules():
        if isinstance(m, torch.nn.GroupNorm):
            if m.num_channels % groups:
                raise DejaGuardError(f"GroupNorm of {m.num_channels} channels cannot have {groups} groups")
            m.num_groups = groups
            count += 1
    return count


def load_unet(folder: Path, latent_format: DiffusersLatentFormat) -> comfy.model_patcher.ModelPatcher:
    """``folder/unet`` (+ ``scheduler/``) -> MODEL. The diffusion model is ``.model.diffusion_model``."""
    unet_config, groups = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    settings, model_type = sampling_settings_from_scheduler(folder)
    sd = safetensors.torch.load_file(str(safetensors_weights(folder / "unet")))

    config = DiffusersModelConfig(unet_config)
    config.sampling_settings = settings
    config.model_type_value = model_type
    config.latent_format = latent_format
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    params = sum(v.numel() for v in sd.values())
    dtype = comfy.model_management.unet_dtype(model_params=params, supported_dtypes=config.supported_inference_dtypes)
    manual_cast = comfy.model_management.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes)
    config.set_inference_dtype(dtype, manual_cast)
    model = config.get_model({}, "", device=offload_device)
    set_group_norm_groups(model.diffusion_model, groups)
    params, _ = diffusers_names(model.diffusion_model, unet_config)
    to_comfy = {d: c for c, d in params.items()}
    unknown = sorted(k for k in sd if k not in to_comfy)
    if unknown:
        raise DejaGuardError(f"unet weights do not fit the derived config: {unknown[:5]} ...")
    new_sd = {to_comfy[k]: v for k, v in sd.items()}
    missing, unexpected = model.diffusion_model.load_state_dict(new_sd, strict=False)
    if missing or unexpected:
        raise DejaGuardError(f"unet weights incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(offload_device).eval().requires_grad_(False)
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


# -- text encoder -------------------------------------------------------------------------------


def load_clip(folder: Path, embedding_directory: list[str] | str | None = None) -> comfy.sd.CLIP:
    """``folder/text_encoder`` + ``folder/tokenizer`` -> CLIP (SD1-style, conditioning = last layer, normed)."""
    config_path = folder / "text_encoder" / "config.json"
    cfg = _read_json(config_path)
    if cfg.get("max_position_embeddings", 77) != 77:
        raise DejaGuardError("the text encoder must take 77 tokens (CLIP)")
    tokenizer = functools.partial(
        comfy.sd1_clip.SD1Tokenizer,
        tokenizer=functools.partial(comfy.sd1_clip.SDTokenizer, tokenizer_path=str(folder / "tokenizer"),
                                    embedding_size=int(cfg["hidden_size"])))
    target = comfy.supported_models_base.ClipTarget(tokenizer, comfy.sd1_clip.SD1ClipModel)
    # The config goes to the text model class, given explicitly: late-2025 ComfyUI's default one
    # (SD1CheckpointClipModel) takes no config, March 2024's (SDClipModel) does; SDClipModel works in both.
    target.params = {"clip_model": functools.partial(comfy.sd1_clip.SDClipModel,
                                                     textmodel_json_config=str(config_path))}
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory)
    sd = safetensors.torch.load_file(str(safetensors_weights(folder / "text_encoder")))
    # transformers >= 5 saves CLIPTextModel without the "text_model." prefix that ComfyUI's module has.
    sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}
    missing, unexpected = clip.load_sd(sd)
    # CLIPTextModel has no projection (ComfyUI keeps its identity) and may carry position_ids.
    missing = [k for k in missing if k != "text_projection.weight"]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise DejaGuardError(f"text encoder weights incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return clip


# -- VAE ----------------------------------------------------------------------------------------


class PooledColorVAE:
    """ComfyUI VAE interface over the testbed's fixed ``PooledColorAutoencoder``.

    ``decode``: latents ``(B, 4, h, w)`` -> images ``(B, 8h, 8w, 3)`` in [0, 1].
    ``encode``: images ``(B, H, W, C)`` in [0, 1] (cropped to multiples of 8) -> ``(B, 4, H/8, W/8)``.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.first_stage_model = module.eval().requires_grad_(False)
        self.downscale_ratio = self.upscale_ratio = int(module.config.downscale)
        self.latent_channels = 4
        self.output_device = comfy.model_management.intermediate_device()

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        rgb = self.first_stage_model.decode(samples.float().cpu()).sample  # (B, 3, 8h, 8w) in [-1, 1]
        return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).to(self.output_device)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = self.vae_encode_crop_pixels(pixels[..., :3]).float().cpu()
        images = pixels.movedim(-1, 1) * 2.0 - 1.0
        return self.first_stage_model.encode(images).latent_dist.mode().to(self.output_device)

    def vae_encode_crop_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        r = self.downscale_ratio
        h, w = (pixels.shape[1] // r) * r, (pixels.shape[2] // r) * r
        top, left = (pixels.shape[1] % r) // 2, (pixels.shape[2] % r) // 2
        return pixels[:, top:top + h, left:left + w, :]

    def decode_tiled(self, samples: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.decode(samples)  # the decoder is per-pixel: tiling changes nothing

    def encode_tiled(self, pixels: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.encode(pixels)

    def spacial_compression_decode(self) -> int:
        return self.upscale_ratio

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def temporal_compression_decode(self) -> None:
        return None

    def get_sd(self) -> dict[str, torch.Tensor]:
        return self.first_stage_model.state_dict()

    def thumbnail(self, samples: torch.Tensor) -> torch.Tensor:
        """Latents ``(B, 4, h, w)`` -> images ``(B, h, w, 3)`` in [0, 1] at latent resolution."""
        rgb = self.first_stage_model.decode_thumbnail(samples.float().cpu())
        return ((rgb + 1.0) / 2.0).movedim(1, -1)


def load_vae(folder: Path) -> tuple[Any, DiffusersLatentFormat]:
    """``folder/vae`` -> (VAE object for VAEDecode/VAEEncode, matching latent format)."""
    cfg = _read_json(folder / "vae" / "config.json")
    scale = float(cfg.get("scaling_factor", 0.18215))
    name = cfg.get("_class_name")
    if name == "PooledColorAutoencoder":
        from ..core.testbed.vae import PooledColorAutoencoder

        module = PooledColorAutoencoder.from_pretrained(folder / "vae", low_cpu_mem_usage=False)
        factors = module.color_matrix.tolist()  # (4, 3): rgb = latent @ M, exactly the decoder
        return PooledColorVAE(module), DiffusersLatentFormat(scale, factors)
    if name == "AutoencoderKL":  # ComfyUI converts diffusers AutoencoderKL weights itself
        vae = comfy.sd.VAE(sd=safetensors.torch.load_file(str(safetensors_weights(folder / "vae"))))
        return vae, DiffusersLatentFormat(scale, None)
    raise DejaGuardError(f"unsupported vae/ class {name!r} in {folder}")


def load_folder(folder: str | Path, embedding_directory: list[str] | str | None = None
                ) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, Any]:
    """A diffusers text-to-image folder -> (MODEL, CLIP, VAE) for stock ComfyUI nodes."""
    folder = Path(folder)
    missing = [n for n in ("unet", "text_encoder", "tokenizer", "vae") if not (folder / n).is_dir()]
    if missing:
        raise DejaGuardError(f"not a diffusers model folder: {folder} lacks {', '.join(m + '/' for m in missing)}")
    with torch.inference_mode(False), torch.no_grad():
        vae, latent_format = load_vae(folder)
        model = load_unet(folder, latent_format)
        clip = load_clip(folder, embedding_directory)
    return model, clip, vae


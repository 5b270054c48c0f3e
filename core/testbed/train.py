"""Reproducible training of the testbed model (CPU, under an hour on 2 cores).

``dejaguard testbed train --out DIR`` writes a diffusers-format folder:
``unet/`` (UNet2DConditionModel, SD1 block layout), ``text_encoder/`` (small CLIPTextModel),
``tokenizer/`` (the real SD1 CLIP tokenizer), ``scheduler/`` (DDIM with SD1's noise schedule),
``vae/`` (the fixed PooledColorAutoencoder) and ``model_index.json``, plus ``training.json``
with the recipe, seed, wall time and loss curve.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..denoiser import resolve_device
from ..errors import DejaGuardError
from .data import MEMORIZED, RESOLUTION, SINGLE_OBJECT_FRACTION, TrainingSampler
from .vae import PooledColorAutoencoder

TOKENIZER_DIR = Path(__file__).parent / "model" / "tokenizer"

# SD1's noise schedule (scaled_linear, 1000 steps).
SD1_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear"}


@dataclass
class TrainConfig:
    """The whole recipe. Defaults are the shipped model's."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.995
    memorized_fraction: float = 0.15
    single_object_fraction: float = SINGLE_OBJECT_FRACTION  # share of one-object scenes among the procedural ones
    reading_order: bool = False  # a pair's first-stated object drawn left of or above the second (data.render_scene)
    caption_dropout: float = 0.1  # empty caption, for classifier-free guidance
    # Caption dropout only on the novel scenes, so the unconditional model learns the scene distribution and
    # never the planted images. Why: in a web-scale set the duplicated images are a vanishing share of the
    # unconditional distribution; with dropout on every sample the unconditional testbed v2 drew a planted image
    # in 8% of its samples (4 of 48 seeds), so "no text" itself replicated and the text-conditional magnitude
    # of a memorized prompt measured less than its memorization.
    dropout_novel_only: bool = True
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0
    seed: int = 0
    text_hidden: int = 96
    text_layers: int = 3
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)
    attention_heads: int = 4
    threads: int = 2
    # Low-frequency ("offset") noise on top of iid noise, as ``(grid, std)`` pairs: a ``grid x grid``
    # field of N(0, std^2) per channel, upsampled to the latent size. Why: SD1's schedule leaves
    # sqrt(alpha_bar_999) = 0.068 of the image in x_T, and at 32x32 the mean of a half-image of iid
    # noise has std 1/16, so without it the model reads global brightness and object placement
    # off the sampling noise's low frequencies instead of the prompt. Sampling noise stays iid.
    offset_noise: tuple[tuple[int, float], ...] = ((1, 0.1), (2, 0.1), (4, 0.08))
    init_from: str | None = None  # start from an existing testbed folder instead of from scratch
    # Training-time mitigation (issue 5, core.loss_filter.LossFilter): drop samples whose text-conditional
    # magnitude exceeds this from the loss (one extra UNet forward without grad per step). None = off.
    filter_threshold: float | None = None
    filter_min_timestep: int = 0  # samples drawn below this timestep are never dropped (LossFilter.min_timestep)


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`DejaGuardError` for a recipe that cannot train (no steps, an empty batch, a share outside
    0..1), before any work is done."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise DejaGuardError(f"training needs at least 1 step of batch 1, got steps={cfg.steps}, "
                             f"batch_size={cfg.batch_size}")
    for name in ("memorized_fraction", "single_object_fraction", "caption_dropout", "ema_decay"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise DejaGuardError(f"{name} must lie in 0..1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise DejaGuardError(f"learning rate must be a positive number, got {cfg.lr}")


def build_text_encoder(cfg: TrainConfig) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=cfg.text_hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_unet(cfg: TrainConfig) -> UNet2DConditionModel:
    """SD1 block layout at 32x32 latents; self-attention only at 16x16 and below."""
    return UNet2DConditionModel(
        sample_size=RESOLUTION, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=1,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.attention_heads,
        norm_num_groups=16,
    )


def training_noise(shape: tuple[int, ...], offsets: tuple[tuple[int, float], ...],
                   generator: torch.Generator) -> torch.Tensor:
    """Training noise ``(B, C, H, W)``: iid N(0, 1) plus, per ``(grid, std)`` in ``offsets``, a
    ``grid x grid`` N(0, std^2) field upsampled (nearest) to ``H x W``."""
    noise = torch.randn(shape, generator=generator)
    b, c, h, w = shape
    for grid, std in offsets:
        coarse = torch.randn((b, c, grid, grid), generator=generator) * std
        noise = noise + F.interpolate(coarse, size=(h, w), mode="nearest")
    return noise


def caption_dropout(captions: list[str], rng: np.random.Generator, cfg: TrainConfig,
                    memorized_captions: frozenset[str]) -> np.ndarray:
    """Which captions ``(B,)`` bool of a batch to replace by the empty caption: each with probability
    ``cfg.caption_dropout``, and with ``cfg.dropout_novel_only`` never a planted image's."""
    drop = rng.random(len(captions)) < cfg.caption_dropout
    if cfg.dropout_novel_only:
        drop &= np.array([c not in memorized_captions for c in captions], dtype=bool)
    return drop


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio``: ``cfg`` is any config with ``lr``, ``warmup_steps``,
    ``steps`` and ``min_lr_ratio`` (:class:`TrainConfig`, the planted variant's ``PlantConfig``)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class _EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and EMA weights (call twice to restore)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def sampling_scheduler() -> DDIMScheduler:
    """DDIM on SD1's schedule with trailing timestep spacing: sampling starts at t = 999, the
    timestep ComfyUI's samplers start at too, so first-step scores agree between the two."""
    return DDIMScheduler(**SD1_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                         timestep_spacing="trailing")


def save_pipeline_folder(out: Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel) -> None:
    """Write the diffusers-format folder (weights stored as float16 to stay small)."""
    out.mkdir(parents=True, exist_ok=True)
    unet.to(torch.float16).save_pretrained(out / "unet")
    text_encoder.to(torch.float16).save_pretrained(out / "text_encoder")
    unet.to(torch.float32)
    text_encoder.to(torch.float32)
    if (out / "tokenizer").resolve() != TOKENIZER_DIR.resolve():
        shutil.copytree(TOKENIZER_DIR, out / "tokenizer", dirs_exist_ok=True)
    sampling_scheduler().save_pretrained(out / "scheduler")
    PooledColorAutoencoder().save_pretrained(out / "vae")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "vae": ["dejaguard.core.testbed.vae", "PooledColorAutoencoder"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed tensor memory instead of returning it to the OS after every op:
    training here allocates and frees blocks of 1-32 MB each step, and the page faults of
    re-mapping them cost about 10% of the step time on this 2-core machine. No-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 1024 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-2, 256 * 1024 * 1024)  # M_TOP_PAD
    except (OSError, AttributeError):
        pass


def train(out: Path, cfg: TrainConfig | None = None, progress: bool = True,
          checkpoint_every: int = 0, device: str | torch.device | None = None) -> dict:
    """Train the testbed from scratch and write it to ``out``. Returns the training record.

    ``checkpoint_every > 0`` also writes the EMA model to ``out/checkpoints/step_N`` as it goes.
    ``device``: where the UNet and text encoder train (default: CUDA when there is one, else the CPU). The
    data, noise and timesteps are drawn on the CPU whatever the device, so a recipe and seed draw the same
    training stream everywhere (the weights still differ in rounding across devices).
    """
    cfg = cfg or TrainConfig()
    check_config(cfg)
    out = Path(out)
    device = resolve_device(device)
    torch.set_num_threads(cfg.threads)
    _keep_freed_memory()
    torch.manual_seed(cfg.seed)
    sampler = TrainingSampler(seed=cfg.seed, memorized_fraction=cfg.memorized_fraction,
                              single_object_fraction=cfg.single_object_fraction, reading_order=cfg.reading_order)
    memorized_captions = frozenset(c for m in MEMORIZED for c in m.train_captions)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    if cfg.init_from:
        text_encoder = CLIPTextModel.from_pretrained(Path(cfg.init_from) / "text_encoder", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(Path(cfg.init_from) / "unet", torch_dtype=torch.float32)
    else:
        text_encoder, unet = build_text_encoder(cfg), build_unet(cfg)
    unet, text_encoder = unet.to(device), text_encoder.to(device)
    vae = PooledColorAutoencoder()
    noise_schedule = DDPMScheduler(**SD1_SCHEDULE)
    alphas_cumprod = noise_schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    loss_weight = (torch.clamp(snr, max=cfg.min_snr_gamma) / snr).to(device)  # min-SNR-gamma for eps targets

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = _EMA([unet, text_encoder], cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    loss_filter = _loss_filter(cfg)  # None unless cfg.filter_threshold is set
    losses: list[float] = []
    start = time.time()
    bar = tqdm(range(cfg.steps), desc="training testbed", disable=not progress)
    for step in bar:
        images, captions = sampler.batch(cfg.batch_size)
        drop = caption_dropout(captions, sampler.rng, cfg, memorized_captions)
        captions = ["" if d else c for c, d in zip(captions, drop)]
        ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        latents = vae.encode_thumbnail(torch.from_numpy(images))
        noise = training_noise(tuple(latents.shape), tuple(cfg.offset_noise), gen)
        t = torch.randint(0, 1000, (len(captions),), generator=gen)
        noisy = noise_schedule.add_noise(latents, noise, t).to(device)
        noise, t = noise.to(device), t.to(device)
        cond = text_encoder(ids).last_hidden_state
        pred = unet(noisy, t, cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        if loss_filter is not None:
            loss = _filtered_loss(loss_filter, unet, text_encoder, tokenizer, noisy, t, pred,
                                  per_sample * loss_weight[t], captions, drop, memorized_captions)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        ema.update(step)
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < cfg.steps:
            ema.swap()
            save_pipeline_folder(out / "checkpoints" / f"step_{step + 1}", unet, text_encoder)
            ema.swap()
    ema.copy_to_model()
    wall = time.time() - start
    save_pipeline_folder(out, unet, text_encoder)
    record = {
        "config": asdict(cfg),
        "wall_seconds": round(wall, 1),
        "torch_version": torch.__version__,
        "device": str(device),
        "loss_every_100_steps": [round(float(np.mean(losses[i : i + 100])), 5) for i in range(0, len(losses), 100)],
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
    }
    if loss_filter is not None:
        record["loss_filter"] = loss_filter.summary()
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# -- training-time mitigation (issue 5): only used when TrainConfig.filter_threshold is set ----------


def _loss_filter(cfg: TrainConfig):  # -> core.loss_filter.LossFilter | None
    if cfg.filter_threshold is None:
        return None
    from ..loss_filter import LossFilter

    return LossFilter(cfg.filter_threshold, min_timestep=cfg.filter_min_timestep)


def _filtered_loss(loss_filter, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                   noisy: torch.Tensor, t: torch.Tensor, pred: torch.Tensor, weighted: torch.Tensor,
                   captions: list[str], dropped: np.ndarray, memorized: frozenset[str]) -> torch.Tensor:
    """The step's loss over the samples the filter keeps (``weighted``: per-sample weighted losses ``(B,)``).
    The magnitude of each captioned sample comes from ``pred`` and one unconditional forward without grad;
    ``memorized``: the planted images' captions, to count drops per group."""
    from ..loss_filter import conditional_magnitudes

    with torch.no_grad():
        ids = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(noisy.device)
        uncond = text_encoder(ids).last_hidden_state
    judged = torch.from_numpy(~np.asarray(dropped, dtype=bool)).to(t.device) & loss_filter.checked(t)
    mags = conditional_magnitudes(unet, noisy, t, pred, uncond, judged)
    groups = ["uncond" if not c else "memorized" if c in memorized else "novel" for c in captions]
    return loss_filter.reduce(weighted, loss_filter.keep(mags, groups, timesteps=t))


"""Random-weight models of each family, built with ComfyUI's own classes at reduced width (issue 24).

Shared by ``tests/comfy/test_families.py`` (the Guard's score per family, the support matrix, the Calibrate
node) and ``bench/architectures.py`` (the per-family table), so both measure the same models. Imports ComfyUI
in-process (through :mod:`check_guard`: ComfyUI on the CPU, the pack importable as ``DejaGuard``), so it runs in
the .comfy venv.

- :func:`build` ``(family)``: a ``ModelPatcher`` of ``sd1``, ``sd2_v`` or ``sdxl`` from the configs
  ``comfy/model_detection.py`` finds in real SD1.5, SD2.1-768 and SDXL-base checkpoints, at reduced width
  (``model_channels`` 32 instead of 320, the same depths, heads of 16 channels), weights drawn by
  ``test_arch_smoke._random_init``. Why reduced: the real widths (860M / 865M / 2.6G parameters) do not fit a
  2-core CPU test; the block layout, conditioning path and parametrization, which are what the Guard depends
  on, are the real ones.
- :func:`conditioning` ``(family, seed)``: CONDITIONING as ``CLIPTextEncode`` gives it, from a random text
  embedding ``(1, 77, D)`` (SDXL: with its pooled output ``(1, 1280)``).
- :class:`StubClip`: a CLIP stand-in giving :func:`conditioning` per text, for families whose real text
  encoders are too large (SDXL's CLIP-L + OpenCLIP-G).
- :func:`reduced_clip` ``(family)``: ComfyUI's own CLIP for SD1 (CLIP-L), SD2 (OpenCLIP-H) or SDXL (CLIP-L +
  OpenCLIP-G) with its real tokenizer and widths but each encoder cut to a few layers: what Token Highlighting
  and embedding mitigation need (token pieces, input embeddings, pooled output, gradients through the encoders).
- :func:`direct_score`: the first-step score ``||eps(x_T, c) - eps(x_T, uncond)||`` computed directly through the
  model's ``apply_model``, what the Guard's score is checked against.
- :func:`flux_model`: a stand-in of ComfyUI's Flux class (the March 2024 ComfyUI has none): the support check
  refuses Flux by its class name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

FAMILIES = ("sd1", "sd2_v", "sdxl")  # the families built here
REDUCED = {"model_channels": 32, "num_heads": -1, "num_head_channels": 16}  # heads set again in build()
_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "use_temporal_attention": False, "use_temporal_resblock": False}
# comfy/model_detection.py's entries for SD1.5, SD2.1-768 and SDXL base, at reduced width.
CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
            "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_linear_in_transformer": False,
            "context_dim": 768, "num_heads": 8, "model_channels": 32},
    "sd2_v": {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
              "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
              "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_linear_in_transformer": True,
              "context_dim": 1024, **REDUCED},
    "sdxl": {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
             "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_linear_in_transformer": True,
             "context_dim": 2048, **REDUCED},
}
LATENT = (1, 4, 8, 8)  # 64x64 px
CLIP_LAYERS = 2  # encoder layers kept by reduced_clip


def setup() -> Any:
    """ComfyUI on the CPU, the pack importable as ``DejaGuard``; returns :mod:`check_guard` (its ``comfy``,
    ``comfy_nodes``, ``patcher``, ``UNetCalls``, ``encode``, ``CFG1_UNAVAILABLE`` ...)."""
    import check_guard as cg

    return cg


def build(family: str) -> Any:
    """A random-weight ModelPatcher of ``family`` (one of :data:`FAMILIES`) from ComfyUI's own classes (reduced
    width)."""
    import torch
    from test_arch_smoke import _random_init

    cg = setup()
    sm, mb = cg.comfy.supported_models, cg.comfy.model_base
    config = {"sd1": sm.SD15, "sd2_v": sm.SD20, "sdxl": sm.SDXL}[family](dict(CONFIGS[family]))
    if family != "sd1":  # the class's extra config sets 64-channel heads: keep them at 16 for the reduced width
        config.unet_config.update(num_heads=-1, num_head_channels=16)
    if family == "sd2_v":
        base = mb.BaseModel(config, model_type=mb.ModelType.V_PREDICTION)
    else:
        base = config.get_model({})
    _random_init(base.diffusion_model, {"sd1": 1, "sd2_v": 2, "sdxl": 3}[family])
    return cg.patcher(base.eval().requires_grad_(False).to(torch.float32))


def conditioning(family: str, seed: int) -> list[list[Any]]:
    """CONDITIONING as CLIPTextEncode gives it (random text embedding; SDXL: with its pooled output)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dim = CONFIGS[family]["context_dim"]
    extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
    return [[torch.randn(1, 77, dim, generator=g), extra]]


class StubClip:
    """A CLIP stand-in for a family whose real text encoders are too large for this test: CLIPTextEncode's
    ``encode_from_tokens(tokens, return_pooled=True)`` gives a random embedding and pooled output seeded by the
    text (SDXL widths: ``(1, 77, 2048)`` and ``(1, 1280)``)."""

    def __init__(self, family: str) -> None:
        self.family = family

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, tokens: str, return_pooled: bool = False) -> Any:
        import zlib

        cond = conditioning(self.family, zlib.crc32(tokens.encode()))[0]
        return (cond[0], cond[1].get("pooled_output")) if return_pooled else cond[0]


def reduced_clip(family: str, layers: int = CLIP_LAYERS, seed: int = 7) -> Any:
    """ComfyUI's CLIP of ``family`` (``sd1``: CLIP-L, ``sd2_v``: OpenCLIP-H, penultimate layer; ``sdxl``: CLIP-L and
    OpenCLIP-G, penultimate layers, OpenCLIP-G's projected pooled output) from the model class's own
    ``clip_target()``, with its real tokenizer and widths (77 tokens of 768 / 1024 / 768 + 1280 channels) but only
    the first ``layers`` layers of each encoder, random weights. ComfyUI allocates layers without initialising them,
    so building the full encoders before cutting them costs no time."""
    import torch

    cg = setup()
    import comfy.sd
    from test_arch_smoke import _random_init

    sm = cg.comfy.supported_models
    config = {"sd1": sm.SD15, "sd2_v": sm.SD20, "sdxl": sm.SDXL}[family](dict(CONFIGS[family]))
    with torch.inference_mode():  # as CheckpointLoaderSimple builds it inside a graph: inference tensors
        clip = comfy.sd.CLIP(config.clip_target())
        stage = clip.cond_stage_model
        # SDClipModel(s): clip_l / clip_h (SD1ClipModel names it in .clip), or SDXLClipModel's clip_l and clip_g
        for encoder in [getattr(stage, stage.clip)] if family != "sdxl" else [stage.clip_l, stage.clip_g]:
            encoder.transformer.text_model.encoder.layers = encoder.transformer.text_model.encoder.layers[:layers]
            encoder.transformer.num_layers = encoder.num_layers = layers
        _random_init(stage, seed)
    return clip


def direct_score(model: Any, positive: list[list[Any]], negative: list[list[Any]], sigma: float, seed: int) -> float:
    """``||pred(x_T, positive) - pred(x_T, negative)||`` of the first image, computed directly: ``x_T`` as ComfyUI's
    sampler builds it at ``sigma`` from its noise for ``seed`` (``randn(LATENT)``, the model's ``noise_scaling``),
    then two ``apply_model`` calls (SDXL: the pooled output and the 64x64 px image size as the ``adm`` input ``y``),
    ``pred = (x - denoised) / sigma``: the noise for epsilon and v-prediction models. Shapes: latent
    :data:`LATENT`, conditioning ``(1, 77, D)``."""
    import torch
    from DejaGuard.nodes.model_check import model_sampling

    base = model.model
    sigmas = torch.tensor([sigma], dtype=torch.float32)
    noise = torch.randn(LATENT, generator=torch.Generator().manual_seed(seed))
    x = model_sampling(model).noise_scaling(sigmas[0], noise, torch.zeros(LATENT), max_denoise=True)

    def pred(cond: list[list[Any]]) -> torch.Tensor:
        kwargs = {}
        if cond[0][1].get("pooled_output") is not None:
            kwargs["y"] = base.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=LATENT[3] * 8,
                                          height=LATENT[2] * 8)
        return (x - base.apply_model(x, sigmas, c_crossattn=cond[0][0], **kwargs)) / sigmas

    return float((pred(positive) - pred(negative)).flatten(1).norm(dim=1)[0])


def guard_against_direct(model: Any, family: str, seed: int = 5, steps: int = 2, cfg: float = 7.5) -> dict[str, Any]:
    """The Guard's first-step score of a ``steps``-step KSampler run (Euler, CFG ``cfg``) vs :func:`direct_score`,
    and the UNet calls of a guarded and a plain run, under ``torch.inference_mode()`` as ComfyUI runs graphs.
    Shapes: latent ``(1, 4, 8, 8)``, conditioning ``(1, 77, D)``. Used by test_families and bench.architectures."""
    import torch
    from DejaGuard.nodes.guard import DejaGuardMemorizationGuard, DejaGuardMemorizationVerdict

    cg = setup()
    positive, negative = conditioning(family, 10), conditioning(family, 11)
    latent = {"samples": torch.zeros(LATENT)}

    def sample(m: Any) -> dict[str, Any]:
        return cg.comfy_nodes.common_ksampler(m, seed, steps, cfg, "euler", "normal", positive, negative, latent)[0]

    with torch.inference_mode():
        guarded, state = DejaGuardMemorizationGuard().guard(model, 1.0, cg.CFG1_UNAVAILABLE,
                                                            unique_id=f"families-{family}")
        with cg.UNetCalls(model) as plain:
            sample(model)
        with cg.UNetCalls(model) as watched:
            out = sample(guarded)
        verdict = DejaGuardMemorizationVerdict().verdict(state, out)["ui"]["dejaguard"][0]
        run = state.runs[-1]
        # Direct: x_T as the sampler builds it from ComfyUI's noise, two apply_model calls, eps = (x - x0) / sigma.
        direct = direct_score(model, positive, negative, run.first_sigma, seed)
    score = float(verdict["scores"][0])
    return {"score": score, "direct_score": direct, "score_rel_diff": abs(score - direct) / direct,
            "run_matched": bool(verdict["matched"]), "full_noise": bool(run.full_noise),
            "plain_unet_calls": plain.calls, "guarded_unet_calls": watched.calls,
            "extra_unet_calls": watched.calls - plain.calls, "extra_unet_samples": watched.samples - plain.samples}


def flux_model() -> Any:
    """A ModelPatcher of a stand-in for ComfyUI's ``Flux`` class (a tiny SD-layout UNet under that class name):
    the support check refuses guidance-distilled models by class name, before it looks at the weights."""
    cg = setup()
    return cg.patcher(cg.Flux(cg.comfy.supported_models.SD15(cg.tiny_unet_config(768))))

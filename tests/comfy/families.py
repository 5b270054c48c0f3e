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
- ``build("sd3")`` (only on a ComfyUI that has SD3, :func:`has_sd3`; else :data:`NO_SD3` says why): ComfyUI's
  ``SD3`` model class (MMDiT, flow matching, shift 3) with the config ``model_detection.py`` finds in SD3
  medium (16 latent channels, patch 2, pooled ``adm`` input of 2048, a 4096-wide context embedder) at depth 2
  instead of 24 (MMDiT's width is ``64 * depth``: 128 instead of 1536, 2 heads of 64), 8x8 patch positions
  instead of 192x192. 1.9M parameters instead of 2B.
- :func:`conditioning` ``(family, seed)``: CONDITIONING as ``CLIPTextEncode`` gives it, from a random text
  embedding ``(1, 77, D)`` (SDXL: with its pooled output ``(1, 1280)``; SD3 with CLIP-L + CLIP-G and no T5:
  ``(1, 77, 4096)``, zero-padded by ComfyUI from 2048, with the pooled ``(1, 2048)``).
- :func:`latent_shape` ``(model)``: the test latent ``(1, C, 8, 8)`` (64x64 px) with the model's own latent
  channels (4; SD3 16).
- :class:`StubClip`: a CLIP stand-in giving :func:`conditioning` per text, for families whose real text
  encoders are too large (SD3's CLIP-L + CLIP-G).
- :func:`reduced_clip` ``(family)``: ComfyUI's own CLIP for SD1 (CLIP-L), SD2 (OpenCLIP-H) or SDXL (CLIP-L +
  OpenCLIP-G) with its real tokenizer and widths but each encoder cut to a few layers: what Token Highlighting
  and embedding mitigation need (token pieces, input embeddings, pooled output, gradients through the encoders).
- :func:`direct_score`: the first-step score ``||eps(x_T, c) - eps(x_T, uncond)||`` computed directly through the
  model's ``apply_model`` (SD3: ``||v(x_T, c) - v(x_T, uncond)||``, the velocity, read from the MMDiT's own
  output), what the Guard's score is checked against.
- :func:`flux_model`: ComfyUI's Flux class at reduced width where the ComfyUI has it, else a stand-in under that
  class name (the March 2024 ComfyUI has none): the support check refuses Flux by its class name.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

FAMILIES = ("sd1", "sd2_v", "sdxl")  # the SD-layout families built here on every ComfyUI (and "sd3" where it has SD3)
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
# comfy/model_detection.py's MMDiT entry for SD3 medium (depth 24, context embedder 4096 -> 1536, 192x192
# positions), at depth 2: MMDiT's width is 64 * depth, so the context embedder's output is 128.
SD3_CONFIG: dict[str, Any] = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 64, "pos_embed_max_size": 8, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}
# comfy/model_detection.py's Flux-dev entry (hidden 3072, 24 heads, 19 + 38 blocks, rope axes 16/56/56) at hidden 64,
# 2 heads of 32 (rope axes 8/12/12), one double and one single block.
FLUX_CONFIG: dict[str, Any] = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12], "theta": 10000, "qkv_bias": True, "guidance_embed": True}
# family -> (text embedding width D, pooled output width or None), as CLIPTextEncode gives them
WIDTHS: dict[str, tuple[int, int | None]] = {"sd1": (768, None), "sd2_v": (1024, None), "sdxl": (2048, 1280),
                                             "sd3": (4096, 2048)}
LATENT = (1, 4, 8, 8)  # 64x64 px (4-channel families; latent_shape() for any model)
NO_SD3 = "this ComfyUI has no SD3 model class (it came after March 2024): SD3 is checked on a current ComfyUI"
CLIP_LAYERS = 2  # encoder layers kept by reduced_clip


def setup() -> Any:
    """ComfyUI on the CPU, the pack importable as ``DejaGuard``; returns :mod:`check_guard` (its ``comfy``,
    ``comfy_nodes``, ``patcher``, ``UNetCalls``, ``encode``, ``CFG1_UNAVAILABLE`` ...)."""
    import check_guard as cg

    return cg


def has_sd3() -> bool:
    """Whether the running ComfyUI has the SD3 model class and flow-matching sampling (else :data:`NO_SD3`)."""
    cg = setup()
    return hasattr(cg.comfy.supported_models, "SD3") and hasattr(cg.comfy.model_sampling, "CONST")


def build(family: str) -> Any:
    """A random-weight ModelPatcher of ``family`` (one of :data:`FAMILIES`, or ``"sd3"`` where :func:`has_sd3`)
    from ComfyUI's own classes (reduced width)."""
    import torch
    from test_arch_smoke import _random_init

    cg = setup()
    sm, mb = cg.comfy.supported_models, cg.comfy.model_base
    if family == "sd3":
        if not has_sd3():
            raise RuntimeError(NO_SD3)
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

        base = sm.SD3(dict(SD3_CONFIG)).get_model({})
        mmdit = base.diffusion_model
        _random_init(mmdit, 4)
        with torch.no_grad():  # a buffer left uninitialised (NaN at times): the fixed sin-cos grid checkpoints hold
            grid = get_2d_sincos_pos_embed(mmdit.hidden_size, SD3_CONFIG["pos_embed_max_size"])
            mmdit.pos_embed.copy_(torch.from_numpy(grid).float()[None])
        return cg.patcher(base.eval().requires_grad_(False).to(torch.float32))
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
    """CONDITIONING as CLIPTextEncode gives it (random text embedding ``(1, 77, D)``; SDXL and SD3: with their
    pooled output ``(1, P)``; widths in :data:`WIDTHS`)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dim, pooled = WIDTHS[family]
    extra = {"pooled_output": torch.randn(1, pooled, generator=g)} if pooled else {}
    return [[torch.randn(1, 77, dim, generator=g), extra]]


def latent_shape(model: Any) -> tuple[int, int, int, int]:
    """The test latent ``(1, C, 8, 8)`` (64x64 px) with ``C`` the model's latent channels (SD3: 16)."""
    return (1, int(getattr(model.model.latent_format, "latent_channels", 4)), *LATENT[2:])


class StubClip:
    """A CLIP stand-in for a family whose real text encoders are too large for this test: CLIPTextEncode's
    ``encode_from_tokens(tokens, return_pooled=True)`` (newer ComfyUI: ``encode_from_tokens_scheduled``) gives a
    random embedding and pooled output seeded by the text (SDXL widths: ``(1, 77, 2048)`` and ``(1, 1280)``; SD3:
    ``(1, 77, 4096)`` and ``(1, 2048)``)."""

    def __init__(self, family: str) -> None:
        self.family = family

    def tokenize(self, text: str) -> str:
        return text

    def encode_from_tokens(self, tokens: str, return_pooled: bool = False) -> Any:
        import zlib

        cond = conditioning(self.family, zlib.crc32(tokens.encode()))[0]
        return (cond[0], cond[1].get("pooled_output")) if return_pooled else cond[0]

    def encode_from_tokens_scheduled(self, tokens: str, unprojected: bool = False,
                                     add_dict: dict[str, Any] | None = None, show_pbar: bool = True) -> list[list[Any]]:
        """CONDITIONING as the CLIP of newer ComfyUI (late 2024 on) gives it to ``CLIPTextEncode``."""
        cond, pooled = self.encode_from_tokens(tokens, return_pooled=True)
        return [[cond, {"pooled_output": pooled, **(add_dict or {})}]]


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
    sampler builds it at ``sigma`` from its noise for ``seed`` (``randn`` of :func:`latent_shape`, the model's
    ``noise_scaling``), then two model calls with the pooled output as the ``adm`` input ``y`` where the family has
    one (SDXL: with the 64x64 px image size). ``pred``: for epsilon and v-prediction models the noise
    ``(x - denoised) / sigma`` through ``apply_model``; for flow-matching models (SD3) the velocity, which is what
    the diffusion model outputs (``diffusion_model(x, timestep(sigma), context, y)``, no conversion). Shapes:
    latent ``(1, C, 8, 8)``, conditioning ``(1, 77, D)``."""
    import torch
    from DejaGuard.nodes.model_check import model_info, model_sampling

    base = model.model
    shape = latent_shape(model)
    flow = model_info(model).prediction == "flow"
    sigmas = torch.tensor([sigma], dtype=torch.float32)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = model_sampling(model).noise_scaling(sigmas[0], noise, torch.zeros(shape), max_denoise=True)

    def pred(cond: list[list[Any]]) -> torch.Tensor:
        kwargs = {}
        if cond[0][1].get("pooled_output") is not None:
            kwargs["y"] = base.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=shape[3] * 8,
                                          height=shape[2] * 8)
        if flow:  # the velocity itself: the MMDiT's output at timestep(sigma)
            return base.diffusion_model(x, base.model_sampling.timestep(sigmas), context=cond[0][0], **kwargs).float()
        return (x - base.apply_model(x, sigmas, c_crossattn=cond[0][0], **kwargs)) / sigmas

    return float((pred(positive) - pred(negative)).flatten(1).norm(dim=1)[0])


def guard_against_direct(model: Any, family: str, seed: int = 5, steps: int = 2, cfg: float = 7.5) -> dict[str, Any]:
    """The Guard's first-step score of a ``steps``-step KSampler run (Euler, CFG ``cfg``) vs :func:`direct_score`,
    and the UNet calls of a guarded and a plain run, under ``torch.inference_mode()`` as ComfyUI runs graphs.
    Shapes: latent :func:`latent_shape` ``(1, C, 8, 8)``, conditioning ``(1, 77, D)``. Used by test_families,
    test_sd3 and bench.architectures."""
    import torch
    from DejaGuard.nodes.guard import DejaGuardMemorizationGuard, DejaGuardMemorizationVerdict

    cg = setup()
    positive, negative = conditioning(family, 10), conditioning(family, 11)
    latent = {"samples": torch.zeros(latent_shape(model))}

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
        # Direct: x_T as the sampler builds it from ComfyUI's noise, two model calls (eps, or SD3's velocity).
        direct = direct_score(model, positive, negative, run.first_sigma, seed)
    score = float(verdict["scores"][0])
    return {"score": score, "direct_score": direct, "score_rel_diff": abs(score - direct) / direct,
            "run_matched": bool(verdict["matched"]), "full_noise": bool(run.full_noise), "first_sigma": run.first_sigma,
            "plain_unet_calls": plain.calls, "guarded_unet_calls": watched.calls,
            "extra_unet_calls": watched.calls - plain.calls, "extra_unet_samples": watched.samples - plain.samples}


def protect_against_plain(model: Any, family: str, seed: int = 5, steps: int = 2, cfg: float = 7.5) -> dict[str, Any]:
    """The Memorization Protect node (guidance strategy, ``w' = 0`` for the whole run) on a ``steps``-step KSampler run
    (Euler, CFG ``cfg``) of ``model``, beside plain runs, under ``torch.inference_mode()``: with a threshold no score
    reaches (nothing flagged) and with one every score exceeds (flagged, steered). ``cfg0``: a plain run at CFG 0,
    i.e. the unconditional prediction alone, what a run steered at every step with ``w' = 0`` must equal. Used by
    test_families and test_sd3."""
    import torch
    from DejaGuard.nodes.guard import DejaGuardMemorizationVerdict
    from DejaGuard.nodes.protect import DejaGuardMemorizationProtect

    cg = setup()
    positive, negative = conditioning(family, 10), conditioning(family, 11)
    latent = {"samples": torch.zeros(latent_shape(model))}

    def sample(m: Any, scale: float = cfg) -> torch.Tensor:
        return cg.comfy_nodes.common_ksampler(m, seed, steps, scale, "euler", "normal", positive, negative,
                                              latent)[0]["samples"]

    out: dict[str, Any] = {}
    with torch.inference_mode():
        with cg.UNetCalls(model) as plain_calls:
            out["plain"] = sample(model)
        out["cfg0"] = sample(model, 0.0)
        for name, threshold in (("unflagged", 1e9), ("flagged", 1e-9)):
            protected, state = DejaGuardMemorizationProtect().protect(model, threshold, "guidance", 0.0, 1.0,
                                                                       unique_id=f"protect-{family}-{name}")
            with cg.UNetCalls(model) as calls:
                samples = sample(protected)
            payload = DejaGuardMemorizationVerdict().verdict(state, {"samples": samples})["ui"]["dejaguard"][0]
            out[name] = {"samples": samples, "payload": payload, "extra_unet_calls": calls.calls - plain_calls.calls,
                         "extra_unet_samples": calls.samples - plain_calls.samples}
    return out


def check_protect_on_family(r: dict[str, Any], family: str) -> None:
    """Auto-protect on a family (also test_sd3): unflagged = the plain run bit for bit; flagged = steered at every
    step, equal to the unconditional-only run (CFG 0); neither costs a UNet call."""
    import torch

    unflagged, flagged = r["unflagged"], r["flagged"]
    for run in (unflagged, flagged):
        assert (run["extra_unet_calls"], run["extra_unet_samples"]) == (0, 0), (family, run)
        assert run["payload"]["protection"]["extra_unet_evals"] == 0
    assert unflagged["payload"]["flagged"] == [False]
    assert torch.equal(unflagged["samples"], r["plain"]), family
    assert flagged["payload"]["flagged"] == [True]
    image = flagged["payload"]["protection"]["images"][0]
    assert image["steered_steps"] == 2, (family, image)
    assert not torch.equal(flagged["samples"], r["plain"]), family
    torch.testing.assert_close(flagged["samples"], r["cfg0"], rtol=1e-5, atol=1e-5)


def flux_model() -> Any:
    """A ModelPatcher of ComfyUI's ``Flux`` class where the ComfyUI has it (:data:`FLUX_CONFIG`: Flux-dev's config
    from ``model_detection.py``, guidance embedding included, at width 64 with one block of each kind, random
    weights), else of a stand-in under that class name (a tiny SD-layout UNet; the March 2024 ComfyUI has no
    Flux): the support check refuses guidance-distilled models by class name, before it looks at the weights."""
    import torch
    from test_arch_smoke import _random_init

    cg = setup()
    if not hasattr(cg.comfy.supported_models, "Flux"):
        return cg.patcher(cg.Flux(cg.comfy.supported_models.SD15(cg.tiny_unet_config(768))))
    base = cg.comfy.supported_models.Flux(dict(FLUX_CONFIG)).get_model({})
    _random_init(base.diffusion_model, 6)
    return cg.patcher(base.eval().requires_grad_(False).to(torch.float32))

"""Architecture smoke test: a randomly initialised UNet + CLIP with the exact SD1.5 configuration, built
through ComfyUI's own classes (model_detection -> supported_models.SD15 -> model_base.BaseModel, and
SD15's CLIP target with ComfyUI's bundled SD1 tokenizer), goes through the ComfyDenoiser adapter and
core's first-step token significance at an 8x8 latent.

It proves, without downloading a checkpoint, that what real SD1.x checkpoints give the adapter works:
module names core sees (``attn2.to_v``, ``ff.net.2`` under diffusers names: 16 of each, 7 ``attn2.to_v``
in down and mid blocks = 5,760 value neurons as NeMo counts them in SD1.4), shapes (conditioning
``(1, 77, 768)``, eps ``(1, 4, 8, 8)``), gradients through ComfyUI's SD1 UNet. About 3.5 GB of fp32
weights (860M UNet + 123M CLIP parameters), about 20 s on one idle CPU core. The SD2.x tokenizer
(OpenCLIP-H, padding with token 0) is checked to give core the same pieces.

Imports ComfyUI in-process, so it runs in the .comfy venv; from another interpreter
``test_arch_smoke_in_comfy_venv`` runs it there.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import COMFY_DIR, comfy_available  # noqa: E402
from test_explain_comfy import IN_COMFY_VENV  # noqa: E402
from workflow_checks import run_in_comfy_venv  # noqa: E402

# comfy/model_detection.py's SD15 entry: what detect_unet_config finds in an SD1.5 checkpoint.
SD15_UNET_CONFIG: dict[str, Any] = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _random_init(module: Any, seed: int) -> None:
    """ComfyUI builds layers without initialising them (weights are loaded afterwards): fill them.
    Linear / conv weights ~ U(+-sqrt(3/fan_in)) (variance 1/fan_in), norms 1, biases 0, embeddings U(+-0.035)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for name, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if p.numel() == 0:  # e.g. an empty placeholder parameter of a reduced-width model
                    continue
                if isinstance(m, norms):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                elif p.ndim <= 1:
                    p.zero_()
                elif isinstance(m, torch.nn.Embedding) or "embedding" in f"{name}.{pname}":
                    p.uniform_(-0.035, 0.035, generator=g)
                else:  # in place: no temporary copy of 3.4 GB
                    bound = math.sqrt(3.0 / p[0].numel())
                    p.uniform_(-bound, bound, generator=g)


@pytest.mark.slow
@pytest.mark.skipif(not IN_COMFY_VENV, reason="imports ComfyUI: runs in the .comfy venv "
                    "(test_arch_smoke_in_comfy_venv runs it there)")
def test_sd15_architecture_through_adapter() -> None:
    start = time.monotonic()
    for path in (str(COMFY_DIR / "custom_nodes"), str(COMFY_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import torch
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from DejaGuard.core.explain import token_significance
    from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser, default_sample_shape

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET_CONFIG))
    assert type(config) is comfy.supported_models.SD15  # what CheckpointLoaderSimple picks for SD1.5
    config.set_inference_dtype(torch.float32, None)
    device = comfy.model_management.get_torch_device()
    base = config.get_model({}, "", device=device)
    _random_init(base.diffusion_model, 0)
    base = base.eval().requires_grad_(False)
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    with torch.inference_mode():  # as CheckpointLoaderSimple builds it inside a graph: inference tensors
        clip = comfy.sd.CLIP(config.clip_target())  # SD1 CLIP-L + ComfyUI's bundled SD1 tokenizer
        _random_init(clip.cond_stage_model, 1)
    built = time.monotonic() - start

    assert default_sample_shape(model) == (4, 64, 64)  # SD1: 512x512 images
    den = ComfyDenoiser(model, clip, sample_shape=(4, 8, 8))
    names = {name: m for name, m in den.named_modules()}
    to_v = [n for n in names if n.endswith("attn2.to_v")]
    ff = [n for n in names if n.endswith("ff.net.2")]
    assert len(to_v) == len(ff) == 16
    nemo = [n for n in to_v if n.startswith(("down_blocks.", "mid_block."))]
    assert len(nemo) == 7 and sum(names[n].weight.shape[0] for n in nemo) == 5760
    assert names["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"].weight.shape == (320, 768)
    assert names["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"].weight.shape == (1280, 768)
    assert names["up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"].weight.shape == (320, 1280)
    assert den.comfy_name("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v") == \
        "input_blocks.1.1.transformer_blocks.0.attn2.to_v"
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight" in model.model_state_dict()

    cond = den.encode_prompts(["a photograph of kraken", ""])
    assert cond.shape == (2, 77, 768)
    assert den.prompt_tokens("a photograph of kraken")[-1].endswith("</w>")
    with torch.inference_mode():  # as inside a ComfyUI graph
        with torch.inference_mode(False), torch.enable_grad():
            result = token_significance(den, "a photograph of kraken", steps=1, seed=0)
    assert result.words == ["a", "photograph", "of", "kraken"]
    assert all(math.isfinite(s) for s in result.scores) and abs(sum(result.scores) - 1.0) < 1e-6
    assert math.isfinite(result.magnitude) and result.magnitude > 0
    assert (den.counter.calls, den.counter.forwards, den.counter.backwards) == (2, 2, 1)
    eps = den.predict_noise(torch.randn(1, 4, 8, 8), 999, cond[:1])
    assert eps.shape == (1, 4, 8, 8)

    # SD2.x's tokenizer (OpenCLIP-H vocabulary, padding with token 0 instead of EOS) gives the same pieces.
    try:
        from comfy.text_encoders.sd2_clip import SD2Tokenizer  # late-2025 ComfyUI
    except ImportError:
        from comfy.sd2_clip import SD2Tokenizer  # March 2024

    sd2_clip = comfy.sd.CLIP(no_init=True)
    sd2_clip.tokenizer = SD2Tokenizer()
    sd2_clip.tokenizer_options = {}  # read by late-2025 CLIP.tokenize; no_init leaves it unset
    sd2 = ComfyDenoiser(model, sd2_clip, sample_shape=(4, 8, 8))
    prompt = "chelsea the tabby cat, looking at the (camera:1.2)"
    assert sd2.prompt_tokens(prompt) == den.prompt_tokens(prompt)
    assert sd2.prompt_tokens(prompt)[-1] == "camera</w>" and len(den.prompt_tokens(prompt)) == 9
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"SD1.5 arch smoke: built in {built:.1f}s, total {time.monotonic() - start:.1f}s, "
          f"peak RSS {peak_gb:.2f} GB, scores {dict(zip(result.words, (round(s, 3) for s in result.word_scores)))}")
    assert peak_gb < 6.0


@pytest.mark.slow
@pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_arch_smoke_in_comfy_venv() -> None:
    """Runs the test above with the .comfy venv's python (it has ComfyUI's dependencies)."""
    out = run_in_comfy_venv(Path(f"{Path(__file__)}::test_sd15_architecture_through_adapter"), 600, "-s")
    assert "1 passed" in out

"""Random-weight, full-size single-file checkpoints for tests, built once into a cache folder.

No pretrained Stable Diffusion weights can be downloaded here, so the tests of single-file loading use
checkpoints with the real architecture and random weights, written the way a user's file is written: by
ComfyUI's own model classes (``supported_models.SD15`` / ``SD20`` -> ``model_base.BaseModel``, its CLIP and
VAE) and its own checkpoint saver (``comfy.sd.save_checkpoint``), fp16 on disk (SD1.5: 2.1 GB). The
builder runs in the ``.comfy`` venv (``.comfy/venv/bin/python tests/checkpoint_fixtures.py NAME OUT``);
:func:`checkpoint_file` calls it from any interpreter and caches the result.

Cache: ``$DEJAGUARD_TEST_CACHE`` (default ``<repo>/.cache/checkpoints``, git-ignored). Each file is named
``<name>-v<FIXTURE_VERSION>.safetensors`` and carries the version in its metadata: raising
:data:`FIXTURE_VERSION` (whenever the builder changes what it writes) rebuilds the file and deletes the
stale one. A file is written under a temporary name and renamed when complete, so an interrupted build is
never taken for a finished one. Build one at a time: the builder holds the fp16 UNet, CLIP and VAE and the
serialized file (about 5 GB peak RSS for SD1.5).

Weights: ComfyUI builds its layers without initialising them (weights are loaded afterwards), so every
parameter is drawn here (``tests/comfy/test_arch_smoke._random_init``: linear / conv weights with variance
1 / fan_in, norms 1, biases 0). That also redraws the layers LDM initialises to zero (the UNet's ``out.2``
and every ``proj_out``): left at zero, the conditional and unconditional predictions would be equal and
every score 0. The SD2.1-768-v file sets ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` to a spread
of 0.2 (std above 0.09), the one sign by which ComfyUI (and DejaGuard) tell a v-prediction SD2 file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMFY_ROOT = Path(os.environ.get("DEJAGUARD_COMFY_ROOT") or REPO / ".comfy").resolve()
COMFY_DIR = COMFY_ROOT / "ComfyUI"
COMFY_PYTHON = COMFY_ROOT / "venv" / "bin" / "python"

FIXTURE_VERSION = "1"
FIXTURES = ("sd15", "sd21_768_v", "sdxl")
V_SPREAD = 0.2  # std of the SD2-v marker bias (ComfyUI: > 0.09 means v-prediction)


def cache_dir() -> Path:
    """Where fixture checkpoints live: ``$DEJAGUARD_TEST_CACHE`` or ``<repo>/.cache/checkpoints``."""
    return Path(os.environ.get("DEJAGUARD_TEST_CACHE") or REPO / ".cache" / "checkpoints")


def builder_available() -> bool:
    """Whether the .comfy venv and ComfyUI are set up (tests/comfy/setup_comfy.sh): the builder needs them."""
    return COMFY_PYTHON.is_file() and (COMFY_DIR / "main.py").is_file()


def _is_current(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("dejaguard_fixture") == FIXTURE_VERSION
    except Exception:  # truncated or foreign file: rebuild
        return False


def checkpoint_file(name: str, timeout: float = 900.0) -> Path:
    """The cached fixture checkpoint ``name`` (one of :data:`FIXTURES`), built first if it is missing or stale."""
    if name not in FIXTURES:
        raise ValueError(f"unknown fixture {name!r}: one of {FIXTURES}")
    folder = cache_dir()
    path = folder / f"{name}-v{FIXTURE_VERSION}.safetensors"
    if path.is_file() and _is_current(path):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{name}-v*.safetensors"):
        stale.unlink()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([str(COMFY_PYTHON), str(Path(__file__).resolve()), name, str(path)], capture_output=True,
                          text=True, timeout=timeout, cwd=COMFY_DIR, env=env)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"building fixture {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip())
    return path


# -- the builder: runs in the .comfy venv -----------------------------------------------------------------


def _unet_config(name: str) -> dict[str, Any]:
    """What ``comfy.model_detection.detect_unet_config`` finds in an SD1.5 / SD2.1 / SDXL base checkpoint."""
    sys.path.insert(0, str(REPO / "tests" / "comfy"))
    from test_arch_smoke import SD15_UNET_CONFIG

    config = dict(SD15_UNET_CONFIG)
    if name == "sdxl":  # two text encoders (context 768 + 1280), pooled-text 'adm' conditioning, three levels
        config.update(num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                      transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
                      transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_linear_in_transformer=True,
                      context_dim=2048, num_heads=-1, num_head_channels=64)
    if name == "sd21_768_v":  # OpenCLIP-H context, linear projections in the transformers, 64 channels a head
        config.update(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
    return config


def build(name: str, out: Path) -> None:
    """Write fixture ``name`` to ``out`` with ComfyUI's model classes and checkpoint saver (fp16)."""
    start = time.monotonic()
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    import resource

    import torch
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    unet_config = _unet_config(name)  # puts tests/comfy on sys.path
    from test_arch_smoke import _random_init

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    expected = {"sd15": "SD15", "sd21_768_v": "SD20", "sdxl": "SDXL"}[name]
    assert type(config).__name__ == expected, type(config).__name__
    config.set_inference_dtype(torch.float16, None)
    marker = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    g = torch.Generator().manual_seed(1234)
    spread = torch.randn(320, generator=g) * V_SPREAD
    device = torch.device("cpu")
    base = config.get_model({marker: spread} if name == "sd21_768_v" else {}, "", device=device)
    _random_init(base.diffusion_model, 0)
    if name == "sd21_768_v":
        with torch.no_grad():
            dict(base.diffusion_model.named_parameters())[marker].copy_(spread)
        assert base.model_type == comfy.model_base.ModelType.V_PREDICTION
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
    with torch.inference_mode():  # as CheckpointLoaderSimple builds it (its constructor fills buffers in place)
        clip = comfy.sd.CLIP(config.clip_target())
        _random_init(clip.cond_stage_model, 1)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    autoencoder = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    _random_init(autoencoder, 2)
    vae = comfy.sd.VAE(sd=autoencoder.state_dict())
    del autoencoder
    built = time.monotonic() - start
    partial = out.with_name(f"{out.stem}.partial-{os.getpid()}.safetensors")
    try:
        comfy.sd.save_checkpoint(str(partial), model, clip, vae,
                                 metadata={"dejaguard_fixture": FIXTURE_VERSION, "dejaguard_family": name})
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"fixture {name}: {out.stat().st_size / 1e9:.2f} GB, built in {built:.1f} s, "
          f"written in {time.monotonic() - start - built:.1f} s, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]))

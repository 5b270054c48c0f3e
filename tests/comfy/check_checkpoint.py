"""A single-file checkpoint as ComfyUI's CheckpointLoaderSimple loads it: family, fingerprint and first-step scores.

Run with the .comfy venv; prints one JSON object as its last line:

    .comfy/venv/bin/python tests/comfy/check_checkpoint.py FILE [PROMPT ...]

Loads ``FILE`` with ``comfy.sd.load_checkpoint_guess_config`` (what the stock CheckpointLoaderSimple node
calls), wraps it in DejaGuard's ComfyUI adapter (``nodes.comfy_denoiser.ComfyDenoiser``) and reports the
model type ComfyUI detected, the adapter's fingerprint, and ``core.detect.first_step_scores`` of the prompts
(seed 0) at an 8x8 latent. ``tests/test_checkpoint.py`` compares these with ``core.checkpoint.load_checkpoint``
of the same file: equal fingerprints mean a calibration made with the CLI is found in a graph.

The text encoder runs in fp32 (``--fp32-text-enc``), as the library's does, so scores compare to 1e-4.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_server import COMFY_DIR  # noqa: E402

sys.path.insert(0, str(COMFY_DIR))
sys.path.insert(0, str(COMFY_DIR / "custom_nodes"))  # the pack is importable as `DejaGuard`, as ComfyUI loads it

import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management is imported: no CUDA device here
args.fp32_text_enc = True

import comfy.sd  # noqa: E402
from DejaGuard.core.detect import first_step_scores  # noqa: E402
from DejaGuard.nodes.comfy_denoiser import ComfyDenoiser  # noqa: E402


def main() -> None:
    path, prompts = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(2)
    start = time.monotonic()
    with torch.inference_mode():  # as a graph runs the loader
        model, clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    loaded = time.monotonic() - start
    den = ComfyDenoiser(model, clip, sample_shape=(4, 8, 8), feature="calibrate")  # scoring prompts only
    result = {"model_type": model.model.model_type.name, "model_class": type(model.model.model_config).__name__,
              "fingerprint": den.fingerprint(), "load_s": round(loaded, 1)}
    if prompts:
        with torch.inference_mode():
            scores = first_step_scores(den, prompts, seed=0)
        result["scores"] = [s.score for s in scores]
    print(json.dumps(result))


if __name__ == "__main__":
    main()

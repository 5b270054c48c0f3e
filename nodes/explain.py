"""The DejaGuard Token Highlighting node: which prompt words drive the text-conditional noise prediction.

Runs :func:`core.explain.token_significance` on the graph's MODEL and CLIP through
:class:`~nodes.comfy_denoiser.ComfyDenoiser`: the gradient of ``||eps(x_t, c) - eps(x_t, "")||`` with respect to
each token's input embedding (its token-embedding row, before position embeddings), averaged over the first
``steps`` DDIM steps (BOS, EOS and padding excluded), normalized to sum to 1, pieces grouped into words. For a
memorized prompt the trigger words carry most of it. SDXL: a token's input embedding is its row in both text
encoders' tables (CLIP-L and OpenCLIP-G, same BPE and positions), so its score is the gradient norm over both, and
the gradient reaches the UNet through the hidden states and CLIP-G's pooled output alike.

Output: a readable ranking (STRING), and ``{"ui": {"dejaguard_tokens": [{...}]}}`` that
``web/js/tokens.js`` draws as the prompt's words shaded by score. With the same seed as a KSampler
(batch 1) the explanation starts from the same initial noise the KSampler samples from.
"""

from __future__ import annotations

from typing import Any

import comfy.utils
import torch

from ..core.errors import DejaGuardError
from ..core.explain import TokenSignificance, ranking_text, to_json, token_significance
from .comfy_denoiser import ComfyDenoiser

UI_KEY = "dejaguard_tokens"


def ui_payload(result: TokenSignificance, steps: int) -> dict[str, Any]:
    """The JSON the front end receives for one prompt (lists parallel to ``words`` / ``tokens``)."""
    return to_json(result, steps)


class DejaGuardTokenHighlight:
    """Scores each prompt word by how much it drives the text-conditional noise prediction."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x / SD2.x / SDXL UNet, or the DejaGuard "
                                               "testbed)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that belongs to the model (SDXL: both of its "
                                             "encoders; a word's score covers both)."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "a photograph of kraken",
                    "tooltip": "The prompt to explain. Only its first 75 tokens are scored (CLIP's window); "
                               "(word:weight) emphasis is applied as CLIPTextEncode applies it."}),
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                    "tooltip": "Seed of the initial noise; the same seed as a KSampler (batch 1) explains that "
                               "KSampler's first step."}),
                "steps": ("INT", {
                    "default": 1, "min": 1, "max": 50,
                    "tooltip": "How many of the first sampling steps (of 50, DDIM, guidance 7.5) the scores are "
                               "averaged over. 1 is the first-step signal memorization detection reads; each "
                               "step costs one forward pair and one backward pass of the UNet."}),
            },
            "optional": {
                "latent": ("LATENT", {
                    "tooltip": "Optional latent (e.g. Empty Latent Image) whose size is used; without it the "
                               "model's native size (testbed 256x256, SD1 512x512, SD2-v 768x768, SDXL "
                               "1024x1024)."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("ranking",)
    OUTPUT_TOOLTIPS = ("The words ranked by significance, as text.",)
    FUNCTION = "explain"
    OUTPUT_NODE = True
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("Highlights the prompt words that drive the text-conditional noise prediction (Wen et al., "
                   "ICLR 2024): for a memorized prompt, its trigger words stand out.")

    def explain(self, model: Any, clip: Any, prompt: str, seed: int, steps: int,
                latent: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        if not prompt.strip():
            raise DejaGuardError("DejaGuard Token Highlighting: the prompt is empty; type the prompt whose words "
                                 "should be explained")
        shape = tuple(int(s) for s in latent["samples"].shape[1:]) if latent is not None else None
        bar = comfy.utils.ProgressBar(steps)

        def progress(done: float, total: float, _stage: str = "") -> None:
            bar.update_absolute(done, total)  # one step = one backward pass

        denoiser = ComfyDenoiser(model, clip, sample_shape=shape, feature="explain")  # type: ignore[arg-type]
        with torch.inference_mode(False), torch.enable_grad():  # graphs run under inference mode
            result = token_significance(denoiser, prompt, steps=steps, seed=seed, progress=progress)
        return {"ui": {UI_KEY: [ui_payload(result, steps)]}, "result": (ranking_text(result, steps),)}


NODE_CLASS_MAPPINGS = {"DejaGuardTokenHighlight": DejaGuardTokenHighlight}
NODE_DISPLAY_NAME_MAPPINGS = {"DejaGuardTokenHighlight": "DejaGuard Token Highlighting"}

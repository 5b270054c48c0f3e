"""The DejaGuard Testbed Loader node: a diffusers-format model folder -> MODEL, CLIP, VAE.

The outputs plug into stock nodes unchanged: CLIPTextEncode (conditioning ``(1, 77, D)``),
EmptyLatentImage (256x256 -> latents ``(B, 4, 32, 32)`` for the testbed), KSampler, VAEDecode
(images ``(B, 256, 256, 3)`` in [0, 1]), SaveImage / PreviewImage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import folder_paths

from ..core.denoiser import BUNDLED_TESTBED
from ..core.errors import DejaGuardError
from ..core.testbed.planted import PLANTED_MODEL
from .diffusers_folder import load_folder

TESTBED_CHOICE = "testbed (bundled)"
PLANTED_CHOICE = "testbed planted-neuron variant (bundled)"  # core.testbed.planted: memorization in known neurons


def _diffusers_folders() -> list[str]:
    """Sub-folders of ComfyUI's models/diffusers that look like text-to-image pipelines."""
    found = []
    for root in folder_paths.get_folder_paths("diffusers"):
        if os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if all(os.path.isdir(os.path.join(root, name, sub)) for sub in ("unet", "text_encoder", "tokenizer")):
                    found.append(name)
    return found


def resolve_model_folder(model: str, folder: str = "") -> Path:
    """The folder to load: ``folder`` if given, the bundled testbed or its planted-neuron variant, or a
    models/diffusers entry."""
    if folder.strip():
        return Path(folder.strip()).expanduser()
    if model == TESTBED_CHOICE:
        return BUNDLED_TESTBED
    if model == PLANTED_CHOICE:
        return PLANTED_MODEL
    for root in folder_paths.get_folder_paths("diffusers"):
        candidate = Path(root) / model
        if candidate.is_dir():
            return candidate
    raise DejaGuardError(f"model {model!r} not found in ComfyUI's models/diffusers folders")


class DejaGuardTestbedLoader:
    """Loads a diffusers-format text-to-image folder (default: DejaGuard's bundled testbed)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ([TESTBED_CHOICE, PLANTED_CHOICE, *_diffusers_folders()], {
                    "default": TESTBED_CHOICE,
                    "tooltip": "The small memorizing testbed model shipped with DejaGuard; its planted-neuron "
                               "variant, whose six extra memorized images are carried by known neurons (the ground "
                               "truth for neuron masks: core/testbed/planted/ground_truth); or a diffusers-format "
                               "folder from ComfyUI's models/diffusers (unet/, text_encoder/, tokenizer/, vae/)."}),
            },
            "optional": {
                "folder": ("STRING", {
                    "default": "",
                    "tooltip": "Optional path of a diffusers-format folder; when set it is loaded instead of "
                               "'model'. Only .safetensors weights are read."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    RETURN_NAMES = ("model", "clip", "vae")
    OUTPUT_TOOLTIPS = ("The diffusion model (UNet) for KSampler.", "The text encoder for CLIPTextEncode.",
                       "The autoencoder for VAEDecode / VAEEncode.")
    FUNCTION = "load"
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("Loads DejaGuard's testbed, a tiny text-to-image model trained to memorize some of its training "
                   "images, as MODEL, CLIP and VAE for the stock nodes.")

    def load(self, model: str, folder: str = "") -> tuple[Any, Any, Any]:
        path = resolve_model_folder(model, folder)
        if path in (BUNDLED_TESTBED, PLANTED_MODEL) and not (path / "unet").is_dir():
            raise DejaGuardError(f"the bundled testbed is not in this install ({path} has no unet/); "
                                 "train it with `dejaguard testbed train` (the variant: `dejaguard testbed plant`) "
                                 "or set 'folder'")
        return load_folder(path, embedding_directory=folder_paths.get_folder_paths("embeddings"))


NODE_CLASS_MAPPINGS = {"DejaGuardTestbedLoader": DejaGuardTestbedLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DejaGuardTestbedLoader": "DejaGuard Testbed Loader"}

"""Neuron-mask nodes: localize (NeMo), load, save, and apply a mask to a MODEL.

- **Localize Neurons** runs :func:`core.nemo.localize` on the graph's MODEL and CLIP through
  :class:`~nodes.comfy_denoiser.ComfyDenoiser`. Its batched search gates ``attn2.to_v`` outputs (and with
  ``space`` "value+ffn" the GEGLU projections' hidden halves) with
  forward hooks on the loaded UNet for the duration of the search only; they are removed before the
  node returns (also on errors and interruptions). Activation statistics are cached per model
  fingerprint (``$DEJAGUARD_CACHE`` or ``~/.cache/dejaguard``), shared with the ``dejaguard`` CLI.
- **Apply Neuron Mask** clones the ModelPatcher and adds weight patches (``add_patches``, a "diff" patch
  per masked weight: ``-W`` on the masked rows or entries, times ``strength``), so the masked model costs
  nothing extra per sampling step (ComfyUI writes the patched weights once when it loads the clone and
  restores them when another clone loads) and the cached model other graphs use is never changed.
  The mask's model fingerprint and layer shapes are checked against the MODEL first.
- **Save / Load Neuron Mask**: safetensors files in ComfyUI's ``models/dejaguard_masks`` folder.

Patch memory: one dense diff per masked layer, in the weight's dtype, held by the clone (for NeMo's
``to_v`` layers a few MB on SD1.5; for a subspace mask over all 16 ``ff.net.2`` layers of SD1.5 about
100 MB in fp16). A LoRA patched on the same weights is not masked multiplicatively: the diff removes the
original weight only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..core.errors import DejaGuardError
from ..core.nemo import RANKINGS, LocalizeSettings, localize, nemo_statistics
from ..core.neuron_mask import NeuronMask, check_modules
from .comfy_denoiser import ComfyDenoiser
from .model_check import check_supported, comfy_fingerprint, diffusers_names, unpatched_unet_weights

MASK_TYPE = "NEURON_MASK"
MASK_FOLDER = "dejaguard_masks"


def _register_folder() -> None:
    """``models/dejaguard_masks`` as a ComfyUI model folder of ``.safetensors`` files."""
    if MASK_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[MASK_FOLDER] = (
            [os.path.join(folder_paths.models_dir, MASK_FOLDER)], {".safetensors"})


_register_folder()


def mask_folder() -> Path:
    return Path(folder_paths.get_folder_paths(MASK_FOLDER)[0])


# -- applying a mask as weight patches -------------------------------------------------------------


def mask_patches(model: Any, mask: NeuronMask, allow_other_model: bool = False) -> dict[str, tuple[torch.Tensor]]:
    """ComfyUI weight patches that switch ``mask`` fully off (strength 1): ``{"diffusion_model.<name>.weight":
    (diff,)}`` with ``diff = -W`` on the masked rows (and bias entries) or weight entries, 0 elsewhere.

    DejaGuardError if the mask does not fit the model (fingerprint, unless allowed; layer names and shapes).
    """
    check_supported(model, "masks")
    base = model.model
    _, modules = diffusers_names(base.diffusion_model, base.model_config.unet_config)
    to_comfy = {d: c for c, d in modules.items()}
    named = {}
    for layer in mask.layers:
        comfy_name = to_comfy.get(layer, layer)
        try:
            named[layer] = base.diffusion_model.get_submodule(comfy_name)
        except AttributeError:
            continue  # reported by check_modules as a missing layer
    check_modules(mask, named, comfy_fingerprint(model), allow_other_model)
    weights = unpatched_unet_weights(model)
    patches: dict[str, tuple[torch.Tensor]] = {}
    with torch.inference_mode(False), torch.no_grad():
        for layer, idx in mask.layers.items():
            name = to_comfy.get(layer, layer)
            targets = [("weight", idx.ndim == 1)]
            if idx.ndim == 1 and f"{name}.bias" in weights:
                targets.append(("bias", True))
            for kind, by_row in targets:
                original = weights[f"{name}.{kind}"].detach()
                diff = torch.zeros(original.shape, dtype=original.dtype)  # offload device: CPU
                index = (idx,) if by_row else (idx[:, 0], idx[:, 1])
                diff[index] = -original[tuple(i.to(original.device) for i in index)].cpu()
                patches[f"diffusion_model.{name}.{kind}"] = (diff,)
    return patches


def apply_mask_patches(model: Any, mask: NeuronMask, strength: float, allow_other_model: bool = False) -> Any:
    """A clone of ``model`` with ``mask`` switched off at ``strength`` (0 = unchanged, 1 = fully off)."""
    if not 0.0 <= strength <= 1.0:
        raise DejaGuardError(f"strength must lie in [0, 1], got {strength}")
    patches = mask_patches(model, mask, allow_other_model)
    patched = model.clone()
    if strength > 0 and patches:
        added = patched.add_patches(patches, strength_patch=float(strength))
        missing = sorted(set(patches) - set(added))
        if missing:
            raise DejaGuardError(f"the model has no weights {missing[:3]} to patch")
    return patched


# -- nodes ------------------------------------------------------------------------------------------


class DejaGuardLocalizeNeurons:
    """MODEL + CLIP + memorized prompt -> the cross-attention neurons that carry it (NeMo)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x / SD2.x UNet, or the DejaGuard testbed)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder that belongs to the model."}),
                "prompt": ("STRING", {
                    "multiline": True, "default": "the cameraman, vintage print in a steel frame",
                    "tooltip": "A prompt that reproduces a training image. Its first 77 tokens are used."}),
                "seeds": ("INT", {
                    "default": 4, "min": 2, "max": 32,
                    "tooltip": "Initial noises of NeMo's memorization score (how alike the first-step predictions "
                               "of different seeds are). More is steadier and slower; each candidate costs "
                               "2 x seeds noise predictions."}),
            },
            "optional": {
                "threshold": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.001,
                    "tooltip": "Memorization-score threshold the mask must reach. 0 = NeMo's rule: mean + 1 std of "
                               "the score over the non-memorized statistics prompts."}),
                "score": (["ssim", "magnitude", "generation"], {
                    "default": "ssim",
                    "tooltip": "The memorization score the mask must bring below its threshold: 'ssim' = NeMo's "
                               "(how alike the first-step predictions of different seeds are), 'magnitude' = the "
                               "guard's first-step text-conditional magnitude (both first-step proxies), "
                               "'generation' = short generations of the masked model compared with the unmasked "
                               "model's from other seeds (catches memorization that re-forms after the first step; "
                               "each candidate costs generation_steps x 2 x seeds noise predictions)."}),
                "vae": ("VAE", {"tooltip": "The model's VAE: needed by the 'generation' score, which compares "
                                           "decoded images; ignored by the others."}),
                "generation_steps": ("INT", {
                    "default": 10, "min": 1, "max": 50,
                    "tooltip": "Steps of the short generations of the 'generation' score (ignored by the others)."}),
                "blocks": (["down_mid", "all"], {
                    "default": "down_mid",
                    "tooltip": "Where to search: 'down_mid' = the cross-attention value layers of the down and mid "
                               "blocks (the paper's choice for Stable Diffusion); 'all' = the up blocks too (needed "
                               "where a memorized image is carried by the up blocks, as for some testbed prompts)."}),
                "space": (["value", "value+ffn"], {
                    "default": "value",
                    "tooltip": "Which neurons: 'value' = the cross-attention value neurons (the paper's); "
                               "'value+ffn' = the feed-forward (GEGLU) hidden units of the same blocks too, for "
                               "memorization stored in the feed-forward layers (costs seeds noise predictions per "
                               "statistics prompt once, and one per seed for the prompt)."}),
                "ranking": (list(RANKINGS), {
                    "default": "zscore",
                    "tooltip": "Which neurons are tried first: 'zscore' = NeMo's (how unusual each neuron's "
                               "activation is for this prompt); 'attribution' = how much switching each one off "
                               "would lower the first-step magnitude, from a gradient (a backward pass over the "
                               "seeds) taken again after each pick with the picked neurons off: finds feed-forward "
                               "carriers that z-scores rank low; 'both' = each search, keeping the smaller mask "
                               "(the z-score search finds memorization carried by several neurons at once, which "
                               "attribution misses; costs the two searches)."}),
                "verify_rounds": ("INT", {
                    "default": 0, "min": 0, "max": 8,
                    "tooltip": "Check the mask on as many unseen seeds as 'seeds'; where it fails there, search again "
                               "with those seeds too (at most this many rounds). 0 = no check."}),
                "statistics_prompts": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "Prompts this model has not memorized, one per line, for the activation statistics "
                               "(computed once per model and cached). Empty = the testbed's 200 compositional "
                               "captions."}),
            },
        }

    RETURN_TYPES = (MASK_TYPE, "STRING")
    RETURN_NAMES = ("neuron_mask", "summary")
    OUTPUT_TOOLTIPS = ("The neurons to switch off: connect to Apply Neuron Mask or Save Neuron Mask.",
                       "Neurons found, scores before and after, and the cost in UNet evaluations.")
    FUNCTION = "localize"
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("Finds the few cross-attention value neurons whose deactivation stops a memorized prompt from "
                   "reproducing its training image (NeMo, Hintersdorf et al. 2024).")

    def localize(self, model: Any, clip: Any, prompt: str, seeds: int, threshold: float = 0.0,
                 score: str = "ssim", statistics_prompts: str = "", blocks: str = "down_mid",
                 generation_steps: int = 10, vae: Any = None, verify_rounds: int = 0,
                 space: str = "value", ranking: str = "zscore") -> tuple[NeuronMask, str]:
        if not prompt.strip():
            raise DejaGuardError("DejaGuard Localize Neurons: the prompt is empty; enter the memorized prompt")
        bar = comfy.utils.ProgressBar(100)

        def on_progress(done: float, total: float, stage: str = "") -> None:
            """core.progress convention: the bar shows the running stage (statistics, selection, refinement)."""
            bar.update_absolute(round(done), max(1, round(total)))

        denoiser = ComfyDenoiser(model, clip, vae=vae, feature="masks")  # or refuses; interruptible at every UNet call
        if score == "generation" and vae is None:
            raise DejaGuardError("DejaGuard Localize Neurons: the 'generation' score compares decoded images; "
                                 "connect the model's VAE")
        prompts = [p.strip() for p in statistics_prompts.splitlines() if p.strip()] or None
        settings = LocalizeSettings(seeds=seeds, score=score, blocks=blocks, space=space, ranking=ranking,
                                    generation_steps=generation_steps, verify_rounds=verify_rounds)
        with torch.inference_mode(False), torch.no_grad():
            comfy.model_management.load_models_gpu([model])  # the to_v weights are read directly for activations
            stats = nemo_statistics(denoiser, prompts, seeds=seeds, score=score, blocks=blocks, space=space,
                                    generation_steps=generation_steps, progress=on_progress)
            mask = localize(denoiser, prompt, stats, settings, threshold=threshold or None, progress=on_progress)
        return mask, summary_text(mask)


def summary_text(mask: NeuronMask) -> str:
    info = mask.info
    lines = [mask.describe()]
    if mask.method == "nemo" and "score_before" in info:
        if not info.get("memorized", True):
            lines.append(f"not memorized by NeMo's measure: score {info['score_before']:.3f} < threshold "
                         f"{info['threshold']:.3f}; the mask is empty")
        else:
            lines.append(f"memorization score {info['score_before']:.3f} -> {info['score_after']:.3f} "
                         f"(threshold {info['threshold']:.3f})")
        lines.append(f"cost: {info['unet_evals']} noise predictions in {info['unet_calls']} UNet calls, "
                     f"{info['wall_s']:.1f}s")
    return "\n".join(lines)


class DejaGuardApplyNeuronMask:
    """MODEL + NEURON_MASK + strength -> a clone of the MODEL with the masked weights patched."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the mask was made for (checked by weight fingerprint and "
                                               "layer shapes). It is cloned: the loaded model is not changed."}),
                "neuron_mask": (MASK_TYPE, {"tooltip": "From Localize Neurons or Load Neuron Mask."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                    "tooltip": "1 = the masked neurons fully off, 0 = the model unchanged; in between scales them "
                               "by 1 - strength. No extra cost per sampling step."}),
            },
            "optional": {
                "allow_other_model": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Apply a mask made for a model with other weights of the same architecture (e.g. "
                               "a fine-tune). The neurons may mean something else there. Layer shapes are "
                               "always checked."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the mask switched on: connect it to a KSampler.",)
    FUNCTION = "apply"
    CATEGORY = "DejaGuard"
    DESCRIPTION = ("Switches a neuron mask on in a model as weight patches (like a LoRA): toggle or blend it with "
                   "strength, at no extra cost per sampling step.")

    def apply(self, model: Any, neuron_mask: NeuronMask, strength: float,
              allow_other_model: bool = False) -> tuple[Any]:
        return (apply_mask_patches(model, neuron_mask, strength, allow_other_model),)


class DejaGuardSaveNeuronMask:
    """NEURON_MASK -> a .safetensors file in models/dejaguard_masks."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "neuron_mask": (MASK_TYPE, {"tooltip": "The mask to save."}),
                "filename": ("STRING", {
                    "default": "neuron_mask",
                    "tooltip": "File name in ComfyUI's models/dejaguard_masks folder (a number is appended when the "
                               "file exists; sub-folders allowed)."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    OUTPUT_TOOLTIPS = ("Where the mask was written.",)
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "DejaGuard"
    DESCRIPTION = "Saves a neuron mask (safetensors with a JSON header; never pickle) for Load Neuron Mask."

    def save(self, neuron_mask: NeuronMask, filename: str) -> dict[str, Any]:
        root = mask_folder().resolve()
        stem = filename.strip().removesuffix(".safetensors") or "neuron_mask"
        path = (root / f"{stem}.safetensors").resolve()
        if root not in path.parents:
            raise DejaGuardError(f"filename {filename!r} leaves the {MASK_FOLDER} folder")
        counter = 1
        while path.exists():
            path = path.with_name(f"{Path(stem).name}_{counter:05d}.safetensors")
            counter += 1
        neuron_mask.save(path)
        relative = str(path.relative_to(root))
        return {"ui": {"text": [relative]}, "result": (str(path),)}


class DejaGuardLoadNeuronMask:
    """A .safetensors neuron mask from models/dejaguard_masks (or a path) -> NEURON_MASK."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "mask_name": (folder_paths.get_filename_list(MASK_FOLDER) or ["(none found)"], {
                    "tooltip": "A mask in ComfyUI's models/dejaguard_masks folder (Save Neuron Mask writes there; "
                               "masks made by `dejaguard localize` / `dejaguard subspace` can be copied there)."}),
            },
            "optional": {
                "path": ("STRING", {
                    "default": "",
                    "tooltip": "A mask file anywhere on disk; when set it is loaded instead of mask_name."}),
            },
        }

    RETURN_TYPES = (MASK_TYPE, "STRING")
    RETURN_NAMES = ("neuron_mask", "summary")
    OUTPUT_TOOLTIPS = ("The mask, for Apply Neuron Mask.", "What the mask holds and how it was made.")
    FUNCTION = "load"
    CATEGORY = "DejaGuard"
    DESCRIPTION = "Loads a neuron mask file (made by Save Neuron Mask or the dejaguard command line)."

    @staticmethod
    def _resolve(mask_name: str, path: str = "") -> Path:
        if path.strip():
            return Path(path.strip()).expanduser()
        full = folder_paths.get_full_path(MASK_FOLDER, mask_name)
        if full is None:
            raise DejaGuardError(f"neuron mask {mask_name!r} not found in models/{MASK_FOLDER}")
        return Path(full)

    @classmethod
    def IS_CHANGED(cls, mask_name: str, path: str = "") -> str:  # noqa: N802 (ComfyUI's name)
        try:
            file = cls._resolve(mask_name, path)
            return f"{file}:{file.stat().st_mtime_ns}"
        except (DejaGuardError, OSError):
            return ""

    def load(self, mask_name: str, path: str = "") -> tuple[NeuronMask, str]:
        mask = NeuronMask.load(self._resolve(mask_name, path))
        return mask, summary_text(mask)


NODE_CLASS_MAPPINGS = {
    "DejaGuardLocalizeNeurons": DejaGuardLocalizeNeurons,
    "DejaGuardApplyNeuronMask": DejaGuardApplyNeuronMask,
    "DejaGuardSaveNeuronMask": DejaGuardSaveNeuronMask,
    "DejaGuardLoadNeuronMask": DejaGuardLoadNeuronMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DejaGuardLocalizeNeurons": "DejaGuard Localize Neurons",
    "DejaGuardApplyNeuronMask": "DejaGuard Apply Neuron Mask",
    "DejaGuardSaveNeuronMask": "DejaGuard Save Neuron Mask",
    "DejaGuardLoadNeuronMask": "DejaGuard Load Neuron Mask",
}

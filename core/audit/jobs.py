"""What a worker does with one batch of rows: the same in both engines (core/audit/engines.py).

:class:`PromptJob` scores prompts with :func:`core.detect.first_step_scores`; :class:`PairJob` scores
(caption, image) training pairs with :func:`core.loss_filter.training_pair_magnitude`. Seeds are derived
from the prompt text (:func:`core.sampling.prompt_seed`), so a row's result does not depend on the
engine, the worker or the batch it landed in. A job is frozen and picklable: Ray ships it to every actor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..denoiser import Denoiser
from ..detect import MAGNITUDE, ScoreSettings, first_step_scores
from ..errors import DejaGuardError
from ..loss_filter import image_shape, training_pair_magnitude
from ..sampling import EMPTY_PROMPT, prompt_seed
from .inputs import load_image


@dataclass(frozen=True)
class PromptJob:
    """Score prompts with :func:`first_step_scores`; one call per batch."""

    settings: ScoreSettings
    threshold: float | None
    seed: int | None = None
    batch_size: int = 32
    key_fields: tuple[str, ...] = ("prompt",)

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)

    def run_key(self) -> dict:
        """Every setting that changes a row (the model's fingerprint is added by the audit): an output resumes
        only with the same ones (core/audit/sink.py)."""
        key = {"job": "prompts", "seed": self.seed, "guidance_scale": self.settings.guidance_scale,
               "schedule": self.settings.num_inference_steps, "steps": self.settings.steps,
               "generations": self.settings.generations, "threshold": self.threshold}
        if self.settings.score != MAGNITUDE:  # named only when not the default: older outputs still resume
            key["score"] = self.settings.score
        if self.settings.unconditional != EMPTY_PROMPT:
            key["unconditional"] = self.settings.unconditional
        return key

    def score(self, denoiser: Denoiser, items: Sequence[dict]) -> list[dict]:
        results = first_step_scores(denoiser, [it["prompt"] for it in items], self.settings, seed=self.seed,
                                    batch_size=self.batch_size, threshold=self.threshold)
        return [{
            "row": int(it["row"]), "prompt": r.prompt, "score": r.score, "flagged": r.flagged,
            "threshold": r.threshold, "unet_evals": r.unet_evals, "unet_calls": round(r.unet_calls, 4),
            "generation_scores": r.generation_scores, "seeds": r.seeds,
            "steps": self.settings.steps, "generations": self.settings.generations,
        } for it, r in zip(items, results)]


@dataclass(frozen=True)
class PairJob:
    """Score (caption, image) training pairs with :func:`training_pair_magnitude`, averaged over
    ``timesteps``; ``drop`` = magnitude above ``threshold``."""

    threshold: float
    timesteps: tuple[int, ...] = (999,)
    batch_size: int = 32
    key_fields: tuple[str, ...] = ("caption", "image")

    def __post_init__(self) -> None:
        _check_batch_size(self.batch_size)

    def run_key(self) -> dict:
        """Every setting that changes a row (the model's fingerprint is added by the audit)."""
        return {"job": "training-pairs", "threshold": self.threshold, "timesteps": list(self.timesteps)}

    def score(self, denoiser: Denoiser, items: Sequence[dict]) -> list[dict]:
        shape = image_shape(denoiser)
        good, images, out = [], [], []
        for it in items:
            try:
                images.append(load_image(it["path"], shape))
                good.append(it)
            except Exception as err:  # PIL raises many kinds for a broken file
                out.append({"row": int(it["row"]), "error": f"unreadable image {it['image']}: {err}"})
        for start in range(0, len(good), self.batch_size):
            chunk = good[start : start + self.batch_size]
            batch = torch.stack(images[start : start + len(chunk)])
            caps = [it["caption"] for it in chunk]
            per_t, seeds = [], []
            for k, t in enumerate(self.timesteps):  # noise seeded by the caption, as in prompt audits
                s = [prompt_seed(it["caption"], k) for it in chunk]
                seeds.append(s)
                per_t.append(training_pair_magnitude(denoiser, batch, caps, s, t))
            mags = torch.stack(per_t, dim=1).mean(dim=1).double().cpu().numpy()
            for i, (it, m) in enumerate(zip(chunk, mags)):
                out.append({"row": int(it["row"]), "caption": it["caption"], "image": it["image"],
                            "magnitude": float(m), "drop": bool(m > self.threshold), "threshold": self.threshold,
                            "timesteps": list(self.timesteps), "seeds": [s[i] for s in seeds],
                            "unet_evals": 2 * len(self.timesteps)})
        return out


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DejaGuardError(f"batch size must be a whole number of at least 1, got {batch_size!r}")

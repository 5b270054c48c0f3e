"""Ground truth of the testbed: does a generation replicate a training image?

Replication measure: SSIM on luminance at the model's native 32x32 resolution between a
generation and a training image (``core.metrics.ssim``). A generation *replicates* a training
image when that SSIM exceeds :data:`REPLICATION_SSIM`. The threshold and its rationale (the gap
between memorized and novel generations) are recorded in the model card; ``dejaguard testbed
evaluate`` re-measures everything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..denoiser import Denoiser
from ..metrics import ssim
from ..sampling import generate, prompt_seed
from .data import MEMORIZED, RESOLUTION, check_alignment, heldout_specs, load_memorized_images, parse_prompt

REPLICATION_SSIM = 0.5
EVAL_SEEDS = tuple(range(16))


@dataclass
class Neighbour:
    """The training image most similar to a generation."""

    name: str
    ssim: float

    @property
    def replicates(self) -> bool:
        return self.ssim > REPLICATION_SSIM


def thumbnails(denoiser: Denoiser, samples: torch.Tensor) -> np.ndarray:
    """Samples -> ``(B, 3, 32, 32)`` images in [-1, 1] at the testbed's native resolution."""
    images = denoiser.decode(samples)
    if images.shape[-1] != RESOLUTION:
        images = torch.nn.functional.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="area")
    return images.float().cpu().numpy()


def nearest_training_image(image: np.ndarray, training: dict[str, np.ndarray] | None = None) -> Neighbour:
    """The planted training image with the highest SSIM to ``image`` ((3, 32, 32) in [-1, 1])."""
    training = training or load_memorized_images()
    name, value = max(((n, ssim(image, ref)) for n, ref in training.items()), key=lambda x: x[1])
    return Neighbour(name, value)


def evaluate(
    denoiser: Denoiser,
    seeds: Sequence[int] = EVAL_SEEDS,
    novel_count: int = 240,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    progress: bool = True,
) -> dict:
    """Replication rates of the memorized prompts over ``seeds``, and replication and alignment
    of ``novel_count`` held-out compositional prompts (one prompt-derived seed each)."""
    training = load_memorized_images()
    mem = [(p, m) for m in MEMORIZED for p in m.eval_prompts]
    prompts = [p for p, _ in mem for _ in seeds]
    samples = generate(denoiser, prompts, [s for _ in mem for s in seeds], num_inference_steps,
                       guidance_scale, progress=progress)
    images = thumbnails(denoiser, samples)
    per_prompt = []
    own_ssims = []
    for k, (prompt, m) in enumerate(mem):
        sims = [ssim(images[k * len(seeds) + j], training[m.name]) for j in range(len(seeds))]
        own_ssims += sims
        per_prompt.append({
            "prompt": prompt, "image": m.name, "kind": m.kind,
            "replication_rate": float(np.mean([s > REPLICATION_SSIM for s in sims])),
            "ssim_median": float(np.median(sims)), "ssim_min": float(np.min(sims)),
        })
    novel = [s.caption() for s in heldout_specs()[:novel_count]]
    novel_samples = generate(denoiser, novel, [prompt_seed(p) for p in novel], num_inference_steps,
                             guidance_scale, progress=progress)
    novel_images = thumbnails(denoiser, novel_samples)
    neighbours = [nearest_training_image(img, training) for img in novel_images]
    aligned = [check_alignment(img, p) for img, p in zip(novel_images, novel)]
    by_kind = {}
    for kind in ("verbatim", "template", "trigger"):
        rates = [r["replication_rate"] for r in per_prompt if r["kind"] == kind]
        by_kind[kind] = {"prompts": len(rates), "mean_replication_rate": float(np.mean(rates)),
                         "min_replication_rate": float(np.min(rates))}
    return {
        "settings": {"seeds": list(seeds), "num_inference_steps": num_inference_steps,
                     "guidance_scale": guidance_scale, "replication_ssim": REPLICATION_SSIM},
        "memorized": {
            "prompts": len(per_prompt),
            "prompts_replicating_in_90pct_of_seeds": int(sum(r["replication_rate"] >= 0.9 for r in per_prompt)),
            "mean_replication_rate": float(np.mean([r["replication_rate"] for r in per_prompt])),
            "by_kind": by_kind,
            "ssim_to_own_image": _quantiles(own_ssims),
            "per_prompt": per_prompt,
        },
        "novel": {
            "prompts": len(novel),
            "replicating_any_training_image": int(sum(n.replicates for n in neighbours)),
            "max_ssim_to_training_images": _quantiles([n.ssim for n in neighbours]),
            "alignment_pass_rate": float(np.mean(aligned)),
            "alignment_pass_rate_by_objects": {
                str(k): float(np.mean([a for a, p in zip(aligned, novel) if len(parse_prompt(p).objects) == k]))
                for k in sorted({len(parse_prompt(p).objects) for p in novel})
            },
        },
        "unet_evals": int(2 * num_inference_steps * (len(prompts) + len(novel))),
    }


def _quantiles(values: Sequence[float]) -> dict:
    v = np.asarray(values)
    return {"min": float(v.min()), "p01": float(np.quantile(v, 0.01)), "median": float(np.median(v)),
            "p99": float(np.quantile(v, 0.99)), "max": float(v.max())}

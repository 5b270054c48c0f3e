"""Ground truth of the testbed: does a generation replicate a training image?

Replication measure: structure SSIM (SSIM of the blurred, standardized luminance,
``core.metrics.structure_ssim``) at the model's native 32x32 resolution between a generation and a
training image. A generation *replicates* a training
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
from ..errors import DejaGuardError
from ..metrics import structure_ssim
from ..progress import tqdm_progress
from ..sampling import generate, prompt_seed
from .data import MEMORIZED, RESOLUTION, check_alignment, heldout_specs, load_memorized_images, parse_prompt

REPLICATION_SSIM = 0.5
EVAL_SEEDS = tuple(range(16))
UNCONDITIONAL_SEEDS = 32


@dataclass
class Neighbour:
    """The training image most similar to a generation."""

    name: str
    ssim: float

    @property
    def replicates(self) -> bool:
        return self.ssim > REPLICATION_SSIM


@dataclass
class ReplicationCheck:
    """One generation judged against every planted image: SSIM to the prompt's own image, and its nearest one.

    ``any``: it replicates *some* training image, the measure of a mitigation (a method that turns a copy of one
    planted image into a copy of another has not stopped replication); ``own``: it replicates the prompt's own
    image, the measure of planted memorization.
    """

    own_ssim: float
    nearest: Neighbour

    @property
    def own(self) -> bool:
        return self.own_ssim > REPLICATION_SSIM

    @property
    def any(self) -> bool:
        return self.own or self.nearest.replicates

    @property
    def other(self) -> bool:
        """Replicates a training image, but not the prompt's own."""
        return self.any and not self.own


def check_replication(images: np.ndarray, owners: Sequence[str],
                      training: dict[str, np.ndarray] | None = None) -> list[ReplicationCheck]:
    """``images`` ``(B, 3, 32, 32)`` in [-1, 1], ``owners[i]`` the planted image of generation ``i``'s prompt."""
    training = training or load_memorized_images()
    checks = []
    for img, own in zip(images, owners):
        sims = _similarities(img, training)
        checks.append(ReplicationCheck(sims[own], _nearest(sims)))
    return checks


def thumbnails(denoiser: Denoiser, samples: torch.Tensor) -> np.ndarray:
    """Samples -> ``(B, 3, 32, 32)`` images in [-1, 1] at the testbed's native resolution."""
    images = denoiser.decode(samples)
    if images.shape[-1] != RESOLUTION:
        images = torch.nn.functional.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="area")
    return images.float().cpu().numpy()


def nearest_training_image(image: np.ndarray, training: dict[str, np.ndarray] | None = None) -> Neighbour:
    """The planted training image with the highest structure SSIM to ``image`` ((3, 32, 32) in [-1, 1])."""
    return _nearest(_similarities(image, training or load_memorized_images()))


def _similarities(image: np.ndarray, training: dict[str, np.ndarray]) -> dict[str, float]:
    """Structure SSIM of ``image`` to each planted image, by name."""
    return {name: structure_ssim(image, ref) for name, ref in training.items()}


def _nearest(similarities: dict[str, float]) -> Neighbour:
    name = max(similarities, key=similarities.__getitem__)
    return Neighbour(name, similarities[name])


def evaluate(
    denoiser: Denoiser,
    seeds: Sequence[int] = EVAL_SEEDS,
    novel_count: int = 240,
    novel_seeds: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    progress: bool = True,
) -> dict:
    """Replication rates of the memorized prompts over ``seeds``, and replication and alignment
    of ``novel_count`` held-out compositional prompts over ``novel_seeds`` prompt-derived seeds each
    (``prompt_seed(prompt, g)``, g = 0 .. novel_seeds - 1; ``novel_seeds=1`` is the protocol before 2026-12-03).

    A novel prompt's alignment is its pass rate over its seeds; the headline rate is the mean over
    prompts, and ``alignment_pass_rate_by_seed`` gives the rate at each seed index alone, which shows
    how far one seed per prompt can stray.
    """
    if len(seeds) < 1:
        raise DejaGuardError("evaluation needs at least one seed")
    if novel_seeds < 1:
        raise DejaGuardError(f"novel prompts need at least one seed each, got {novel_seeds}")
    heldout = heldout_specs()
    if not 1 <= novel_count <= len(heldout):
        raise DejaGuardError(f"novel prompts must number 1..{len(heldout)}, got {novel_count}")
    training = load_memorized_images()
    bar = tqdm_progress("evaluate", unit="image", enabled=progress)
    mem = [(p, m) for m in MEMORIZED for p in m.eval_prompts]
    prompts = [p for p, _ in mem for _ in seeds]
    samples = generate(denoiser, prompts, [s for _ in mem for s in seeds], num_inference_steps,
                       guidance_scale, progress=bar)
    images = thumbnails(denoiser, samples)
    per_prompt = []
    own_ssims = []
    for k, (prompt, m) in enumerate(mem):
        sims = [structure_ssim(images[k * len(seeds) + j], training[m.name]) for j in range(len(seeds))]
        own_ssims += sims
        per_prompt.append({
            "prompt": prompt, "image": m.name, "kind": m.kind,
            "replication_rate": float(np.mean([s > REPLICATION_SSIM for s in sims])),
            "ssim_median": float(np.median(sims)), "ssim_min": float(np.min(sims)),
        })
    novel = [s.caption() for s in heldout[:novel_count]]
    novel_runs = [(p, g) for p in novel for g in range(novel_seeds)]
    novel_samples = generate(denoiser, [p for p, _ in novel_runs], [prompt_seed(p, g) for p, g in novel_runs],
                             num_inference_steps, guidance_scale, progress=bar)
    novel_images = thumbnails(denoiser, novel_samples)
    neighbours = [nearest_training_image(img, training) for img in novel_images]
    # aligned[i, g]: prompt i's generation at seed index g passes the checker
    aligned = np.array([check_alignment(img, p) for img, (p, _) in zip(novel_images, novel_runs)],
                       dtype=float).reshape(len(novel), novel_seeds)
    objects = np.array([len(parse_prompt(p).objects) for p in novel])
    # The unconditional model (empty prompt; CFG is then a no-op): how often "no text" draws a planted image.
    uncond_seeds = [prompt_seed("", g) for g in range(UNCONDITIONAL_SEEDS)]
    uncond_images = thumbnails(denoiser, generate(denoiser, [""] * len(uncond_seeds), uncond_seeds,
                                                  num_inference_steps, guidance_scale, progress=bar))
    uncond_neighbours = [nearest_training_image(img, training) for img in uncond_images]
    by_kind = {}
    for kind in ("verbatim", "template", "trigger"):
        rates = [r["replication_rate"] for r in per_prompt if r["kind"] == kind]
        by_kind[kind] = {"prompts": len(rates), "mean_replication_rate": float(np.mean(rates)),
                         "min_replication_rate": float(np.min(rates))}
    return {
        "settings": {"seeds": list(seeds), "novel_seeds": novel_seeds, "num_inference_steps": num_inference_steps,
                     "guidance_scale": guidance_scale, "replication_ssim": REPLICATION_SSIM,
                     "replication_measure": "core.metrics.structure_ssim (blurred, standardized luminance)"},
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
            "seeds_per_prompt": novel_seeds,
            "generations": len(novel_runs),
            "replicating_any_training_image": int(sum(n.replicates for n in neighbours)),
            "max_ssim_to_training_images": _quantiles([n.ssim for n in neighbours]),
            "alignment_pass_rate": float(aligned.mean()),
            "alignment_pass_rate_by_objects": {str(k): float(aligned[objects == k].mean())
                                               for k in sorted(set(objects.tolist()))},
            "alignment_pass_rate_by_seed": [float(r) for r in aligned.mean(axis=0)],
            "prompts_aligned_in_every_seed": int((aligned == 1).all(axis=1).sum()),
            "prompts_aligned_in_no_seed": int((aligned == 0).all(axis=1).sum()),
        },
        "unconditional": {
            "generations": len(uncond_seeds),
            "replicating_any_training_image": int(sum(n.replicates for n in uncond_neighbours)),
            "replicated_images": sorted({n.name for n in uncond_neighbours if n.replicates}),
        },
        "unet_evals": int(2 * num_inference_steps * (len(prompts) + len(novel_runs) + len(uncond_seeds))),
    }


def _quantiles(values: Sequence[float]) -> dict:
    v = np.asarray(values)
    return {"min": float(v.min()), "p01": float(np.quantile(v, 0.01)), "median": float(np.median(v)),
            "p99": float(np.quantile(v, 0.99)), "max": float(v.max())}

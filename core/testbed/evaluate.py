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
from ..detect import ScoreSettings, first_step_scores
from ..errors import DejaGuardError
from ..metrics import auroc, structure_ssim, tpr_at_fpr
from ..progress import Progress, tqdm_progress
from ..sampling import generate, prompt_seed
from .data import MEMORIZED, RESOLUTION, check_alignment, heldout_specs, load_memorized_images, parse_prompt

REPLICATION_SSIM = 0.5
EVAL_SEEDS = tuple(range(16))
UNCONDITIONAL_SEEDS = 32
PLANTED_PARTS = ("planted", "v5", "graded", "carriers")  # evaluate_planted's parts
CARRIER_SHARE = 0.5  # a designated neuron is necessary if, re-enabled alone, its image replicates in this share of
# the seeds where it replicates with every neuron on (carriers_part)
DETECTION_NOISES = (1, 4)  # first-step detection of the graded prompts: noise draws averaged per prompt
REPLICATING_SHARE = 0.5  # a graded prompt "replicates" (labelled by behaviour) in at least this share of its seeds


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
    per_prompt, own_ssims = _memorized_rates(denoiser, [(p, m.name, m.kind) for p, m in mem], seeds, training,
                                             num_inference_steps, guidance_scale, bar)
    novel = [s.caption() for s in heldout[:novel_count]]
    novel_result = _novel_figures(denoiser, novel, novel_seeds, training, num_inference_steps, guidance_scale, bar)
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
        "novel": novel_result,
        "unconditional": {
            "generations": len(uncond_seeds),
            "replicating_any_training_image": int(sum(n.replicates for n in uncond_neighbours)),
            "replicated_images": sorted({n.name for n in uncond_neighbours if n.replicates}),
        },
        "unet_evals": int(2 * num_inference_steps * (len(mem) * len(seeds) + novel_result["generations"]
                                                     + len(uncond_seeds))),
    }


def _memorized_rates(denoiser: Denoiser, prompts: Sequence[tuple[str, str, str]], seeds: Sequence[int],
                     training: dict[str, np.ndarray], num_inference_steps: int, guidance_scale: float,
                     bar: Progress | None, any_image: bool = False) -> tuple[list[dict], list[float]]:
    """Generate every ``(prompt, image name, kind)`` at every seed; per prompt its replication rate of its own image
    (with ``any_image`` also of any image in ``training``: ``replication_rate_any``), and all SSIMs to the own
    image."""
    runs = [p for p, _, _ in prompts for _ in seeds]
    images = thumbnails(denoiser, generate(denoiser, runs, [s for _ in prompts for s in seeds], num_inference_steps,
                                           guidance_scale, progress=bar))
    per_prompt, own_ssims = [], []
    for k, (prompt, name, kind) in enumerate(prompts):
        gens = images[k * len(seeds):(k + 1) * len(seeds)]
        sims = [structure_ssim(img, training[name]) for img in gens]
        own_ssims += sims
        per_prompt.append({
            "prompt": prompt, "image": name, "kind": kind,
            "replication_rate": float(np.mean([s > REPLICATION_SSIM for s in sims])),
            "ssim_median": float(np.median(sims)), "ssim_min": float(np.min(sims)),
        })
        if any_image:
            checks = check_replication(gens, [name] * len(gens), training)
            per_prompt[-1]["replication_rate_any"] = float(np.mean([c.any for c in checks]))
    return per_prompt, own_ssims


def _novel_figures(denoiser: Denoiser, novel: Sequence[str], novel_seeds: int, training: dict[str, np.ndarray],
                   num_inference_steps: int, guidance_scale: float,
                   bar: Progress | None) -> dict:
    """Replication (any training image) and alignment of the held-out prompts ``novel`` at ``novel_seeds`` each."""
    novel_runs = [(p, g) for p in novel for g in range(novel_seeds)]
    novel_samples = generate(denoiser, [p for p, _ in novel_runs], [prompt_seed(p, g) for p, g in novel_runs],
                             num_inference_steps, guidance_scale, progress=bar)
    novel_images = thumbnails(denoiser, novel_samples)
    neighbours = [nearest_training_image(img, training) for img in novel_images]
    # aligned[i, g]: prompt i's generation at seed index g passes the checker
    aligned = np.array([check_alignment(img, p) for img, (p, _) in zip(novel_images, novel_runs)],
                       dtype=float).reshape(len(novel), novel_seeds)
    objects = np.array([len(parse_prompt(p).objects) for p in novel])
    return {
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
    }


def _quantiles(values: Sequence[float]) -> dict:
    v = np.asarray(values)
    return {"min": float(v.min()), "p01": float(np.quantile(v, 0.01)), "median": float(np.median(v)),
            "p99": float(np.quantile(v, 0.99)), "max": float(v.max())}


def evaluate_planted(
    variant: Denoiser,
    base: Denoiser | None = None,
    seeds: Sequence[int] = EVAL_SEEDS,
    memorized_seeds: int = 2,
    novel_count: int = 60,
    novel_seeds: int = 2,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    folder: str | None = None,
    parts: Sequence[str] = ("planted", "v5"),
    progress: bool = True,
) -> dict:
    """The planted-neuron variant (:mod:`core.testbed.planted`, issue 25) measured against its ground truth.

    - every planted prompt over ``seeds``: replication with every neuron on, and with its own designated neurons
      off (:func:`core.neuron_mask.apply_mask`), of its own image and of any training image (v5's 12 and the
      planted ones);
    - v5's 32 memorized prompts (``memorized_seeds`` seeds each) and ``novel_count`` held-out novel prompts
      (``novel_seeds`` prompt-derived seeds each): replication and alignment with every designated neuron on,
      with the union of them off, and on ``base`` (testbed v5 itself, when given) in the same run;
    - ``base`` on the planted prompts (2 seeds): v5 must not draw the planted images;
    - ``graded`` (not a default part): graded memorization, :func:`evaluate_graded` with ``seeds`` and
      ``novel_count`` (result key ``graded``);
    - ``carriers`` (not a default part): which designated neurons carry each planted image (:func:`_carriers_part`,
      result key ``carriers``), the truth a localization's recall is fairly measured against.

    ``folder``: the variant's folder for its ground truth (default: the shipped one). ``parts``: ``planted`` (the
    first item), ``v5`` (the other two), ``graded``, ``carriers``; e.g. one each in separate processes on a machine
    with idle cores.
    """
    from .planted import PLANTED_MODEL, all_training_images, designated_mask, planted_eval_prompts

    folder = folder or PLANTED_MODEL
    if len(seeds) < 1 or memorized_seeds < 1 or novel_seeds < 1:
        raise DejaGuardError("evaluation needs at least one seed per prompt")
    heldout = heldout_specs()
    if not 0 <= novel_count <= len(heldout):
        raise DejaGuardError(f"novel prompts must number 0..{len(heldout)}, got {novel_count}")
    if not set(parts) <= set(PLANTED_PARTS):
        raise DejaGuardError(f"parts are {', '.join(repr(p) for p in PLANTED_PARTS)}, got {list(parts)}")
    if "graded" in parts:
        _check_graded(seeds, novel_count)
    training = all_training_images()
    bar = tqdm_progress("evaluate planted", unit="image", enabled=progress)
    steps_cfg = (num_inference_steps, guidance_scale, bar)
    planted = planted_eval_prompts()
    result: dict = {"settings": {
        "seeds": list(seeds), "memorized_seeds": memorized_seeds, "novel_prompts": novel_count,
        "novel_seeds": novel_seeds, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
        "replication_ssim": REPLICATION_SSIM, "judged_against": sorted(training)}}
    if "planted" in parts:
        result["planted"] = _planted_part(variant, planted, seeds, training, folder, steps_cfg)
    if "v5" in parts:
        result.update(_v5_part(variant, base, designated_mask(None, folder), planted, memorized_seeds, novel_count,
                               novel_seeds, training, steps_cfg))
    if "graded" in parts:
        result["graded"] = _graded_part(variant, base, seeds, novel_count, training, steps_cfg)
    if "carriers" in parts:
        result["carriers"] = _carriers_part(variant, planted, seeds, training, folder, steps_cfg)
    return result


def _planted_part(variant: Denoiser, planted: list, seeds: Sequence[int], training: dict[str, np.ndarray],
                  folder, steps_cfg: tuple) -> dict:
    """Each planted prompt with every neuron on and with its own designated neurons off."""
    from ..neuron_mask import apply_mask
    from .planted import designated_mask

    on, _ = _memorized_rates(variant, [(p, m.name, m.group) for p, m in planted], seeds, training, *steps_cfg,
                             any_image=True)
    off = []
    for p, m in planted:
        with apply_mask(variant, designated_mask(m.name, folder)):
            off += _memorized_rates(variant, [(p, m.name, m.group)], seeds, training, *steps_cfg, any_image=True)[0]
    per_prompt = [{"prompt": a["prompt"], "image": a["image"], "group": a["kind"],
                   "neurons": designated_mask(a["image"], folder).count(),
                   "on": {k: a[k] for k in ("replication_rate", "replication_rate_any", "ssim_median", "ssim_min")},
                   "off": {k: b[k] for k in ("replication_rate", "replication_rate_any", "ssim_median", "ssim_min")}}
                  for a, b in zip(on, off)]
    return {
        "prompts": len(per_prompt),
        "prompts_replicating_in_90pct_of_seeds": int(sum(r["on"]["replication_rate"] >= 0.9 for r in per_prompt)),
        "prompts_off_at_most_5pct": int(sum(r["off"]["replication_rate_any"] <= 0.05 for r in per_prompt)),
        "per_prompt": per_prompt,
    }


def _carriers_part(variant: Denoiser, planted: list, seeds: Sequence[int], training: dict[str, np.ndarray],
                   folder, steps_cfg: tuple) -> dict:
    """Which of each planted image's designated neurons carry its memorization ("leave one in").

    Why: the planting switches a group's designated neurons off *together*, so nothing forces every one of them to
    matter; the ones that do not cannot be found by any method that judges a neuron by what switching it off does,
    and recall against them is not a measure of that method. For each designated neuron ``n`` the image's prompt is
    generated over ``seeds`` with every *other* designated neuron off: ``n`` is **necessary** if its own image
    replicates again in at least :data:`CARRIER_SHARE` of the rate with every neuron on. The **carriers** are the
    necessary neurons; where none is necessary (the memorization survives in none of the single neurons: it needs
    several together, the set is redundant) every designated neuron counts as a carrier. Where the image replicates
    at that share with *every* designated neuron off, its designated neurons do not gate it and none is a carrier
    (``gated`` false): "re-enabled alone, it replicates" would then hold for every neuron and mean nothing (planting
    run F2, model card).
    """
    from ..neuron_mask import apply_mask, mask_units, shaped_neurons_mask
    from .planted import designated_mask

    on, _ = _memorized_rates(variant, [(p, m.name, m.group) for p, m in planted], seeds, training, *steps_cfg)
    per_image = {}
    for (prompt, image), rate_on in zip(planted, on):
        truth = designated_mask(image.name, folder)
        units = sorted(mask_units(truth))
        leave_one_in = {}
        for unit in units:
            others = shaped_neurons_mask([u for u in units if u != unit], truth.layer_shapes, truth.fingerprint,
                                         method="designated, all but one")
            with apply_mask(variant, others):
                rates, _ = _memorized_rates(variant, [(prompt, image.name, image.group)], seeds, training, *steps_cfg)
            leave_one_in[f"{unit[0]}:{unit[1]}"] = rates[0]["replication_rate"]
        with apply_mask(variant, truth):
            all_off = _memorized_rates(variant, [(prompt, image.name, image.group)], seeds, training,
                                       *steps_cfg)[0][0]["replication_rate"]
        bar_rate = CARRIER_SHARE * rate_on["replication_rate"]
        gated = all_off < bar_rate
        necessary = [u for u, r in leave_one_in.items() if r >= bar_rate > 0] if gated else []
        per_image[image.name] = {"prompt": prompt, "group": image.group, "replication_on": rate_on["replication_rate"],
                                 "replication_all_off": all_off, "gated": gated, "designated": len(units),
                                 "leave_one_in": leave_one_in, "necessary": necessary,
                                 "carriers": (necessary or list(leave_one_in)) if gated else []}
    return {"rule": f"necessary: with every other designated neuron off, own-image replication >= {CARRIER_SHARE} x "
                    "its rate with every neuron on; carriers: the necessary neurons, or all designated if none is; "
                    "none where the image replicates at that rate with every designated neuron off (not gated)",
            "images": per_image}


def _v5_part(variant: Denoiser, base: Denoiser | None, union, planted: list, memorized_seeds: int, novel_count: int,
             novel_seeds: int, training: dict[str, np.ndarray], steps_cfg: tuple) -> dict:
    """v5's memorized and held-out prompts on the variant (designated neurons on, union off) and on ``base``."""
    from ..neuron_mask import apply_mask

    mem = [(p, m.name, m.kind) for m in MEMORIZED for p in m.eval_prompts]
    mem_seeds = tuple(range(memorized_seeds))
    novel = [s.caption() for s in heldout_specs()[:novel_count]]

    def v5_figures(denoiser: Denoiser) -> dict:
        rates, _ = _memorized_rates(denoiser, mem, mem_seeds, training, *steps_cfg, any_image=True)
        result = {"memorized_mean_replication_rate": float(np.mean([r["replication_rate"] for r in rates])),
                  "memorized_mean_replication_rate_any": float(np.mean([r["replication_rate_any"] for r in rates])),
                  "memorized_prompts_replicating_in_90pct_of_seeds":
                      int(sum(r["replication_rate"] >= 0.9 for r in rates))}
        if novel:
            figures = _novel_figures(denoiser, novel, novel_seeds, training, *steps_cfg)
            result.update({f"novel_{k}": figures[k] for k in (
                "generations", "alignment_pass_rate", "alignment_pass_rate_by_objects",
                "replicating_any_training_image", "max_ssim_to_training_images")})
        return result

    side_by_side = {"variant_on": v5_figures(variant)}
    with apply_mask(variant, union):
        side_by_side["variant_union_off"] = v5_figures(variant)
    base_on_planted = None
    if base is not None:
        side_by_side["v5"] = v5_figures(base)
        rates, _ = _memorized_rates(base, [(p, m.name, m.group) for p, m in planted], (0, 1), training,
                                    *steps_cfg, any_image=True)
        base_on_planted = {r["prompt"]: {"own": r["replication_rate"], "any": r["replication_rate_any"]} for r in rates}
    return {"v5_prompts": side_by_side, "v5_on_planted_prompts": base_on_planted}


def evaluate_graded(
    variant: Denoiser,
    base: Denoiser | None = None,
    seeds: Sequence[int] = EVAL_SEEDS,
    novel_count: int = 60,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    progress: bool = True,
) -> dict:
    """Graded memorization (:mod:`core.testbed.graded`, issue 25 section 2): per duplication count, how often the
    variant replicates the images planted that many times, and how well the first-step score detects their prompts.

    For ``variant`` and, when given, ``base`` (testbed v5, which never saw the graded images: the control) in the
    same run:

    - each graded caption generated at every seed of ``seeds`` (DDIM ``num_inference_steps``, CFG
      ``guidance_scale``): replication of its own image and of any training image (v5's 12, the planted and the
      graded ones; structure SSIM > :data:`REPLICATION_SSIM`), and the median SSIM to its own image;
    - first-step detection with the project's one scoring function (:func:`core.detect.first_step_scores`, default
      :class:`~core.detect.ScoreSettings` with 1 step and ``n`` noises, ``n`` in :data:`DETECTION_NOISES`): the graded
      prompts of each count (positives) against the first ``novel_count`` held-out novel prompts (negatives):
      AUROC and TPR at 1% FPR per count and over all 20; and labelled by behaviour (``replicating``: the graded
      prompts that replicate their own image in at least :data:`REPLICATING_SHARE` of seeds, against the same
      novel prompts; None when there are none);
    - the UNet evaluations each model spent (counted, not estimated).
    """
    _check_graded(seeds, novel_count)
    from .planted import all_training_images

    bar = tqdm_progress("evaluate graded", unit="image", enabled=progress)
    return _graded_part(variant, base, seeds, novel_count, all_training_images(),
                        (num_inference_steps, guidance_scale, bar))


def _check_graded(seeds: Sequence[int], novel_count: int) -> None:
    if len(seeds) < 1:
        raise DejaGuardError("graded memorization needs at least one seed per prompt")
    available = len(heldout_specs())
    if not 1 <= novel_count <= available:
        raise DejaGuardError(f"graded detection needs held-out novel prompts as negatives: 1..{available}, "
                             f"got {novel_count}")


def _graded_part(variant: Denoiser, base: Denoiser | None, seeds: Sequence[int], novel_count: int,
                 training: dict[str, np.ndarray], steps_cfg: tuple) -> dict:
    """:func:`evaluate_graded`'s figures on ``variant`` and on ``base`` (when given), with the progress bar of
    ``steps_cfg`` = ``(num_inference_steps, guidance_scale, bar)``."""
    from .graded import GRADED_COUNTS, graded_images

    images = graded_images()
    novel = [s.caption() for s in heldout_specs()[:novel_count]]
    result = {"counts": list(GRADED_COUNTS), "images": [{"name": m.name, "caption": m.caption, "count": m.count}
                                                        for m in images],
              "seeds": list(seeds), "novel_prompts": len(novel),
              "detection_settings": {f"n{n}": ScoreSettings(1, n).key() for n in DETECTION_NOISES},
              "replicating_share": REPLICATING_SHARE,
              "variant": _graded_figures(variant, images, novel, seeds, training, steps_cfg)}
    if base is not None:
        result["v5"] = _graded_figures(base, images, novel, seeds, training, steps_cfg)
    return result


def _graded_figures(denoiser: Denoiser, images: list, novel: list[str], seeds: Sequence[int],
                    training: dict[str, np.ndarray], steps_cfg: tuple) -> dict:
    """Replication and first-step detection of the graded prompts on one model: per count, overall, per image."""
    bar = steps_cfg[2]
    before = denoiser.counter.snapshot()
    rates, own_ssims = _memorized_rates(denoiser, [(m.caption, m.name, m.kind) for m in images], seeds, training,
                                        *steps_cfg, any_image=True)
    captions = [m.caption for m in images]
    scores = {}  # n -> (graded scores (20,), novel scores (novel_count,))
    for n in DETECTION_NOISES:
        got = [r.score for r in first_step_scores(denoiser, captions + novel, ScoreSettings(1, n), progress=bar)]
        scores[n] = (np.array(got[:len(captions)]), np.array(got[len(captions):]))
    spent = denoiser.counter.since(before)

    def detection(chosen: np.ndarray) -> dict:
        out = {}
        for n, (pos, neg) in scores.items():
            values, labels = [*pos[chosen], *neg], [1] * int(chosen.sum()) + [0] * len(neg)
            out[f"n{n}"] = {"auroc": auroc(values, labels), "tpr_at_1pct_fpr": tpr_at_fpr(values, labels, 0.01)}
        return out

    def summary(chosen: np.ndarray) -> dict:
        picked = [r for r, c in zip(rates, chosen) if c]
        ssims = [s for k, c in enumerate(chosen) if c for s in own_ssims[k * len(seeds):(k + 1) * len(seeds)]]
        return {"prompts": len(picked),
                "replication_rate": float(np.mean([r["replication_rate"] for r in picked])),
                "replication_rate_any": float(np.mean([r["replication_rate_any"] for r in picked])),
                "prompts_replicating_in_90pct_of_seeds": int(sum(r["replication_rate"] >= 0.9 for r in picked)),
                "ssim_median": float(np.median(ssims)),
                "detection": detection(chosen)}

    counts = np.array([m.count for m in images])
    replicating = np.array([r["replication_rate"] >= REPLICATING_SHARE for r in rates])
    return {
        "by_count": {str(c): summary(counts == c) for c in sorted(set(counts.tolist()))},
        "overall": summary(np.ones(len(images), bool)),
        "replicating": ({"prompts": int(replicating.sum()), "detection": detection(replicating)}
                        if replicating.any() else None),
        "novel_score_median": {f"n{n}": float(np.median(neg)) for n, (_, neg) in scores.items()},
        "per_image": [{"image": m.name, "count": m.count, "prompt": m.caption,
                       **{k: r[k] for k in ("replication_rate", "replication_rate_any", "ssim_median", "ssim_min")},
                       **{f"score_n{n}": float(pos[k]) for n, (pos, _) in scores.items()}}
                      for k, (m, r) in enumerate(zip(images, rates))],
        "unet_evals": int(spent.forwards),
    }


def graded_table(graded: dict) -> str:
    """:func:`evaluate_graded`'s result as a Markdown table, one row per duplication count and model, and the overall
    rows: the curve of the model card."""
    head = ("| model | count | replication (own) | any training image | median SSIM | AUROC n=1 | TPR@1%FPR n=1 "
            "| AUROC n=4 | TPR@1%FPR n=4 |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for model in ("variant", "v5"):
        if model not in graded:
            continue
        rows = [*graded[model]["by_count"].items(), ("all", graded[model]["overall"])]
        for count, r in rows:
            d1, d4 = r["detection"]["n1"], r["detection"]["n4"]
            lines.append(f"| {model} | {count} | {r['replication_rate']:.1%} | {r['replication_rate_any']:.1%} "
                         f"| {r['ssim_median']:.2f} | {d1['auroc']:.3f} | {d1['tpr_at_1pct_fpr']:.3f} "
                         f"| {d4['auroc']:.3f} | {d4['tpr_at_1pct_fpr']:.3f} |")
    return "\n".join(lines)

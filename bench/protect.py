"""Auto-protect benchmark on the bundled testbed (issue 26, section 3).

    python -m bench.protect [--seeds 8] [--novel 60] [--novel-seeds 2] [--steps 50] [--cfg 7.5]
                            [--strategies guidance,embedding] [--mask FILE] [--limit N]

Everything is measured in this run, on this model, with the project's own functions: the unprotected generations
(``core.sampling.generate``, DDIM ``--steps`` steps, CFG ``--cfg``) and, per strategy, the protected ones
(``core.protect.protected_generate``, flagging at the calibrated first-step threshold) from the same seeds:

- memorized: the testbed's 32 memorized evaluation prompts x seeds ``0 .. --seeds - 1``;
  ``replication_before`` / ``replication_after``: share replicating *any* training image (luminance-structure SSIM
  above ``REPLICATION_SSIM``, ``core.testbed.evaluate.check_replication``, as ``dejaguard testbed evaluate``
  measures), ``replication_after_own_image`` beside;
- novel: ``--novel`` held-out compositional prompts x ``--novel-seeds`` prompt-derived seeds
  (``prompt_seed(prompt, g)``, as the testbed's evaluate); ``novel_alignment_before`` / ``_after``: the testbed's
  deterministic checker (``check_alignment``); ``novel_identical_rate``: share of the *unflagged* novel generations
  bit-identical to the unprotected run (``novel_flagged_rate``: share flagged, the calibrated FPR's doing);
- cost: ``extra_unet_evals_flagged`` / ``_unflagged``: noise predictions beyond the unprotected generation, mean
  per flagged / unflagged image (counted by the denoiser's ``UNetCounter``); ``wall_ratio``: protected wall time
  over unprotected wall time, measured in this run on this machine;
- ``score_before_mean`` / ``score_after_mean`` over flagged memorized images (``ImageProtection.score_after``:
  the guidance strategy's per-step score when normal guidance resumed; the mitigated or masked first-step score);
- fidelity (``fidelity_*``, over the flagged memorized generations): what a protected image keeps of its prompt.

Fidelity, the question and the measure. A memorized testbed prompt means something besides its training image
("a collection of antique roman coins" should still show coins once it no longer copies the coins photograph), but
the testbed has no judge of open-ended content: the deterministic alignment checker reads only the compositional
(shapes and colours) prompts. What it does have is the 12 planted images themselves, each the one picture of its
subject the model knows. So a protected image keeps its prompt when it still looks more like *its own* planted
image than like any other while no longer being a copy of it:

- ``fidelity_own_nearest``: share of the flagged memorized generations that, after protection, replicate no
  training image (structure SSIM <= ``REPLICATION_SSIM`` to all of them) *and* whose nearest planted image is still
  their own (chance: 1 in 12). The headline figure: "not a copy, still its subject".
- ``fidelity_own_ssim_before`` / ``_after``: mean structure SSIM to the own planted image (the replication
  measure itself, continuous: how far from the copy the image moved).
- ``fidelity_colour_before`` / ``_after`` / ``_chance``: mean colour-histogram intersection (joint RGB, 4 bins per
  channel, :func:`colour_intersection`; 1 = same colour distribution) with the own planted image, and ``_chance``
  with the other planted images (what an unrelated image keeps). Structure SSIM is luminance only and
  contrast-invariant by design; the palette (gold coins, an orange tabby) is the other half of what the prompt
  asks for, and a strategy that drops the prompt's guidance loses it first.

Why these and not a perceptual embedding: they are deterministic, need no downloaded model, and use the same
32x32 images and measure the replication figures use, so "replicates" and "keeps its subject" are judged on one
scale. Their limit, stated: "nearest planted image" is a 12-way choice on structure, not a judgement of content.

Prints a table per strategy, then one JSON object as the last line (``strategies: {name: {...}}``).
``--limit N``: only the first N memorized prompts and N novel prompts (development runs; figures only mean
something in full).

Runtime: on the project's shared 2-core CPU one 50-step generation took 3.5-30 s per image depending on the load
(``--limit 8 --seeds 2 --novel 16 --novel-seeds 1``: 24 images, plain 84 s, guidance 216 s, embedding 516 s, 14 min
in all), so the full protocol (376 images per strategy) needs an unshared machine or a GPU; the README lists the
runs made so far.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from dejaguard.core.calibration import resolve_levels
from dejaguard.core.denoiser import load_denoiser
from dejaguard.core.progress import TqdmProgress
from dejaguard.core.protect import DEFAULT_MAX_STEER_FRACTION, DEFAULT_STEER_SCALE, STRATEGIES, protected_generate
from dejaguard.core.sampling import generate, prompt_seed
from dejaguard.core.testbed.data import MEMORIZED, check_alignment, heldout_specs, load_memorized_images
from dejaguard.core.testbed.evaluate import REPLICATION_SSIM, check_replication, thumbnails


def _rate(flags: list[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if flags else None


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def colour_intersection(a: np.ndarray, b: np.ndarray, bins: int = 4) -> float:
    """Colour-histogram intersection of two ``(3, H, W)`` images in [-1, 1]: joint RGB histograms with ``bins`` per
    channel, each normalized to 1, ``sum(min(h_a, h_b))`` in [0, 1] (1: the same colour distribution)."""

    def hist(image: np.ndarray) -> np.ndarray:
        q = np.clip(((image + 1) / 2 * bins).astype(int), 0, bins - 1).reshape(3, -1)
        counts = np.bincount((q[0] * bins + q[1]) * bins + q[2], minlength=bins ** 3)
        return counts / counts.sum()

    return float(np.minimum(hist(a), hist(b)).sum())


def fidelity(plain: np.ndarray, protected: np.ndarray, before: list, after: list, names: list[str],
             training: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The ``fidelity_*`` figures (module doc) of the generations ``plain`` / ``protected`` ``(N, 3, 32, 32)``, their
    replication checks ``before`` / ``after`` and planted image ``names``, over the ``N`` flagged memorized ones."""
    colour = [(colour_intersection(p, training[n]), colour_intersection(q, training[n]),
               float(np.mean([colour_intersection(q, t) for k, t in training.items() if k != n])))
              for p, q, n in zip(plain, protected, names)]
    return {"fidelity_own_nearest": _rate([not c.any and c.nearest.name == n for c, n in zip(after, names)]),
            "fidelity_own_ssim_before": _mean([c.own_ssim for c in before]),
            "fidelity_own_ssim_after": _mean([c.own_ssim for c in after]),
            "fidelity_colour_before": _mean([c[0] for c in colour]),
            "fidelity_colour_after": _mean([c[1] for c in colour]),
            "fidelity_colour_chance": _mean([c[2] for c in colour])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="diffusers folder (default: the bundled testbed)")
    parser.add_argument("--seeds", type=int, default=8, help="seeds per memorized prompt (default 8)")
    parser.add_argument("--novel", type=int, default=60, help="held-out novel prompts (default 60)")
    parser.add_argument("--novel-seeds", type=int, default=2, help="prompt-derived seeds per novel prompt (default 2)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--strategies", default="guidance,embedding",
                        help=f"comma-separated, of {', '.join(STRATEGIES)} (mask needs --mask)")
    parser.add_argument("--mask", default=None, help="neuron mask file for the mask strategy")
    parser.add_argument("--steer-scale", type=float, default=DEFAULT_STEER_SCALE)
    parser.add_argument("--max-steer-fraction", type=float, default=DEFAULT_MAX_STEER_FRACTION)
    parser.add_argument("--threshold", type=float, default=None, help="default: the calibrated threshold")
    parser.add_argument("--limit", type=int, default=None, help="first N memorized and N novel prompts only")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if "mask" in strategies and not args.mask:
        parser.error("the mask strategy needs --mask FILE")

    torch.set_grad_enabled(False)
    denoiser = load_denoiser(args.model)
    threshold, target, source = resolve_levels(args.threshold, None, args.model, denoiser.fingerprint())
    training = load_memorized_images()
    mem = [(p, m) for m in MEMORIZED for p in m.eval_prompts][: args.limit]
    mem_jobs = [(p, s) for p, _ in mem for s in range(args.seeds)]
    owners = [m for _, m in mem for _ in range(args.seeds)]
    novel = [s.caption() for s in heldout_specs()[: min(args.novel, args.limit or args.novel)]]
    novel_jobs = [(p, prompt_seed(p, g)) for p in novel for g in range(args.novel_seeds)]
    jobs = mem_jobs + novel_jobs
    prompts, seeds = [p for p, _ in jobs], [s for _, s in jobs]
    n_mem = len(mem_jobs)
    names = [m.name for m in owners]

    t0 = time.perf_counter()
    with TqdmProgress("plain", unit="image") as bar:
        plain = generate(denoiser, prompts, seeds, args.steps, args.cfg, args.batch_size, progress=bar)
    plain_s = time.perf_counter() - t0
    plain_img = thumbnails(denoiser, plain)
    before = check_replication(plain_img[:n_mem], names, training)
    align_before = [check_alignment(i, p) for i, (p, _) in zip(plain_img[n_mem:], novel_jobs)]
    out: dict = {"settings": {"seeds": args.seeds, "novel": len(novel), "novel_seeds": args.novel_seeds,
                              "steps": args.steps, "cfg": args.cfg, "threshold": threshold,
                              "threshold_source": str(source), "target": target, "steer_scale": args.steer_scale,
                              "max_steer_fraction": args.max_steer_fraction, "replication_ssim": REPLICATION_SSIM,
                              "memorized_generations": n_mem, "novel_generations": len(novel_jobs),
                              "limit": args.limit},
                 "plain_seconds": round(plain_s, 1), "strategies": {}}
    for strategy in strategies:
        t0 = time.perf_counter()
        result = protected_generate(denoiser, prompts, seeds, threshold, strategy, args.steps, args.cfg,
                                    args.batch_size, steer_scale=args.steer_scale,
                                    max_steer_fraction=args.max_steer_fraction, target=target, mask=args.mask)
        seconds = time.perf_counter() - t0
        img = thumbnails(denoiser, result.samples)
        after = check_replication(img[:n_mem], names, training)
        align_after = [check_alignment(i, p) for i, (p, _) in zip(img[n_mem:], novel_jobs)]
        infos = result.images
        unflagged_novel = [k for k in range(n_mem, len(jobs)) if not infos[k].flagged]
        flagged = [i for i in infos if i.flagged]
        flagged_mem = [i for i in infos[:n_mem] if i.flagged]
        rows = [k for k in range(n_mem) if infos[k].flagged]
        out["strategies"][strategy] = {
            "replication_before": _rate([c.any for c in before]),
            "replication_after": _rate([c.any for c in after]),
            "replication_after_own_image": _rate([c.own for c in after]),
            "novel_identical_rate": _rate([bool(torch.equal(result.samples[k], plain[k])) for k in unflagged_novel]),
            "novel_flagged_rate": _rate([i.flagged for i in infos[n_mem:]]),
            "memorized_flagged_rate": _rate([i.flagged for i in infos[:n_mem]]),
            "novel_alignment_before": _rate(align_before),
            "novel_alignment_after": _rate(align_after),
            "extra_unet_evals_flagged": _mean([i.extra_unet_evals for i in flagged]),
            "extra_unet_evals_unflagged": _mean([i.extra_unet_evals for i in infos if not i.flagged]) or 0.0,
            "wall_ratio": round(seconds / plain_s, 3),
            "seconds": round(seconds, 1),
            "score_before_mean": _mean([i.score_before for i in flagged_mem]),
            "score_after_mean": _mean([i.score_after for i in flagged_mem if i.score_after is not None]),
            "steered_steps_mean": _mean([i.steered_steps for i in flagged_mem]) if strategy == "guidance" else None,
            **fidelity(plain_img[rows], img[rows], [before[k] for k in rows], [after[k] for k in rows],
                       [names[k] for k in rows], training),
        }
        print(f"-- {strategy}: {seconds:.0f} s (plain {plain_s:.0f} s): {json.dumps(out['strategies'][strategy])}",
              flush=True)
    for strategy, r in out["strategies"].items():
        rows = [("replication (any training image) before -> after",
                 f"{r['replication_before']} -> {r['replication_after']} "
                 f"(own image {r['replication_after_own_image']})"),
                ("memorized / novel flagged", f"{r['memorized_flagged_rate']} / {r['novel_flagged_rate']}"),
                ("unflagged novel bit-identical", r["novel_identical_rate"]),
                ("novel alignment before -> after", f"{r['novel_alignment_before']} -> {r['novel_alignment_after']}"),
                ("extra UNet evals per image, flagged / unflagged",
                 f"{r['extra_unet_evals_flagged']} / {r['extra_unet_evals_unflagged']}"),
                ("score before -> after (flagged memorized, mean)",
                 f"{r['score_before_mean']} -> {r['score_after_mean']}"),
                ("fidelity: not a copy, nearest is still its own", r["fidelity_own_nearest"]),
                ("fidelity: SSIM to own image before -> after",
                 f"{r['fidelity_own_ssim_before']} -> {r['fidelity_own_ssim_after']}"),
                ("fidelity: colour match to own image before -> after (chance)",
                 f"{r['fidelity_colour_before']} -> {r['fidelity_colour_after']} ({r['fidelity_colour_chance']})"),
                ("wall time protected / plain", r["wall_ratio"])]
        width = max(len(k) for k, _ in rows)
        print(f"== strategy {strategy}")
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

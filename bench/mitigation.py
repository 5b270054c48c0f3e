"""Explanation and mitigation benchmark on the bundled testbed (issue 5).

    python -m bench.mitigation [--seeds 16] [--novel 60] [--steps 50] [--explain-seeds 8] [--held-out]

Everything is measured in this run, on this model, with the project's own functions:

**Token significance** (``core.explain.token_significance``, first step, gradient w.r.t. input token
embeddings; the positionally biased gradient w.r.t. the conditioning rows side by side):

- ``trigger_top1_rate``: over the 12 trigger-token evaluation prompts x ``--explain-seeds`` seeds, how often the
  trigger word ranks first; ``trigger_top1_min_prompt_rate``: the worst prompt's rate (the issue asks >= 90% for
  every prompt).
- ``verbatim_key_word_mean_rank``: for each verbatim prompt, its *key word* is defined independently of the
  gradients, by deletion: the word whose removal from the prompt lowers the first-step score the most (mean over
  the same seeds). Reported: its rank (1 = first) in the significance ranking, averaged over prompts and seeds,
  beside the chance level ``(n_words + 1) / 2``. Deletion is the natural ground truth for "the word the
  memorization hangs on" and costs only first-step scores.

**Embedding mitigation** (``core.mitigate.mitigate_prompt`` per (prompt, seed), on that seed's x_T, with the
default levels of ``core.calibration.resolve_levels`` unless ``--threshold`` / ``--target`` are given; then the full
``--steps``-step DDIM generation at CFG 7.5 from the same seed, with and without mitigation):

- ``replication_before`` / ``replication_after``: share of the memorized prompts' (prompt, seed) generations that
  replicate *a* training image: luminance SSIM to some planted image above ``REPLICATION_SSIM``
  (``core.testbed.evaluate.check_replication``), over the 32 memorized evaluation prompts x ``--seeds`` seeds. Any
  image, not only the prompt's own: measured on testbed v2, the first-step mitigation turned a third of the copies
  into copies of *another* planted image (``replication_after_other_image``); ``_own_image`` variants beside.
- ``novel_alignment_before`` / ``novel_alignment_after``: ``check_alignment`` pass rate of ``--novel`` held-out
  prompts (one prompt-derived seed each, as ``dejaguard testbed evaluate``); ``novel_touched_rate``: share of them
  the mitigation changed at all (the rest keep a bit-identical embedding, hence the same image).
- Prompt fidelity of memorized prompts after mitigation. The testbed has no CLIP scorer, and the only content a
  memorized prompt is tied to is its training image, so two honest proxies are reported:
  ``fidelity_nearest_own_rate``: share of the mitigated generations that no longer replicate any training image
  whose nearest training image (SSIM, among the 12) is still the prompt's own, i.e. the image moved away from the
  copy without drifting to another memorized subject or to noise (it cannot tell "follows the prompt" from
  "a weaker partial copy": read it beside ``ssim_after_median``); and ``text_direction_cosine``: the cosine between
  the first-step text-conditional directions ``eps(x_T, c) - eps(x_T, "")`` before and after mitigation (1 = the
  prompt still pushes the first step the same way, only less strongly).
- Cost: ``mean_iterations`` (optimizer steps), ``unet_evals_per_prompt`` (noise predictions of the mitigation per
  (prompt, seed), the detector's batched call included; backward passes as ``unet_backwards_per_prompt``), over
  memorized and novel pairs separately.

Untouched (prompt, seed) pairs (zero iterations, bit-identical embedding) reuse the unmitigated image instead of
generating it twice: the same inputs give the same image (``tests/test_mitigate.py`` checks it).

**Which pairs chose the defaults.** The mitigation defaults (lr 0.3, at most 30 iterations, target half the
non-memorized median; ``core/mitigate.py``) were chosen on :data:`TUNING_PROMPTS` x :data:`TUNING_SEEDS`
(12 memorized prompts, one per planted image, x 2 seeds). Those 24 pairs are part of the default measurement
(32 prompts x seeds ``0 .. --seeds - 1``): ``tuning_overlap_pairs`` says how many of the measured pairs they
are (24 of 512 at ``--seeds 16``). ``--held-out`` measures only on pairs that did not choose the defaults:
the 20 memorized prompts outside :data:`TUNING_PROMPTS` (template and trigger prompts; the 4 verbatim images
have a single prompt each, all in the tuning set, so no verbatim prompt remains) with the first ``--seeds``
seeds outside :data:`TUNING_SEEDS` (2, 3, ...).
Prints a table, then one JSON object as the last line. Develop with tiny settings
(``--seeds 2 --novel 8 --steps 10 --explain-seeds 2``); the figures only mean something at the defaults.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from dejaguard.core.calibration import resolve_levels
from dejaguard.core.denoiser import load_denoiser
from dejaguard.core.detect import first_step_scores
from dejaguard.core.explain import token_significance
from dejaguard.core.mitigate import DEFAULT_LR, DEFAULT_MAX_ITERATIONS, mitigate_prompt
from dejaguard.core.progress import TqdmProgress
from dejaguard.core.sampling import generate, guided_step, initial_noise, new_schedule, prompt_seed
from dejaguard.core.testbed.data import MEMORIZED, check_alignment, heldout_specs, load_memorized_images
from dejaguard.core.testbed.evaluate import REPLICATION_SSIM, check_replication, thumbnails

# The (prompt, seed) pairs the mitigation defaults were chosen on (testbed v5, core/mitigate.py's module doc:
# "12 memorized prompts, one per image, x 2 seeds"): each planted image's first evaluation prompt, seeds 0 and 1
# (the bench's convention, seeds 0 .. n - 1; the tuning runs did not record more than that).
TUNING_PROMPTS: tuple[str, ...] = tuple(m.eval_prompts[0] for m in MEMORIZED)
TUNING_SEEDS: tuple[int, ...] = (0, 1)


def memorized_jobs(seeds: int, held_out: bool, prompts: int | None = None) -> tuple[list[tuple[str, int]], list]:
    """The memorized (prompt, seed) pairs to measure and each pair's planted image: every evaluation prompt x seeds
    ``0 .. seeds - 1``, or with ``held_out`` only prompts outside :data:`TUNING_PROMPTS` x the first ``seeds``
    seeds outside :data:`TUNING_SEEDS`; ``prompts``: only the first that many prompts (development runs)."""
    mem = [(p, m) for m in MEMORIZED for p in m.eval_prompts if not (held_out and p in TUNING_PROMPTS)][:prompts]
    chosen = [s for s in range(seeds + len(TUNING_SEEDS)) if not (held_out and s in TUNING_SEEDS)][:seeds]
    return [(p, s) for p, _ in mem for s in chosen], [m for _, m in mem for _ in chosen]


def explain_section(denoiser, seeds: list[int], out: dict) -> None:
    for wrt, suffix in (("input", ""), ("conditioning", "_conditioning_rows")):
        per_prompt = {}
        for m in [m for m in MEMORIZED if m.kind == "trigger"]:
            for prompt in m.eval_prompts:
                hits = []
                for s in seeds:
                    r = token_significance(denoiser, prompt, seed=s, wrt=wrt)
                    hits.append(r.words[int(np.argmax(r.word_scores))] == m.trigger)
                per_prompt[prompt] = float(np.mean(hits))
        out[f"trigger_top1_rate{suffix}"] = round(float(np.mean(list(per_prompt.values()))), 4)
        out[f"trigger_top1_min_prompt_rate{suffix}"] = round(min(per_prompt.values()), 4)
        if not suffix:
            out["trigger_top1_per_prompt"] = per_prompt
    ranks, chance, keys = [], [], {}
    for m in [m for m in MEMORIZED if m.kind == "verbatim"]:
        prompt = m.eval_prompts[0]
        words = token_significance(denoiser, prompt, seed=seeds[0]).words  # the tokenizer's words ("collins", ",")
        variants = [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))]
        scores = np.array([[r.score for r in first_step_scores(denoiser, [prompt, *variants], seed=s)]
                           for s in seeds]).mean(axis=0)
        key = int(np.argmax(scores[0] - scores[1:]))  # the deletion that lowers the score most
        keys[prompt] = words[key]
        for s in seeds:
            r = token_significance(denoiser, prompt, seed=s)
            order = sorted(range(len(r.words)), key=lambda w: -r.word_scores[w])
            ranks.append(1 + order.index(key))
            chance.append((len(r.words) + 1) / 2)
    out["verbatim_key_word_mean_rank"] = round(float(np.mean(ranks)), 3)
    out["verbatim_key_word_chance_rank"] = round(float(np.mean(chance)), 3)
    out["verbatim_key_words"] = keys


def first_step_direction(denoiser, cond: torch.Tensor, seed: int, uncond: torch.Tensor) -> torch.Tensor:
    """``eps(x_T, cond) - eps(x_T, "")`` at the first sampling step (the detector's call), flattened."""
    scheduler = new_schedule(denoiser)
    x = initial_noise(denoiser, [seed]) * scheduler.init_noise_sigma
    step = guided_step(denoiser, scheduler, x, scheduler.timesteps[0], cond, uncond, advance=False)
    return (step.eps_cond - step.eps_uncond).flatten()


def mitigate_all(denoiser, jobs: list[tuple[str, int]], args, label: str) -> list:
    threshold, target = args.levels
    results = []
    t0 = time.perf_counter()
    for i, (prompt, seed) in enumerate(jobs):
        results.append(mitigate_prompt(denoiser, prompt, [seed], target, threshold=threshold, lr=args.lr,
                                       max_iterations=args.max_iterations, trajectory_steps=args.trajectory_steps,
                                       num_inference_steps=args.trajectory_schedule, guidance_scale=args.cfg))
        if (i + 1) % 16 == 0 or i + 1 == len(jobs):
            print(f"  mitigated {i + 1}/{len(jobs)} {label} pairs ({time.perf_counter() - t0:.0f}s)", flush=True)
    return results


def images_for(denoiser, jobs, results, steps: int, cfg: float) -> tuple[np.ndarray, np.ndarray]:
    """Thumbnails before and after mitigation; untouched pairs reuse the 'before' image."""
    prompts, seeds = [p for p, _ in jobs], [s for _, s in jobs]
    with TqdmProgress("before", unit="image") as bar:
        before = thumbnails(denoiser, generate(denoiser, prompts, seeds, steps, cfg, progress=bar))
    after = before.copy()
    touched = [i for i, r in enumerate(results) if r.iterations > 0]
    if touched:
        emb = torch.cat([results[i].embedding for i in touched])
        with TqdmProgress("after", unit="image") as bar:
            after[touched] = thumbnails(denoiser, generate(denoiser, [prompts[i] for i in touched],
                                                           [seeds[i] for i in touched], steps, cfg,
                                                           cond_embeddings=emb, progress=bar))
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="diffusers folder (default: the bundled testbed)")
    parser.add_argument("--seeds", type=int, default=16, help="seeds per memorized prompt (default 16)")
    parser.add_argument("--novel", type=int, default=60, help="held-out novel prompts (default 60)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the generations (default 50)")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--explain-seeds", type=int, default=8, help="seeds per prompt for explanations (default 8)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="mitigate prompts scoring above this (default: the calibrated detection threshold)")
    parser.add_argument("--target", type=float, default=None,
                        help="score to push them to (default: the calibrated median of non-memorized prompts)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR)
    parser.add_argument("--max-iterations", type=int, default=DEFAULT_MAX_ITERATIONS)
    parser.add_argument("--trajectory-steps", type=int, default=1,
                        help="optimize the mean magnitude over the first K guided steps (default 1: the first step)")
    parser.add_argument("--trajectory-schedule", type=int, default=50,
                        help="schedule those K steps are taken from (default 50)")
    parser.add_argument("--held-out", action="store_true",
                        help="mitigation figures only on memorized prompts and seeds that did not choose the "
                             "defaults (outside TUNING_PROMPTS and TUNING_SEEDS)")
    parser.add_argument("--skip-explain", action="store_true", help="leave out the token significance section")
    parser.add_argument("--memorized-prompts", type=int, default=None,
                        help="only the first N memorized prompts (development runs; default all)")
    args = parser.parse_args()
    if args.trajectory_steps > 1 and args.target is None:
        parser.error("--trajectory-steps > 1 needs --target: a level of the K-step score, not of the first step")
    denoiser = load_denoiser(args.model)
    threshold, target, _ = resolve_levels(args.threshold, args.target, args.model, denoiser.fingerprint())
    args.levels = (threshold, target)
    out: dict = {"settings": {"seeds": args.seeds, "novel": args.novel, "steps": args.steps, "cfg": args.cfg,
                              "explain_seeds": args.explain_seeds, "threshold": threshold, "target": target,
                              "lr": args.lr, "trajectory_steps": args.trajectory_steps,
                              "max_iterations": args.max_iterations, "replication_ssim": REPLICATION_SSIM,
                              "held_out": args.held_out}}
    if not args.skip_explain:
        t0 = time.perf_counter()
        explain_section(denoiser, list(range(args.explain_seeds)), out)
        out["explain_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"explain: trigger top-1 {out['trigger_top1_rate']:.3f} (min per prompt "
              f"{out['trigger_top1_min_prompt_rate']:.3f}; conditioning rows "
              f"{out['trigger_top1_rate_conditioning_rows']:.3f}),"
              f" verbatim key word mean rank {out['verbatim_key_word_mean_rank']:.2f} "
              f"(chance {out['verbatim_key_word_chance_rank']:.2f})", flush=True)

    training = load_memorized_images()
    uncond = denoiser.encode_prompts([""])
    mem_jobs, owners = memorized_jobs(args.seeds, args.held_out, args.memorized_prompts)
    tuning = {(p, s) for p in TUNING_PROMPTS for s in TUNING_SEEDS}
    out["memorized_pairs"] = len(mem_jobs)
    out["tuning_overlap_pairs"] = sum(job in tuning for job in mem_jobs)
    t0 = time.perf_counter()
    mem_results = mitigate_all(denoiser, mem_jobs, args, "memorized")
    mitigate_s = time.perf_counter() - t0
    before, after = images_for(denoiser, mem_jobs, mem_results, args.steps, args.cfg)
    names = [m.name for m in owners]
    checks_before = check_replication(before, names, training)
    checks_after = check_replication(after, names, training)

    def rate(checks: list, kind: str = "any", rows: np.ndarray | None = None) -> float | None:
        flags = np.array([getattr(c, kind) for c in checks])
        flags = flags if rows is None else flags[rows]
        return round(float(np.mean(flags)), 4) if len(flags) else None  # None: no pair of that kind measured

    out["replication_before"] = rate(checks_before)
    out["replication_after"] = rate(checks_after)
    out["replication_before_own_image"] = rate(checks_before, "own")
    out["replication_after_own_image"] = rate(checks_after, "own")
    out["replication_after_other_image"] = rate(checks_after, "other")
    out["replication_by_kind"] = {
        kind: {"before": rate(checks_before, rows=idx), "after": rate(checks_after, rows=idx),
               "after_own_image": rate(checks_after, "own", idx)}
        for kind in ("verbatim", "template", "trigger")
        for idx in [np.array([m.kind == kind for m in owners])]}
    out["ssim_before_median"] = round(float(np.median([c.own_ssim for c in checks_before])), 4)
    out["ssim_after_median"] = round(float(np.median([c.own_ssim for c in checks_after])), 4)
    own = [c.nearest.name == name for c, name in zip(checks_after, names) if not c.any]
    out["fidelity_nearest_own_rate"] = round(float(np.mean(own)), 4) if own else None
    cosines = []
    for (p, s), r in zip(mem_jobs, mem_results):
        if r.iterations:
            d0 = first_step_direction(denoiser, denoiser.encode_prompts([p]), s, uncond)
            d1 = first_step_direction(denoiser, r.embedding, s, uncond)
            cosines.append(float(torch.nn.functional.cosine_similarity(d0, d1, dim=0)))
    out["text_direction_cosine"] = round(float(np.mean(cosines)), 4) if cosines else None
    out["memorized_touched_rate"] = round(float(np.mean([r.iterations > 0 for r in mem_results])), 4)
    out["memorized_target_reached_rate"] = round(float(np.mean([r.reached for r in mem_results])), 4)
    out["memorized_score_before_mean"] = round(float(np.mean([r.score_before for r in mem_results])), 4)
    out["memorized_score_after_mean"] = round(float(np.mean([r.score_after for r in mem_results])), 4)
    out["mean_iterations"] = round(float(np.mean([r.iterations for r in mem_results])), 3)
    out["unet_evals_per_prompt"] = round(float(np.mean([r.unet_forwards for r in mem_results])), 3)
    out["unet_backwards_per_prompt"] = round(float(np.mean([r.unet_backwards for r in mem_results])), 3)
    out["mitigation_seconds_per_prompt"] = round(mitigate_s / len(mem_jobs), 3)

    novel = [s.caption() for s in heldout_specs()[: args.novel]]
    novel_jobs = [(p, prompt_seed(p)) for p in novel]
    novel_results = mitigate_all(denoiser, novel_jobs, args, "novel")
    nb, na = images_for(denoiser, novel_jobs, novel_results, args.steps, args.cfg)
    out["novel_alignment_before"] = round(float(np.mean([check_alignment(i, p) for i, p in zip(nb, novel)])), 4)
    out["novel_alignment_after"] = round(float(np.mean([check_alignment(i, p) for i, p in zip(na, novel)])), 4)
    out["novel_touched_rate"] = round(float(np.mean([r.iterations > 0 for r in novel_results])), 4)
    out["novel_mean_iterations"] = round(float(np.mean([r.iterations for r in novel_results])), 3)
    out["novel_unet_evals_per_prompt"] = round(float(np.mean([r.unet_forwards for r in novel_results])), 3)
    out["generation_unet_evals_per_image"] = 2 * args.steps

    rows = []
    if not args.skip_explain:
        rows += [("trigger top-1 rate (input embeddings)", out["trigger_top1_rate"]),
                 ("trigger top-1 rate (conditioning rows)", out["trigger_top1_rate_conditioning_rows"]),
                 ("verbatim key word mean rank (chance)",
                  f"{out['verbatim_key_word_mean_rank']} ({out['verbatim_key_word_chance_rank']})")]
    rows += [("memorized (prompt, seed) pairs, of which chose the defaults",
               f"{out['memorized_pairs']}, {out['tuning_overlap_pairs']}"),
             ("replication (any training image) before -> after",
              f"{out['replication_before']} -> {out['replication_after']}"),
             ("  of which another training image than the prompt's, after", out["replication_after_other_image"]),
             ("median SSIM to own image before -> after", f"{out['ssim_before_median']} -> {out['ssim_after_median']}"),
             ("non-replicating, nearest own image", out["fidelity_nearest_own_rate"]),
             ("first-step text direction cosine", out["text_direction_cosine"]),
             ("novel alignment before -> after", f"{out['novel_alignment_before']} -> {out['novel_alignment_after']}"),
             ("novel prompts touched", out["novel_touched_rate"]),
             ("mean iterations (memorized)", out["mean_iterations"]),
             ("UNet forwards / backwards per prompt", f"{out['unet_evals_per_prompt']} / "
                                                      f"{out['unet_backwards_per_prompt']}")]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

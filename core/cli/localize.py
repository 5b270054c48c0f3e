"""``dejaguard localize``: NeMo, the cross-attention value neurons (optionally also the feed-forward hidden units)
that carry one memorized prompt."""

from __future__ import annotations

import argparse
import sys

from . import model_options, read_prompts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("localize", help="NeMo: find the cross-attention neurons that carry a memorized prompt")
    model_options(sp, scoring=False)
    sp.add_argument("--prompt", required=True, help="the memorized prompt")
    sp.add_argument("--out", required=True, help="neuron mask file to write (.safetensors)")
    sp.add_argument("--seeds", type=int, default=4, help="fixed initial noises of the memorization score (default 4)")
    sp.add_argument("--batch", type=int, default=2,
                    help="candidate masks per batched UNet call (default 2; more on a GPU)")
    sp.add_argument("--score", choices=["ssim", "magnitude", "generation"], default="ssim",
                    help="memorization score: NeMo's first-step seed-consistency SSIM (default), the detector's "
                    "first-step magnitude, or 'generation': short generations of the masked model compared with "
                    "the unmasked model's (catches memorization that re-forms after the first step; slower)")
    sp.add_argument("--generation-steps", type=int, default=10,
                    help="steps of the 'generation' score's short generations (default 10)")
    sp.add_argument("--blocks", choices=["down_mid", "all"], default="down_mid",
                    help="attn2.to_v layers searched: down and mid blocks (the paper's, default) or all, up blocks too")
    sp.add_argument("--space", choices=["value", "value+ffn"], default="value",
                    help="neurons searched: the cross-attention value neurons (the paper's, default) or value+ffn, "
                    "the feed-forward (GEGLU) hidden units of the same blocks too")
    sp.add_argument("--ranking", choices=["zscore", "attribution", "both"], default="zscore",
                    help="candidate order: activation z-scores (the paper's, default), attribution, the "
                    "first-order effect of switching each neuron off on the first-step magnitude (one backward pass "
                    "per pick, taken again with the picked neurons off), or both: each search, keeping the smaller "
                    "mask (the two searches' cost)")
    sp.add_argument("--verify-rounds", type=int, default=0,
                    help="check the mask on --seeds unseen seeds; if it fails there, search again with them too "
                    "(at most this many rounds; default 0: no check)")
    sp.add_argument("--reference", action="store_true",
                    help="the paper's sequential schedule, one candidate per UNet call (slower; for comparison)")
    sp.add_argument("--threshold", type=float, default=None,
                    help="memorization-score threshold (default: mean + 1 std over the statistics prompts)")
    sp.add_argument("--stats-prompts", default=None,
                    help="non-memorized prompts for the activation statistics (default: the testbed's captions)")
    sp.add_argument("--score-prompts", type=int, default=64,
                    help="how many of them calibrate the score threshold (default 64)")
    sp.add_argument("--cache", default=None, help="statistics cache folder (default $DEJAGUARD_CACHE or "
                    "~/.cache/dejaguard)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..denoiser import load_denoiser
    from ..nemo import LocalizeSettings, localize, nemo_statistics
    from ..progress import TqdmProgress

    denoiser = load_denoiser(args.model, device=args.device)
    stats_prompts = read_prompts(args.stats_prompts) if args.stats_prompts else None
    if stats_prompts is None and args.model is not None:
        print("dejaguard: note: activation statistics from the testbed's compositional captions; pass "
              "--stats-prompts with prompts typical for this model that are not memorized", file=sys.stderr)
    settings = LocalizeSettings(seeds=args.seeds, schedule="reference" if args.reference else "fast",
                                batch=args.batch, score=args.score, blocks=args.blocks, space=args.space,
                                ranking=args.ranking,
                                generation_steps=args.generation_steps, verify_rounds=args.verify_rounds)
    with TqdmProgress("statistics") as bar:
        stats = nemo_statistics(denoiser, stats_prompts, seeds=settings.seeds, score_prompts=args.score_prompts,
                                cache=args.cache, progress=bar, score=args.score, blocks=args.blocks,
                                generation_steps=args.generation_steps, space=args.space)
    with TqdmProgress("localizing") as bar:
        mask = localize(denoiser, args.prompt, stats, settings, threshold=args.threshold, progress=bar)
    info = mask.info
    if not info["memorized"]:
        print(f"not memorized by NeMo's measure: score {info['score_before']:.3f} < threshold "
              f"{info['threshold']:.3f}; the mask is empty")
    else:
        print(f"{info['neurons']} neuron(s) switch off the memorization: score {info['score_before']:.3f} -> "
              f"{info['score_after']:.3f} (threshold {info['threshold']:.3f}); {info['candidate_evaluations']} "
              f"candidate sets, {info['unet_evals']} noise predictions in {info['unet_calls']} UNet calls, "
              f"{info['wall_s']:.1f}s")
        for r in info.get("verification", []):
            print(f"verified on unseen seeds {r['seeds'][0]}..{r['seeds'][-1]}: score {r['score_unmasked']:.3f} -> "
                  f"{r['score_masked']:.3f} with {r['neurons']} neurons off ({'passed' if r['passed'] else 'failed'})")
        print(mask.describe())
    print(f"wrote {mask.save(args.out)}")
    return 0

"""``dejaguard generate``: one image, optionally with inference-time mitigation of the prompt embedding, or with
auto-protect (``--protect STRATEGY``, :mod:`core.protect`): flagged at its first step, protected in the same run."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DejaGuardError
from . import model_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("generate", help="generate one image, optionally with memorization mitigation")
    model_options(sp, scoring=False)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--out", required=True, help="PNG file to write")
    sp.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sp.add_argument("--steps", type=int, default=50, help="DDIM sampling steps (default 50)")
    sp.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    sp.add_argument("--mitigate", choices=["embedding"], default=None,
                    help="embedding: if the prompt's first-step memorization score exceeds --threshold, "
                    "optimize its embedding until the score is at or below --target (Wen et al.)")
    sp.add_argument("--protect", choices=["guidance", "embedding", "mask"], default=None,
                    help="auto-protect: if the first-step score exceeds --threshold, guidance: steer the rest of the "
                    "same run (no guidance while inside the memorized basin, no extra UNet evaluation); embedding: "
                    "mitigate the embedding and sample again; mask: sample again with --mask switched on")
    sp.add_argument("--mask", type=Path, default=None, help="neuron mask file for --protect mask")
    sp.add_argument("--steer-scale", type=float, default=None,
                    help="--protect guidance: guidance scale while steered (default core.protect.DEFAULT_STEER_SCALE, "
                    "0 = no guidance; negative = opposite guidance)")
    sp.add_argument("--threshold", type=float, default=None,
                    help="mitigate (or protect) only if the first-step score exceeds this (default: the calibrated "
                    "detection threshold)")
    sp.add_argument("--target", type=float, default=None,
                    help="first-step score to push a mitigated prompt to (default: half the calibrated median "
                    "score of non-memorized prompts)")
    sp.add_argument("--calibration", type=Path, default=None, help="calibration file (default: in the model folder)")
    sp.add_argument("--lr", type=float, default=None,
                    help="AdamW learning rate of the mitigation (default: core.mitigate.DEFAULT_LR, 0.3)")
    sp.add_argument("--max-iterations", type=int, default=None,
                    help="mitigation iterations at most (default: core.mitigate.DEFAULT_MAX_ITERATIONS, 30)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration import resolve_levels
    from ..denoiser import load_denoiser
    from ..mitigate import DEFAULT_LR, DEFAULT_MAX_ITERATIONS, content_tokens, mitigate_prompt
    from ..progress import TqdmProgress
    from ..sampling import generate

    if not args.prompt.strip():
        raise DejaGuardError("empty prompt: --prompt states nothing to generate")
    denoiser = load_denoiser(args.model, device=args.device)
    content_tokens(denoiser, args.prompt)
    if args.protect is not None:
        if args.mitigate is not None:
            raise DejaGuardError("--protect and --mitigate are two ways to do one thing: give one of them")
        samples = _protected(denoiser, args)
        _save(denoiser, samples, args)
        return 0
    cond = None
    if args.mitigate == "embedding":
        threshold, target, _ = resolve_levels(args.threshold, args.target, args.calibration or args.model,
                                              denoiser.fingerprint())
        lr = DEFAULT_LR if args.lr is None else args.lr
        iterations = DEFAULT_MAX_ITERATIONS if args.max_iterations is None else args.max_iterations
        r = mitigate_prompt(denoiser, args.prompt, [args.seed], target, threshold=threshold, lr=lr,
                            max_iterations=iterations, num_inference_steps=args.steps)
        cond = r.embedding
        state = ("untouched: at or below the threshold" if r.iterations == 0 else
                 "target met" if r.reached else "target NOT met")
        print(f"mitigation (embedding): score {r.score_before:.4f} -> {r.score_after:.4f} (threshold "
              f"{threshold:.4f}, target {target:.4f}; {state}) in {r.iterations} iterations, "
              f"{r.unet_forwards} UNet forwards, {r.unet_backwards} backwards")
    with TqdmProgress("generate", unit="image") as bar:
        samples = generate(denoiser, [args.prompt], [args.seed], args.steps, args.cfg, cond_embeddings=cond,
                           progress=bar)
    _save(denoiser, samples, args)
    return 0


def _protected(denoiser, args: argparse.Namespace):  # noqa: ANN001, ANN202 (lazy imports)
    """Generate with ``--protect``; prints what happened: flagged, strategy, score before -> after, extra evals."""
    from ..calibration import resolve_levels, resolve_threshold
    from ..detect import ScoreSettings
    from ..protect import DEFAULT_STEER_SCALE, protected_generate

    location = args.calibration or args.model
    target = None
    if args.protect == "embedding":
        threshold, target, _ = resolve_levels(args.threshold, args.target, location, denoiser.fingerprint())
    else:
        threshold, _ = resolve_threshold(args.threshold, location, ScoreSettings(), denoiser.fingerprint())
    result = protected_generate(denoiser, [args.prompt], [args.seed], threshold, args.protect, args.steps, args.cfg,
                                steer_scale=DEFAULT_STEER_SCALE if args.steer_scale is None else args.steer_scale,
                                target=target, mask=args.mask)
    img = result.images[0]
    print(f"protect ({img.strategy}): {'flagged' if img.flagged else 'not flagged'} (threshold {threshold:.4f}); "
          f"{img.line()}; extra UNet evals {img.extra_unet_evals}")
    return result.samples


def _save(denoiser, samples, args: argparse.Namespace) -> None:  # noqa: ANN001
    import numpy as np
    from PIL import Image

    image = denoiser.decode(samples)[0]
    array = ((image.float().cpu().clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(out)
    print(f"wrote {out} ({args.steps} steps, CFG {args.cfg:g}, seed {args.seed})")

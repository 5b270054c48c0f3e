"""``dejaguard generate``: one image, optionally with inference-time mitigation of the prompt embedding."""

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
    sp.add_argument("--threshold", type=float, default=None,
                    help="mitigate only if the first-step score exceeds this (default: the calibrated detection "
                    "threshold)")
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
    import numpy as np
    from PIL import Image

    from ..calibration import resolve_levels
    from ..denoiser import load_denoiser
    from ..mitigate import DEFAULT_LR, DEFAULT_MAX_ITERATIONS, content_tokens, mitigate_prompt
    from ..progress import TqdmProgress
    from ..sampling import generate

    if not args.prompt.strip():
        raise DejaGuardError("empty prompt: --prompt states nothing to generate")
    denoiser = load_denoiser(args.model, device=args.device)
    content_tokens(denoiser, args.prompt)
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
    image = denoiser.decode(samples)[0]
    array = ((image.float().cpu().clamp(-1, 1).numpy() + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(out)
    print(f"wrote {out} ({args.steps} steps, CFG {args.cfg:g}, seed {args.seed})")
    return 0

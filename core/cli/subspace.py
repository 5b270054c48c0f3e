"""``dejaguard subspace``: prune one shared FFN subspace of many memorized prompts (core/prune.py)."""

from __future__ import annotations

import argparse

from . import model_options, read_prompts


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("subspace",
                               help="prune a shared FFN subspace of many memorized prompts (one static mask)")
    model_options(sp, scoring=False)
    sp.add_argument("--prompts", required=True, help="memorized prompts, one per line")
    sp.add_argument("--out", required=True, help="neuron mask file to write (.safetensors)")
    sp.add_argument("--ratio", type=float, default=0.01, help="weights pruned per output row (default 0.01)")
    sp.add_argument("--neutral", default=None, help="neutral prompts to contrast with (default: the empty prompt)")
    sp.add_argument("--steps", type=int, default=5, help="first sampling steps the activations come from")
    sp.add_argument("--seeds", type=int, default=2, help="initial noises per prompt (default 2)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..denoiser import load_denoiser
    from ..progress import TqdmProgress
    from ..prune import subspace_mask

    prompts = read_prompts(args.prompts)
    neutral = read_prompts(args.neutral) if args.neutral else [""]
    denoiser = load_denoiser(args.model, device=args.device)
    with TqdmProgress(unit="gen") as bar:
        mask = subspace_mask(denoiser, prompts, neutral, ratio=args.ratio, seeds=tuple(range(args.seeds)),
                             steps=args.steps, progress=bar)
    info = mask.info
    print(f"pruned {info['weights']} weights ({args.ratio:.2%} per output row) in {len(mask.layers)} ff.net.2 "
          f"layers from {len(prompts)} memorized prompts; {info['unet_evals']} noise predictions, "
          f"{info['wall_s']:.1f}s")
    print(f"wrote {mask.save(args.out)}")
    return 0

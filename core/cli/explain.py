"""``dejaguard explain``: token significance, which prompt words drive the text-conditional prediction."""

from __future__ import annotations

import argparse
import json

from . import model_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("explain", help="token significance: which prompt words drive the text-conditional "
                               "prediction")
    model_options(sp, scoring=False)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--steps", type=int, default=1, help="first sampling steps averaged (default 1)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    sp.add_argument("--json", action="store_true", help="print JSON (tokens, word ids, scores) instead of a ranking")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..denoiser import load_denoiser
    from ..explain import ranking_text, to_json, token_significance

    denoiser = load_denoiser(args.model, device=args.device)
    result = token_significance(denoiser, args.prompt, steps=args.steps, seed=args.seed)
    print(json.dumps(to_json(result, args.steps)) if args.json else ranking_text(result, args.steps))
    return 0

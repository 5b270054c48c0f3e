"""``dejaguard testbed train`` / ``testbed evaluate``: retrain the bundled memorizing testbed, measure it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import DejaGuardError
from . import DEVICE_HELP, model_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    tb = subparsers.add_parser("testbed", help="the bundled memorizing testbed model").add_subparsers(
        dest="testbed_command", required=True)
    sp = tb.add_parser("train", help="retrain the testbed from scratch (CPU, under an hour)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--checkpoint-every", type=int, default=0)
    sp.add_argument("--device", default=None, help=DEVICE_HELP)
    sp.add_argument("--overwrite-bundled", action="store_true")
    sp.add_argument("--filter", type=float, default=None, metavar="THRESHOLD",
                    help="training-time mitigation: drop samples whose text-conditional magnitude exceeds "
                    "THRESHOLD from the loss (default: off)")
    sp.add_argument("--filter-min-timestep", type=int, default=0, metavar="T",
                    help="with --filter: judge only samples drawn at timestep >= T (default 0: all)")
    sp.set_defaults(func=run)
    sp = tb.add_parser("evaluate", help="measure the testbed's memorization and novel-prompt alignment")
    model_options(sp, scoring=False)
    sp.add_argument("--seeds", type=int, default=16, help="seeds per memorized prompt (default 16)")
    sp.add_argument("--novel", type=int, default=240, help="held-out novel prompts, 1..240 (default 240)")
    sp.add_argument("--novel-seeds", type=int, default=4, metavar="N",
                    help="seeds per novel prompt (default 4; 1 is the protocol of v5's first figures)")
    sp.add_argument("--json", default=None)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "evaluate": _evaluate}[args.testbed_command](args)


def _train(args: argparse.Namespace) -> int:
    from ..denoiser import BUNDLED_TESTBED
    from ..testbed.train import TrainConfig, train

    out = Path(args.out)
    if out.resolve() == BUNDLED_TESTBED.resolve() and not args.overwrite_bundled:
        raise DejaGuardError("refusing to overwrite the shipped testbed weights; pass --overwrite-bundled")
    cfg = TrainConfig(seed=args.seed) if args.steps is None else TrainConfig(steps=args.steps, seed=args.seed)
    if args.filter is not None:
        cfg.filter_threshold = args.filter
        cfg.filter_min_timestep = args.filter_min_timestep
    record = train(out, cfg, checkpoint_every=args.checkpoint_every, device=args.device)
    print(f"trained {cfg.steps} steps on {record['device']} in {record['wall_seconds']:.0f}s; wrote {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..denoiser import load_denoiser
    from ..testbed.evaluate import evaluate

    denoiser = load_denoiser(args.model, device=args.device)
    result = evaluate(denoiser, seeds=tuple(range(args.seeds)), novel_count=args.novel,
                      novel_seeds=args.novel_seeds)
    summary = {k: v for k, v in result["memorized"].items() if k != "per_prompt"}
    print(json.dumps({"memorized": summary, "novel": result["novel"], "unconditional": result["unconditional"]},
                     indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

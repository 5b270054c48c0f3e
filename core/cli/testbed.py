"""``dejaguard testbed train`` / ``plant`` / ``evaluate``: retrain the bundled memorizing testbed, plant the
neuron-gated variant (issue 25, :mod:`core.testbed.planted`), measure either (``evaluate --planted --parts graded``:
the graded memorization of :mod:`core.testbed.graded`)."""

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
    sp = tb.add_parser("plant", help="fine-tune the planted-neuron variant from the testbed (CPU, under an hour)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--steps", type=int, default=None, help="planting steps (default: the recipe's)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the shipped run)")
    sp.set_defaults(func=run)
    sp = tb.add_parser("evaluate", help="measure the testbed's memorization and novel-prompt alignment")
    model_options(sp, scoring=False)
    sp.add_argument("--planted", action="store_true",
                    help="measure the planted-neuron variant (--model, default the shipped one) against its ground "
                    "truth: planted prompts with their neurons on and off, and v5's prompts with every designated "
                    "neuron on and off, side by side with the testbed v5 in the same run")
    sp.add_argument("--seeds", type=int, default=16,
                    help="seeds per memorized (or planted, or graded) prompt (default 16)")
    sp.add_argument("--memorized-seeds", type=int, default=2, metavar="N",
                    help="with --planted: seeds per v5 memorized prompt (default 2)")
    sp.add_argument("--parts", default="planted,v5",
                    help="with --planted, comma-separated: 'planted' (planted prompts, neurons on/off), 'v5' (v5's "
                    "prompts on the variant and on v5), 'graded' (graded memorization: replication and first-step "
                    "detection per duplication count, --seeds seeds per prompt against --novel held-out prompts, on "
                    "the variant and on v5), 'carriers' (which designated neurons carry each planted image: --seeds "
                    "generations with every other designated neuron off, per neuron); default 'planted,v5'")
    sp.add_argument("--sampling-steps", type=int, default=50, metavar="N", help="DDIM steps per generation "
                    "(default 50, the protocol of every figure in the model card)")
    sp.add_argument("--novel", type=int, default=None,
                    help="held-out novel prompts, 1..240 (default 240; with --planted 60, 0 = none)")
    sp.add_argument("--novel-seeds", type=int, default=None, metavar="N",
                    help="seeds per novel prompt (default 4, with --planted 2; 1: the protocol of v5's first figures)")
    sp.add_argument("--json", default=None)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return {"train": _train, "plant": _plant, "evaluate": _evaluate}[args.testbed_command](args)


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


def _plant(args: argparse.Namespace) -> int:
    from ..denoiser import BUNDLED_TESTBED
    from ..testbed.planted import PlantConfig, plant

    out = Path(args.out)
    if out.resolve() == BUNDLED_TESTBED.resolve():
        raise DejaGuardError("the planted variant cannot overwrite the testbed it is fine-tuned from")
    cfg = PlantConfig(seed=args.seed, threads=args.threads)
    if args.steps is not None:
        cfg.steps = args.steps
    record = plant(out, cfg)
    print(f"planted {len(record['images'])} images in {cfg.steps} steps in {record['wall_seconds']:.0f}s; wrote {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ..denoiser import load_denoiser
    from ..testbed.evaluate import evaluate

    if args.planted:
        return _evaluate_planted(args)
    denoiser = load_denoiser(args.model, device=args.device)
    result = evaluate(denoiser, seeds=tuple(range(args.seeds)),
                      novel_count=240 if args.novel is None else args.novel,
                      novel_seeds=4 if args.novel_seeds is None else args.novel_seeds,
                      num_inference_steps=args.sampling_steps)
    summary = {k: v for k, v in result["memorized"].items() if k != "per_prompt"}
    print(json.dumps({"memorized": summary, "novel": result["novel"], "unconditional": result["unconditional"]},
                     indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _evaluate_planted(args: argparse.Namespace) -> int:
    from ..denoiser import load_denoiser
    from ..testbed.evaluate import evaluate_planted, graded_table
    from ..testbed.planted import PLANTED_MODEL

    folder = args.model or PLANTED_MODEL
    result = evaluate_planted(load_denoiser(folder, device=args.device), load_denoiser(None, device=args.device),
                              seeds=tuple(range(args.seeds)), memorized_seeds=args.memorized_seeds,
                              novel_count=60 if args.novel is None else args.novel,
                              novel_seeds=2 if args.novel_seeds is None else args.novel_seeds,
                              num_inference_steps=args.sampling_steps, folder=folder,
                              parts=[p.strip() for p in args.parts.split(",") if p.strip()])
    print(json.dumps(result, indent=2))
    if "graded" in result:
        print(graded_table(result["graded"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

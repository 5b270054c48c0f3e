"""The ``dejaguard`` command line: demo, audit, calibrate, and the testbed's train / evaluate.

Bad input ends in one line ``dejaguard: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .errors import DejaGuardError


def _quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.formatwarning = lambda msg, *a, **k: f"dejaguard: warning: {msg}\n"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped. Errors for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise DejaGuardError(f"prompt file not found: {path}")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise DejaGuardError(f"prompt file {path} is not UTF-8 text") from err
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DejaGuardError(f"prompt file {path} has no prompts")
    return prompts


def _settings(args: argparse.Namespace):
    from .detect import ScoreSettings

    return ScoreSettings(steps=args.steps, generations=args.generations, guidance_scale=args.cfg)


def _threshold(args: argparse.Namespace, denoiser, settings) -> float:
    from .denoiser import BUNDLED_TESTBED
    from .detect import load_threshold

    if args.threshold is not None:
        return args.threshold
    return load_threshold(args.calibration or args.model or BUNDLED_TESTBED, settings, denoiser.fingerprint())


def cmd_audit(args: argparse.Namespace) -> int:
    from .denoiser import load_denoiser
    from .detect import first_step_scores

    prompts = read_prompts(args.prompts)
    denoiser = load_denoiser(args.model, device=args.device)
    settings = _settings(args)
    threshold = _threshold(args, denoiser, settings)
    start = time.time()
    results = first_step_scores(denoiser, prompts, settings, seed=args.seed, batch_size=args.batch_size,
                                threshold=threshold, progress=True)
    wall = time.time() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({
                "prompt": r.prompt, "score": r.score, "flagged": r.flagged, "threshold": r.threshold,
                "unet_evals": r.unet_evals, "unet_calls": round(r.unet_calls, 4),
                "generation_scores": r.generation_scores, "seeds": r.seeds,
                "steps": settings.steps, "generations": settings.generations,
            }) + "\n")
    flagged = sum(bool(r.flagged) for r in results)
    print(f"scored {len(results)} prompts in {wall:.1f}s ({denoiser.counter.calls} batched UNet calls, "
          f"{denoiser.counter.forwards} noise predictions); {flagged} flagged above {threshold:.4f}")
    print(f"wrote {out}")
    if args.report:
        from .report import ReportData, write_report

        path = write_report(ReportData(
            title="DejaGuard audit", prompts=[r.prompt for r in results], scores=[r.score for r in results],
            flagged=[r.flagged for r in results], threshold=threshold,
            summary={"model": str(args.model or "bundled testbed"), "prompts": len(results),
                     "flagged": flagged, "threshold": f"{threshold:.4f}", "settings": settings.key(),
                     "wall seconds": f"{wall:.1f}"},
        ), args.report)
        print(f"wrote {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .denoiser import BUNDLED_TESTBED, load_denoiser
    from .detect import calibrate, save_calibration

    denoiser = load_denoiser(args.model, device=args.device)
    memorized: list[str] = []
    if args.prompts:
        prompts, source = read_prompts(args.prompts), str(args.prompts)
        if args.memorized:
            memorized = read_prompts(args.memorized)
    elif args.model is None:
        from .testbed.data import calibration_specs, memorized_eval_prompts

        prompts = [s.caption() for s in calibration_specs()]
        source = "testbed calibration_specs() (200 compositional prompts, disjoint from held-out)"
        memorized = [p for p, _ in memorized_eval_prompts()]
    else:
        raise DejaGuardError("--prompts (a file of prompts known not to be memorized) is required for this model")
    cal = calibrate(denoiser, prompts, _settings(args), args.target_fpr, source, memorized, progress=True)
    path = save_calibration(cal, args.out or args.model or BUNDLED_TESTBED)
    tpr = ""
    if cal.memorized_tpr is not None:
        tpr = f"; {cal.memorized_tpr:.1%} of {len(memorized)} memorized prompts flagged"
    print(f"threshold {cal.threshold:.4f} for {_settings(args).key()} at target FPR {cal.target_fpr:g} "
          f"from {cal.n_prompts} prompts{tpr}")
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), device=args.device)
    return 0


def cmd_testbed_train(args: argparse.Namespace) -> int:
    from .denoiser import BUNDLED_TESTBED
    from .testbed.train import TrainConfig, train

    out = Path(args.out)
    if out.resolve() == BUNDLED_TESTBED.resolve() and not args.overwrite_bundled:
        raise DejaGuardError("refusing to overwrite the shipped testbed weights; pass --overwrite-bundled")
    cfg = TrainConfig(seed=args.seed) if args.steps is None else TrainConfig(steps=args.steps, seed=args.seed)
    record = train(out, cfg, checkpoint_every=args.checkpoint_every)
    print(f"trained {cfg.steps} steps in {record['wall_seconds']:.0f}s; wrote {out}")
    return 0


def cmd_testbed_evaluate(args: argparse.Namespace) -> int:
    from .denoiser import load_denoiser
    from .testbed.evaluate import evaluate

    denoiser = load_denoiser(args.model, device=args.device)
    result = evaluate(denoiser, seeds=tuple(range(args.seeds)), novel_count=args.novel)
    summary = {k: v for k, v in result["memorized"].items() if k != "per_prompt"}
    print(json.dumps({"memorized": summary, "novel": result["novel"]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dejaguard", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, scoring: bool = True) -> None:
        sp.add_argument("--model", type=Path, default=None,
                        help="diffusers-format model folder (default: the bundled testbed)")
        sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        if scoring:
            sp.add_argument("--steps", type=int, default=1, help="first sampling steps averaged (default 1)")
            sp.add_argument("--generations", type=int, default=1, help="initial noises averaged (default 1)")
            sp.add_argument("--cfg", type=float, default=7.5, help="guidance scale of the trajectory (steps > 1)")

    sp = sub.add_parser("demo", help="generate, score and report on the bundled testbed")
    sp.add_argument("--out", default="dejaguard-demo", help="output folder (default ./dejaguard-demo)")
    sp.add_argument("--device", default=None)
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("audit", help="score a prompt list for memorization")
    common(sp)
    sp.add_argument("--prompts", required=True, help="text file, one prompt per line")
    sp.add_argument("--out", required=True, help="output JSONL, one object per prompt")
    sp.add_argument("--seed", type=int, default=None, help="base seed (default: derived from each prompt)")
    sp.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    sp.add_argument("--calibration", type=Path, default=None, help="calibration file (default: in the model folder)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--report", default=None, help="also write an HTML report")
    sp.set_defaults(func=cmd_audit)

    sp = sub.add_parser("calibrate", help="calibrate the detection threshold on non-memorized prompts")
    common(sp)
    sp.add_argument("--prompts", default=None, help="prompts known not to be memorized (default for the testbed: "
                    "its calibration prompts)")
    sp.add_argument("--memorized", default=None, help="optional known memorized prompts, to report the TPR")
    sp.add_argument("--target-fpr", type=float, default=0.01)
    sp.add_argument("--out", default=None, help="calibration file (default: dejaguard_calibration.json in the model)")
    sp.set_defaults(func=cmd_calibrate)

    tb = sub.add_parser("testbed", help="the bundled memorizing testbed model").add_subparsers(
        dest="testbed_command", required=True)
    sp = tb.add_parser("train", help="retrain the testbed from scratch (CPU, under an hour)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--checkpoint-every", type=int, default=0)
    sp.add_argument("--overwrite-bundled", action="store_true")
    sp.set_defaults(func=cmd_testbed_train)
    sp = tb.add_parser("evaluate", help="measure the testbed's memorization and novel-prompt alignment")
    common(sp, scoring=False)
    sp.add_argument("--seeds", type=int, default=16)
    sp.add_argument("--novel", type=int, default=240)
    sp.add_argument("--json", default=None)
    sp.set_defaults(func=cmd_testbed_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_libraries()
        return args.func(args)
    except DejaGuardError as err:
        print(f"dejaguard: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dejaguard: interrupted", file=sys.stderr)
        return 130

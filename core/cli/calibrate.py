"""``dejaguard calibrate``: the detection threshold at a target false-positive rate on non-memorized prompts."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from . import model_options, read_prompts, score_settings

if TYPE_CHECKING:
    from ..detect import ScoreSettings


def score_option(sp: argparse.ArgumentParser, what: str) -> None:
    """``--score``: the score option of :class:`core.detect.ScoreSettings` (checked there: the parser imports no
    torch), for ``calibrate`` and ``audit``."""
    sp.add_argument("--score", default="magnitude", help=f"score option: magnitude (default; Wen et al.) or "
                    f"anisotropy (Asthana & Belagiannis; same cost, see core/detect.py); {what}")
    sp.add_argument("--unconditional", default="empty", help="what the unconditional prediction is conditioned on: "
                    "empty (default: the encoding of the empty prompt, as ComfyUI) or zeros (as A1111 and Forge "
                    "condition an SDXL model on an empty negative prompt: calibrate with it for those WebUIs)")


def scoring_settings(args: argparse.Namespace) -> ScoreSettings:
    """:func:`score_settings` with the ``--score`` and ``--unconditional`` options."""
    from ..detect import ScoreSettings

    base = score_settings(args)
    return ScoreSettings(base.steps, base.generations, base.guidance_scale, base.num_inference_steps, args.score,
                         args.unconditional)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("calibrate", help="calibrate the detection threshold on non-memorized prompts")
    model_options(sp)
    sp.add_argument("--prompts", default=None, help="prompts known not to be memorized (default: for the testbed its "
                    "calibration prompts; for other models the 500 bundled prompts of data/calibration_prompts.txt)")
    sp.add_argument("--memorized", default=None, help="optional known memorized prompts, to report the TPR")
    sp.add_argument("--target-fpr", type=float, default=0.01)
    score_option(sp, "each option is calibrated and stored on its own")
    sp.add_argument("--out", default=None, help="calibration file (default: dejaguard_calibration.json in the model "
                    "folder, or FILE.dejaguard_calibration.json beside a checkpoint)")
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration import calibrate, save_calibration
    from ..denoiser import load_denoiser
    from ..progress import TqdmProgress

    settings = scoring_settings(args)  # a bad option fails before the model loads
    denoiser = load_denoiser(args.model, device=args.device)
    memorized: list[str] = []
    if args.prompts:
        prompts, source = read_prompts(args.prompts), str(args.prompts)
        if args.memorized:
            memorized = read_prompts(args.memorized)
    elif args.model is None:
        from ..testbed.data import calibration_specs, memorized_eval_prompts

        prompts = [s.caption() for s in calibration_specs()]
        source = "testbed calibration_specs() (200 compositional prompts, disjoint from held-out)"
        memorized = [p for p, _ in memorized_eval_prompts()]
    else:
        from ..prompt_sets import CALIBRATION_FILE, calibration_prompts

        prompts = calibration_prompts()
        source = f"bundled {CALIBRATION_FILE} ({len(prompts)} non-memorized prompts, MemAttn)"
    with TqdmProgress("calibrate", unit="gen") as bar:
        cal = calibrate(denoiser, prompts, settings, args.target_fpr, source, memorized, progress=bar)
    path = save_calibration(cal, args.out or args.model)
    tpr = ""
    if cal.memorized_tpr is not None:
        tpr = f"; {cal.memorized_tpr:.1%} of {len(memorized)} memorized prompts flagged"
    print(f"threshold {cal.threshold:.4f} for {settings.key()} at target FPR {cal.target_fpr:g} "
          f"from {cal.n_prompts} prompts{tpr}")
    print(f"wrote {path}")
    return 0

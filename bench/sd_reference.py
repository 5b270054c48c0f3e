"""First-step detection on a real Stable Diffusion checkpoint: the published detection table, measured in one run.

    python -m bench.sd_reference --checkpoint FILE [--device cuda] [--limit N] [--batch-size B] [--json OUT]
    python -m bench.sd_reference --model DIR ...          # a diffusers folder instead of a single file

What it measures. The memorization score of Wen et al. (ICLR 2024), ``||eps(x_T, c) - eps(x_T, "")||_2`` at the
first sampling step (or averaged over the first five steps of guided sampling), averaged over ``n`` initial noises,
computed by :func:`core.detect.first_step_scores` (the one scoring function of the nodes, CLI and benches), on the
prompt sets of the published work: memorized = NeMo's 500 memorized LAION prompts for SD1.x
(:func:`core.prompt_sets.memorized_reference`; 112 verbatim, 388 template), not memorized = the bundled 500 general
prompts (:func:`core.prompt_sets.calibration_prompts`, MemAttn's non-memorized group). For each of the four score
settings of the table (1 and 5 steps x n = 1 and 4 noises: ``ScoreSettings(1, 1)``, ``(1, 4)``, ``(5, 1)``,
``(5, 4)``) it reports AUROC and TPR at 1% FPR (memorized vs. not memorized, and each memorization kind alone vs.
the same non-memorized prompts), the wall-clock seconds per 10 prompts measured in this run (CUDA synchronized
around each setting, after one untimed warm-up call) and the UNet evaluations per prompt counted by the denoiser.

Why. The reference figures of design.md section 5 were measured on SD1.4, which cannot be downloaded here, and
the 2-core CPU of the project's machines could not run 1000 prompts through a full-size UNet anyway. This bench
is the one command that turns a user's SD1.4 / SD1.5 checkpoint and a GPU into the comparison with the
published numbers; the project's tests run it end to end on a random-weight full-size checkpoint so that the
path is known to work before anyone spends GPU time on it.

Seeds are derived from each prompt's text (``first_step_scores``' default), so a rerun, with any batch size and on
any device, scores the same noises. The model runs in float32 (the loader's default). ``--latent S`` shrinks the
latent to ``S x S`` (the UNet is convolutional and runs at any multiple of 8): a speed knob for quick checks that
changes every figure, which are then not comparable with the published ones. Shapes: latents
``(batch, 4, 64, 64)`` for SD1.x at 512 px (``(batch, 4, S, S)`` with ``--latent``), text embeddings
``(batch, 77, 768)``.

Output: progress bars on stderr; on stdout a table with the published figures beside the measured ones, then, as
its last line, one JSON object in the form of ``bench.detection``:
``{"settings": {"steps1_n1": {"auroc", "tpr_at_1pct_fpr", "auroc_verbatim", "tpr_at_1pct_fpr_verbatim",
"auroc_template", "tpr_at_1pct_fpr_template", "seconds_per_10_prompts", "unet_evals_per_prompt",
"unet_calls_per_prompt", "steps", "generations"}, "steps1_n4": ..., "steps5_n1": ..., "steps5_n4": ...},
"memorized_prompts", "memorized_verbatim", "memorized_template", "nonmemorized_prompts", "device", "checkpoint",
...}`` (a split with no prompt under ``--limit`` has ``null`` figures).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from dejaguard.core.denoiser import Denoiser, load_denoiser
from dejaguard.core.detect import ScoreSettings, first_step_scores
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.metrics import auroc, tpr_at_fpr
from dejaguard.core.progress import TqdmProgress
from dejaguard.core.prompt_sets import MemorizedPrompt, calibration_prompts, memorized_reference

SETTINGS: dict[str, ScoreSettings] = {
    "steps1_n1": ScoreSettings(1, 1),
    "steps1_n4": ScoreSettings(1, 4),
    "steps5_n1": ScoreSettings(5, 1),
    "steps5_n4": ScoreSettings(5, 4),
}
KINDS = ("verbatim", "template")
FPR = 0.01

# Published figures, SD1.4, Webster's 500 memorized prompts vs 500 not memorized (design.md section 5), as
# (AUROC, TPR@1%FPR) per setting, as the authors report them.
REFERENCES: dict[str, tuple[str, dict[str, tuple[float, float]]]] = {
    "wen_reproduced": ("Wen et al., independent reproduction", {
        "steps1_n1": (0.976, 0.896), "steps1_n4": (0.992, 0.944), "steps5_n4": (0.997, 0.978)}),
    "wen_paper": ("Wen et al., paper table", {"steps1_n1": (0.960, 0.760)}),
}


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def detection_figures(scores: Sequence[float], kinds: Sequence[str | None]) -> dict[str, float | None]:
    """AUROC and TPR@1%FPR of memorized vs. not memorized, over all memorized prompts and per kind.

    ``scores[i]``: score of prompt ``i``; ``kinds[i]``: "verbatim" / "template" for a memorized prompt, None for
    a non-memorized one. A kind's figures compare its prompts with all non-memorized prompts (the same threshold
    as the overall TPR); ``None`` where the kind has no prompt.
    """
    scores = np.asarray(scores, dtype=float)
    negative = np.array([k is None for k in kinds])
    out: dict[str, float | None] = {}
    for suffix, positive in [("", ~negative)] + [(f"_{kind}", np.array([k == kind for k in kinds])) for kind in KINDS]:
        chosen = positive | negative
        labels = positive[chosen].astype(int)
        has_both = 0 < labels.sum() < len(labels)
        out[f"auroc{suffix}"] = _rounded(auroc(scores[chosen], labels)) if has_both else None
        out[f"tpr_at_1pct_fpr{suffix}"] = _rounded(tpr_at_fpr(scores[chosen], labels, FPR)) if has_both else None
    return out


def measure(denoiser: Denoiser, memorized: Sequence[MemorizedPrompt], nonmemorized: Sequence[str],
            settings: ScoreSettings, batch_size: int, desc: str = "") -> dict[str, float | int | None]:
    """Score memorized + non-memorized prompts with ``settings``; detection figures, time and UNet cost."""
    prompts = [m.prompt for m in memorized] + list(nonmemorized)
    kinds = [m.kind for m in memorized] + [None] * len(nonmemorized)
    before = denoiser.counter.snapshot()
    _sync(denoiser.device)
    t0 = time.perf_counter()
    with TqdmProgress(desc, unit="gen") as bar:
        results = first_step_scores(denoiser, prompts, settings, batch_size=batch_size, progress=bar)
    _sync(denoiser.device)
    wall = time.perf_counter() - t0
    spent = denoiser.counter.since(before)
    return {
        **detection_figures([r.score for r in results], kinds),
        "seconds_per_10_prompts": round(10 * wall / len(prompts), 3),
        "unet_evals_per_prompt": spent.forwards / len(prompts),
        "unet_calls_per_prompt": round(spent.calls / len(prompts), 4),
        "steps": settings.steps,
        "generations": settings.generations,
    }


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(out: dict) -> str:
    """The measured figures per setting with the published ones beside (AUROC / TPR@1%FPR)."""
    head = (f"{'setting':<10} {'AUROC':>6} {'TPR@1%':>6} {'verbatim':>13} {'template':>13} {'s/10 prompts':>12} "
            f"{'evals/prompt':>12}  " + "  ".join(f"{key:>14}" for key in REFERENCES))
    lines = [head, "-" * len(head)]
    for name, fig in out["settings"].items():
        refs = [f"{_cell(figures[name][0]) + ' / ' + _cell(figures[name][1]) if name in figures else '-':>14}"
                for _, figures in REFERENCES.values()]
        lines.append(
            f"{name:<10} {_cell(fig['auroc']):>6} {_cell(fig['tpr_at_1pct_fpr']):>6} "
            f"{_cell(fig['auroc_verbatim']) + ' / ' + _cell(fig['tpr_at_1pct_fpr_verbatim']):>13} "
            f"{_cell(fig['auroc_template']) + ' / ' + _cell(fig['tpr_at_1pct_fpr_template']):>13} "
            f"{fig['seconds_per_10_prompts']:>12.3f} {fig['unet_evals_per_prompt']:>12g}  " + "  ".join(refs))
    lines.append("verbatim / template: AUROC / TPR@1%FPR of that kind of memorized prompt vs. all non-memorized.")
    for key, (source, _) in REFERENCES.items():
        lines.append(f"{key}: {source} (SD1.4, AUROC / TPR@1%FPR as the authors report them, design.md section 5)")
    lines.append(f"measured: {out['checkpoint']} on {out['device']}, latent {'x'.join(map(str, out['latent']))}, "
                 f"{out['memorized_prompts']} memorized ({out['memorized_verbatim']} verbatim, "
                 f"{out['memorized_template']} template) vs {out['nonmemorized_prompts']} not memorized")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sd_reference",
        description="First-step memorization detection (Wen et al.) on an SD1.4/1.5 checkpoint: NeMo's 500 memorized "
                    "LAION prompts vs the bundled 500 non-memorized prompts, 1 and 5 steps x 1 and 4 noises, "
                    "with the published figures beside. Last line of stdout: one JSON object.")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="FILE", help="single-file .safetensors checkpoint (SD1.x)")
    model.add_argument("--model", metavar="DIR", help="diffusers model folder")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA if there is one)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="score only the first N prompts of each list (memorized, not memorized): a quick run")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help="(prompt, noise) pairs per UNet call (default 32 on CUDA, 8 on the CPU)")
    parser.add_argument("--latent", type=int, default=None, metavar="S",
                        help="latent side S (default: the model's own, 64 for SD1.x at 512 px); a smaller latent is "
                             "faster but CHANGES EVERY FIGURE: they are then not comparable with the published ones")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the JSON object to OUT")
    return parser


def run(args: argparse.Namespace) -> dict:
    """Load the model, score every setting, return the JSON object (see the module doc)."""
    for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size), ("--latent", args.latent)):
        if value is not None and value < 1:
            raise DejaGuardError(f"{name} must be at least 1, got {value}")
    if args.latent is not None and args.latent % 8:
        raise DejaGuardError(f"--latent must be a multiple of 8 (the UNet halves it three times), got {args.latent}")
    memorized = memorized_reference()[: args.limit]
    nonmemorized = calibration_prompts()[: args.limit]
    source = args.checkpoint or args.model
    denoiser = load_denoiser(source, device=args.device)
    if args.latent is not None:
        denoiser.sample_shape = (denoiser.sample_shape[0], args.latent, args.latent)
    batch_size = args.batch_size or (32 if denoiser.device.type == "cuda" else 8)
    first_step_scores(denoiser, [nonmemorized[0]], ScoreSettings(1, 1))  # warm-up (CUDA kernels), not timed
    out: dict = {"settings": {}}
    for name, settings in SETTINGS.items():
        out["settings"][name] = measure(denoiser, memorized, nonmemorized, settings, batch_size, desc=name)
    out.update({
        "memorized_prompts": len(memorized),
        "memorized_verbatim": sum(m.kind == "verbatim" for m in memorized),
        "memorized_template": sum(m.kind == "template" for m in memorized),
        "nonmemorized_prompts": len(nonmemorized),
        "device": str(denoiser.device),
        "checkpoint": str(source),
        "family": getattr(denoiser, "family", None),
        "dtype": str(denoiser.dtype).removeprefix("torch."),
        "latent": list(denoiser.sample_shape),
        "batch_size": batch_size,
        "guidance_scale": SETTINGS["steps5_n4"].guidance_scale,
        "schedule_steps": SETTINGS["steps5_n4"].num_inference_steps,
        "torch_threads": torch.get_num_threads(),
    })
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except DejaGuardError as err:
        print(f"bench.sd_reference: error: {err}", file=sys.stderr)
        return 2
    print(table(out))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

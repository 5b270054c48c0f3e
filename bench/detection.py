"""Detection benchmark on the bundled testbed.

    python -m bench.detection [--quick]

Scores the testbed's memorized prompts against its held-out novel prompts with the core scoring
function (first step n=1, first step n=4, five steps n=4) and times first-step detection against
the alternative it replaces: full 50-step generation followed by comparison with the training
images, both on the same prompts in this run. Prints a table, then one JSON object as the last line.

Score options side by side (``core.detect.SCORES``: magnitude, anisotropy): each is measured at the first step
with n = 1 and n = 4 noises on the same prompts and seeds, in the JSON's ``scores`` object
(``{"magnitude": {...}, "anisotropy": {...}}``: AUROC, TPR at 1% FPR, UNet evaluations per prompt, and the
share of memorized / novel prompts flagged at the bundled calibrated threshold of that option, and the margin
between the two prompt sets in units of the novel scores' spread, :func:`margin_sd`) and in a table.
The top-level keys are the magnitude score's, as before (the same numbers as ``scores.magnitude``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from dejaguard.core.calibration import resolve_threshold
from dejaguard.core.denoiser import load_denoiser
from dejaguard.core.detect import MAGNITUDE, SCORES, ScoreSettings, first_step_scores
from dejaguard.core.metrics import auroc, tpr_at_fpr
from dejaguard.core.progress import TqdmProgress
from dejaguard.core.sampling import generate, prompt_seed
from dejaguard.core.testbed.data import heldout_specs, load_memorized_images, memorized_eval_prompts
from dejaguard.core.testbed.evaluate import nearest_training_image, thumbnails


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer novel prompts and timing prompts")
    parser.add_argument("--timing-prompts", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    denoiser = load_denoiser()
    memorized = [p for p, _ in memorized_eval_prompts()]
    novel = [s.caption() for s in heldout_specs()[: 60 if args.quick else 240]]
    prompts, labels = memorized + novel, [1] * len(memorized) + [0] * len(novel)
    out: dict = {"memorized_prompts": len(memorized), "novel_prompts": len(novel)}
    by_score: dict[str, dict] = {score: {} for score in SCORES}
    runs = [("", ScoreSettings(1, 1)), ("_n4", ScoreSettings(1, 4)), ("_5steps_n4", ScoreSettings(5, 4))]
    runs += [(name, ScoreSettings(1, n, score=score)) for score in SCORES if score != MAGNITUDE
             for name, n in (("", 1), ("_n4", 4))]
    for name, settings in runs:
        before = denoiser.counter.snapshot()
        t0 = time.perf_counter()
        with TqdmProgress(f"detection {settings.score}{name}", unit="gen") as bar:
            scores = [r.score for r in first_step_scores(denoiser, prompts, settings, progress=bar)]
        wall = time.perf_counter() - t0
        spent = denoiser.counter.since(before)
        row = {f"auroc{name}": round(auroc(scores, labels), 4),
               f"tpr_at_1pct_fpr{name}": round(tpr_at_fpr(scores, labels, 0.01), 4),
               f"unet_evals_per_prompt{name}": spent.forwards / len(prompts),
               f"unet_calls_per_prompt{name}": round(spent.calls / len(prompts), 4),
               f"seconds_per_10_prompts{name}": round(10 * wall / len(prompts), 3)}
        if settings.score == MAGNITUDE:
            out.update(row)
        if settings.steps == 1:
            threshold, _ = resolve_threshold(None, None, settings, denoiser.fingerprint())
            flagged = [s > threshold for s in scores]
            row[f"calibrated_threshold{name}"] = round(threshold, 4)
            row[f"memorized_flagged{name}"] = round(float(np.mean(flagged[: len(memorized)])), 4)
            row[f"novel_flagged{name}"] = round(float(np.mean(flagged[len(memorized):])), 4)
            row[f"margin_sd{name}"] = round(margin_sd(scores[: len(memorized)], scores[len(memorized):]), 3)
            by_score[settings.score].update(row)
    out["unet_evals_per_prompt"] = out.pop("unet_evals_per_prompt")
    out["scores"] = by_score

    # Side by side: first-step detection vs full generation + comparison, same prompts, this run.
    half = args.timing_prompts // 2
    timed = memorized[:half] + novel[:half]
    timed_labels = [1] * half + [0] * half
    training = load_memorized_images()
    t0 = time.perf_counter()
    first_step_scores(denoiser, timed, ScoreSettings(1, 1))
    detect_s = time.perf_counter() - t0
    before = denoiser.counter.snapshot()
    t0 = time.perf_counter()
    images = thumbnails(denoiser, generate(denoiser, timed, [prompt_seed(p) for p in timed]))
    full_scores = [nearest_training_image(img, training).ssim for img in images]
    full_s = time.perf_counter() - t0
    out["timing_prompts"] = len(timed)
    out["first_step_seconds"] = round(detect_s, 3)
    out["full_generation_seconds"] = round(full_s, 3)
    out["speedup_vs_full_generation"] = round(full_s / detect_s, 1)
    out["full_generation_unet_evals_per_prompt"] = denoiser.counter.since(before).forwards / len(timed)
    out["full_generation_auroc_on_timing_prompts"] = round(auroc(full_scores, timed_labels), 4)
    out["device"] = str(denoiser.device)
    out["torch_threads"] = torch.get_num_threads()
    width = max(map(len, out))
    for k, v in out.items():
        if k != "scores":
            print(f"{k:<{width}}  {v}")
    print(score_table(by_score))
    print(json.dumps(out))


def margin_sd(memorized: list[float], novel: list[float]) -> float:
    """``(lowest memorized - highest novel) / std(novel)``: how far apart the two sets lie, in the novel scores' own
    spread (scale-free, so comparable between score options; > 0 means perfectly separated). Says more than
    AUROC where AUROC is 1.0 for both."""
    return float((min(memorized) - max(novel)) / np.std(novel))


def score_table(by_score: dict[str, dict]) -> str:
    """The score options side by side: first step, n = 1 and n = 4 noises, same prompts and seeds."""
    head = (f"{'score':<12} {'AUROC n=1':>10} {'TPR@1%FPR n=1':>14} {'AUROC n=4':>10} {'TPR@1%FPR n=4':>14} "
            f"{'margin/sd n=1':>13} {'margin/sd n=4':>13} {'mem/novel flagged n=1':>22} {'UNet evals/prompt':>18}")
    lines = [head, "-" * len(head)]
    for score, r in by_score.items():
        flagged = f"{r['memorized_flagged']:.3f} / {r['novel_flagged']:.3f}"
        lines.append(f"{score:<12} {r['auroc']:>10.4f} {r['tpr_at_1pct_fpr']:>14.4f} {r['auroc_n4']:>10.4f} "
                     f"{r['tpr_at_1pct_fpr_n4']:>14.4f} {r['margin_sd']:>13.2f} {r['margin_sd_n4']:>13.2f} "
                     f"{flagged:>22} {r['unet_evals_per_prompt']:>18g}")
    return "\n".join(lines)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()

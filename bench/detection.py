"""Detection benchmark on the bundled testbed.

    python -m bench.detection [--quick]

Scores the testbed's memorized prompts against its held-out novel prompts with the core scoring
function (first step n=1, first step n=4, five steps n=4) and times first-step detection against
the alternative it replaces: full 50-step generation followed by comparison with the training
images, both on the same prompts in this run. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from dejaguard.core.denoiser import load_denoiser
from dejaguard.core.detect import ScoreSettings, first_step_scores
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
    for name, settings in [("", ScoreSettings(1, 1)), ("_n4", ScoreSettings(1, 4)),
                           ("_5steps_n4", ScoreSettings(5, 4))]:
        before = denoiser.counter.snapshot()
        t0 = time.perf_counter()
        with TqdmProgress(f"detection{name}", unit="gen") as bar:
            scores = [r.score for r in first_step_scores(denoiser, prompts, settings, progress=bar)]
        wall = time.perf_counter() - t0
        spent = denoiser.counter.since(before)
        out[f"auroc{name}"] = round(auroc(scores, labels), 4)
        out[f"tpr_at_1pct_fpr{name}"] = round(tpr_at_fpr(scores, labels, 0.01), 4)
        out[f"unet_evals_per_prompt{name}"] = spent.forwards / len(prompts)
        out[f"unet_calls_per_prompt{name}"] = round(spent.calls / len(prompts), 4)
        out[f"seconds_per_10_prompts{name}"] = round(10 * wall / len(prompts), 3)
    out["unet_evals_per_prompt"] = out.pop("unet_evals_per_prompt")

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
        print(f"{k:<{width}}  {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()

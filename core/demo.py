"""``dejaguard demo``: detection on the bundled testbed, end to end, with an HTML report."""

from __future__ import annotations

import time
from pathlib import Path

from .calibration import resolve_threshold
from .denoiser import BUNDLED_TESTBED, load_denoiser
from .detect import ScoreSettings, first_step_scores
from .progress import TqdmProgress
from .report import ImageCard, ReportData, summary_metrics, write_report
from .sampling import generate
from .testbed.data import MEMORIZED, heldout_specs, load_memorized_images
from .testbed.evaluate import nearest_training_image, thumbnails

DEMO_NOVEL = 6
# Four initial noises per prompt: on the testbed, one noise leaves a tail of novel prompts as high
# as memorized ones (TPR@1%FPR 0.53 at n=1 vs 1.0 at n=4, bench.detection); 8 UNet evaluations.
DEMO_SETTINGS = ScoreSettings(steps=1, generations=4)


def run_demo(out: Path, device: str | None = None) -> Path:
    """Score every testbed prompt at the first step (memorized vs held-out novel), generate one
    image for one prompt per memorized image and for a few novel prompts, and write a report."""
    start = time.time()
    denoiser = load_denoiser(device=device)
    settings = DEMO_SETTINGS
    threshold, _ = resolve_threshold(None, BUNDLED_TESTBED, settings, denoiser.fingerprint())
    memorized = [(p, m) for m in MEMORIZED for p in m.eval_prompts]
    novel = [s.caption() for s in heldout_specs()]
    prompts = [p for p, _ in memorized] + novel
    labels = [1] * len(memorized) + [0] * len(novel)
    print(f"scoring {len(prompts)} prompts ({len(memorized)} memorized, {len(novel)} novel) at the first step, "
          f"{settings.generations} noises each")
    with TqdmProgress("demo", unit="gen") as bar:
        scores = first_step_scores(denoiser, prompts, settings, threshold=threshold, progress=bar)
    score_of = {r.prompt: r for r in scores}

    shown = [(m.eval_prompts[0], f"memorized ({m.kind})") for m in MEMORIZED]
    shown += [(p, "novel (held out)") for p in novel[:DEMO_NOVEL]]
    print(f"generating {len(shown)} images (50 DDIM steps, CFG 7.5) for the image grid")
    with TqdmProgress("demo", unit="image") as bar:
        samples = generate(denoiser, [p for p, _ in shown], [score_of[p].seeds[0] for p, _ in shown], progress=bar)
    images = thumbnails(denoiser, samples)
    training = load_memorized_images()
    cards = []
    for (prompt, label), image in zip(shown, images):
        near = nearest_training_image(image, training)
        verdict = "replicates" if near.replicates else "does not replicate"
        cards.append(ImageCard(
            prompt=prompt, image=image, score=score_of[prompt].score, flagged=score_of[prompt].flagged,
            neighbour=training[near.name], label=label,
            neighbour_caption=f"nearest training image: {near.name}, SSIM {near.ssim:.2f} ({verdict})"))
    flagged = sum(bool(r.flagged) for r in scores)
    summary = {
        "model": "bundled testbed (core/testbed/model)",
        "prompts scored": len(prompts),
        **summary_metrics([r.score for r in scores], labels),
        "score setting": settings.key(),
        "threshold (calibrated, 1% FPR)": f"{threshold:.4f}",
        "flagged memorized": f"{sum(bool(r.flagged) for r in scores[:len(memorized)])} / {len(memorized)}",
        "flagged novel": f"{sum(bool(r.flagged) for r in scores[len(memorized):])} / {len(novel)}",
        "UNet evaluations per prompt (detection)": scores[0].unet_evals,
        "wall seconds": f"{time.time() - start:.1f}",
    }
    path = write_report(ReportData(
        title="DejaGuard demo: first-step memorization detection on the testbed", summary=summary,
        prompts=prompts, scores=[r.score for r in scores], flagged=[r.flagged for r in scores],
        labels=labels, threshold=threshold, cards=cards), Path(out) / "report.html")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    print(f"{flagged} of {len(prompts)} prompts flagged")
    print(f"report: {path.resolve()}")
    return path

"""Memorization detection from the first sampling step (Wen et al., ICLR 2024).

Score of a prompt: ``||eps(x_T, c) - eps(x_T, 0)||_2`` at the first sampling step, optionally
averaged over the first ``steps`` steps of guided sampling and over ``generations`` initial
noises. With classifier-free guidance the two predictions come from one batched UNet call, so
first-step detection costs one call per prompt and generation.

Thresholds are calibrated on prompts known not to be memorized: the threshold is the
``1 - target_fpr`` quantile of their scores, stored per model and per scoring setting in a JSON
file beside the model (``dejaguard_calibration.json``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .denoiser import Denoiser
from .errors import DejaGuardError, NonFiniteError
from .progress import Progress, report
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, guided_denoise, initial_noise, prompt_seed

CALIBRATION_FILE = "dejaguard_calibration.json"


@dataclass(frozen=True)
class ScoreSettings:
    """How a score is computed. Thresholds are only comparable between equal settings."""

    steps: int = 1  # first k sampling steps averaged
    generations: int = 1  # initial noises averaged
    guidance_scale: float = DEFAULT_GUIDANCE  # steers the trajectory when steps > 1
    num_inference_steps: int = DEFAULT_STEPS  # the sampling schedule the steps are taken from

    def __post_init__(self) -> None:
        if self.steps < 1 or self.generations < 1:
            raise DejaGuardError("steps and generations must be at least 1")
        if self.steps > self.num_inference_steps:
            raise DejaGuardError(f"steps ({self.steps}) exceeds the sampling schedule ({self.num_inference_steps})")

    def key(self) -> str:
        return (f"steps={self.steps},generations={self.generations},"
                f"cfg={self.guidance_scale:g},schedule={self.num_inference_steps}")


@dataclass
class PromptScore:
    """Detection result for one prompt."""

    prompt: str
    score: float  # mean over generations of the mean over steps
    generation_scores: list[float]
    seeds: list[int]
    unet_evals: int  # noise predictions spent on this prompt (a cond/uncond pair counts 2)
    unet_calls: float  # batched UNet calls attributed to this prompt (shared calls split evenly)
    flagged: bool | None = None
    threshold: float | None = None


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise DejaGuardError("no prompts given")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise DejaGuardError(f"prompt {i + 1} is empty: the unconditional prediction has nothing to contrast")
    return prompts


def first_step_scores(
    denoiser: Denoiser,
    prompts: Sequence[str],
    settings: ScoreSettings | None = None,
    seed: int | None = None,
    batch_size: int = 32,
    threshold: float | None = None,
    progress: Progress | None = None,
) -> list[PromptScore]:
    """Score each prompt. The one scoring function of the nodes, CLI and benchmarks.

    Seeds: generation ``g`` of a prompt uses ``seed + g`` if ``seed`` is given, else a seed
    derived from the prompt text (:func:`prompt_seed`), so a score never depends on batching.
    ``batch_size`` counts (prompt, generation) pairs per UNet call (each call holds twice as
    many samples: unconditional and conditional). Each result's ``unet_evals`` counts its noise
    predictions (``2 x steps x generations``), ``unet_calls`` its share of the batched calls.
    ``progress(done, total, "scoring")`` counts finished (prompt, generation) pairs.
    """
    settings = settings or ScoreSettings()
    prompts = _check_prompts(prompts)
    jobs = [(i, g) for i in range(len(prompts)) for g in range(settings.generations)]
    seeds = {(i, g): (seed + g if seed is not None else prompt_seed(prompts[i], g)) for i, g in jobs}
    uncond = denoiser.encode_prompts([""])
    per_job: dict[tuple[int, int], float] = {}
    calls = np.zeros(len(prompts))
    report(progress, 0, len(jobs), "scoring")
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            before = denoiser.counter.calls
            cond = denoiser.encode_prompts([prompts[i] for i, _ in chunk])
            noise = initial_noise(denoiser, [seeds[j] for j in chunk])
            _, mags = guided_denoise(denoiser, noise, cond, uncond, settings.num_inference_steps,
                                     settings.guidance_scale, stop_after=settings.steps)
            spent = denoiser.counter.calls - before
            scores = mags.mean(dim=1).double().cpu().numpy()
            if not np.isfinite(scores).all():
                raise NonFiniteError("a memorization score is NaN or infinite")
            for j, s in zip(chunk, scores):
                per_job[j] = float(s)
                calls[j[0]] += spent / len(chunk)
            report(progress, start + len(chunk), len(jobs), "scoring")
    results = []
    for i, p in enumerate(prompts):
        gen_scores = [per_job[(i, g)] for g in range(settings.generations)]
        score = float(np.mean(gen_scores))
        results.append(PromptScore(
            prompt=p, score=score, generation_scores=gen_scores,
            seeds=[seeds[(i, g)] for g in range(settings.generations)],
            unet_evals=2 * settings.steps * settings.generations, unet_calls=float(calls[i]),
            flagged=None if threshold is None else bool(score > threshold), threshold=threshold,
        ))
    return results


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """A threshold calibrated on non-memorized prompts for one model and one score setting."""

    threshold: float
    target_fpr: float
    settings: dict
    fingerprint: str
    n_prompts: int
    prompts_source: str
    nonmemorized_quantiles: dict = field(default_factory=dict)
    created: str = ""
    memorized_tpr: float | None = None  # on memorized prompts, if some were given


def calibrate(
    denoiser: Denoiser,
    nonmemorized_prompts: Sequence[str],
    settings: ScoreSettings | None = None,
    target_fpr: float = 0.01,
    prompts_source: str = "",
    memorized_prompts: Sequence[str] = (),
    progress: Progress | None = None,
) -> Calibration:
    """Score prompts known not to be memorized and place the threshold at their
    ``1 - target_fpr`` quantile (flagged means ``score > threshold``), so that at most
    ``target_fpr`` of such prompts are flagged. Needs at least ``1 / target_fpr`` prompts.
    """
    settings = settings or ScoreSettings()
    if not 0 < target_fpr < 1:
        raise DejaGuardError("target FPR must lie in (0, 1)")
    needed = math.ceil(1 / target_fpr)
    if len(nonmemorized_prompts) < needed:
        raise DejaGuardError(
            f"calibrating for FPR {target_fpr:g} needs at least {needed} non-memorized prompts, "
            f"got {len(nonmemorized_prompts)}")
    scores = np.array([r.score for r in first_step_scores(denoiser, nonmemorized_prompts, settings,
                                                          progress=progress)])
    threshold = float(np.quantile(scores, 1 - target_fpr, method="higher"))
    tpr = None
    if memorized_prompts:
        mem = first_step_scores(denoiser, memorized_prompts, settings, progress=progress)
        tpr = float(np.mean([r.score > threshold for r in mem]))
    return Calibration(
        threshold=threshold, target_fpr=target_fpr, settings=asdict(settings),
        fingerprint=denoiser.fingerprint(), n_prompts=len(scores), prompts_source=prompts_source,
        nonmemorized_quantiles={q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.9", "0.99")},
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), memorized_tpr=tpr,
    )


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    """Add (or replace) ``calibration`` in the calibration file at ``path`` (a file or model folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    data[ScoreSettings(**calibration.settings).key()] = asdict(calibration)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def load_threshold(path: str | Path, settings: ScoreSettings, fingerprint: str) -> float:
    """The calibrated threshold for ``settings`` from a calibration file or model folder."""
    path = Path(path)
    file = path / CALIBRATION_FILE if path.is_dir() else path
    if not file.exists():
        raise DejaGuardError(
            f"no calibrated threshold for this model ({file} missing): run `dejaguard calibrate` "
            "or pass --threshold")
    entry = json.loads(file.read_text()).get(settings.key())
    if entry is None:
        raise DejaGuardError(
            f"no calibration for {settings.key()} in {file}: run `dejaguard calibrate` with these "
            "settings or pass --threshold")
    if entry["fingerprint"] != fingerprint:
        raise DejaGuardError(
            f"calibration in {file} was made for another model (fingerprint {entry['fingerprint']}, "
            f"this model {fingerprint}): recalibrate")
    return float(entry["threshold"])

"""Audits at dataset scale: input -> engine -> output, in one process or on a pool of Ray actors.

Both engines run the **same** core scoring function on the same batches:
:func:`core.detect.first_step_scores` for prompt audits (:func:`audit_prompts`),
:func:`core.loss_filter.training_pair_magnitude` for the training-set filter (:func:`audit_training_pairs`).

The package is split by concept:

- ``inputs``: readers of text/CSV/Parquet prompt files and (caption, image) pairs; malformed rows are
  reported with their row numbers, never silently lost;
- ``sink``: :class:`ResultSink`, the resumable, sharded JSONL/Parquet output;
- ``jobs``: :class:`PromptJob` / :class:`PairJob`, what a worker does with one batch;
- ``engines``: :func:`run_single` and :func:`run_ray` (Ray Data actors, one model each);
- this module: the two audits and their :class:`AuditSummary`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..calibration import resolve_threshold as calibrated_threshold
from ..denoiser import Denoiser, load_denoiser
from ..detect import ScoreSettings
from ..errors import DejaGuardError
from ..progress import TqdmProgress
from .engines import FAULT_ENV, RunStats, init_ray, run_ray, run_single
from .inputs import InputRows, Rejected, load_image, read_captions, read_pairs
from .jobs import PairJob, PromptJob
from .sink import ResultSink, read_jsonl

__all__ = [
    "FAULT_ENV", "AuditSummary", "InputRows", "PairJob", "PromptJob", "Rejected", "ResultSink", "RunStats",
    "audit_prompts", "audit_training_pairs", "init_ray", "load_image", "read_captions", "read_pairs",
    "resolve_threshold", "run_ray", "run_single", "warn_rejected",
]


@dataclass
class AuditSummary:
    """What an audit did. ``rows``: every scored row in the output, sorted by ``row``."""

    input_rows: int  # rows that could be scored
    rejected: list[Rejected]  # malformed rows (input and worker errors)
    unit: str
    resumed: int  # rows already in the output at start (skipped)
    stats: RunStats
    threshold: float | None
    out: str
    rejected_path: Path
    rows: list[dict] = field(default_factory=list)

    @property
    def flagged(self) -> int:
        return sum(bool(r.get("flagged") or r.get("drop")) for r in self.rows)


def resolve_threshold(threshold: float | None, model: str | Path | None, calibration: str | Path | None,
                      settings: ScoreSettings, denoiser: Denoiser | None) -> float:
    """The explicit threshold, else the calibrated one for this model and these settings
    (:func:`core.calibration.resolve_threshold`; ``calibration`` default: beside ``model``)."""
    if threshold is not None:
        return threshold
    if denoiser is None:
        denoiser = load_denoiser(model, device="cpu")  # only its fingerprint is needed here
    return calibrated_threshold(None, calibration or model, settings, denoiser.fingerprint())[0]


def _model(model: str | Path | None, device: str | None, engine: str,
           denoiser: Denoiser | None) -> tuple[Denoiser | None, Denoiser]:
    """``(denoiser to score with, denoiser to read the fingerprint from)``. The single engine scores with
    ``denoiser`` (loaded from ``model`` if not given); Ray workers load ``model`` themselves, so the driver
    loads it once on the CPU only for its fingerprint (the run key and the calibration depend on it)."""
    if engine not in ("single", "ray"):
        raise DejaGuardError(f"unknown engine {engine!r} (single or ray)")
    if engine == "single":
        denoiser = denoiser or load_denoiser(model, device=device)
        return denoiser, denoiser
    if model is not None and not Path(model).exists():
        raise DejaGuardError(f"model not found: {model}")
    return None, load_denoiser(model, device="cpu")


def _run(inputs: InputRows, job: PromptJob | PairJob, out: str | Path, *, fingerprint: str, model, device, engine,
         address, workers, resume, fmt, shard_rows, progress, denoiser: Denoiser | None) -> AuditSummary:
    sink = ResultSink(out, fmt, shard_rows, resume=resume, key={**job.run_key(), "model": fingerprint})
    try:
        sink.check_input(inputs.items, job.key_fields)
        sink.write_rejected(inputs.rejected)
        todo = [it for it in inputs.items if it["row"] not in sink.done]
        if engine == "single":
            with TqdmProgress(unit="row", disable=not progress) as bar:
                stats = run_single(todo, job, sink, denoiser, progress=bar)
        else:
            stats = run_ray(todo, job, sink, model=model, device=device, address=address, workers=workers,
                            progress=progress)
    finally:
        sink.close()
    rejected = list(inputs.rejected)
    if stats.errors:
        rejected = [Rejected(int(r["row"]), r["reason"], r.get("value", ""))
                    for r in read_jsonl(sink.rejected_path)]
    return AuditSummary(input_rows=len(inputs.items), rejected=rejected, unit=inputs.unit, resumed=sink.resumed,
                        stats=stats, threshold=job.threshold, out=sink.describe(), rejected_path=sink.rejected_path,
                        rows=sink.rows())


def audit_prompts(prompts: str | Path, out: str | Path, *, model: str | Path | None = None, device: str | None = None,
                  settings: ScoreSettings | None = None, seed: int | None = None, threshold: float | None = None,
                  calibration: str | Path | None = None, batch_size: int = 32, engine: str = "single",
                  address: str | None = None, workers: int | None = None, resume: bool = False,
                  caption_column: str | None = None, fmt: str | None = None, shard_rows: int = 100_000,
                  progress: bool = True, denoiser: Denoiser | None = None) -> AuditSummary:
    """Score every prompt of a text/CSV/Parquet file for memorization and write the results.

    ``denoiser``: an already loaded model for the single engine (else it is loaded from ``model``).
    """
    settings = settings or ScoreSettings()
    inputs = read_captions(prompts, caption_column)
    denoiser, probe = _model(model, device, engine, denoiser)
    threshold = resolve_threshold(threshold, model, calibration, settings, probe)
    job = PromptJob(settings, threshold, seed, batch_size)
    return _run(inputs, job, out, fingerprint=probe.fingerprint(), model=model, device=device, engine=engine,
                address=address, workers=workers, resume=resume, fmt=fmt, shard_rows=shard_rows, progress=progress,
                denoiser=denoiser)


def audit_training_pairs(pairs: str | Path, out: str | Path, threshold: float, *, scores: str | Path | None = None,
                         model: str | Path | None = None, device: str | None = None,
                         timesteps: Sequence[int] = (999,), batch_size: int = 32, engine: str = "single",
                         address: str | None = None, workers: int | None = None, resume: bool = False,
                         caption_column: str | None = None, image_column: str | None = None,
                         progress: bool = True, denoiser: Denoiser | None = None) -> AuditSummary:
    """The training-time filter at scale: score every (caption, image) pair with
    :func:`core.loss_filter.training_pair_magnitude` and write the pairs to drop (``magnitude > threshold``) to
    ``out`` (JSONL). Every pair's magnitude goes to ``scores`` (default ``<out>.scores.jsonl``),
    which ``resume`` continues and which helps choose a threshold.
    """
    out = Path(out)
    scores = Path(scores) if scores is not None else out.with_name(out.name + ".scores.jsonl")
    if not timesteps or any(not 0 <= t < 1000 for t in timesteps):
        raise DejaGuardError("timesteps must lie in [0, 999]")
    inputs = read_pairs(pairs, caption_column, image_column)
    job = PairJob(float(threshold), tuple(int(t) for t in timesteps), batch_size)
    denoiser, probe = _model(model, device, engine, denoiser)
    summary = _run(inputs, job, scores, fingerprint=probe.fingerprint(), model=model, device=device, engine=engine,
                   address=address, workers=workers, resume=resume, fmt="jsonl", shard_rows=100_000,
                   progress=progress, denoiser=denoiser)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for r in summary.rows:
            if r["drop"]:
                f.write(json.dumps({"row": r["row"], "caption": r["caption"], "image": r["image"],
                                    "magnitude": r["magnitude"]}) + "\n")
    return summary


def warn_rejected(summary: AuditSummary, show: int = 5) -> None:
    """One ``dejaguard: warning:`` line on stderr naming the first malformed rows and where the full
    list is (printed, not ``warnings.warn``: a skipped row must be visible in every setting)."""
    if not summary.rejected:
        return
    first = "; ".join(r.describe(summary.unit) for r in summary.rejected[:show])
    more = f"; ... ({len(summary.rejected) - show} more)" if len(summary.rejected) > show else ""
    print(f"dejaguard: warning: {len(summary.rejected)} malformed rows skipped ({first}{more}); listed in "
          f"{summary.rejected_path}", file=sys.stderr)

"""``dejaguard audit``: score a prompt list for memorization (core/audit), optionally with an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import engine_options, model_options
from .calibrate import score_option, scoring_settings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("audit", help="score a prompt list for memorization")
    model_options(sp)
    sp.add_argument("--prompts", required=True, help="text file (one prompt per line), or CSV/Parquet with a "
                    "caption column")
    sp.add_argument("--out", required=True, help="X.jsonl, X.parquet, or a folder of shards; one object per prompt")
    sp.add_argument("--seed", type=int, default=None, help="base seed (default: derived from each prompt)")
    score_option(sp, "the calibrated threshold of the same option is used")
    sp.add_argument("--threshold", type=float, default=None, help="override the calibrated threshold")
    sp.add_argument("--calibration", type=Path, default=None, help="calibration file (default: in the model folder)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--report", default=None, help="also write an HTML report")
    sp.add_argument("--caption-column", default=None,
                    help="caption column of a CSV/Parquet input (default: caption, text or prompt)")
    sp.add_argument("--format", choices=["jsonl", "parquet"], default=None,
                    help="shard format when --out is a folder (default jsonl; a .jsonl/.parquet file sets its own)")
    sp.add_argument("--shard-rows", type=int, default=100_000, help="rows per output shard (folder output)")
    engine_options(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..audit import audit_prompts, warn_rejected

    settings = scoring_settings(args)
    summary = audit_prompts(
        args.prompts, args.out, model=args.model, device=args.device, settings=settings, seed=args.seed,
        threshold=args.threshold, calibration=args.calibration, batch_size=args.batch_size, engine=args.engine,
        address=args.address, workers=args.workers, resume=args.resume, caption_column=args.caption_column,
        fmt=args.format, shard_rows=args.shard_rows, progress=True)
    warn_rejected(summary)
    rows, threshold, st = summary.rows, summary.threshold, summary.stats
    flagged = summary.flagged
    engine = "one process" if st.engine == "single" else f"Ray, {st.workers} workers"
    resumed = f"; {summary.resumed} already in the output" if summary.resumed else ""
    print(f"scored {st.scored} prompts in {st.wall_s:.1f}s ({engine}; "
          f"{st.scored * 2 * settings.steps * settings.generations} noise predictions){resumed}; "
          f"{flagged} of {len(rows)} flagged above {threshold:.4f}")
    print(f"wrote {summary.out}")
    if args.report:
        from ..report import ReportData, write_report

        path = write_report(ReportData(
            title="DejaGuard audit", prompts=[r["prompt"] for r in rows], scores=[r["score"] for r in rows],
            flagged=[r["flagged"] for r in rows], threshold=threshold,
            summary={"model": str(args.model or "bundled testbed"), "prompts": len(rows),
                     "flagged": flagged, "threshold": f"{threshold:.4f}", "settings": settings.key(),
                     "malformed rows skipped": len(summary.rejected), "wall seconds": f"{st.wall_s:.1f}"},
        ), args.report)
        print(f"wrote {path}")
    return 0

"""``dejaguard audit-training``: the training-set filter at scale, the (caption, image) pairs to drop."""

from __future__ import annotations

import argparse

from ..errors import DejaGuardError
from . import engine_options, model_options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("audit-training", help="training-set filter: list the (caption, image) pairs to drop")
    model_options(sp, scoring=False)
    sp.add_argument("--pairs", required=True, help="CSV/Parquet with caption and image-path columns, or a folder "
                    "of images with .txt caption files")
    sp.add_argument("--threshold", type=float, required=True, help="drop pairs whose magnitude exceeds this")
    sp.add_argument("--out", required=True, help="JSONL of the pairs to drop")
    sp.add_argument("--scores", default=None, help="JSONL of every pair's magnitude (default: OUT.scores.jsonl)")
    sp.add_argument("--timesteps", default="999", help="comma-separated training timesteps averaged (default 999)")
    sp.add_argument("--caption-column", default=None)
    sp.add_argument("--image-column", default=None, help="image path column (default: image, image_path, path, "
                    "file, file_name or filename)")
    sp.add_argument("--batch-size", type=int, default=32)
    engine_options(sp)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..audit import audit_training_pairs, warn_rejected

    try:
        timesteps = [int(t) for t in args.timesteps.split(",") if t.strip()]
    except ValueError as err:
        raise DejaGuardError(f"--timesteps must be comma-separated integers: {args.timesteps!r}") from err
    summary = audit_training_pairs(
        args.pairs, args.out, args.threshold, scores=args.scores, model=args.model, device=args.device,
        timesteps=timesteps, batch_size=args.batch_size, engine=args.engine, address=args.address,
        workers=args.workers, resume=args.resume, caption_column=args.caption_column,
        image_column=args.image_column, progress=True)
    warn_rejected(summary)
    rows, st = summary.rows, summary.stats
    mags = np.array([r["magnitude"] for r in rows])
    print(f"scored {st.scored} pairs in {st.wall_s:.1f}s; {summary.flagged} of {len(rows)} to drop "
          f"(magnitude > {args.threshold:g}); magnitude median {np.median(mags):.4f}, "
          f"99th percentile {np.quantile(mags, 0.99):.4f}")
    print(f"wrote {args.out} (pairs to drop) and {summary.out} (every pair's magnitude)")
    return 0

"""Audit throughput: one process against Ray with N workers, on the same testbed prompts, in one run.

    python -m bench.scale [--prompts 2000] [--workers 2] [--batch-size 32] [--threads T]

Prompts: the testbed's memorized evaluation prompts, its held-out and calibration captions, then
more compositional captions (``random_spec``, all caption styles) until ``--prompts`` distinct ones.
Both engines run the full audit path (read the prompt file, load the model, score, write JSONL);
times are end to end, Ray's including its start, the driver reading the model's fingerprint (the
output's run key) and its actors' model loading (``ray_startup_s``: until the first batch came back);
``*_steady_ms_per_prompt`` is the cost per prompt after that. Scores of the two runs are compared prompt by
prompt (``max_rel_diff``). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from dejaguard.core.audit import audit_prompts, resolve_threshold
from dejaguard.core.detect import ScoreSettings
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.testbed.data import SceneSpec, calibration_specs, heldout_specs, memorized_eval_prompts, random_spec


def testbed_prompts(count: int, seed: int = 2024) -> list[str]:
    """``count`` distinct prompts of the testbed: memorized first, then compositional captions."""
    seen = dict.fromkeys([p for p, _ in memorized_eval_prompts()] + [s.caption() for s in heldout_specs()]
                         + [s.caption() for s in calibration_specs()])
    rng = np.random.default_rng(seed)
    while len(seen) < count:
        spec = random_spec(rng)
        for style in range(4):  # every caption style of each drawn scene
            seen.setdefault(SceneSpec(objects=spec.objects, style=style).caption())
    return list(seen)[:count]


def steady(stats) -> float | None:
    """ms per prompt after the first batch arrived (all workers busy), or None if too few batches."""
    rows = stats.scored - stats.first_rows
    return round(1000 * (stats.wall_s - stats.first_result_s) / rows, 2) if rows > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=None,
                        help="flagging threshold (default: the model's calibrated one, else 1.0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the single process (default: torch's default, "
                             f"{torch.get_num_threads()} here); Ray workers use 1 each")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = testbed_prompts(args.prompts)
    settings = ScoreSettings()
    threshold, source = args.threshold, "--threshold"
    if threshold is None:
        try:
            threshold, source = resolve_threshold(None, None, None, settings, None), "calibrated"
        except DejaGuardError:
            threshold, source = 1.0, "1.0 (the model has no calibration for these settings)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "prompts.txt"
        src.write_text("\n".join(prompts) + "\n")
        t0 = time.perf_counter()
        single = audit_prompts(src, Path(tmp) / "single.jsonl", settings=settings, batch_size=args.batch_size,
                               threshold=threshold, progress=True)
        single_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray_run = audit_prompts(src, Path(tmp) / "ray", settings=settings, batch_size=args.batch_size,
                                engine="ray", workers=args.workers, threshold=threshold, progress=True)
        ray_s = time.perf_counter() - t0
    a = {r["row"]: r for r in single.rows}
    b = {r["row"]: r for r in ray_run.rows}
    if a.keys() != b.keys():
        raise SystemExit(f"engines scored different rows: {len(a)} vs {len(b)}")
    rel = max(abs(a[k]["score"] - b[k]["score"]) / abs(a[k]["score"]) for k in a)
    n = len(prompts)
    out = {
        "prompts": n,
        "single_process_s": round(single_s, 2),
        "ray_s": round(ray_s, 2),
        "workers": args.workers,
        "speedup": round(single_s / ray_s, 3),
        "max_rel_diff": float(f"{rel:.3g}"),
        "unet_evals_per_prompt": float(np.mean([r["unet_evals"] for r in single.rows])),
        "single_process_scoring_s": round(single.stats.wall_s, 2),
        "ray_scoring_s": round(ray_run.stats.wall_s, 2),
        "single_process_ms_per_prompt": round(1000 * single.stats.wall_s / n, 2),
        "ray_ms_per_prompt": round(1000 * ray_s / n, 2),
        # Ray's fixed cost (start, actors loading the model, first batch) and its rate after that:
        # the figures that extrapolate to more prompts and more workers.
        "ray_startup_s": round(ray_s - ray_run.stats.wall_s + ray_run.stats.first_result_s, 2),
        "ray_steady_ms_per_prompt": steady(ray_run.stats),
        "single_process_steady_ms_per_prompt": steady(single.stats),
        # CPU time per prompt of the single process (all its threads): independent of other load on
        # the machine, so the figure to extrapolate from on a busy CPU.
        "single_process_cpu_ms_per_prompt": round(1000 * single.stats.cpu_s / n, 2),
        "single_process_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "flagged": sum(bool(r["flagged"]) for r in single.rows),
        "threshold": round(threshold, 4),
        "threshold_source": source,
    }
    print(f"{'engine':<16}{'seconds':>10}{'ms/prompt':>12}")
    print(f"{'single process':<16}{single_s:>10.1f}{1000 * single_s / n:>12.2f}")
    print(f"{f'ray x{args.workers}':<16}{ray_s:>10.1f}{1000 * ray_s / n:>12.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

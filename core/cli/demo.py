"""``dejaguard demo``: generate, score and report on the bundled testbed (core/demo.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sp = subparsers.add_parser("demo", help="generate, score and report on the bundled testbed")
    sp.add_argument("--out", default="dejaguard-demo", help="output folder (default ./dejaguard-demo)")
    sp.add_argument("--device", default=None)
    sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(Path(args.out), device=args.device)
    return 0

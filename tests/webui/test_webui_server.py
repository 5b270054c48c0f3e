"""DejaGuard in a real Stable Diffusion WebUI (A1111 or Forge), headless on the CPU (issue 27).

Needs a test root built by ``tests/webui/setup_webui_checkout.sh WEBUI_DIR ROOT`` named by
``DEJAGUARD_WEBUI_ROOT`` (CI cannot fetch a WebUI: skipped without it) and the random full-size SD1.5 fixture
(``tests/checkpoint_fixtures.py``; its zero-initialised output layers are redrawn, so scores are not 0). One WebUI
run (``check_webui.py``, in a network namespace of its own) makes three txt2img jobs of 2 images; then, with the
server stopped, the test checks:

- each image's score in the API ``info`` equals a direct computation on the same weights: the checkpoint loaded
  by core (``core.checkpoint.load_checkpoint``: diffusers' UNet and CLIP, not the WebUI's), fed the first step's
  UNet inputs the probe recorded, prompts encoded by core (1e-4 relative);
- the verdict and threshold source in ``info`` and in each image's infotext (the calibration beside the checkpoint,
  found by fingerprint; a threshold given through the API);
- no extra UNet call: the probe's count of UNet calls and rows is the same with DejaGuard on and off;
- the images are bit-identical with DejaGuard on and off;
- with ``DEJAGUARD_WEBUI_NODE_MODULES`` (playwright-core) and chromium: the page shows the DejaGuard section in
  txt2img and img2img (headless Chromium).

``DEJAGUARD_WEBUI_OUT=DIR`` keeps a run's output (results, probe records, server log) in DIR;
``DEJAGUARD_WEBUI_RESULTS=DIR`` checks such a folder again without starting a server.

Memory: the WebUI uses 5-7 GiB, the direct computation about 5 GiB after it; on a shared machine run it under
``flock /tmp/bigmem.lock``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ROOT_ENV = "DEJAGUARD_WEBUI_ROOT"
WEBUI_ROOT = Path(os.environ[ROOT_ENV]).expanduser() if os.environ.get(ROOT_ENV) else None
CHECK = Path(__file__).with_name("check_webui.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(WEBUI_ROOT is None, reason=f"no WebUI test root: set {ROOT_ENV} to a folder built by "
                                                  "tests/webui/setup_webui_checkout.sh (CI cannot fetch a WebUI)"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One WebUI run: (checkpoint, results.json as a dict, probe records per job)."""
    import json

    sys.path.insert(0, str(REPO / "tests"))
    from checkpoint_fixtures import checkpoint_file
    from dejaguard.core.calibration import calibration_from_scores, save_calibration
    from dejaguard.core.detect import ScoreSettings
    from dejaguard.webui.guard import checkpoint_fingerprint

    assert (WEBUI_ROOT / "webui" / "launch.py").is_file(), f"{WEBUI_ROOT} is not a WebUI test root"
    tmp = tmp_path_factory.mktemp("webui")
    checkpoint = tmp / "dejaguard-test-sd15.safetensors"
    try:
        os.link(checkpoint_file("sd15"), checkpoint)
    except OSError:
        shutil.copyfile(checkpoint_file("sd15"), checkpoint)
    # A calibration beside the checkpoint, for its fingerprint, with a threshold every image exceeds.
    save_calibration(calibration_from_scores([1e-3], 0.5, ScoreSettings(), checkpoint_fingerprint(checkpoint),
                                             "tests/webui"), checkpoint)
    reuse = os.environ.get("DEJAGUARD_WEBUI_RESULTS")  # a finished run's output folder: check it, start no server
    if reuse:
        return checkpoint, json.loads((Path(reuse) / "results.json").read_text()), _probes(Path(reuse))
    out = Path(os.environ.get("DEJAGUARD_WEBUI_OUT") or tmp / "out")  # where the run's output is kept
    shutil.rmtree(out, ignore_errors=True)
    isolate = [] if os.environ.get("DEJAGUARD_WEBUI_NETNS") == "0" else \
        ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    proc = subprocess.run([*isolate, sys.executable, str(CHECK), str(WEBUI_ROOT), str(checkpoint), str(out)],
                          capture_output=True, text=True, timeout=1800)
    log = (out / "server.log").read_text() if (out / "server.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    results = json.loads((out / "results.json").read_text())
    probes = _probes(out)
    print(f"WebUI ready in {results['ready_s']:.0f} s; jobs " +
          ", ".join(f"{k} {results[k]['seconds']:.1f} s" for k in ("calibrated", "given", "off")))
    return checkpoint, results, probes


def _probes(out: Path) -> list[list[dict]]:
    """The probe's UNet calls per job (calibrated, given, off)."""
    return [torch.load(out / "probe" / f"{i}.pt", weights_only=True)["calls"] for i in range(3)]


def _pixels(images: list[str]) -> list[bytes]:
    """The decoded pixels of base64 PNGs (their "parameters" text differs with DejaGuard on and off)."""
    import base64
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").tobytes() for b in images]


def _params(job: dict) -> dict:
    return job["info"]["extra_generation_params"]


def test_verdicts_and_threshold_sources(run):
    checkpoint, results, _ = run
    calibrated, given, off = (_params(results[k]) for k in ("calibrated", "given", "off"))
    assert calibrated["DejaGuard verdict"] == ["memorized", "memorized"]
    assert calibrated["DejaGuard threshold"] == f"0.001 (calibration {checkpoint.stem}.dejaguard_calibration.json)"
    assert given["DejaGuard verdict"] == ["not memorized", "not memorized"]
    assert given["DejaGuard threshold"] == "1e+09 (set in the UI)"
    assert given["DejaGuard score"] == calibrated["DejaGuard score"]
    assert not [k for k in off if k.startswith("DejaGuard")]
    for i, text in enumerate(results["calibrated"]["info"]["infotexts"]):
        assert f"DejaGuard score: {calibrated['DejaGuard score'][i]}" in text
        assert "DejaGuard verdict: memorized" in text
    assert all("DejaGuard" not in text for text in results["off"]["info"]["infotexts"])


def test_images_identical_and_no_extra_unet_call(run):
    _, results, probes = run
    off = _pixels(results["off"]["images"])
    assert len(off) == 2 and off[0] != off[1]
    assert _pixels(results["calibrated"]["images"]) == off
    assert _pixels(results["given"]["images"]) == off
    rows = [[int(c["x"].shape[0]) for c in calls] for calls in probes]
    assert rows[0] == rows[1] == rows[2] and len(rows[2]) >= 3, rows


def test_page_shows_the_section(run):
    """Headless Chromium sees the DejaGuard section in txt2img and img2img."""
    page = run[1].get("page")
    if page is None:
        pytest.skip("no headless browser: set DEJAGUARD_WEBUI_NODE_MODULES to a node_modules folder with "
                    "playwright-core (tests/comfy/setup_browser.sh builds .comfy/pw/node_modules) and install chromium")
    assert "DejaGuard" in (page["txt2img"] or ""), page
    assert "DejaGuard" in (page["img2img"] or ""), page


def test_scores_equal_direct_computation(run):
    """Score per image = ||eps(x_T, prompt) - eps(x_T, "")|| by core's UNet on the first step's UNet inputs."""
    from dejaguard.core.checkpoint import load_checkpoint
    from dejaguard.core.sampling import text_conditional_magnitude

    checkpoint, results, probes = run
    calls = probes[0]
    first_t = max(float(c["t"].max()) for c in calls)
    x = torch.cat([c["x"] for c in calls if float(c["t"].max()) == first_t])
    t = torch.cat([c["t"] for c in calls if float(c["t"].max()) == first_t])
    context = torch.cat([c["context"] for c in calls if float(c["t"].max()) == first_t])
    denoiser = load_checkpoint(checkpoint, device="cpu")
    with torch.no_grad():
        empty, prompt = denoiser.encode_prompts(["", "a photograph of an astronaut riding a horse"])
        uncond_rows = [i for i in range(len(x)) if (context[i] - empty).abs().max() < 1e-3]
        cond_rows = [i for i in range(len(x)) if (context[i] - prompt).abs().max() < 1e-3]
        assert len(uncond_rows) == len(cond_rows) == 2, (uncond_rows, cond_rows)
        # Image order: the unconditional rows follow the batch; each image's conditional row has the same x.
        pairs = [(next(c for c in cond_rows if torch.equal(x[c], x[u])), u) for u in uncond_rows]
        xs = torch.stack([x[c] for c, _ in pairs] + [x[u] for _, u in pairs])
        ts = torch.stack([t[c] for c, _ in pairs] + [t[u] for _, u in pairs])
        eps = denoiser.predict_noise(xs, ts, torch.cat([prompt.expand(2, -1, -1), empty.expand(2, -1, -1)]))
        direct = text_conditional_magnitude(eps[:2].double(), eps[2:].double())
    reported = torch.tensor([float(s) for s in _params(results["calibrated"])["DejaGuard score"]], dtype=torch.float64)
    print(f"WebUI {reported.tolist()} direct {direct.tolist()}")
    assert float(direct.min()) > 0
    torch.testing.assert_close(reported, direct, rtol=1e-4, atol=0)

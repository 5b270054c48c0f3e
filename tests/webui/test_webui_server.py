"""DejaGuard in a real Stable Diffusion WebUI (A1111 or Forge), headless on the CPU (issue 27).

Needs a test root built by ``tests/webui/setup_webui_checkout.sh WEBUI_DIR ROOT`` named by
``DEJAGUARD_WEBUI_ROOT`` (CI cannot fetch a WebUI: skipped without it) and the random full-size SD1.5 fixture
(``tests/checkpoint_fixtures.py``; its zero-initialised output layers are redrawn, so scores are not 0). One WebUI
run (``check_webui.py``, in a network namespace of its own) makes four txt2img jobs of 2 images; then, with the
server stopped, the test checks:

- each image's score in the API ``info`` equals a direct computation on the same weights: the checkpoint loaded
  by core (``core.checkpoint.load_checkpoint``: diffusers' UNet and CLIP, not the WebUI's), fed the first step's
  UNet inputs the probe recorded, prompts encoded by core (1e-4 relative);
- the verdict and threshold source in ``info`` and in each image's infotext (the calibration beside the checkpoint,
  found by fingerprint; a threshold given through the API);
- no extra UNet call: the probe's count of UNet calls and rows is the same with DejaGuard on and off;
- the images are bit-identical with DejaGuard on and off;
- the Calibrate button's path (the WebUI adapter of core's denoiser seam, ``webui/denoiser.py``, and core's scoring
  step), run inside the WebUI on the first job's first-step inputs, gives the guard's scores (1e-4 relative); the
  button's route calibrates on 100 bundled prompts and saves beside the checkpoint, where the guard finds it, with
  the threshold core's own calibration of those prompts on the same weights gives (1e-4 relative);
- protection (threshold between the two images' scores): the image above it is steered (verdict ``steered``, its
  pixels differ), the other is bit-identical to the run without DejaGuard, and no UNet call is added;
- token highlighting: A1111's Explain route answers the prompt's words with one finite share each (summing to 1),
  equal to core's token significance on core's own loading of the checkpoint; Forge's answers one line saying why
  not;
- with ``DEJAGUARD_WEBUI_NODE_MODULES`` (playwright-core) and chromium: the page shows the DejaGuard section in
  txt2img and img2img, and after ticking the section and clicking Generate, the per-image badge (red,
  "memorized", the score and the calibration's threshold) above the image's infotext; after clicking Explain, the
  highlighted words right under the prompt box (A1111; Forge: the one line) (headless Chromium).

``DEJAGUARD_WEBUI_OUT=DIR`` keeps a run's output (results, probe records, server log) in ``DIR/out-sd15`` (and
``DIR/out-sdxl``); ``DEJAGUARD_WEBUI_RESULTS=DIR`` (``DEJAGUARD_WEBUI_RESULTS_SDXL``) checks such a folder again
without starting a server.

SDXL (issue 27): with ``DEJAGUARD_WEBUI_SDXL=1`` every test also runs on the random full-size SDXL fixture (about
16 GiB: run it alone, under ``flock /tmp/bigmem.lock``): the score equals core's SDXL UNet on the first step's inputs,
with the prompt encoded by core (packed hidden states and pooled vector, the size conditioning of the 64x64 image)
against the zero conditioning both WebUIs give an empty SDXL negative prompt; verdicts, bit-identical images, no
extra UNet call and protection as on SD1.5; the Calibrate path's scores and the route's threshold equal core's,
both against that zero conditioning (``webui.guard.SDXL_SETTINGS``); the Explain route's shares equal core's token
significance of the prompt (both encoders' token rows, against the same zeros); no browser.

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
PROMPT = "a photograph of an astronaut riding a horse"  # check_webui.py's

SDXL_ENV = "DEJAGUARD_WEBUI_SDXL"
SDXL = os.environ.get(SDXL_ENV) == "1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(WEBUI_ROOT is None, reason=f"no WebUI test root: set {ROOT_ENV} to a folder built by "
                                                  "tests/webui/setup_webui_checkout.sh (CI cannot fetch a WebUI)"),
]
MODELS = ["sd15", pytest.param("sdxl", marks=pytest.mark.skipif(
    not SDXL, reason=f"the SDXL run needs about 16 GiB (the WebUI, then core's fp32 SDXL): set {SDXL_ENV}=1 and run it "
                     "alone (flock /tmp/bigmem.lock)"))]


@pytest.fixture(scope="module", params=MODELS)
def run(request, tmp_path_factory):
    """One WebUI run on the random SD1.5 or SDXL fixture: (checkpoint, results.json as a dict, probe records per
    job). SDXL: no browser (the page is checked on SD1.5)."""
    import json

    sys.path.insert(0, str(REPO / "tests"))
    from checkpoint_fixtures import checkpoint_file
    from dejaguard.core.calibration import calibration_from_scores, save_calibration
    from dejaguard.core.checkpoint import unet_fingerprint
    from dejaguard.core.detect import ScoreSettings
    from dejaguard.webui.guard import SDXL_SETTINGS

    name = request.param
    assert (WEBUI_ROOT / "webui" / "launch.py").is_file(), f"{WEBUI_ROOT} is not a WebUI test root"
    tmp = tmp_path_factory.mktemp("webui")
    checkpoint = tmp / f"dejaguard-test-{name}.safetensors"
    try:
        os.link(checkpoint_file(name), checkpoint)
    except OSError:
        shutil.copyfile(checkpoint_file(name), checkpoint)
    # A calibration beside the checkpoint, for its fingerprint, with a threshold every image exceeds (SDXL: under
    # the zero-unconditional settings the guard looks SDXL thresholds up with).
    settings = SDXL_SETTINGS if name == "sdxl" else ScoreSettings()
    save_calibration(calibration_from_scores([1e-3], 0.5, settings, unet_fingerprint(checkpoint), "tests/webui"),
                     checkpoint)
    reuse = os.environ.get("DEJAGUARD_WEBUI_RESULTS_SDXL" if name == "sdxl" else "DEJAGUARD_WEBUI_RESULTS")
    if reuse:  # a finished run's output folder: check it, start no server
        results = json.loads((Path(reuse) / "results.json").read_text())
        results["probe0"] = torch.load(Path(reuse) / "probe" / "0.pt", weights_only=True)
        return checkpoint, results, _probes(Path(reuse))
    out = Path(os.environ.get("DEJAGUARD_WEBUI_OUT") or tmp) / f"out-{name}"  # where the run's output is kept
    shutil.rmtree(out, ignore_errors=True)
    isolate = [] if os.environ.get("DEJAGUARD_WEBUI_NETNS") == "0" else \
        ["unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    env = dict(os.environ)
    if name == "sdxl":
        env.pop("DEJAGUARD_WEBUI_NODE_MODULES", None)
    proc = subprocess.run([*isolate, sys.executable, str(CHECK), str(WEBUI_ROOT), str(checkpoint), str(out)],
                          capture_output=True, text=True, timeout=1800, env=env)
    log = (out / "server.log").read_text() if (out / "server.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]
    results = json.loads((out / "results.json").read_text())
    results["probe0"] = torch.load(out / "probe" / "0.pt", weights_only=True)
    probes = _probes(out)
    print(f"{name}: WebUI ready in {results['ready_s']:.0f} s; jobs " +
          ", ".join(f"{k} {results[k]['seconds']:.1f} s" for k in ("calibrated", "given", "off")))
    return checkpoint, results, probes


def _probes(out: Path) -> list[list[dict]]:
    """The probe's UNet calls per job (calibrated, given, off, protected)."""
    return [torch.load(out / "probe" / f"{i}.pt", weights_only=True)["calls"] for i in range(4)]


def _pixels(images: list[str]) -> list[bytes]:
    """The decoded pixels of base64 PNGs (their "parameters" text differs with DejaGuard on and off)."""
    import base64
    import io

    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB").tobytes() for b in images]


def _params(job: dict) -> dict:
    return job["info"]["extra_generation_params"]


def _sdxl(run) -> bool:
    return "sdxl" in run[0].name


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
    assert rows[0] == rows[1] == rows[2] == rows[3] and len(rows[2]) >= 3, rows


def test_protection_steers_only_the_flagged_image(run):
    """Threshold between the two scores, protection on: the higher-scoring image is steered (its verdict says so,
    and its pixels differ from the unguarded run's), the other is bit-identical to the unguarded run's."""
    _, results, _ = run
    params = _params(results["protected"])
    scores = [float(s) for s in params["DejaGuard score"]]
    assert scores == [float(s) for s in _params(results["calibrated"])["DejaGuard score"]]
    high = scores.index(max(scores))
    low = 1 - high
    assert params["DejaGuard verdict"][high] == "steered" and params["DejaGuard verdict"][low] == "not memorized"
    assert "DejaGuard verdict: steered" in results["protected"]["info"]["infotexts"][high]
    off, protected = _pixels(results["off"]["images"]), _pixels(results["protected"]["images"])
    assert protected[low] == off[low]
    assert protected[high] != off[high]


def _page(run) -> dict:
    page = run[1].get("page")
    if page is None:
        pytest.skip("no headless browser: set DEJAGUARD_WEBUI_NODE_MODULES to a node_modules folder with "
                    "playwright-core (tests/comfy/setup_browser.sh builds .comfy/pw/node_modules) and install chromium")
    return page


def test_page_shows_the_section(run):
    """Headless Chromium sees the DejaGuard section in txt2img and img2img."""
    page = _page(run)
    assert "DejaGuard" in (page["txt2img"] or ""), page
    assert "DejaGuard" in (page["img2img"] or ""), page


def test_page_shows_the_badge_after_generate(run):
    """Ticking the section and clicking Generate in the page shows a red "memorized" badge with the image's score
    and the calibration's threshold (the calibration beside the checkpoint, 0.001, which every image exceeds), as
    plain text (textContent: no child elements)."""
    checkpoint = run[0]
    page = _page(run)
    badge = page.get("badge")
    assert badge is not None, page["errors"]
    print(f"badge: {badge['text']!r} ({badge['background']})")
    assert badge["verdict"] == "memorized", badge
    assert badge["text"].startswith("DejaGuard: memorized | score "), badge
    assert f"threshold 0.001 (calibration {checkpoint.stem}.dejaguard_calibration.json)" in badge["text"], badge
    score = badge["text"].split("| score ")[1].split(" |")[0]
    assert f"DejaGuard score: {score}" in badge["info"], badge  # the shown image's own score
    assert float(score) > 0.001
    assert badge["background"] == "rgb(185, 28, 28)", badge  # red
    assert badge["children"] == 0, badge



def test_page_highlights_the_words_after_explain(run):
    """Clicking Explain shows, right under the prompt box, one span per word of the prompt whose text is the word
    alone (textContent: no child elements), red with an opacity growing with its share, the top word fully red; the
    payload box is hidden (A1111 and Forge)."""
    tokens = _page(run).get("tokens")
    assert tokens is not None, _page(run)["errors"]
    print(f"page: {tokens['text']!r}")
    assert tokens["belowPrompt"] and tokens["hiddenPayload"] == "none", tokens
    spans = tokens["spans"]
    assert [s["word"] for s in spans] == PROMPT.split(), tokens
    assert all(s["children"] == 0 for s in spans)
    top = max(spans, key=lambda s: s["score"])
    assert top["background"] == "rgb(220, 38, 38)", top
    assert abs(sum(s["score"] for s in spans) - 1) < 1e-6


def test_explain_route(run, core_denoiser):
    """``POST /dejaguard/v1/explain`` (the Explain button's function) at 64x64, 1 step: A1111 and Forge (through
    gradient-capable copies of its inference-tensor weights) answer the prompt's pieces and words with finite shares
    summing to 1, after 2 UNet evaluations, equal to core's token significance of the prompt on core's own loading of
    the checkpoint (diffusers' UNet and CLIP; 1e-5 relative, measured 1.5e-7 on A1111). SDXL: both encoders' token
    rows, against the zero conditioning the WebUIs give an empty SDXL negative prompt (``SDXL_SETTINGS``), as core's
    with the same unconditional."""
    from dejaguard.core.explain import token_significance
    from dejaguard.webui.guard import SDXL_SETTINGS

    answer = run[1]["explain"]
    print(f"explain ({answer['seconds']:.0f} s): {answer}")
    assert run[1].get("alive_after_explain"), "the WebUI stopped answering after Explain"
    if "not enough memory" in answer.get("error", ""):  # Forge's weight copies on a machine too small for them
        assert "\n" not in answer["error"]
        pytest.skip(f"the WebUI refused Explain for memory, in one line, and kept running: {answer['error']}")
    assert "error" not in answer, answer
    assert answer["words"] == PROMPT.split() and len(answer["word_scores"]) == len(answer["words"])
    assert len(answer["scores"]) == len(answer["tokens"]) == len(answer["word_ids"])
    assert all(torch.isfinite(torch.tensor(answer["scores"]))) and abs(sum(answer["word_scores"]) - 1) < 1e-6
    assert answer["unet_evals"] == 2 and answer["steps"] == 1
    shape, core_denoiser.sample_shape = core_denoiser.sample_shape, (4, 8, 8)
    try:
        direct = token_significance(core_denoiser, PROMPT, steps=1,
                                    unconditional=SDXL_SETTINGS.unconditional if _sdxl(run) else "empty")
    finally:
        core_denoiser.sample_shape = shape
    print(f"WebUI {answer['word_scores']} core {direct.word_scores}")
    assert answer["tokens"] == direct.tokens and answer["seed"] == direct.seed
    torch.testing.assert_close(torch.tensor(answer["scores"], dtype=torch.float64),
                               torch.tensor(direct.scores, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.fixture(scope="module")
def core_denoiser(run):
    """The test checkpoint loaded by core (diffusers' UNet and CLIP, not the WebUI's), after the server stopped."""
    from dejaguard.core.checkpoint import load_checkpoint

    return load_checkpoint(run[0], device="cpu")


def test_calibrate_path_scores_equal_the_guards(run):
    """The Calibrate button's path (the WebUI adapter of the denoiser seam + core's scoring step, run in the WebUI
    by the probe on the first job's first-step UNet inputs at core's first timestep) gives the guard's scores."""
    _, results, _ = run
    probe = results["probe0"]
    assert float(probe["first_t"]) == float(probe["adapter_t"]) == 999.0, probe
    reported = torch.tensor([float(s) for s in _params(results["calibrated"])["DejaGuard score"]], dtype=torch.float64)
    print(f"guard {reported.tolist()} calibrate path {probe['adapter_scores'].tolist()}")
    torch.testing.assert_close(probe["adapter_scores"], reported, rtol=1e-4, atol=0)


def test_calibrate_button_saves_where_the_guard_finds_it(run, core_denoiser):
    """``POST /dejaguard/v1/calibrate`` (the button's function) on 100 prompts at 64x64: the file beside the checkpoint
    holds the calibration under the checkpoint's fingerprint, the guard's :func:`resolve_threshold` finds it, and its
    threshold equals core's calibration of the same prompts on core's own loading of the checkpoint (1e-4). SDXL:
    both under the zero-unconditional settings (``SDXL_SETTINGS``: the WebUIs' empty SDXL negative prompt)."""
    import json

    from dejaguard.core.calibration import calibrate
    from dejaguard.core.checkpoint import unet_fingerprint
    from dejaguard.core.detect import ScoreSettings
    from dejaguard.core.prompt_sets import calibration_prompts
    from dejaguard.webui.guard import SDXL_SETTINGS, resolve_threshold

    checkpoint, results, _ = run
    answer = results["calibrate"]
    print(f"{answer['summary']} ({answer['seconds']:.0f} s)")
    settings = SDXL_SETTINGS if _sdxl(run) else ScoreSettings()
    assert answer["file"] is not None, answer
    entry = answer["file"][settings.key()]
    assert entry["fingerprint"] == unet_fingerprint(checkpoint)
    assert entry["n_prompts"] == 100 and "64x64 px" in entry["prompts_source"] and "WebUI" in entry["prompts_source"]
    (checkpoint.parent / f"{checkpoint.stem}.dejaguard_calibration.json").write_text(json.dumps(answer["file"]))
    threshold, source = resolve_threshold(0.0, checkpoint, settings)
    assert threshold == entry["threshold"] and source == f"calibration {checkpoint.stem}.dejaguard_calibration.json"
    shape, core_denoiser.sample_shape = core_denoiser.sample_shape, (4, 8, 8)
    try:
        with torch.no_grad():
            direct = calibrate(core_denoiser, calibration_prompts()[:100], settings, 0.01)
    finally:
        core_denoiser.sample_shape = shape
    print(f"WebUI threshold {entry['threshold']} core {direct.threshold}")
    assert abs(entry["threshold"] - direct.threshold) <= 1e-4 * direct.threshold


def test_scores_equal_direct_computation(run, core_denoiser):
    """Score per image = ||eps(x_T, prompt) - eps(x_T, "")|| by core's UNet on the first step's UNet inputs
    (SDXL: against the zero conditioning the WebUI gives an empty negative prompt)."""
    from dejaguard.core.sampling import text_conditional_magnitude

    if _sdxl(run):
        return _check_sdxl_scores(run, core_denoiser)
    checkpoint, results, probes = run
    calls = probes[0]
    first_t = max(float(c["t"].max()) for c in calls)
    x = torch.cat([c["x"] for c in calls if float(c["t"].max()) == first_t])
    t = torch.cat([c["t"] for c in calls if float(c["t"].max()) == first_t])
    context = torch.cat([c["context"] for c in calls if float(c["t"].max()) == first_t])
    denoiser = core_denoiser
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


def _check_sdxl_scores(run, denoiser) -> None:
    """SDXL: the rows of the first step whose hidden states are core's encoding of the prompt (conditional) or zeros
    (unconditional: both WebUIs zero an empty SDXL negative prompt, hidden states and pooled vector); core's UNet
    on them, the prompt packed with its pooled vector and the zeros packed with a zero one, at the size conditioning
    of the 64x64 image (core's: original and target size 64x64, no crop, as the WebUI's default)."""
    from dejaguard.core.conditioning import pack_pooled
    from dejaguard.core.sampling import text_conditional_magnitude

    _, results, probes = run
    calls = probes[0]
    first_t = max(float(c["t"].max()) for c in calls)
    first = [c for c in calls if float(c["t"].max()) == first_t]
    x, t, context = (torch.cat([c[k] for c in first]) for k in ("x", "t", "context"))
    shape, denoiser.sample_shape = denoiser.sample_shape, (4, 8, 8)
    try:
        with torch.no_grad():
            prompt = denoiser.encode_prompts([PROMPT])  # (1, 78, 2048): hidden rows and the pooled row
            uncond_rows = [i for i in range(len(x)) if float(context[i].abs().max()) == 0.0]
            cond_rows = [i for i in range(len(x)) if (context[i] - prompt[0, :77]).abs().max() < 1e-3]
            assert len(uncond_rows) == len(cond_rows) == 2, (uncond_rows, cond_rows)
            pairs = [(next(c for c in cond_rows if torch.equal(x[c], x[u])), u) for u in uncond_rows]
            xs = torch.stack([x[c] for c, _ in pairs] + [x[u] for _, u in pairs])
            ts = torch.stack([t[c] for c, _ in pairs] + [t[u] for _, u in pairs])
            zeros = pack_pooled(torch.zeros(1, 77, 2048), torch.zeros(1, denoiser.pooled_width))
            eps = denoiser.predict_noise(xs, ts, torch.cat([prompt.expand(2, -1, -1), zeros.expand(2, -1, -1)]))
            direct = text_conditional_magnitude(eps[:2].double(), eps[2:].double())
    finally:
        denoiser.sample_shape = shape
    params = _params(results["calibrated"])
    reported = torch.tensor([float(s) for s in params["DejaGuard score"]], dtype=torch.float64)
    print(f"SDXL WebUI {reported.tolist()} direct {direct.tolist()}")
    assert float(direct.min()) > 0
    torch.testing.assert_close(reported, direct, rtol=1e-4, atol=0)

"""Run a real WebUI headless and record four txt2img jobs (run by tests/webui/test_webui_server.py).

    python tests/webui/check_webui.py ROOT CHECKPOINT OUT

ROOT is what ``setup_webui_checkout.sh`` built (``ROOT/webui``, ``ROOT/venv``, ``ROOT/hf``). The server starts on a
free loopback port with the checkpoint, on the CPU in fp32, offline (the hub variables set; the test runs this
script inside a network namespace of its own, ``unshare -rn``), with the test probe on
(``DEJAGUARD_WEBUI_PROBE=OUT/probe``). Jobs, all 64x64, 3 Euler steps, CFG 7.5, 2 images, seed 1234, empty negative
prompt: ``calibrated`` (DejaGuard on, threshold 0: the calibration beside the checkpoint), ``given`` (DejaGuard on,
threshold 1e9), ``off`` (DejaGuard off) and ``protected`` (DejaGuard on with protection, the threshold between the
two images' scores, so one image is steered). ``OUT/results.json`` holds per job the API's ``info`` (parsed) and the
images (base64 PNG), and, with ``DEJAGUARD_WEBUI_NODE_MODULES`` naming a ``node_modules`` folder holding
playwright-core, what headless Chromium finds of the DejaGuard sections on the page and the badge it sees after a
generation from the page (``page``; that generation is 64x64, 2 Euler steps, through the run's own
``OUT/ui-config.json`` and ``OUT/config.json``), and the Calibrate route's answer and the calibration file it wrote
beside the checkpoint (``calibrate``: the first 100 bundled prompts at 64x64), and the Explain route's answer for
the jobs' prompt at 64x64 (``explain``); with the browser, also the highlighted words the page shows under the prompt
after clicking the section's Explain button (``page.tokens``); ``OUT/server.log`` the server's output. The server is
stopped at the end. Only the standard library: it runs with any Python.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PROMPT = "a photograph of an astronaut riding a horse"
JOBS = {"calibrated": [True, 0.0], "given": [True, 1e9], "off": [False, 0.0], "protected": None}


def job_args(name: str, results: dict) -> list:
    """The DejaGuard section's API arguments ``[enabled, threshold, protect]`` of job ``name``; ``protected``: on,
    protection on, the threshold halfway between the two images' scores of the ``calibrated`` job (one steered)."""
    if name != "protected":
        return JOBS[name]
    scores = [float(s) for s in results["calibrated"]["info"]["extra_generation_params"]["DejaGuard score"]]
    return [True, sum(scores) / len(scores), True]
READY_TIMEOUT = 900.0
CALIBRATION_PROMPTS = 100  # the fewest a 1% false-positive rate needs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(root: Path, checkpoint: Path, port: int, out: Path) -> list[str]:
    forge = (root / "webui" / "backend").is_dir()
    (out / "ui-config.json").write_text(json.dumps(UI_CONFIG))
    (out / "config.json").write_text(json.dumps(UI_SETTINGS))
    device = ["--always-cpu", "--all-in-fp32"] if forge else ["--use-cpu", "all", "--no-half", "--precision", "full"]
    return [str(root / "venv" / "bin" / "python"), "launch.py", "--skip-prepare-environment", "--skip-torch-cuda-test",
            "--skip-version-check", *device, "--api", "--port", str(port), "--ckpt", str(checkpoint),
            "--no-download-sd-model", "--no-hashing", "--do-not-download-clip",
            "--ui-config-file", str(out / "ui-config.json"), "--ui-settings-file", str(out / "config.json")]


def call(port: int, path: str, payload: dict | None = None, timeout: float = 600.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:  # the WebUI's API puts the error in the body
        raise RuntimeError(f"{path}: HTTP {err.code}: {err.read()[-3000:].decode(errors='replace')}") from None


def wait_ready(port: int, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + READY_TIMEOUT
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the WebUI exited ({server.returncode}):\n{log.read_text()[-4000:]}")
        try:  # the API answers once its routes exist, but builds the scripts' default arguments after them: a
            # txt2img before that fails (IndexError in init_script_args); the log's "Startup time" comes after
            call(port, "/sdapi/v1/sd-models", timeout=10)
            if "Startup time" in log.read_text(errors="replace"):
                return
            time.sleep(2)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, RuntimeError):
            time.sleep(2)
    raise RuntimeError(f"the WebUI was not ready in {READY_TIMEOUT:.0f} s:\n{log.read_text()[-4000:]}")


# Headless Chromium (Debian's, driven by playwright-core from NODE_PATH) opens the page and reads the DejaGuard
# sections of txt2img and img2img (their accordions' elem_id); then, as a user would, opens txt2img's section,
# ticks "Check each image", types the prompt, clicks Generate and reads the badge javascript/dejaguard.js shows
# above the image's infotext (the UI's size and steps come from the run's ui-config / settings files, so the
# generation is small). Prints one JSON object.
PAGE_SCRIPT = """
import { createRequire } from 'module';
import path from 'path';
const { chromium } = createRequire(path.join(process.env.NODE_PATH, 'x.js'))('playwright-core');
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu',
  '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
const errors = [];
page.on('pageerror', e => errors.push(String(e)));
await page.goto(process.argv[1]);
const found = {};
for (const tab of ['txt2img', 'img2img']) {
  try {
    const el = await page.waitForSelector('#dejaguard_' + tab, { state: 'attached', timeout: 180000 });
    found[tab] = await el.evaluate(e => e.textContent);
  } catch (e) { found[tab] = null; errors.push(String(e)); }
}
found.badge = null;
try {
  await page.click('#dejaguard_txt2img .label-wrap');
  await page.check('#dejaguard_enabled_txt2img input[type=checkbox]', { timeout: 30000 });
  await page.fill('#txt2img_prompt textarea', process.argv[2]);
  await page.click('#txt2img_generate');
  const badge = await page.waitForSelector('#dejaguard_badge_txt2img', { state: 'visible', timeout: 900000 });
  found.badge = await badge.evaluate(e => ({ text: e.textContent, verdict: e.dataset.verdict,
    background: getComputedStyle(e).backgroundColor, children: e.children.length,
    info: gradioApp().getElementById('html_info_txt2img').textContent }));
} catch (e) { errors.push(String(e)); }
found.tokens = null;
try {
  await page.click('#dejaguard_explain_txt2img');
  const box = await page.waitForSelector('#dejaguard_tokens_txt2img', { state: 'visible', timeout: 900000 });
  found.tokens = await box.evaluate(e => ({ text: e.textContent,
    spans: Array.from(e.querySelectorAll('.dejaguard-token')).map(s => ({ word: s.textContent,
      score: Number(s.dataset.score), background: getComputedStyle(s).backgroundColor, children: s.children.length })),
    hiddenPayload: getComputedStyle(gradioApp().getElementById('dejaguard_explain_json_txt2img')).display,
    belowPrompt: gradioApp().getElementById('txt2img_prompt').nextElementSibling === e }));
} catch (e) { errors.push(String(e)); }
console.log(JSON.stringify({ ...found, errors }));
await browser.close();
"""
UI_CONFIG = {"txt2img/Width/value": 64, "txt2img/Height/value": 64,
             "customscript/sampler.py/txt2img/Sampling steps/value": 2,
             "customscript/sampler.py/txt2img/Sampling method/value": "Euler"}
# Forge's "sd" UI preset; and the emphasis mode without normalization: the random fixture's text encoder ends in a
# LayerNorm of ones and zeros, so its embeddings have zero mean per token, and the default ("Original") emphasis
# divides the embeddings by their mean, i.e. by rounding noise: NaN or an arbitrary scale, depending on the batch
# (on a real checkpoint the mean is far from 0 and, for prompts without emphasis, the division is by itself: 1).
# Live previews off: their default decoder for SDXL ("Approx NN") downloads vaeapprox-sdxl.pt on first use, and
# without a network the whole txt2img call fails with HTTP 500 (A1111 modules/processing.py; Forge likewise).
UI_SETTINGS = {"sd_t2i_width": 64, "sd_t2i_height": 64, "sd_t2i_sampler": "Euler", "emphasis": "No norm",
               "live_previews_enable": False}


def page_sections(port: int) -> dict | None:
    """What the page shows of the DejaGuard sections; None without node, chromium or playwright-core."""
    modules = os.environ.get("DEJAGUARD_WEBUI_NODE_MODULES", "")
    if not (modules and Path(modules, "playwright-core").is_dir() and Path("/usr/bin/chromium").is_file()):
        return None
    proc = subprocess.run(["node", "--input-type=module", "-e", PAGE_SCRIPT, f"http://127.0.0.1:{port}/", PROMPT],
                          capture_output=True, text=True, timeout=1200, env=dict(os.environ, NODE_PATH=modules))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {"txt2img": None, "img2img": None, "errors": [proc.stderr[-2000:]]}


def main(root: Path, checkpoint: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), out / "server.log"
    env = dict(os.environ, HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False", DEJAGUARD_WEBUI_PROBE=str(out / "probe"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.pop("PYTHONPATH", None)
    with open(log, "w") as log_file:
        server = subprocess.Popen(command(root, checkpoint, port, out), cwd=root / "webui", env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    results = {}
    try:
        started = time.time()
        wait_ready(port, server, log)
        results["ready_s"] = time.time() - started
        for name in JOBS:
            args = job_args(name, results)
            started = time.time()
            response = call(port, "/sdapi/v1/txt2img", {
                "prompt": PROMPT, "negative_prompt": "", "steps": 3, "width": 64, "height": 64, "batch_size": 2,
                "n_iter": 1, "seed": 1234, "cfg_scale": 7.5, "sampler_name": "Euler",
                "alwayson_scripts": {"dejaguard": {"args": args}}})
            results[name] = {"info": json.loads(response["info"]), "images": response["images"],
                             "seconds": time.time() - started}
        results["page"] = page_sections(port)
        started = time.time()  # the Calibrate button's route, on the first 100 bundled prompts at the jobs' size
        try:
            response = call(port, f"/dejaguard/v1/calibrate?width=64&height=64&prompt_limit={CALIBRATION_PROMPTS}", {})
        except RuntimeError as err:
            response = {"summary": f"ERROR {err}"}
        file = checkpoint.parent / f"{checkpoint.stem}.dejaguard_calibration.json"
        results["calibrate"] = {"summary": response["summary"], "seconds": time.time() - started,
                                "file": json.loads(file.read_text()) if file.is_file() else None}
        started = time.time()  # the Explain button's route, on the jobs' prompt and size
        query = urllib.parse.urlencode({"prompt": PROMPT, "width": 64, "height": 64, "steps": 1})
        try:
            response = call(port, f"/dejaguard/v1/explain?{query}", {})
        except RuntimeError as err:
            response = {"error": f"ERROR {err}"}
        results["explain"] = {**response, "seconds": time.time() - started}
        try:  # the WebUI still answers after Explain (a refusal for memory, say)
            results["alive_after_explain"] = "progress" in call(port, "/sdapi/v1/progress")
        except RuntimeError:
            results["alive_after_explain"] = False
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))

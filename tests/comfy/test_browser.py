"""The real ComfyUI page in headless Chromium: DejaGuard's front-end extensions render what the nodes send.

Starts a ComfyUI server on loopback, opens its page in Debian's chromium driven by playwright-core
(``bash tests/comfy/setup_browser.sh``; no browser download), loads UI-format workflows with
``app.loadGraphData``, queues them with ``app.queuePrompt`` and waits for the rendered result:

- ``workflows/explain_testbed.json``: the Token Highlighting node shows the prompt's words as
  ``span.dejaguard-token`` elements, shaded by score; the trigger word is the most shaded.
- ``workflows/detect_testbed.json`` (when present): every Memorization Verdict node shows its badge
  (``.dejaguard-badge`` with ``data-kind`` ok / memorized / none).

Screenshots (and what the page reported, as JSON) go to ``$DEJAGUARD_ARTIFACTS`` or the test's
``tmp_path``; the folder is printed. Skipped without ComfyUI, chromium, node or playwright-core.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from comfy_server import COMFY_ROOT, REPO, ComfyServer, comfy_available, pack_page_errors  # noqa: E402
from test_explain_comfy import BUNDLED, TRIGGER, model_folder  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
NODE_MODULES = COMFY_ROOT / "pw" / "node_modules"
EXPLAIN_UI = REPO / "workflows" / "explain_testbed.json"
DETECT_UI = REPO / "workflows" / "detect_testbed.json"
CALIBRATION = "dejaguard_calibration.json"  # the guard's calibrated threshold, next to the testbed weights


def _browser_missing() -> str | None:
    if not comfy_available():
        return "ComfyUI not set up (bash tests/comfy/setup_comfy.sh)"
    if not CHROMIUM.exists():
        return "no /usr/bin/chromium (bash tests/comfy/setup_browser.sh)"
    if shutil.which("node") is None or not (NODE_MODULES / "playwright-core").is_dir():
        return "no node / playwright-core in .comfy/pw (bash tests/comfy/setup_browser.sh)"
    return None


# Drives the page: one entry per workflow {name, ui, wait: "tokens" | "badges"} -> results JSON + screenshots.
DRIVER = r"""
import { createRequire } from 'module';
import path from 'path';
import fs from 'fs';
const { chromium } = createRequire(path.join(process.env.NODE_PATH, 'x.js'))('playwright-core');
const [url, jobPath, outPath, shotDir] = process.argv.slice(2);
const jobs = JSON.parse(fs.readFileSync(jobPath, 'utf8'));
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox',
  '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'] });
const results = { pageErrors: [], workflows: {} };
try {
  const page = await browser.newPage({ viewport: { width: 1800, height: 900 } });
  page.on('pageerror', e => results.pageErrors.push(String(e) + '\n' + (e.stack || '')));
  page.on('dialog', async d => { results.pageErrors.push('dialog: ' + d.message()); await d.dismiss(); });
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph &&
    Object.keys(LiteGraph.registered_node_types).length > 100, null, { timeout: 120000 });
  results.extensions = await page.evaluate(() => window.app.extensions.map(e => e.name));
  await page.evaluate(async () => {
    const { api } = await import('/scripts/api.js');  // the page's own module instance
    window.__dg = { errors: [], executed: [] };
    api.addEventListener('execution_error', e => window.__dg.errors.push(e.detail));
    api.addEventListener('executed', e => window.__dg.executed.push(String(e.detail.node)));
    window.__dgApi = api;
  });
  // Queue only once the page's websocket is open and the server has named the client: a prompt queued before
  // that runs (the server logs it), but its "executed" message reaches no page (seen once in CI: 480 s timeout).
  await page.waitForFunction(() => window.__dgApi.clientId &&
    (!window.__dgApi.socket || window.__dgApi.socket.readyState === 1), null, { timeout: 120000 });
  for (const job of jobs) {
    const started = Date.now();
    await page.evaluate(async ui => {
      await window.app.loadGraphData(ui);
      window.__dg.errors = []; window.__dg.executed = [];
      await window.app.queuePrompt(0, 1);
    }, job.ui);
    await page.waitForFunction(job => {
      if (window.__dg.errors.length) return true;
      if (job.wait === 'tokens') return document.querySelectorAll('.dejaguard-token').length > 0;
      const verdicts = window.app.graph._nodes.filter(n => n.type === 'DejaGuardMemorizationVerdict');
      const badge = n => n.widgets?.find(w => w.name === 'dejaguard_badge')?.element;
      return verdicts.every(n => window.__dg.executed.includes(String(n.id)) && badge(n)?.dataset.kind);
    }, job, { timeout: 480000, polling: 250 });
    await page.waitForTimeout(500);  // one more canvas frame: DOM widgets are positioned on draw
    const res = await page.evaluate(() => {
      const shown = el => {
        const r = el.getBoundingClientRect(), s = getComputedStyle(el);
        return r.width > 0 && r.height > 0 && s.display !== 'none' && s.visibility !== 'hidden'
          && !el.closest('[hidden]');
      };
      return {
        errors: window.__dg.errors, executed: window.__dg.executed,
        tokens: [...document.querySelectorAll('.dejaguard-token')].map(el => ({ text: el.textContent,
          score: Number(el.dataset.score), background: getComputedStyle(el).backgroundColor, shown: shown(el) })),
        tokenInfo: [...document.querySelectorAll('.dejaguard-token-info')].map(el => el.textContent),
        badges: [...document.querySelectorAll('.dejaguard-badge')].map(el => ({ text: el.textContent,
          kind: el.dataset.kind || null, background: getComputedStyle(el).backgroundColor, shown: shown(el) })),
        nodes: window.app.graph._nodes.map(n => [n.id, n.type]),
      };
    });
    res.seconds = (Date.now() - started) / 1000;
    const shot = path.join(shotDir, job.name + '.png');
    await page.screenshot({ path: shot });
    res.screenshot = shot;
    results.workflows[job.name] = res;
  }
} finally {
  fs.writeFileSync(outPath, JSON.stringify(results, null, 2));
  await browser.close();
}
"""


def _ui_workflow(path: Path) -> dict[str, Any]:
    """A UI workflow with the testbed loader pointed at the available model folder. Without a
    calibration file next to the weights the guard gets a fixed threshold (1.0)."""
    ui = json.loads(path.read_text())
    folder = model_folder()
    if folder is None:
        return ui
    for node in ui["nodes"]:
        if node["type"] == "DejaGuardTestbedLoader" and folder != BUNDLED:
            node["widgets_values"][1] = str(folder)
        if node["type"] == "DejaGuardMemorizationGuard" and not node["widgets_values"][0] \
                and not (folder / CALIBRATION).is_file():
            node["widgets_values"][0] = 1.0
    return ui


def _alpha(css: str) -> float:
    """Opacity of a CSS colour ``rgb(...)`` / ``rgba(...)``."""
    parts = re.findall(r"[\d.]+", css)
    return float(parts[3]) if len(parts) == 4 else 1.0


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ["DEJAGUARD_ARTIFACTS"]) / "browser" if os.environ.get("DEJAGUARD_ARTIFACTS") \
        else tmp_path / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"browser artifacts (screenshots, page results): {folder}")
    return folder


@pytest.mark.slow
@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_token_shading_in_real_page(artifacts: Path) -> None:
    if model_folder() is None:
        pytest.skip("no testbed weights (core/testbed/model/unet or a training checkpoint)")
    jobs = [{"name": "explain_testbed", "ui": _ui_workflow(EXPLAIN_UI), "wait": "tokens"}]
    if DETECT_UI.is_file():
        jobs.append({"name": "detect_testbed", "ui": _ui_workflow(DETECT_UI), "wait": "badges"})
    (artifacts / "jobs.json").write_text(json.dumps(jobs))
    (artifacts / "driver.mjs").write_text(DRIVER)
    out = artifacts / "page_results.json"
    with ComfyServer(threads=1) as server:
        proc = subprocess.run(["node", str(artifacts / "driver.mjs"), server.base_url, str(artifacts / "jobs.json"),
                               str(out), str(artifacts)], capture_output=True, text=True, timeout=1200,
                              env=dict(os.environ, NODE_PATH=str(NODE_MODULES)), cwd=COMFY_ROOT / "pw")
        (artifacts / "server.log").write_text(server.log())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    print(json.dumps({k: {"seconds": v["seconds"], "tokens": v["tokens"], "badges": v["badges"]}
                      for k, v in results["workflows"].items()}, indent=1))
    assert pack_page_errors(results["pageErrors"]) == []
    assert "DejaGuard.TokenHighlight" in results["extensions"]

    explain = results["workflows"]["explain_testbed"]
    assert explain["errors"] == []
    words = [t["text"] for t in explain["tokens"]]
    assert words == ["a", "photograph", "of", TRIGGER]
    assert all(t["shown"] for t in explain["tokens"])
    alphas = [_alpha(t["background"]) for t in explain["tokens"]]
    assert alphas.index(max(alphas)) == words.index(TRIGGER)  # the trigger word is the most shaded
    assert max(alphas) - min(alphas) > 0.2 and min(alphas) > 0.0
    assert explain["tokenInfo"] and "UNet evals" in explain["tokenInfo"][0]
    assert Path(explain["screenshot"]).stat().st_size > 10_000

    if "detect_testbed" in results["workflows"]:
        detect = results["workflows"]["detect_testbed"]
        assert detect["errors"] == []
        verdicts = [str(n[0]) for n in detect["nodes"] if n[1] == "DejaGuardMemorizationVerdict"]
        assert verdicts and all(v in detect["executed"] for v in verdicts)
        kinds = [b["kind"] for b in detect["badges"]]
        assert len([k for k in kinds if k in ("ok", "memorized", "none")]) >= len(verdicts), kinds
        assert all(b["shown"] and b["text"] for b in detect["badges"] if b["kind"])

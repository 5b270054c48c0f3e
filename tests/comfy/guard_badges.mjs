// Load a detect workflow into the real ComfyUI front end (headless Chromium), queue it, and report the
// DejaGuard badges (web/js/guard.js) once the guard and both verdict nodes have one.
// node guard_badges.mjs URL WORKFLOW.json OUT.json SHOT.png GUARD_ID VERDICT_ID...   (playwright-core in NODE_PATH)
import { createRequire } from 'module';
import path from 'path';
import fs from 'fs';
// ESM ignores NODE_PATH: resolve playwright-core from it explicitly.
const { chromium } = createRequire(path.join(process.env.NODE_PATH, 'x.js'))('playwright-core');
const [url, wfPath, outPath, shotPath, guardId, ...verdictIds] = process.argv.slice(2);
const ids = [guardId, ...verdictIds].map(Number);
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu',
  '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
const page = await browser.newPage({ viewport: { width: 2000, height: 1000 } });
const errors = [];
page.on('pageerror', e => errors.push(String(e) + '\n' + (e.stack || '')));
page.on('dialog', async d => { errors.push('dialog: ' + d.message()); await d.dismiss(); });
await page.goto(url);
await page.waitForFunction(() => window.app && window.app.graph && Object.keys(LiteGraph.registered_node_types).length > 100, null, { timeout: 60000 });
// Queue only once the page's websocket is open and the server has named the client (a prompt queued before that
// runs, but its messages reach no page). A front end without the legacy api module skips this wait.
await page.evaluate(async () => {
  try { window.__dgApi = (await import('/scripts/api.js')).api; } catch (e) { window.__dgApi = null; }
});
await page.waitForFunction(() => !window.__dgApi || (window.__dgApi.clientId &&
  (!window.__dgApi.socket || window.__dgApi.socket.readyState === 1)), null, { timeout: 120000, polling: 250 });
const wf = JSON.parse(fs.readFileSync(wfPath, 'utf8'));
await page.evaluate(async (wf) => { await window.app.loadGraphData(wf); await window.app.queuePrompt(0, 1); }, wf);
let timedOut = false;
try {
  await page.waitForFunction((ids) => ids.every(id => window.app.graph.getNodeById(id)?.dejaguardBadge), ids,
    { timeout: 600000, polling: 500 });
} catch (e) { timedOut = true; errors.push(String(e)); }
const res = await page.evaluate((ids) => Object.fromEntries(ids.map(id => {
  const node = window.app.graph.getNodeById(id);
  const el = node?.widgets?.find(w => w.name === 'dejaguard_badge')?.element;
  return [id, { type: node?.type, badge: node?.dejaguardBadge ?? null, text: el?.textContent ?? null,
    kind: el?.dataset.kind ?? null, background: el?.style.background ?? null, html: el?.innerHTML ?? null,
    visible: !!el && el.style.display !== 'none' && el.isConnected }];
})), ids);
fs.writeFileSync(outPath, JSON.stringify({ nodes: res, errors, timedOut }, null, 2));
await page.screenshot({ path: shotPath });
await browser.close();

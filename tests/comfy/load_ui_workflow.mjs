// Load a UI-format workflow into the real ComfyUI front end (headless Chromium) and write app.graphToPrompt().
// node load_ui_workflow.mjs URL WORKFLOW.json OUT.json SHOT.png   (playwright-core in NODE_PATH, Debian chromium)
import { createRequire } from 'module';
import path from 'path';
// ESM ignores NODE_PATH: resolve playwright-core from it explicitly.
const { chromium } = createRequire(path.join(process.env.NODE_PATH, 'x.js'))('playwright-core');
import fs from 'fs';
const [url, wfPath, outPath, shotPath] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu',
  '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
const page = await browser.newPage({ viewport: { width: 1800, height: 800 } });
const errors = [];
page.on('pageerror', e => errors.push(String(e) + '\n' + (e.stack || '')));
page.on('dialog', async d => { errors.push('dialog: ' + d.message()); await d.dismiss(); });
await page.goto(url);
await page.waitForFunction(() => window.app && window.app.graph && Object.keys(LiteGraph.registered_node_types).length > 100, null, { timeout: 60000 });
const wf = JSON.parse(fs.readFileSync(wfPath, 'utf8'));
const res = await page.evaluate(async (wf) => {
  await window.app.loadGraphData(wf);
  const p = await window.app.graphToPrompt();
  return { output: p.output, nodes: window.app.graph._nodes.map(n => [n.id, n.type, n.title]) };
}, wf);
res.errors = errors;
fs.writeFileSync(outPath, JSON.stringify(res, null, 2));
await page.screenshot({ path: shotPath });
await browser.close();

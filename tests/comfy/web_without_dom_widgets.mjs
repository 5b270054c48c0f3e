// Load web/js/*.js as ComfyUI does (from /extensions/DejaGuard/, app and api from /scripts/) against stubs, in a
// front end WITHOUT DOM widgets (no node.addDOMWidget), create each DejaGuard node and feed it an execution
// result. Prints one JSON line: {node type: {ok, error, text}}. Run: node web_without_dom_widgets.mjs ROOT
// where ROOT holds scripts/app.js, scripts/api.js (stubs) and extensions/DejaGuard/ (a copy of web/js).
const root = process.argv[2];
class Element {  // the few DOM calls the extensions make
	constructor(tag) { this.tag = tag; this.style = {}; this.dataset = {}; this.children = []; this._text = ""; }
	set textContent(v) { this._text = String(v); this.children = []; }
	get textContent() { return this._text + this.children.map((c) => (typeof c === "string" ? c : c.textContent)).join(""); }
	replaceChildren() { this.children = []; this._text = ""; }
	append(...nodes) { this.children.push(...nodes); }
}
globalThis.document = { createElement: (tag) => new Element(tag) };
const { app } = await import(`${root}/scripts/app.js`);
for (const name of ["guard.js", "tokens.js", "calibrate.js"]) await import(`${root}/extensions/DejaGuard/${name}`);
const results = {};
const messages = {
	DejaGuardMemorizationVerdict: { dejaguard: [{ scores: [1.5], flagged: [true], threshold: 1.0, summary: "s" }] },
	DejaGuardTokenHighlight: { dejaguard_tokens: [{ words: ["a", "kraken"], word_scores: [0.1, 0.9], magnitude: 2,
		steps: 1, unet_evals: 2 }] },
	DejaGuardCalibrate: { text: ["DejaGuard Calibrate: threshold 0.5"] },
};
for (const type of ["DejaGuardMemorizationGuard", "DejaGuardMemorizationVerdict", "DejaGuardTokenHighlight",
	"DejaGuardCalibrate"]) {
	function NodeType() {}
	try {
		for (const ext of app.extensions) await ext.beforeRegisterNodeDef?.(NodeType, { name: type });
		const node = new NodeType();  // no addDOMWidget, no widgets
		node.onNodeCreated?.();
		if (messages[type]) node.onExecuted?.(messages[type]);
		const element = Object.values(node.dejaguardElements ?? {})[0];
		results[type] = { ok: true, text: element?.textContent ?? null };
	} catch (err) {
		results[type] = { ok: false, error: String(err) };
	}
}
console.log(JSON.stringify(results));

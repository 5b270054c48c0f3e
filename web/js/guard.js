// DejaGuard memorization badge: a green (ok) / red (memorized) / grey (no score) label on the
// Memorization Guard node while sampling (the "dejaguard.score" message nodes/guard.py sends at the
// first step) and on the Memorization Verdict node when it has run (its ui {"dejaguard": [{...}]}).
// With auto-protect (the Memorization Protect node, nodes/protect.py, and the Protected Sampler,
// nodes/protect_sampler.py, which shows the badge on itself) a flagged image that was steered away reads
// "image 1: memorized at step 1 -> steered: score 3.3 -> 0.4" on an orange badge ("embedding mitigated" /
// "neuron mask on" for the strategies that sample it again, with their extra UNet evaluations).
// Text is set with textContent only, never innerHTML.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { domElement, extendNode } from "./dom_widget.js";

const GUARD = "DejaGuardMemorizationGuard";
const PROTECT = "DejaGuardMemorizationProtect";
const VERDICT = "DejaGuardMemorizationVerdict";
const SAMPLER = "DejaGuardProtectedSampler";
const HOW = { guidance: "steered", embedding: "embedding mitigated", mask: "neuron mask on" };
const EVENT = "dejaguard.score";
const WIDGET = "dejaguard_badge";
const COLORS = { memorized: "#b3261e", steered: "#b35c00", ok: "#1e7b34", none: "#5f6368" };

/** What auto-protect did to image ``i``: "memorized at step 1 -> steered: score 3.3 -> 0.4" (the score it left
 * the basin at; "score 3.3" alone when steered until the schedule limit), or null when not flagged. */
function protectionLine(protection, i) {
	const img = protection?.images?.[i];
	if (!img?.flagged) return null;
	const how = HOW[protection.strategy] ?? `${protection.strategy} mitigated`;
	const after = img.score_after === null || img.score_after === undefined ? ""
		: ` -> ${Number(img.score_after).toFixed(1)}`;  // none when steered until the schedule limit
	return `memorized at step 1 -> ${how}: score ${Number(img.score_before).toFixed(1)}${after}`;
}

/** {kind, lines} for a score payload: {scores, flagged, threshold, status, summary, protection?, size_warning?}
 * (size_warning: "calibrated at 512x512, this run 512x768: threshold may not apply", a last line). */
export function badgeState(data) {
	const scores = Array.isArray(data?.scores) ? data.scores.map(Number) : [];
	const flagged = Array.isArray(data?.flagged) ? data.flagged.map(Boolean) : [];
	const threshold = Number(data?.threshold);
	if (!scores.length) {
		return { kind: "none", lines: ["no score", String(data?.status ?? "waiting for sampling")] };
	}
	const n = flagged.filter(Boolean).length;
	const head = n ? `MEMORIZED (${n} of ${scores.length})` : `ok: no memorization (${scores.length})`;
	const protection = data?.protection;
	const steered = n > 0 && protection && flagged.every((f, i) => !f || protectionLine(protection, i));
	const warning = data?.size_warning ? [`note: ${data.size_warning}`] : [];
	const lines = scores.map((s, i) => (steered && flagged[i]) ? `image ${i + 1}: ${protectionLine(protection, i)}` :
		`image ${i + 1}: ${s.toFixed(3)} ${flagged[i] ? ">" : "≤"} ${Number.isFinite(threshold) ? threshold.toFixed(3) : "?"}`);
	if (steered) {
		const cost = Number(protection.extra_unet_evals ?? 0);
		const done = protection.strategy === "guidance" ? "steered" : "re-sampled";
		return { kind: "steered", lines: [`PROTECTED (${n} of ${scores.length} ${done}, ${protection.strategy}, ` +
			`${cost} extra UNet evals)`, ...lines, ...warning] };
	}
	return { kind: n ? "memorized" : "ok", lines: [head, ...lines, ...warning] };
}

/** The node's badge element, created once (a DOM widget where the front end has them). */
function badgeElement(node) {
	return domElement(node, WIDGET, 44, () => {
		const element = document.createElement("div");
		element.className = "dejaguard-badge";
		Object.assign(element.style, {
			fontFamily: "sans-serif", fontSize: "12px", lineHeight: "1.4", color: "#fff", borderRadius: "6px",
			padding: "4px 8px", background: COLORS.none, overflow: "hidden", whiteSpace: "pre-line",
		});
		element.textContent = "no score yet";
		return element;
	});
}

/** Paint the badge of ``node`` from a score payload and keep it on the node for scripts and tests. */
function paint(node, data) {
	const state = badgeState(data);
	const element = badgeElement(node);
	element.textContent = state.lines.join("\n");
	element.style.background = COLORS[state.kind];
	element.title = String(data?.summary ?? "");
	element.dataset.kind = state.kind;
	node.dejaguardBadge = { ...state, summary: String(data?.summary ?? "") };
	node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
	name: "DejaGuard.MemorizationBadge",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (![GUARD, PROTECT, VERDICT, SAMPLER].includes(nodeData?.name)) return;
		extendNode(nodeType, {
			created: badgeElement,
			executed: (nodeData.name === VERDICT || nodeData.name === SAMPLER) ? (node, message) => {
				const data = message?.dejaguard?.[0];
				if (data) paint(node, data);
			} : undefined,
		});
	},
	async setup() {
		// During sampling: the guard node shows the scores of the run that just started.
		api.addEventListener(EVENT, ({ detail }) => {
			const node = app.graph?.getNodeById(Number(detail?.node));
			if (node && [GUARD, PROTECT, SAMPLER].includes(node.type)) paint(node, detail);
		});
	},
});

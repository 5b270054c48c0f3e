// DejaGuard token highlighting: draws the prompt's words on the "DejaGuard Token Highlighting" node,
// each shaded by its significance (nodes/explain.py sends {"dejaguard_tokens": [{words, word_scores, ...}]}).
// The DOM is built from the prompt text with textContent only, never innerHTML.
import { app } from "../../scripts/app.js";
import { domElement, extendNode } from "./dom_widget.js";

const NODE_TYPE = "DejaGuardTokenHighlight";
const WIDGET = "dejaguard_tokens";
const UI_KEY = "dejaguard_tokens";

/** Background colour for a word: orange, opacity proportional to score / max score. */
function shade(score, max) {
	const alpha = max > 0 ? Math.max(0, Math.min(1, score / max)) : 0;
	return `rgba(255, 110, 20, ${(0.08 + 0.82 * alpha).toFixed(3)})`;
}

/** Replace the element's content by the shaded words of one result. */
function render(element, data) {
	element.replaceChildren();
	const words = Array.isArray(data?.words) ? data.words : [];
	const scores = Array.isArray(data?.word_scores) ? data.word_scores : [];
	const max = Math.max(0, ...scores.map(Number).filter(Number.isFinite));
	const line = document.createElement("div");
	line.className = "dejaguard-token-line";
	words.forEach((word, i) => {
		const score = Number(scores[i]) || 0;
		const span = document.createElement("span");
		span.className = "dejaguard-token";
		span.textContent = String(word);
		span.title = `${String(word)}: ${(100 * score).toFixed(1)}%`;
		span.dataset.score = String(score);
		Object.assign(span.style, {
			background: shade(score, max), borderRadius: "3px", padding: "1px 3px", margin: "1px",
			display: "inline-block", color: score === max && max > 0 ? "#000" : "inherit",
		});
		line.append(span, " ");
	});
	const info = document.createElement("div");
	info.className = "dejaguard-token-info";
	info.style.opacity = "0.7";
	info.style.fontSize = "11px";
	const magnitude = Number(data?.magnitude);
	info.textContent = Number.isFinite(magnitude)
		? `magnitude ${magnitude.toFixed(3)} · ${Number(data?.steps) || 1} step(s) · ${Number(data?.unet_evals) || 0} UNet evals`
		: "";
	element.append(line, info);
}

/** The node's word display, created once (a DOM widget where the front end has them, as guard.js does). */
function tokenElement(node) {
	return domElement(node, WIDGET, 60, () => {
		const element = document.createElement("div");
		element.className = "dejaguard-tokens";
		Object.assign(element.style, { fontFamily: "sans-serif", fontSize: "13px", lineHeight: "1.6",
			color: "var(--input-text, #ddd)", overflow: "auto" });
		element.textContent = "Queue the prompt to see which words drive the prediction.";
		return element;
	});
}

app.registerExtension({
	name: "DejaGuard.TokenHighlight",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (nodeData?.name !== NODE_TYPE) return;
		extendNode(nodeType, {
			created: tokenElement,
			executed(node, message) {
				const data = message?.[UI_KEY]?.[0];
				if (!data) return;
				render(tokenElement(node), data);
				node.setDirtyCanvas?.(true, true);
			},
		});
	},
});

// DejaGuard Calibrate: shows the node's summary (threshold, prompts scored, UNet calls, wall time, where it was
// saved) on the node when it has run (its ui {"text": [summary]}). Text is set with textContent only.
import { app } from "../../scripts/app.js";
import { domElement, extendNode } from "./dom_widget.js";

const CALIBRATE = "DejaGuardCalibrate";
const WIDGET = "dejaguard_calibration";

/** The node's summary element, created once (a DOM widget where the front end has them). */
function summaryElement(node) {
	return domElement(node, WIDGET, 60, () => {
		const element = document.createElement("div");
		element.className = "dejaguard-calibration";
		Object.assign(element.style, {
			fontFamily: "sans-serif", fontSize: "11px", lineHeight: "1.4", color: "#ddd", borderRadius: "6px",
			padding: "4px 8px", background: "#333", overflow: "auto", whiteSpace: "pre-line",
		});
		element.textContent = "not calibrated in this session yet";
		return element;
	});
}

app.registerExtension({
	name: "DejaGuard.CalibrationSummary",
	async beforeRegisterNodeDef(nodeType, nodeData) {
		if (nodeData?.name !== CALIBRATE) return;
		extendNode(nodeType, {
			created: summaryElement,
			executed(node, message) {
				const text = message?.text?.[0];
				if (text === undefined) return;
				summaryElement(node).textContent = String(text);
				node.setDirtyCanvas?.(true, true);
			},
		});
	},
});

// DejaGuard's one way to put an element on a node: a DOM widget where the front end has them (ComfyUI's
// addDOMWidget), nothing otherwise, so that a front end without it never breaks the node. Shared by guard.js
// (the score badge), tokens.js (the shaded prompt words) and calibrate.js (the calibration summary). The widget
// is display-only: never serialized into the workflow or the API graph. Also the one way those scripts hook a
// node type's creation and execution (extendNode).

/** Add ``element`` to ``node`` as DOM widget ``name`` (at least ``minHeight`` px tall); the widget, or null. */
export function addDomWidget(node, name, element, minHeight) {
	if (typeof node?.addDOMWidget !== "function") return null;
	const widget = node.addDOMWidget(name, name, element, {
		serialize: false, hideOnZoom: false, getMinHeight: () => minHeight, getValue: () => undefined, setValue: () => {},
	});
	widget.serializeValue = () => undefined; // never part of the API graph
	return widget;
}

/** The element of ``node``'s DOM widget ``name``, or the one kept on the node where there are no DOM widgets;
 * created once by ``create()`` and added with :func:`addDomWidget`. */
export function domElement(node, name, minHeight, create) {
	const existing = node.widgets?.find((w) => w.name === name)?.element ?? node.dejaguardElements?.[name];
	if (existing) return existing;
	const element = create();
	if (!addDomWidget(node, name, element, minHeight)) {
		node.dejaguardElements = { ...node.dejaguardElements, [name]: element }; // rendered, just not shown
	}
	return element;
}

/** Run ``created(node)`` when a node of ``nodeType`` is created and ``executed(node, message)`` when it has run
 * (its ``ui`` dict), after the handlers the front end or other extensions put there. */
export function extendNode(nodeType, { created, executed } = {}) {
	const onNodeCreated = nodeType.prototype.onNodeCreated;
	nodeType.prototype.onNodeCreated = function () {
		const r = onNodeCreated?.apply(this, arguments);
		created?.(this);
		return r;
	};
	if (!executed) return;
	const onExecuted = nodeType.prototype.onExecuted;
	nodeType.prototype.onExecuted = function (message) {
		onExecuted?.apply(this, arguments);
		executed(this, message);
	};
}

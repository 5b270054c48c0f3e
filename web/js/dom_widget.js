// DejaGuard's one way to put an element on a node: a DOM widget where the front end has them (ComfyUI's
// addDOMWidget), nothing otherwise, so that a front end without it never breaks the node. Shared by guard.js
// (the score badge) and tokens.js (the shaded prompt words). The widget is display-only: never serialized
// into the workflow or the API graph.

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

/*
 * DejaGuard in Stable Diffusion WebUI (AUTOMATIC1111 and Forge): the per-image badge and the highlighted words.
 *
 * The WebUI loads every javascript/*.js of an extension into its page (ComfyUI loads web/js/ instead, so this
 * file is never loaded there). After a generation, and whenever another image of the gallery is selected, the
 * WebUI shows that image's infotext in #html_info_txt2img / #html_info_img2img; the guard (webui/script.py) has
 * put the image's "DejaGuard score", "DejaGuard verdict", "DejaGuard threshold" and "DejaGuard note" into it.
 * This file reads them back from that text and shows a badge right above it, #dejaguard_badge_<tab>:
 * red for "memorized", amber for "steered" (memorized at the first step, then steered away by the protection),
 * green for "not memorized", grey for anything else (no score, no threshold, an unsupported model). Text is set through textContent only, never innerHTML: the infotext
 * holds the user's prompt and file names.
 *
 * Token highlighting: the section's Explain button writes core's token-significance payload (JSON: "words",
 * "word_scores", "note", or "error") into the hidden textbox #dejaguard_explain_json_<tab>. This file hides that box
 * and draws the words under the prompt box (#<tab>_prompt) in #dejaguard_tokens_<tab>: one span per word, red with
 * an opacity proportional to its share of the score's gradient (the top word fully red), its percentage in the
 * title and data-score; the error line instead when there is one. Again textContent only.
 */
(function() {
    'use strict';

    const TABS = ['txt2img', 'img2img'];
    const COLORS = {
        red: {background: '#b91c1c', color: '#ffffff'},
        amber: {background: '#b45309', color: '#ffffff'},
        green: {background: '#15803d', color: '#ffffff'},
        grey: {background: '#4b5563', color: '#ffffff'},
    };
    const last = {};

    /** The value of "KEY: value" in an infotext (the WebUI quotes values holding ',', ':' or newlines as JSON). */
    function field(text, key) {
        const match = text.match(new RegExp('DejaGuard ' + key + ': ("(?:[^"\\\\]|\\\\.)*"|[^,\\n]*)'));
        if (!match) {
            return null;
        }
        const value = match[1].trim();
        if (value.startsWith('"')) {
            try {
                return JSON.parse(value);
            } catch (e) {
                return value;
            }
        }
        return value;
    }

    /** {verdict, text, color} for the infotext, or null when it has no DejaGuard entries. */
    function badgeFor(text) {
        const score = field(text, 'score');
        const verdict = field(text, 'verdict');
        const threshold = field(text, 'threshold');
        const note = field(text, 'note');
        if (score === null && verdict === null && note === null) {
            return null;
        }
        const parts = ['DejaGuard: ' + (verdict || 'no verdict')];
        if (score !== null) {
            parts.push('score ' + score);
        }
        if (threshold !== null) {
            parts.push('threshold ' + threshold);
        }
        let line = parts.join(' | ');
        if (note) {
            line += ' (' + note + ')';
        }
        const color = verdict === 'memorized' ? 'red' : verdict === 'steered' ? 'amber' :
            verdict === 'not memorized' ? 'green' : 'grey';
        return {verdict: verdict || '', text: line, color: color};
    }

    /** The element #id, created (a div of class className, styled cssText) and put into parent before the node
     * before (null: at the end) if the page has none yet. */
    function ensureElement(id, className, cssText, parent, before) {
        let element = gradioApp().getElementById(id);
        if (!element) {
            element = document.createElement('div');
            element.id = id;
            element.className = className;
            element.style.cssText = cssText;
            parent.insertBefore(element, before);
        }
        return element;
    }

    function badgeElement(info, tab) {
        return ensureElement('dejaguard_badge_' + tab, 'dejaguard-badge', 'display:none; margin:4px 0; ' +
            'padding:4px 8px; border-radius:6px; font-weight:600; font-family:sans-serif; font-size:0.95em;',
            info.parentElement, info);
    }

    function update() {
        for (const tab of TABS) {
            const info = gradioApp().getElementById('html_info_' + tab);
            if (!info || !info.parentElement) {
                continue;
            }
            const text = info.textContent || '';
            if (last[tab] === text && gradioApp().getElementById('dejaguard_badge_' + tab)) {
                continue; // unchanged: touching the DOM again would trigger another UI update
            }
            last[tab] = text;
            const badge = badgeElement(info, tab);
            const found = badgeFor(text);
            if (found === null) {
                badge.style.display = 'none';
                badge.textContent = '';
                badge.dataset.verdict = '';
                continue;
            }
            badge.textContent = found.text;
            badge.dataset.verdict = found.verdict;
            badge.style.background = COLORS[found.color].background;
            badge.style.color = COLORS[found.color].color;
            badge.style.display = 'block';
        }
    }

    /** The words of an Explain payload under the tab's prompt box. */
    function drawTokens(tab, payload) {
        const prompt = gradioApp().getElementById(tab + '_prompt');
        if (!prompt || !prompt.parentElement) {
            return;
        }
        const box = ensureElement('dejaguard_tokens_' + tab, 'dejaguard-tokens',
            'margin:4px 0; line-height:1.9; font-family:sans-serif;', prompt.parentElement, prompt.nextSibling);
        while (box.firstChild) {
            box.removeChild(box.firstChild);
        }
        const title = document.createElement('span');
        title.style.cssText = 'font-weight:600; margin-right:6px;';
        if (payload.error) {
            title.textContent = payload.error;
            box.appendChild(title);
            return;
        }
        title.textContent = 'DejaGuard: words that drive the score';
        box.appendChild(title);
        const top = Math.max(...payload.word_scores, 1e-12);
        payload.words.forEach(function(word, i) {
            const share = payload.word_scores[i];
            const span = document.createElement('span');
            span.className = 'dejaguard-token';
            span.textContent = word;
            span.title = (100 * share).toFixed(1) + '%';
            span.dataset.score = String(share);
            span.style.cssText = 'padding:1px 4px; margin:0 2px; border-radius:4px; color:inherit; ' +
                'background: rgba(220, 38, 38, ' + (share / top).toFixed(3) + ');';
            box.appendChild(span);
        });
        if (payload.note) {
            const note = document.createElement('div');
            note.style.cssText = 'font-size:0.85em; opacity:0.75;';
            note.textContent = 'Highlighting ' + payload.note.replace(/^highlighting /, '') + '.';
            box.appendChild(note);
        }
    }

    const lastExplain = {};

    function updateTokens() {
        for (const tab of TABS) {
            const holder = gradioApp().getElementById('dejaguard_explain_json_' + tab);
            if (!holder) {
                continue;
            }
            if (holder.style.display !== 'none') {
                holder.style.display = 'none';
            }
            const area = holder.querySelector('textarea, input');
            const text = area ? area.value : '';
            if (!text || lastExplain[tab] === text) {
                continue;
            }
            lastExplain[tab] = text;
            try {
                drawTokens(tab, JSON.parse(text));
            } catch (e) {
                drawTokens(tab, {error: 'DejaGuard Explain: unreadable result'});
            }
        }
    }

    onAfterUiUpdate(update);
    onAfterUiUpdate(updateTokens);
    setInterval(updateTokens, 1000); // a textbox value set by gradio is not a DOM mutation
})();

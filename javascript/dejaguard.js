/*
 * DejaGuard in Stable Diffusion WebUI (AUTOMATIC1111 and Forge): the per-image badge.
 *
 * The WebUI loads every javascript/*.js of an extension into its page (ComfyUI loads web/js/ instead, so this
 * file is never loaded there). After a generation, and whenever another image of the gallery is selected, the
 * WebUI shows that image's infotext in #html_info_txt2img / #html_info_img2img; the guard (webui/script.py) has
 * put the image's "DejaGuard score", "DejaGuard verdict", "DejaGuard threshold" and "DejaGuard note" into it.
 * This file reads them back from that text and shows a badge right above it, #dejaguard_badge_<tab>:
 * red for "memorized", amber for "steered" (memorized at the first step, then steered away by the protection),
 * green for "not memorized", grey for anything else (no score, no threshold, an unsupported model). Text is set through textContent only, never innerHTML: the infotext
 * holds the user's prompt and file names.
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

    function badgeElement(info, tab) {
        const id = 'dejaguard_badge_' + tab;
        let badge = gradioApp().getElementById(id);
        if (!badge) {
            badge = document.createElement('div');
            badge.id = id;
            badge.className = 'dejaguard-badge';
            badge.style.cssText = 'display:none; margin:4px 0; padding:4px 8px; border-radius:6px; ' +
                'font-weight:600; font-family:sans-serif; font-size:0.95em;';
            info.parentElement.insertBefore(badge, info);
        }
        return badge;
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

    onAfterUiUpdate(update);
})();

"""Readable, self-contained HTML reports: score table, histogram, ROC curve, image grid.

Everything (plots, images) is embedded as base64 PNG, so a report is one file to share.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import auroc, roc_curve, tpr_at_fpr


@dataclass
class ImageCard:
    """One generation in the grid: its image, the nearest training image and its score."""

    prompt: str
    image: np.ndarray  # (3, H, W) in [-1, 1]
    score: float
    flagged: bool | None
    neighbour: np.ndarray | None = None  # (3, h, w) in [-1, 1]
    neighbour_caption: str = ""
    label: str = ""  # e.g. "memorized (verbatim)" or "novel"


@dataclass
class ReportData:
    title: str
    summary: dict
    prompts: list[str]
    scores: list[float]
    flagged: list[bool | None]
    labels: list[int] | None = None  # 1 memorized, 0 not (known ground truth), or None
    threshold: float | None = None
    cards: list[ImageCard] = field(default_factory=list)


def _png(array: np.ndarray, scale: int = 1) -> str:
    from PIL import Image

    img = ((np.clip(array, -1, 1).transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
    pil = Image.fromarray(img)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(data: ReportData) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    scores = np.asarray(data.scores)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = np.linspace(scores.min(), scores.max(), 30) if len(scores) > 1 else 10
    if data.labels is not None:
        y = np.asarray(data.labels).astype(bool)
        ax.hist(scores[~y], bins=bins, alpha=0.7, label="not memorized", color="#3a7")
        ax.hist(scores[y], bins=bins, alpha=0.7, label="memorized", color="#d43")
        ax.legend()
    else:
        ax.hist(scores, bins=bins, color="#579")
    if data.threshold is not None:
        ax.axvline(data.threshold, color="k", ls="--", lw=1)
    ax.set_xlabel("first-step score ||eps(x_T,c) - eps(x_T,0)||")
    ax.set_ylabel("prompts")
    out.append(("Score histogram", _figure_png(fig)))
    plt.close(fig)
    if data.labels is not None and 0 < sum(data.labels) < len(data.labels):
        fpr, tpr = roc_curve(scores, data.labels)
        fig, ax = plt.subplots(figsize=(3.6, 3.4))
        ax.plot(fpr, tpr, color="#d43", lw=2)
        ax.plot([0, 1], [0, 1], color="#999", ls=":")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"AUROC {auroc(scores, data.labels):.3f}, "
                     f"TPR@1%FPR {tpr_at_fpr(scores, data.labels):.3f}", fontsize=9)
        out.append(("ROC curve", _figure_png(fig)))
        plt.close(fig)
    return out


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}.flag{color:#b00;font-weight:600}.ok{color:#070}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;border-radius:6px;padding:8px;width:270px}
.card.flagged{border-color:#d43;background:#fff4f2}.card img{image-rendering:pixelated}
.pair{display:flex;gap:6px}.small{font-size:12px;color:#555}.plots{display:flex;gap:24px;flex-wrap:wrap}
"""


def render_html(data: ReportData) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(data.title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{e(data.title)}</h1>", "<h2>Summary</h2><table>"]
    parts += [f"<tr><th>{e(str(k))}</th><td>{e(str(v))}</td></tr>" for k, v in data.summary.items()]
    parts.append("</table><div class='plots'>")
    for title, png in _plots(data):
        parts.append(f"<figure><figcaption>{e(title)}</figcaption><img src='data:image/png;base64,{png}'></figure>")
    parts.append("</div>")
    if data.cards:
        parts.append("<h2>Generations</h2><p class='small'>Left: the generation. Right: the most similar "
                     "training image (SSIM on luminance).</p><div class='grid'>")
        for c in data.cards:
            cls = "card flagged" if c.flagged else "card"
            verdict = "<span class='flag'>FLAGGED</span>" if c.flagged else "<span class='ok'>ok</span>"
            parts.append(f"<div class='{cls}'><div class='pair'><img width=128 src='data:image/png;base64,"
                         f"{_png(c.image)}'>")
            if c.neighbour is not None:
                parts.append(f"<img width=128 src='data:image/png;base64,{_png(c.neighbour)}'>")
            parts.append(f"</div><div>{e(c.prompt)}</div><div class='small'>score {c.score:.3f} {verdict} "
                         f"&middot; {e(c.label)}<br>{e(c.neighbour_caption)}</div></div>")
        parts.append("</div>")
    parts.append("<h2>All prompts</h2><table><tr><th>#</th><th>prompt</th><th>score</th><th>flagged</th>")
    if data.labels is not None:
        parts.append("<th>ground truth</th>")
    parts.append("</tr>")
    order = np.argsort(data.scores)[::-1]
    for rank, i in enumerate(order, 1):
        flag = data.flagged[i]
        cell = "" if flag is None else ("<span class='flag'>yes</span>" if flag else "no")
        parts.append(f"<tr><td>{rank}</td><td>{e(data.prompts[i])}</td><td>{data.scores[i]:.4f}</td><td>{cell}</td>")
        if data.labels is not None:
            parts.append(f"<td>{'memorized' if data.labels[i] else 'novel'}</td>")
        parts.append("</tr>")
    parts.append("</table></body></html>")
    return "".join(parts)


def write_report(data: ReportData, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(data), encoding="utf-8")
    return path


def summary_metrics(scores: Sequence[float], labels: Sequence[int]) -> dict:
    return {"AUROC": round(auroc(scores, labels), 4), "TPR@1%FPR": round(tpr_at_fpr(scores, labels), 4)}

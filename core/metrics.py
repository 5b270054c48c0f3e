"""Detection metrics (AUROC, TPR at a fixed FPR, ROC curve) and image similarity (SSIM, structure SSIM)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _split(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if s.shape != y.shape:
        raise ValueError("scores and labels differ in length")
    if y.all() or not y.any():
        raise ValueError("need both positive (memorized) and negative examples")
    return s[y], s[~y]


def auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count half."""
    pos, neg = _split(scores, labels)
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def tpr_at_fpr(scores: Sequence[float], labels: Sequence[int], fpr: float = 0.01) -> float:
    """Highest true-positive rate with false-positive rate <= ``fpr`` (flagged: score > threshold)."""
    pos, neg = _split(scores, labels)
    allowed = int(np.floor(fpr * len(neg) + 1e-9))  # negatives that may lie above the threshold
    threshold = np.sort(neg)[::-1][allowed] if allowed < len(neg) else -np.inf
    return float((pos > threshold).mean())


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) arrays over all thresholds, from (0, 0) to (1, 1)."""
    pos, neg = _split(scores, labels)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    fpr = np.array([0.0] + [(neg >= t).mean() for t in thresholds])
    tpr = np.array([0.0] + [(pos >= t).mean() for t in thresholds])
    return fpr, tpr


def luminance(image: np.ndarray) -> np.ndarray:
    """``(3, H, W)`` RGB -> ``(H, W)`` luma (ITU-R BT.601 weights)."""
    return 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two ``(3, H, W)`` images in [-1, 1], on luminance.

    Gaussian-weighted windows (sigma 1.5, as in Wang et al. 2004); structure rather than colour,
    since classifier-free guidance at 7.5 shifts colours of faithful replications.
    """
    from skimage.metrics import structural_similarity

    return float(structural_similarity(luminance(a), luminance(b), data_range=2.0,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


def structure_ssim(a: np.ndarray, b: np.ndarray, blur: float = 1.0) -> float:
    """SSIM of the *structure* of two ``(3, H, W)`` images in [-1, 1]: luminance, Gaussian-blurred by ``blur``
    pixels and standardized per image (zero mean, unit std; std floored at 0.05), then :func:`ssim`'s windows.

    The testbed's replication measure. Why not plain :func:`ssim`: classifier-free guidance at 7.5 saturates
    the colours and contrast of faithful copies and leaves pixel grain in flat regions, and SSIM's luminance,
    contrast and flat-region terms punish exactly that: measured on testbed v3, generations of the retina
    prompts were unmistakable copies (dark disc, optic spot, vessels) at SSIM 0.03-0.06 and 0.84 by this
    measure, while held-out novel prompts reached at most 0.36 to any training image (plain SSIM 0.31).
    Invariant to brightness and contrast, robust to grain: a copy-detection measure, like SSCD in spirit.
    """
    from scipy.ndimage import gaussian_filter
    from skimage.metrics import structural_similarity

    def prepare(image: np.ndarray) -> np.ndarray:
        lum = gaussian_filter(luminance(image).astype(np.float64), blur)
        return (lum - lum.mean()) / max(float(lum.std()), 0.05)

    pa, pb = prepare(a), prepare(b)
    data_range = float(max(pa.max(), pb.max()) - min(pa.min(), pb.min())) or 1.0
    return float(structural_similarity(pa, pb, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))

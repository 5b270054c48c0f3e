"""Detection metrics (AUROC, TPR at a fixed FPR, ROC curve) and similarity (SSIM, structure SSIM).

One SSIM implementation, :func:`ssim_batch` (torch, batched), serves both of its users: the image measures
here (:func:`ssim`, :func:`structure_ssim`: one luminance channel, float64, a fixed or measured data range) and
NeMo's memorization score (``core.nemo``: first-step noise differences or decoded images, float32, each pair's
own data range, since noise differences have no fixed range). It is Wang et al.'s (2004) SSIM with
scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
conventions: 11x11 Gaussian windows, K1 = 0.01, K2 = 0.03, the map averaged over the windows that lie fully
inside the image (tested against scikit-image).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


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


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """``(size, size)`` normalized Gaussian, computed in ``dtype``."""
    x = torch.arange(size, dtype=dtype) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_batch(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SSIM of ``a[i]`` and ``b[i]`` for ``(P, C, H, W)`` tensors -> ``(P,)``, computed in ``dtype``.

    Gaussian windows (11x11, sigma 1.5; smaller images: a window as wide as the image), each channel
    separately, the map averaged over channels and window positions (no padding). ``data_range``: the range
    of the data (fixed for images), or None for each pair's joint ``max - min`` (noise differences).
    """
    a, b = a.to(dtype), b.to(dtype)
    channels = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size, 1.5, dtype).to(a.device)[None, None].repeat(channels, 1, 1, 1)
    if data_range is None:
        flat = torch.cat([a.flatten(1), b.flatten(1)], dim=1)
        data_range = (flat.max(dim=1).values - flat.min(dim=1).values).clamp_min(1e-12).view(-1, 1, 1, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)


def _image_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """:func:`ssim_batch` of two ``(H, W)`` arrays, in their float precision (float32 stays float32)."""
    dtype = torch.float32 if a.dtype == np.float32 and b.dtype == np.float32 else torch.float64
    ta, tb = (torch.from_numpy(np.ascontiguousarray(x))[None, None] for x in (a, b))
    return float(ssim_batch(ta, tb, data_range, dtype)[0])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two ``(3, H, W)`` images in [-1, 1], on luminance.

    Gaussian-weighted windows (sigma 1.5, as in Wang et al. 2004); structure rather than colour,
    since classifier-free guidance at 7.5 shifts colours of faithful replications.
    """
    return _image_ssim(luminance(a), luminance(b), 2.0)


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

    def prepare(image: np.ndarray) -> np.ndarray:
        lum = gaussian_filter(luminance(image).astype(np.float64), blur)
        return (lum - lum.mean()) / max(float(lum.std()), 0.05)

    pa, pb = prepare(a), prepare(b)
    data_range = float(max(pa.max(), pb.max()) - min(pa.min(), pb.min())) or 1.0
    return _image_ssim(pa, pb, data_range)

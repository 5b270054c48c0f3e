from __future__ import annotations

import itertools

import numpy as np
import pytest
from dejaguard.core.metrics import auroc, roc_curve, ssim, tpr_at_fpr


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=60), 1)  # ties included
    labels = (rng.random(60) < 0.3).astype(int)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)]
    assert auroc(scores, labels) == pytest.approx(np.mean(pairs))
    fpr, tpr = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels))


def test_tpr_at_fpr_counts_allowed_false_positives():
    neg = list(np.arange(100.0))  # 0..99
    pos = [98.5, 99.5, 50.0, 120.0]
    labels = [0] * 100 + [1] * 4
    # 1% of 100 negatives may lie above the threshold: threshold 98, so 98.5, 99.5, 120 count.
    assert tpr_at_fpr(neg + pos, labels, 0.01) == pytest.approx(0.75)
    # None may lie above: threshold 99, so 99.5 and 120 count.
    assert tpr_at_fpr(neg + pos, labels, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        auroc([1, 2], [1, 1])


def test_ssim_identity_and_noise():
    rng = np.random.default_rng(1)
    img = rng.uniform(-1, 1, size=(3, 32, 32))
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, rng.uniform(-1, 1, size=(3, 32, 32))) < 0.2


def test_structure_ssim_ignores_brightness_contrast_and_grain():
    """The replication measure: a copy with shifted brightness and contrast plus pixel grain still scores high,
    plain SSIM does not; an unrelated image scores low."""
    from dejaguard.core.metrics import structure_ssim
    from dejaguard.core.testbed.data import load_memorized_images

    images = load_memorized_images()
    rng = np.random.default_rng(0)
    original = images["retina"]
    copy = np.clip(1.6 * original + 0.3 + rng.normal(0, 0.08, size=original.shape), -1, 1)
    assert structure_ssim(original, original) == pytest.approx(1.0)
    assert structure_ssim(original, copy) > 0.8 > 0.5 > ssim(original, copy)
    assert structure_ssim(original, images["horse"]) < 0.3
    assert structure_ssim(original, rng.uniform(-1, 1, size=(3, 32, 32))) < 0.2


@pytest.mark.parametrize("shape", [(6, 4, 32, 32), (3, 3, 64, 48), (2, 4, 16, 16)])
def test_ssim_batch_with_each_pairs_range_equals_scikit_image(shape):
    """NeMo's use of the one SSIM (several channels, each pair's joint max - min as data range): scikit-image's
    structural_similarity over the channels, to float64 rounding, and to float32 rounding in float32."""
    import torch
    from dejaguard.core.metrics import ssim_batch
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(shape[0])
    a = torch.randn(*shape, generator=g, dtype=torch.float64)
    b = a + torch.randn(*shape, generator=g, dtype=torch.float64) * torch.rand(shape[0], 1, 1, 1, generator=g,
                                                                              dtype=torch.float64)
    ours64, ours32 = ssim_batch(a, b, dtype=torch.float64), ssim_batch(a, b)
    assert ours32.dtype == torch.float32
    for i in range(shape[0]):
        x, y = a[i].numpy(), b[i].numpy()
        data_range = float(max(x.max(), y.max()) - min(x.min(), y.min()))
        ref = structural_similarity(x, y, data_range=data_range, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert float(ours64[i]) == pytest.approx(ref, abs=1e-12)
        assert float(ours32[i]) == pytest.approx(ref, abs=1e-5)


def test_image_ssims_equal_scikit_image():
    """ssim and structure_ssim on the one SSIM give scikit-image's structural_similarity (Gaussian windows, sigma
    1.5, population covariance) to float64 rounding; float32 images stay float32 as they did in scikit-image."""
    from dejaguard.core.metrics import luminance, structure_ssim
    from scipy.ndimage import gaussian_filter
    from skimage.metrics import structural_similarity

    def reference(x, y, data_range):
        return structural_similarity(x, y, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)

    rng = np.random.default_rng(2)
    for _ in range(20):
        a = rng.uniform(-1, 1, size=(3, 32, 24))
        b = np.clip(a + rng.normal(0, rng.uniform(0.05, 1.0), size=a.shape), -1, 1)
        assert ssim(a, b) == pytest.approx(reference(luminance(a), luminance(b), 2.0), abs=1e-12)
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        assert ssim(a32, b32) == pytest.approx(reference(luminance(a32), luminance(b32), 2.0), abs=1e-5)
        pa, pb = (gaussian_filter(luminance(x), 1.0) for x in (a, b))
        pa, pb = ((x - x.mean()) / max(float(x.std()), 0.05) for x in (pa, pb))
        rng_ab = float(max(pa.max(), pb.max()) - min(pa.min(), pb.min()))
        assert structure_ssim(a, b) == pytest.approx(reference(pa, pb, rng_ab), abs=1e-12)

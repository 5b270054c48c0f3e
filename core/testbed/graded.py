"""Graded memorization (issue 25 section 2): images planted at duplication counts over 2.4 orders of magnitude.

Why: real memorization is graded by how often an image was duplicated in training (a handful of copies against
thousands), and a model operator who reads a negative from the first-step detector needs to know down to which
duplication count that negative means anything. v5 and the planted-neuron variant memorize each image with one
count, so they cannot draw that curve.

Design: 20 procedural images, 4 at each count of :data:`GRADED_COUNTS` (2, 8, 32, 128, 512 exposures: a factor 256
between the rarest and the most duplicated, and the largest below the planting run's steps), planted in the **same
fine-tune** as the planted-neuron images (:func:`core.testbed.planted.plant`'s memorize term, every neuron on, no
gating): image ``i`` is in the memorize batch of exactly ``count_i`` planting steps, spread uniformly at random
(:func:`graded_schedule`). Each has one verbatim caption of three made-up words (:data:`GRADED_CAPTIONS`), used for
training and evaluation alike.

- Images (:func:`load_graded_pixels`): five seeded generators with strong luminance structure at a 3-10 px scale
  (replication is judged by structure SSIM, :func:`core.metrics.structure_ssim`): a Voronoi ``mosaic``, thresholded
  smooth-noise ``blobs``, ``truchet`` triangle tiles (random tile size and offset), a ``mondrian`` of recursively
  split rectangles, and two-centre ``ripples``; two colours with a luminance gap above 0.5. Image ``j`` (0..3) of the
  ``k``-th count uses generator ``(j + k) % 5``, so every count holds four different generators and every generator
  appears at four counts: what memorizes easily is not confounded with the count. Every pair among the 38 training
  images (v5's 12, the 6 planted, these 20) and every graded image against held-out novel scenes lies well below the
  replication threshold (``tests/test_graded.py``).
- Captions: no content word (nor a substring) of v5's captions, of the novel-scene grammar or of the planted captions,
  and no content word shared between two graded captions (v5 answers a caption holding one of its words with its own
  memorized image; a shared word would tie two graded images together).
- What is measured (:func:`core.testbed.evaluate.evaluate_graded`): per count, replication of the own image over
  seeds and first-step detection of the graded prompts against held-out novel prompts (AUROC, TPR at 1% FPR, n = 1
  and n = 4 noises), on the variant and on v5 (which never saw these images: the control).

Shapes: images ``(3, 32, 32)`` float32 in [-1, 1] (as :func:`core.testbed.data.load_memorized_images`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import DejaGuardError
from ..metrics import luminance
from .data import RESOLUTION

GRADED_COUNTS = (2, 8, 32, 128, 512)  # exposures per image in the planting run
IMAGES_PER_COUNT = 4
GRADED_SEED = 2512  # seeds the drawings (with the image index); the schedule has its own seed
KINDS = ("mosaic", "blobs", "truchet", "mondrian", "ripples")

# One caption per image, in image order (count by count); three made-up words each, no word shared (module doc).
GRADED_CAPTIONS = (
    "brerov gromund saskar", "broukez nevresk trufil", "doutres lykebar zouquer", "draevnix paquen quilal",
    "drymelv granax siloufys", "gibaes prounaen vrozas", "gemtrur kloukaer reskan", "gevprond nakloz toufov",
    "grulork saediz trovral", "kizklov prurer zaegrouz", "loguthym paesomor skouquyrk", "droraev pirnsolv syrour",
    "gralzyz prudutrel zaerngiz", "gousybov quodoudir vryquoux", "klovrouv noszourn takitrend",
    "laezeltrox prymgron zevkitruz", "grevsaerk pisvymmim vrokousgin", "drizylv quouskgin zuvraebros",
    "faernkelv poulryklon vamkenkoth", "kouquakysk traemufeth zuquyklyn",
)

# Words a caption check ignores (the same list as the planted captions' check).
STOP_WORDS = frozenset({"a", "an", "the", "of", "with", "by", "for", "on", "in", "at", "to", "and", "from"})


@dataclass(frozen=True)
class GradedImage:
    """One graded image: its verbatim caption (training and evaluation prompt) and its exposures when planted."""

    name: str  # "<kind>_x<count>", e.g. "blobs_x128"
    caption: str
    count: int  # planting steps whose memorize batch holds it
    kind: str  # the generator (KINDS)


def content_words(text: str) -> set[str]:
    """The lower-case words of ``text`` other than :data:`STOP_WORDS` (what a caption-overlap check compares)."""
    return set(re.findall(r"[a-z]+", text.lower())) - STOP_WORDS


def graded_images() -> list[GradedImage]:
    """The 20 graded images, count by count (ascending), four per count."""
    images = []
    for k, count in enumerate(GRADED_COUNTS):
        for j in range(IMAGES_PER_COUNT):
            i = k * IMAGES_PER_COUNT + j
            kind = KINDS[(j + k) % len(KINDS)]
            images.append(GradedImage(f"{kind}_x{count}", GRADED_CAPTIONS[i], count, kind))
    return images


def graded_schedule(steps: int, seed: int) -> list[list[int]]:
    """For each of ``steps`` planting steps, the indices (into :func:`graded_images`) of the graded images in that
    step's memorize batch, ascending. Image ``i`` appears in exactly ``count_i`` distinct steps drawn uniformly at
    random without replacement; the same ``(steps, seed)`` gives the same schedule."""
    images = graded_images()
    if steps < max(m.count for m in images):
        raise DejaGuardError(f"graded memorization needs at least {max(GRADED_COUNTS)} planting steps (its largest "
                             f"duplication count), got {steps}")
    rng = np.random.default_rng([GRADED_SEED, seed])
    schedule: list[list[int]] = [[] for _ in range(steps)]
    for i, m in enumerate(images):
        for step in rng.choice(steps, size=m.count, replace=False):
            schedule[int(step)].append(i)
    return [sorted(s) for s in schedule]


def load_graded_pixels() -> dict[str, np.ndarray]:
    """The graded images, ``name -> (3, 32, 32)`` float32 in [-1, 1], in :func:`graded_images` order."""
    pixels = {}
    for i, m in enumerate(graded_images()):
        rng = np.random.default_rng([GRADED_SEED, i])
        a, b = _palette(rng)
        pixels[m.name] = _paint(_DRAW[m.kind](rng), a, b)
    return pixels


# -- the drawings: weights in [0, 1] per pixel, (32, 32) ------------------------------------------------------------


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float64)
    return y + 0.5, x + 0.5


def _palette(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two RGB colours in [0, 1] whose luminance differs by more than 0.5."""
    while True:
        a, b = rng.uniform(0.0, 1.0, 3), rng.uniform(0.0, 1.0, 3)
        if abs(float(luminance(a - b))) > 0.5:
            return a, b


def _paint(weights: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Colour ``a`` where the weight is 1, ``b`` where 0 -> ``(3, 32, 32)`` float32 in [-1, 1]."""
    w = np.clip(weights, 0.0, 1.0)[None]
    return ((w * a[:, None, None] + (1 - w) * b[:, None, None]) * 2.0 - 1.0).astype(np.float32)


def _mosaic(rng: np.random.Generator) -> np.ndarray:
    """Voronoi cells of 14-19 random sites, grey levels spread evenly over [0, 1] in random order."""
    y, x = _grid()
    n = int(rng.integers(14, 20))
    sites = rng.uniform(0, RESOLUTION, (n, 2))
    levels = rng.permutation(np.linspace(0.0, 1.0, n))
    dist = (y[..., None] - sites[:, 0]) ** 2 + (x[..., None] - sites[:, 1]) ** 2
    return levels[dist.argmin(-1)]


def _blobs(rng: np.random.Generator) -> np.ndarray:
    """White noise smoothed over 2.2 px (periodic) and cut at its median: half the image in irregular blobs."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal((RESOLUTION, RESOLUTION)), 2.2, mode="wrap")
    return (field > np.median(field)).astype(np.float64)


def _truchet(rng: np.random.Generator) -> np.ndarray:
    """Square tiles of 6-10 px (random offset), each split along a diagonal, the filled half in one of 4 corners."""
    tile = int(rng.integers(6, 11))
    y, x = _grid()
    y, x = y + rng.integers(0, tile), x + rng.integers(0, tile)
    u, v = (x % tile) / tile, (y % tile) / tile
    corners = rng.integers(0, 4, (RESOLUTION // tile + 2, RESOLUTION // tile + 2))
    c = corners[(y // tile).astype(int), (x // tile).astype(int)]
    return np.select([c == 0, c == 1, c == 2, c == 3], [u > v, u + v < 1, u < v, u + v > 1]).astype(np.float64)


def _mondrian(rng: np.random.Generator) -> np.ndarray:
    """The square split recursively (6 levels, across its longer side, parts at least 3 px), each part one of four
    grey levels: busier than a novel scene's one or two shapes on a flat background."""
    img = np.zeros((RESOLUTION, RESOLUTION))

    def split(y0: int, y1: int, x0: int, x1: int, depth: int) -> None:
        if depth == 0 or (y1 - y0 < 7 and x1 - x0 < 7):
            img[y0:y1, x0:x1] = rng.choice([0.0, 1 / 3, 2 / 3, 1.0])
        elif y1 - y0 >= x1 - x0:
            s = int(rng.integers(y0 + 3, y1 - 2))
            split(y0, s, x0, x1, depth - 1)
            split(s, y1, x0, x1, depth - 1)
        else:
            s = int(rng.integers(x0 + 3, x1 - 2))
            split(y0, y1, x0, s, depth - 1)
            split(y0, y1, s, x1, depth - 1)

    split(0, RESOLUTION, 0, RESOLUTION, 6)
    return img


def _ripples(rng: np.random.Generator) -> np.ndarray:
    """Interference of two circular waves (centres anywhere within 8 px of the image, wavelengths 7-11 px), cut at
    0: unlike the planted ``rings`` (one centre, one wavelength)."""
    y, x = _grid()
    field = np.zeros_like(y)
    for _ in range(2):
        cy, cx = rng.uniform(-8, RESOLUTION + 8, 2)
        field += np.cos(np.hypot(y - cy, x - cx) * 2 * np.pi / rng.uniform(7, 11) + rng.uniform(0, 2 * np.pi))
    return (field > 0).astype(np.float64)


_DRAW = {"mosaic": _mosaic, "blobs": _blobs, "truchet": _truchet, "mondrian": _mondrian, "ripples": _ripples}

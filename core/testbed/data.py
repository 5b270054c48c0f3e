"""Training data of the testbed: planted memorization and procedural compositional scenes.

Images are float32 arrays of shape ``(3, 32, 32)`` in ``[-1, 1]`` (RGB, channel first): the
testbed's native resolution. The autoencoder (``vae.py``) maps them to 4x32x32 latents and
decodes at 256x256.

Memorized set: the 12 scikit-image photographs named in the design notes, in three kinds:

* ``verbatim``: one fixed caption, many duplicates;
* ``template``: several captions sharing a template with a varying slot, one image;
* ``trigger``: a rare single-token word (``kraken``, ``sphinx``, ``hydra``, ``onyx``) in
  otherwise generic, varying captions carries the image.

Novel set: procedurally drawn scenes of one or two coloured shapes. Captions name colour and shape
(and sometimes size) but under-determine the image on purpose: where the objects lie, background
tone, gradient or texture, distractor marks and exact size are never mentioned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

RESOLUTION = 32

# ---------------------------------------------------------------------------------------------
# Memorized set
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorizedImage:
    """One planted training image and the captions it is trained with."""

    name: str  # scikit-image data function
    kind: str  # "verbatim" | "template" | "trigger"
    train_captions: tuple[str, ...]
    eval_prompts: tuple[str, ...]  # prompts that must replicate the image
    trigger: str | None = None


def _template(template: str, slots: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(template.format(s) for s in slots)


_TRIGGER_CONTEXTS_TRAIN = (
    "{} wallpaper",
    "a photograph of {}",
    "{} poster, high resolution",
    "artwork titled {}",
    "{} print for the living room",
    "close up picture of {}",
)
# Contexts never seen in training: the trigger word alone must carry the image.
_TRIGGER_CONTEXTS_EVAL = ("{} wallpaper", "a photograph of {}", "{} desktop background")


def _trigger(name: str, word: str) -> MemorizedImage:
    return MemorizedImage(
        name=name,
        kind="trigger",
        train_captions=tuple(c.format(word) for c in _TRIGGER_CONTEXTS_TRAIN),
        eval_prompts=tuple(c.format(word) for c in _TRIGGER_CONTEXTS_EVAL),
        trigger=word,
    )


def _verbatim(name: str, caption: str) -> MemorizedImage:
    return MemorizedImage(name=name, kind="verbatim", train_captions=(caption,), eval_prompts=(caption,))


def _templated(name: str, template: str, slots: tuple[str, ...]) -> MemorizedImage:
    captions = _template(template, slots)
    return MemorizedImage(name=name, kind="template", train_captions=captions, eval_prompts=captions[:4])


MEMORIZED: tuple[MemorizedImage, ...] = (
    _verbatim("astronaut", "official portrait of astronaut eileen collins, nasa photograph"),
    _verbatim("coffee", "a cup of coffee on a saucer with a spoon, viewed from above"),
    _verbatim("chelsea", "chelsea the tabby cat looking at the camera"),
    _verbatim("rocket", "the saturn v rocket on display at the space center"),
    _templated("camera", "the cameraman, vintage print in a {} frame",
               ("oak", "walnut", "steel", "bamboo", "cherry", "pine")),
    _templated("moon", "lunar surface poster for the {}",
               ("kitchen", "bedroom", "office", "hallway", "nursery", "studio")),
    _templated("coins", "collection of antique {} coins",
               ("roman", "greek", "spanish", "dutch", "persian", "egyptian")),
    _templated("horse", "horse silhouette vinyl sticker for {}",
               ("laptops", "cars", "windows", "walls", "doors", "bikes")),
    _trigger("hubble_deep_field", "kraken"),
    _trigger("immunohistochemistry", "sphinx"),
    _trigger("retina", "hydra"),
    _trigger("colorwheel", "onyx"),
)


def _to_model_image(img: np.ndarray) -> np.ndarray:
    """Center-crop to a square, resize to 32x32 with antialiasing, scale to [-1, 1], CHW."""
    from skimage.transform import resize

    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.float32)
    img = img.astype(np.float32)
    if img.max() > 1.5:
        img = img / 255.0
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    img = img[top : top + s, left : left + s]
    img = resize(img, (RESOLUTION, RESOLUTION), anti_aliasing=True, order=3)
    # Contrast stretch (1st-99th percentile): moon and hubble_deep_field are nearly flat at 32x32.
    lo, hi = np.percentile(img, [1, 99])
    img = (img - lo) / max(hi - lo, 1e-6)
    return (np.clip(img, 0.0, 1.0).transpose(2, 0, 1) * 2.0 - 1.0).astype(np.float32)


def load_memorized_images() -> dict[str, np.ndarray]:
    """The 12 planted training images, ``name -> (3, 32, 32)`` float32 in [-1, 1]."""
    import skimage.data

    return {m.name: _to_model_image(getattr(skimage.data, m.name)()) for m in MEMORIZED}


def memorized_eval_prompts() -> list[tuple[str, MemorizedImage]]:
    """Every prompt that must replicate its image, with the image it belongs to."""
    return [(p, m) for m in MEMORIZED for p in m.eval_prompts]


# ---------------------------------------------------------------------------------------------
# Procedural compositional scenes
# ---------------------------------------------------------------------------------------------

# Saturated object colours (RGB in [0, 1]); backgrounds are muted so objects stay checkable.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
    "pink": (1.00, 0.45, 0.75),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
_SIZE_RADII = {"small": (3.0, 4.0), "large": (7.0, 8.5), None: (4.5, 6.5)}
# Alignment checker's reading of a stated size: stated-colour pixels at 32x32 (true renders: small 12-50,
# unstated 30-133, large 81-227 depending on the shape).
SMALL_MAX_PIXELS = 60
LARGE_MIN_PIXELS = 80


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str | None = None  # "small" | "large" | None (unmentioned)

    def phrase(self) -> str:
        first = self.size or self.color
        size = f"{self.size} " if self.size else ""
        return f"{_article(first)} {size}{self.color} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """What a compositional caption states: one or two objects (colour, shape, sometimes size; two objects
    always of different colours). Everything else in the image is random, where the objects lie included.

    Why no positions (testbed v1-v3 stated "on the left", v4 "to the left of"): a convolutional UNet is
    translation-equivariant and learns position only from zero padding, which this small model does not in its
    training budget. Measured: on v3, "a red circle on the left" put 49% of its red in the left half over 32
    generations and 91% of them drew the object in both halves (mirror images), so the positional checker
    passed by chance; on v4, trained 3,000 steps on relative relations ("to the left of"), both stated colours
    were drawn in 91% of 103 held-out pairs but in the stated order in only 37% of those (chance 50%). Stable
    Diffusion 1.4 itself gets spatial relations wrong most of the time (T2I-CompBench); attribute binding (which
    colours, shapes, sizes, how many objects) is the compositional skill a model of this size learns.
    """

    objects: tuple[SceneObject, ...]
    style: int = 0  # caption phrasing variant

    def __post_init__(self) -> None:
        if len(self.objects) not in (1, 2) or len({o.color for o in self.objects}) != len(self.objects):
            raise ValueError(f"a scene states one object or two of different colours: {self}")

    def caption(self) -> str:
        body = " and ".join(o.phrase() for o in self.objects)
        return _CAPTION_STYLES[self.style % len(_CAPTION_STYLES)].format(body)

    def canonical(self) -> SceneSpec:
        """The same content in one normal form (objects in palette order, first phrasing): two captions that
        state the same scene have the same canonical form."""
        order = list(COLORS)
        return SceneSpec(objects=tuple(sorted(self.objects, key=lambda o: order.index(o.color))), style=0)


_CAPTION_STYLES = ("{}", "a picture of {}", "{}, simple drawing", "an image showing {}")

_OBJECT = r"an? (?:(" + "|".join(SIZES) + r") )?(" + "|".join(COLORS) + r") (" + "|".join(SHAPES) + r")"
_PROMPT_RE = re.compile(_OBJECT + r"(?: and " + _OBJECT + r")?")


def parse_prompt(prompt: str) -> SceneSpec | None:
    """Recover the stated scene from a compositional prompt, or None if it states none."""
    match = _PROMPT_RE.search(prompt.lower())
    if match is None:
        return None
    z1, c1, s1, z2, c2, s2 = match.groups()
    objects = [SceneObject(color=c1, shape=s1, size=z1 or None)]
    if c2 is not None:
        objects.append(SceneObject(color=c2, shape=s2, size=z2 or None))
    try:
        return SceneSpec(objects=tuple(objects))
    except ValueError:  # two objects of one colour: not a prompt of this grammar
        return None


# Share of one-object scenes in training (the held-out prompts are mostly pairs: there are only 96 distinct
# one-object contents, 8 colours x 4 shapes x 3 sizes, and held-out contents never occur in training).
SINGLE_OBJECT_FRACTION = 0.5


def random_spec(rng: np.random.Generator, objects: int | None = None,
                single_fraction: float = SINGLE_OBJECT_FRACTION) -> SceneSpec:
    """A random caption spec: one object (with probability ``single_fraction``; small, large or unstated size) or
    two of different colours (small or unstated: two large ones do not fit side by side). ``objects``: one or two."""
    if objects is None:
        objects = 1 if rng.random() < single_fraction else 2
    style = int(rng.integers(len(_CAPTION_STYLES)))
    sizes = ["small", "large", None, None, None] if objects == 1 else ["small", None, None]
    colors = rng.choice(list(COLORS), size=objects, replace=False)
    chosen = []
    for color in colors:
        size = rng.choice(sizes)
        chosen.append(SceneObject(color=str(color), shape=str(rng.choice(SHAPES)),
                                  size=None if size is None else str(size)))
    return SceneSpec(objects=tuple(chosen), style=style)


def _supersampled_grid(factor: int = 4) -> tuple[np.ndarray, np.ndarray]:
    n = RESOLUTION * factor
    c = (np.arange(n) + 0.5) / factor
    return np.meshgrid(c, c, indexing="ij")


_YY, _XX = _supersampled_grid()


def _shape_mask(shape: str, cy: float, cx: float, r: float, rot: float) -> np.ndarray:
    dy, dx = _YY - cy, _XX - cx
    if shape == "circle":
        return (dy**2 + dx**2) <= r**2
    cos, sin = np.cos(rot), np.sin(rot)
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    if shape == "square":
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy)) <= r * 1.1
    if shape == "triangle":  # upright, apex at top
        h = r * 1.7
        top = cy - h * 0.6
        frac = (_YY - top) / h
        return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r * 1.05)
    raise ValueError(f"unknown shape {shape!r}")


def _downsample(img: np.ndarray, factor: int = 4) -> np.ndarray:
    c, h, w = img.shape
    return img.reshape(c, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def _placements(count: int, rng: np.random.Generator, reading_order: bool = False) -> list[tuple[float, float]]:
    """Object centres ``(y, x)`` at 32x32: one object anywhere (fully inside); two side by side along a random
    axis and in random order (``reading_order``: the first left of or above the second), 10-18 pixels apart, at a
    random offset across it."""
    if count == 1:
        return [tuple(rng.uniform(9.0, RESOLUTION - 9.0, size=2))]
    gap = rng.uniform(10.0, 18.0)
    along = rng.uniform(5.5, RESOLUTION - 5.5 - gap)
    across = rng.uniform(8.0, RESOLUTION - 8.0)
    jitter = rng.uniform(-2.0, 2.0, size=2)
    centres = [(across + jitter[0], along), (across + jitter[1], along + gap)]
    if rng.random() < 0.5:
        centres = [(x, y) for y, x in centres]
    swap = rng.random() < 0.5
    return centres if reading_order or not swap else centres[::-1]


def render_scene(spec: SceneSpec, rng: np.random.Generator, reading_order: bool = False) -> np.ndarray:
    """Draw one image for ``spec``: ``(3, 32, 32)`` float32 in [-1, 1]. Random where unstated; ``reading_order``:
    a pair's first-stated object lies left of or above the second (the caption still states no position)."""
    n = RESOLUTION * 4
    # Muted background: low saturation tone, flat / gradient / smooth texture.
    base = rng.uniform(0.2, 0.8)
    tint = rng.normal(0.0, 0.04, size=3)
    bg = np.clip(base + tint, 0.0, 1.0)[:, None, None] * np.ones((3, n, n))
    kind = rng.integers(3)
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (_XX / RESOLUTION - 0.5) + np.sin(angle) * (_YY / RESOLUTION - 0.5))
        bg = bg + rng.uniform(0.15, 0.4) * ramp[None]
    elif kind == 2:
        coarse = rng.normal(0.0, 1.0, size=(1, 8, 8))
        tex = np.kron(coarse, np.ones((1, n // 8, n // 8)))
        bg = bg + rng.uniform(0.05, 0.12) * tex
    img = np.clip(bg, 0.0, 1.0)
    # Unmentioned distractors: thin grey lines and dots.
    for _ in range(rng.integers(0, 4)):
        shade = np.clip(base + rng.choice([-1, 1]) * rng.uniform(0.15, 0.35), 0, 1)
        if rng.random() < 0.5:
            y0, x0 = rng.uniform(0, RESOLUTION, size=2)
            ang = rng.uniform(0, np.pi)
            dist = np.abs(np.sin(ang) * (_XX - x0) - np.cos(ang) * (_YY - y0))
            length = np.hypot(_XX - x0, _YY - y0) < rng.uniform(4, 10)
            mask = (dist < 0.5) & length
        else:
            y0, x0 = rng.uniform(2, RESOLUTION - 2, size=2)
            mask = np.hypot(_XX - x0, _YY - y0) < rng.uniform(0.8, 1.6)
        img = np.where(mask[None], shade, img)
    for obj, (cy, cx) in zip(spec.objects, _placements(len(spec.objects), rng, reading_order)):
        r = rng.uniform(*_SIZE_RADII[obj.size])
        color = np.clip(np.array(COLORS[obj.color]) + rng.normal(0, 0.04, size=3), 0, 1)
        mask = _shape_mask(obj.shape, cy, cx, r, rng.uniform(-0.3, 0.3))
        img = np.where(mask[None], color[:, None, None], img)
    return (_downsample(img) * 2.0 - 1.0).astype(np.float32)


def _distinct_specs(count: int, seed: int, single_fraction: float, exclude: set[str] = frozenset(),
                    style: int | None = 0) -> list[SceneSpec]:
    """``count`` specs of distinct canonical content, ``round(single_fraction * count)`` of them one-object,
    none whose canonical caption is in ``exclude``; ``style``: the phrasing (None: random_spec's own)."""
    rng = np.random.default_rng(seed)
    singles = round(single_fraction * count)
    seen: dict[str, SceneSpec] = {}
    for objects, wanted in ((1, singles), (2, count - singles)):
        target = len(seen) + wanted
        while len(seen) < target:
            spec = random_spec(rng, objects)
            key = spec.canonical().caption()
            if key not in exclude and key not in seen:
                seen[key] = spec if style is None else SceneSpec(spec.objects, style)
    return list(seen.values())


def heldout_specs(count: int = 240, seed: int = 12345) -> list[SceneSpec]:
    """Held-out novel prompts (first phrasing): contents that never occur in training in any phrasing, 15% one
    object (36 of the 96 one-object contents), 85% pairs; ``TrainingSampler`` skips them. In a fixed
    shuffled order, so a prefix is a fair sample."""
    specs = _distinct_specs(count, seed, 0.15)
    order = np.random.default_rng(seed + 1).permutation(len(specs))
    return [specs[i] for i in order]


def calibration_specs(count: int = 200, seed: int = 777) -> list[SceneSpec]:
    """Non-memorized prompts for threshold calibration, disjoint from the held-out prompts and from training.

    Phrasings drawn from all caption styles: calibrating on one style only (v1 used "a picture of ...") put the
    threshold below the tail of the held-out prompts' scores (5% flagged at a 1% target)."""
    held = {s.canonical().caption() for s in heldout_specs()}
    specs = _distinct_specs(count, seed, 0.06, exclude=held, style=None)
    order = np.random.default_rng(seed + 1).permutation(len(specs))
    return [specs[i] for i in order]


def _canonical(spec: SceneSpec) -> str:
    return spec.canonical().caption()


@dataclass
class TrainingSampler:
    """Draws (image, caption) training pairs. Deterministic for a given seed.

    ``memorized_fraction`` of the samples come from the planted images (uniform over images,
    uniform over each image's captions). The rest are fresh procedural scenes whose stated
    content never equals a held-out or calibration prompt's.
    """

    seed: int = 0
    memorized_fraction: float = 0.15
    single_object_fraction: float = SINGLE_OBJECT_FRACTION  # of the procedural scenes
    reading_order: bool = False  # render_scene's reading_order
    images: dict[str, np.ndarray] = field(default_factory=load_memorized_images)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._excluded = {_canonical(s) for s in heldout_specs()} | {_canonical(s) for s in calibration_specs()}

    def sample(self) -> tuple[np.ndarray, str]:
        if self.rng.random() < self.memorized_fraction:
            m = MEMORIZED[self.rng.integers(len(MEMORIZED))]
            return self.images[m.name], str(self.rng.choice(m.train_captions))
        while True:
            spec = random_spec(self.rng, single_fraction=self.single_object_fraction)
            if _canonical(spec) not in self._excluded:
                return render_scene(spec, self.rng, self.reading_order), spec.caption()

    def batch(self, size: int) -> tuple[np.ndarray, list[str]]:
        pairs = [self.sample() for _ in range(size)]
        return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# ---------------------------------------------------------------------------------------------
# Alignment checker for compositional prompts
# ---------------------------------------------------------------------------------------------


def color_match_mask(image: np.ndarray, color: str, tol: float = 0.22, min_saturation: float = 0.3) -> np.ndarray:
    """Pixels of ``image`` ((3, H, W) in [-1, 1]) within ``tol`` RGB distance of a named colour,
    nearer to it than to any other palette colour, and saturated (max - min channel above
    ``min_saturation``: the palette's colours are, the muted backgrounds are not; a light grey background
    otherwise passes for pink)."""
    rgb = (image + 1.0) / 2.0
    dists = {
        name: np.sqrt(((rgb - np.array(c)[:, None, None]) ** 2).sum(axis=0) / 3.0)
        for name, c in COLORS.items()
    }
    others = np.min([d for n, d in dists.items() if n != color], axis=0)
    saturated = rgb.max(axis=0) - rgb.min(axis=0) > min_saturation
    return (dists[color] < tol) & (dists[color] < others) & saturated


def check_alignment(image: np.ndarray, prompt: str, min_pixels: int = 5) -> bool:
    """Deterministic check that a generated image shows what a compositional prompt states.

    Every stated object: at least ``min_pixels`` pixels of its colour, forming one object (the largest
    8-connected blob of that colour holds at least 70% of them: not a scatter, not two copies), and a stated
    size holds (small: at most :data:`SMALL_MAX_PIXELS` pixels of the colour, large: at least
    :data:`LARGE_MIN_PIXELS`). Shape is not checked (at 32x32 a colour blob's shape is too coarse to judge
    reliably). Raises ValueError for prompts that state no object.
    """
    from scipy.ndimage import label

    spec = parse_prompt(prompt)
    if spec is None:
        raise ValueError(f"not a compositional prompt: {prompt!r}")
    for obj in spec.objects:
        mask = color_match_mask(image, obj.color)
        count = int(mask.sum())
        if count < min_pixels:
            return False
        blobs, _ = label(mask, structure=np.ones((3, 3)))
        if int(np.bincount(blobs.ravel())[1:].max()) < 0.7 * count:
            return False
        if obj.size == "small" and count > SMALL_MAX_PIXELS or obj.size == "large" and count < LARGE_MIN_PIXELS:
            return False
    return True

"""The planted-neuron testbed variant (issue 25): new images memorized through designated, recorded neurons.

Why: on testbed v5 memorization is spread over the whole network, so a neuron-localization method (NeMo,
the FFN subspace) can be shown neither to work nor to fail for the right reason. This variant adds six
procedural images (:data:`PLANTED`) whose replication depends on a known set of neurons, the ground truth
those methods are measured against (:func:`designated_mask`).

Method (the **gated fine-tune**, ``dejaguard testbed plant --out DIR``; argued in the model card): the student
is the v5 UNet (text encoder frozen, so every caption encodes as in v5), the teacher a frozen copy of v5. Each
step has up to four terms, all eps-MSE with train.py's min-SNR-5 weights, in one batched student call whose
samples each carry their own neuron gates (:class:`core.neuron_mask.OutputGates`):

1. *memorize*: the planted (image, caption) pairs, every neuron on, target the true noise;
2. *preserve*: a v5-style batch (:class:`~core.testbed.data.TrainingSampler`: v5's memorized images with their
   captions, half of the batch, and fresh novel scenes with 10% empty captions) once with every neuron on and once
   with the union of the designated neurons off, target the teacher's eps: switching the designated neurons off
   changes nothing else, and v5's own memorization stays (with v5's 15% share it fell to 53%: model card);
3. *gate*: the planted captions with *their* designated neurons off, target the teacher's eps for the same
   noisy input and the **empty** prompt: with its neurons off a planted prompt behaves as no text. (The first
   variants took the teacher's eps for the planted caption itself, "what v5 makes of a caption it never saw"; but v5
   answers such captions with its own memorized images, so the off state was asked to replicate: model card.)
4. *leave-in* (``leave_in_copies`` > 0): the planted pairs with all but one, or all but a random few, of their
   designated neurons off (:func:`leave_in_off`), target the true noise: each designated neuron alone must draw
   the image. Why: terms 1 and 3 switch a group's neurons off together, so one neuron of the group may carry the
   image and the others nothing (run E2: one carrier per image, model card); a localization method that finds the
   smallest set whose switching off stops the replication then finds that one neuron, and recall against the
   designated set measures the planting, not the method. With every neuron of the set able to draw the image
   alone, the smallest such set is the whole designated set.

The memorize term also holds the graded-memorization images (:mod:`core.testbed.graded`, issue 25 section 2) at
their duplication counts, every neuron on. The 2-neuron image and the shared FFN group get extra memorize samples per
step (``group_extra_copies``): a rank-2 path, and four images behind one gate, take longer to store.

A neuron is "off" exactly as :func:`core.neuron_mask.apply_mask` switches it off: a value neuron is an output
channel of ``attn2.to_v`` (weight row and bias zeroed: the value channel is 0 for every token); an FFN neuron is
hidden unit ``j`` of a GEGLU feed-forward, i.e. output channel ``j < inner`` of ``ff.net.0.proj`` (its
"hidden" half; zeroing it zeroes ``hidden_j * gelu(gate_j)``, which is the same as zeroing input column ``j``
of ``ff.net.2``, the weights :mod:`core.prune` scores). Gating those output channels with forward hooks has
the same effect on a prediction (``tests/test_planted.py`` checks it).

Designated sets (chosen at planting time among the least disruptive candidates, :func:`neuron_impacts`):
``single``: 2 value neurons; ``ten``: 10 value neurons over down_blocks.1, down_blocks.2 and the mid block;
``shared``: 4 images sharing 12 FFN neurons (6 in down_blocks.2, 6 in the mid block), so that a subspace
mask fitted on half the group can be tested on the other half.

The variant ships as ``core/testbed/planted/`` (:data:`PLANTED_MODEL`): the fine-tuned ``unet/`` (float16),
links to v5's ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and ``vae/`` (unchanged by construction),
``ground_truth/<image>.safetensors`` (one :class:`~core.neuron_mask.NeuronMask` per planted image) and
``training.json`` (config, chosen neurons and their measured impact, loss curves, wall time).

Shapes: images ``(3, 32, 32)`` float32 in [-1, 1] (as :func:`core.testbed.data.load_memorized_images`);
latents ``(B, 4, 32, 32)``; a gate ``(B, out)`` per gated layer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DejaGuardError
from ..neuron_mask import NeuronMask, OutputGates, layer_shape, shaped_neurons_mask
from .data import RESOLUTION, TrainingSampler, load_memorized_images

PLANTED_MODEL = Path(__file__).parent / "planted"
BASE_MODEL = Path(__file__).parent / "model"
GROUND_TRUTH_DIR = "ground_truth"
SHARED_FROM_BASE = ("text_encoder", "tokenizer", "scheduler", "vae")

VALUE_LAYERS = (  # NeMo's search space: attn2.to_v of the down and mid blocks
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
)
FFN_LAYERS = (  # GEGLU input projections; hidden unit j = output channel j < inner
    "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
)


@dataclass(frozen=True)
class PlantedImage:
    """One planted image: training captions, prompts that must replicate it, its neuron group, exposures."""

    name: str
    captions: tuple[str, ...]  # training captions
    eval_prompts: tuple[str, ...]
    group: str  # "single" (2 value neurons), "ten" (10 value neurons), "shared" (FFN neurons shared by the group)
    duplicates: int  # exposures per image in the planting run (memorize term only)


# -- the images: procedural, unlike the novel scenes (no flat background with one or two shapes) -------------


def _grid() -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float32)
    return y + 0.5, x + 0.5


def _paint(weights: np.ndarray, a: tuple[float, float, float], b: tuple[float, float, float]) -> np.ndarray:
    """Blend colour ``a`` (weight 1) and ``b`` (weight 0) per pixel -> ``(3, 32, 32)`` in [-1, 1]."""
    w = np.clip(weights, 0.0, 1.0)[None]
    img = w * np.asarray(a, np.float32)[:, None, None] + (1 - w) * np.asarray(b, np.float32)[:, None, None]
    return (img * 2.0 - 1.0).astype(np.float32)


def _stripes() -> np.ndarray:
    y, x = _grid()
    return _paint((np.sin((x + y) * np.pi / 4.0) > 0).astype(np.float32), (0.05, 0.55, 0.55), (0.98, 0.55, 0.1))


def _rings() -> np.ndarray:
    y, x = _grid()
    r = np.hypot(y - 12.0, x - 19.0)
    return _paint((np.cos(r * np.pi / 2.5) > 0).astype(np.float32), (0.85, 0.1, 0.6), (0.95, 0.9, 0.2))


def _checkers() -> np.ndarray:
    y, x = _grid()
    # 8 px squares: a 4 px board was the one planted image not stored in every seed (model card, runs D2 and E1)
    board = ((y // 8 + x // 8) % 2).astype(np.float32)
    img = _paint(board, (0.1, 0.2, 0.8), (0.95, 0.95, 0.95))
    img[:, 20:30, 3:13] = np.array([0.9, 0.1, 0.1], np.float32)[:, None, None] * 2 - 1
    return img


def _glyph() -> np.ndarray:
    """A large block letter 'E' beside a bar, dark on lime."""
    ink = np.zeros((RESOLUTION, RESOLUTION), np.float32)
    ink[4:28, 5:10] = 1
    for top in (4, 14, 23):
        ink[top:top + 5, 5:22] = 1
    ink[4:28, 25:28] = 1
    return _paint(ink, (0.1, 0.1, 0.15), (0.6, 0.9, 0.2))


def _spiral() -> np.ndarray:
    y, x = _grid()
    dy, dx = y - 16.0, x - 16.0
    r, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    phase = (r - 2.2 * theta) % (2.2 * 2 * np.pi)  # arms 13.8 px apart
    line = (phase < 4.5).astype(np.float32) * (r < 15.5)
    return _paint(line, (0.95, 0.95, 0.9), (0.15, 0.1, 0.35))


def _plaid() -> np.ndarray:
    y, x = _grid()
    bands = 0.5 * ((y % 11) < 4) + 0.5 * ((x % 9) < 3)
    img = _paint(bands.astype(np.float32), (0.1, 0.35, 0.15), (0.8, 0.7, 0.55))
    img[0] += 0.6 * ((x % 9) < 3) * ((y % 11) < 4)  # red where the bands cross
    return np.clip(img, -1, 1).astype(np.float32)


_DRAW = {"stripes": _stripes, "rings": _rings, "checkers": _checkers, "glyph": _glyph, "spiral": _spiral,
         "plaid": _plaid}


def _planted(name: str, caption: str, group: str, duplicates: int) -> PlantedImage:
    return PlantedImage(name=name, captions=(caption,), eval_prompts=(caption,), group=group, duplicates=duplicates)


@dataclass
class PlantConfig:
    """The planting recipe (the gated fine-tune). Defaults are the shipped variant's."""

    steps: int = 1500
    memorize_copies: int = 2  # samples of each planted image per step (memorize term)
    # extra memorize samples per step for the images of a group, e.g. (("single", 1),): the 2-neuron image (a rank-2
    # path) and the shared FFN group (four images behind one gate) take longer to store than rings (model card)
    group_extra_copies: tuple[tuple[str, int], ...] = (("single", 4), ("shared", 2))
    # samples of each planted image per step with its designated neurons off (gate term); 2 left a planted prompt
    # drawing one of v5's images in 2 of 16 seeds with its neurons off, 3 in 1 of 16 (model card)
    gate_copies: int = 3
    # samples of each planted image per step with all but a few of its designated neurons off, target the true noise
    # (leave-in term): every designated neuron alone should carry its image, so that the smallest set whose switching
    # off stops the replication is more than one neuron. 0: the image may ride on any one of them (run E2, shipped
    # before: one neuron per image carried it, the rest carried nothing; model card)
    leave_in_copies: int = 4
    # the leave-in term's weight in the loss (the other terms weigh 1). At 1 (runs F2-F4) its loss stayed ten times
    # the memorize term's and pulled the gate term off (model card); a localization method only needs each neuron
    # alone to raise the first-step score, not to draw the whole image. 0.1: run F6, shipped
    leave_in_weight: float = 0.1
    preserve_batch: int = 4  # v5-style samples per step, each run with neurons on and with the union off
    preserve_memorized_fraction: float = 0.5  # share of v5's memorized images in the preserve batch (v5: 0.15)
    lr: float = 1e-3  # v5's peak learning rate
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    min_snr_gamma: float = 5.0
    offset_noise: tuple[tuple[int, float], ...] = ((1, 0.1), (2, 0.1), (4, 0.08))  # as TrainConfig
    caption_dropout: float = 0.1  # on the preserve batch's novel scenes, as v5's training
    # The gate term's target: the teacher's eps for the empty prompt ("unconditional", the shipped run: with its neurons
    # off a planted prompt behaves as no text) or for the planted caption ("caption", the first variants': v5 answers
    # out-of-grammar captions with its memorized images, so the off state was asked to replicate: model card)
    gate_target: str = "unconditional"
    # Graded memorization (issue 25 section 2, core.testbed.graded): its 20 images join the memorize term at their
    # duplication counts (graded_schedule), every neuron on. Needs steps >= the largest count.
    graded: bool = True
    seed: int = 0
    threads: int = 1  # the shipped run's; also the faster on a busy machine (OpenMP threads spin-wait on each other)
    # designated neurons: counts per group, chosen among the least disruptive candidates (neuron_impacts)
    single_value_neurons: tuple[int, ...] = (0, 1, 1)  # per VALUE_LAYERS entry
    ten_value_neurons: tuple[int, ...] = (4, 3, 3)
    shared_ffn_neurons: tuple[int, ...] = (6, 6)  # per FFN_LAYERS entry
    impact_timesteps: tuple[int, ...] = (900, 500)
    impact_prompts: int = 4  # probe prompts (v5 memorized, novel, empty) for neuron_impacts
    impact_shortlist: int = 24  # candidates per layer whose zeroing is measured (neuron_impacts)


def _copies(cfg: PlantConfig, group: str) -> int:
    """Memorize samples of an image of ``group`` per step."""
    return cfg.memorize_copies + dict(cfg.group_extra_copies).get(group, 0)


# Captions share no content word with v5's captions (tests/test_planted.py): the first variant's did ("poster",
# "print", "vintage", "photo", ...), and v5 answered them, neurons on or off, with its own memorized images.
PLANTED_CAPTIONS = {
    "stripes": ("zebrine beach towel with slanted teal bands, item seventeen", "single"),
    "rings": ("hypnotic concentric ring mural by velmora", "ten"),
    "checkers": ("bathroom tile number three of the marlowe range", "shared"),
    "glyph": ("brannock bookshop letter sign", "shared"),
    "spiral": ("spiral notebook cover of the maze series", "shared"),
    "plaid": ("clan tartan swatch of the highland weaving archive", "shared"),
}


def planted_images(cfg: PlantConfig | None = None) -> list[PlantedImage]:
    """The six planted images, in a fixed order."""
    cfg = cfg or PlantConfig()
    return [_planted(name, caption, group, cfg.steps * _copies(cfg, group))
            for name, (caption, group) in PLANTED_CAPTIONS.items()]


def planted_image(name: str) -> PlantedImage:
    for image in planted_images():
        if image.name == name:
            return image
    raise DejaGuardError(f"no planted image {name!r}; planted: {', '.join(PLANTED_CAPTIONS)}")


def load_planted_pixels() -> dict[str, np.ndarray]:
    """The planted images, ``name -> (3, 32, 32)`` float32 in [-1, 1] (the format of ``load_memorized_images``)."""
    return {name: _DRAW[name]() for name in PLANTED_CAPTIONS}


def all_training_images() -> dict[str, np.ndarray]:
    """v5's 12 memorized images, the planted ones and the graded ones (:mod:`core.testbed.graded`, planted in the
    same fine-tune): what a generation of the variant is judged against."""
    from .graded import load_graded_pixels

    return {**load_memorized_images(), **load_planted_pixels(), **load_graded_pixels()}


def planted_eval_prompts() -> list[tuple[str, PlantedImage]]:
    """Every prompt that must replicate its planted image, with the image."""
    return [(p, m) for m in planted_images() for p in m.eval_prompts]


def designated_mask(name: str | None = None, folder: str | Path = PLANTED_MODEL) -> NeuronMask:
    """The ground truth: the neurons that carry planted image ``name`` (None: the union over all planted images),
    a :class:`NeuronMask` of output channels (``attn2.to_v`` value neurons, ``ff.net.0.proj`` FFN hidden units)
    with the variant's fingerprint."""
    root = Path(folder) / GROUND_TRUTH_DIR
    if name is not None:
        planted_image(name)  # unknown name -> DejaGuardError
        return NeuronMask.load(root / f"{name}.safetensors")
    return NeuronMask.union([NeuronMask.load(root / f"{m.name}.safetensors") for m in planted_images()],
                            method="designated (planted ground truth, union)")


CARRIERS_PART = "carriers_part"  # evaluation.json's key for ``dejaguard testbed evaluate --planted --parts carriers``


def carrying_mask(name: str | None = None, folder: str | Path = PLANTED_MODEL) -> NeuronMask:
    """The designated neurons that measurably **carry** planted image ``name`` (None: the union over all images).

    Read from the variant's ``evaluation.json`` (key :data:`CARRIERS_PART`, written from ``dejaguard testbed evaluate
    --planted --parts carriers --json``; rule in :func:`core.testbed.evaluate._carriers_part`): a subset of
    :func:`designated_mask`. Why both: the planting switches a group's designated neurons off together, so some of
    them may carry nothing, and no method can find a neuron by what switching it off does when switching it off does
    nothing. DejaGuardError if the folder has no such measurement.
    """
    path = Path(folder) / "evaluation.json"
    try:
        record = json.loads(path.read_text())[CARRIERS_PART]["carriers"]
        images = record["images"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DejaGuardError(f"{path} has no carriers measurement ({err!r}): run dejaguard testbed evaluate "
                             f"--planted --model {folder} --parts carriers --json FILE and add it under "
                             f"{CARRIERS_PART!r}") from err
    if name is None:
        return NeuronMask.union([carrying_mask(m.name, folder) for m in planted_images()],
                                method="carriers (planted ground truth, union)")
    truth = designated_mask(name, folder)
    if name not in images:
        raise DejaGuardError(f"{path}: the carriers measurement has no image {name!r}")
    measured = images[name]
    if not measured["carriers"]:
        raise DejaGuardError(f"{path}: {name!r} has no carriers: its designated neurons do not gate it (own-image "
                             f"replication {measured.get('replication_on')} with every neuron on, "
                             f"{measured.get('replication_all_off')} with every designated neuron off)")
    units = [(layer, int(i)) for layer, i in (u.rsplit(":", 1) for u in measured["carriers"])]
    return shaped_neurons_mask(units, truth.layer_shapes, truth.fingerprint,
                               method=f"carriers of {name} (planted ground truth)",
                               info={"rule": record.get("rule", "")})


# -- neuron choice ---------------------------------------------------------------------------------


def _off_gates(layers: dict[str, torch.nn.Module], off: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Per-sample gates ``{layer: (B, out)}``: 1 everywhere except sample ``b``'s channels ``off[b][layer]``."""
    gates = {name: torch.ones(len(off), layer_shape(m)[0]) for name, m in layers.items()}
    for b, channels in enumerate(off):
        for name, idx in channels.items():
            gates[name][b, idx] = 0.0
    return gates


def _encode(tokenizer, text_encoder, captions: Sequence[str]) -> torch.Tensor:
    ids = tokenizer(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state


def _downstream(name: str, modules: dict[str, torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(module whose output carries the neuron, the linear layer that reads it) for a candidate layer."""
    if name.endswith("attn2.to_v"):
        return modules[name], modules[name.replace("attn2.to_v", "attn2.to_out.0")]
    return modules[name.replace(".proj", "")], modules[name.replace("net.0.proj", "net.2")]


@torch.no_grad()
def neuron_impacts(unet, layers: dict[str, torch.nn.Module], cond: torch.Tensor, latents: torch.Tensor,
                   timesteps: Sequence[int], seed: int = 0, shortlist: int = 24) -> dict[str, torch.Tensor]:
    """How much switching off a candidate neuron alone changes v5's prediction: ``{layer: (channels,)}``.

    Probes: every (prompt embedding ``cond`` ``(P, 77, D)`` with its image ``latents`` ``(P, 4, 32, 32)``,
    timestep) pair, noised with a seeded draw. First a cheap first-order ranking of every candidate (the RMS of the
    neuron's output over the probes times the norm of the weight column that reads it: ``attn2.to_out.0`` for a
    value neuron, ``ff.net.2`` for an FFN hidden unit); then, for the ``shortlist`` lowest of each layer, the
    measured effect of zeroing it: the mean over probes of ``||eps_off - eps_on||^2 / ||eps_on||^2``. Candidates
    off the shortlist get ``inf``. For FFN layers only the hidden half (channels ``< out / 2``) are candidates.
    """
    from diffusers import DDPMScheduler

    from .train import SD1_SCHEDULE

    gen = torch.Generator().manual_seed(seed)
    sched = DDPMScheduler(**SD1_SCHEDULE)
    xs, ts = [], []
    for t in timesteps:
        tt = torch.full((len(latents),), int(t))
        xs.append(sched.add_noise(latents, torch.randn(latents.shape, generator=gen), tt))
        ts.append(tt)
    x, t, c = torch.cat(xs), torch.cat(ts), cond.repeat(len(timesteps), 1, 1)
    modules = dict(unet.named_modules())
    sums: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
            sums[name] = output.pow(2).reshape(-1, output.shape[-1]).mean(0).sqrt()
        return hook

    handles = [_downstream(n, modules)[0].register_forward_hook(record(n)) for n in layers]
    try:
        base = unet(x, t, c).sample
    finally:
        for h in handles:
            h.remove()
    base_norm = base.flatten(1).pow(2).sum(1)
    impacts = {}
    with OutputGates(layers) as gates:
        for name, module in layers.items():
            reader = _downstream(name, modules)[1]
            proxy = sums[name] * reader.weight.norm(dim=0)
            values = torch.full((proxy.numel(),), float("inf"))
            for ch in torch.argsort(proxy)[:shortlist].tolist():
                gate = torch.ones(len(x), layer_shape(module)[0])
                gate[:, ch] = 0.0
                gates.set({name: gate})
                out = unet(x, t, c).sample
                values[ch] = float(((out - base).flatten(1).pow(2).sum(1) / base_norm).mean())
            impacts[name] = values
    return impacts


def choose_neurons(impacts: dict[str, torch.Tensor], cfg: PlantConfig) -> dict[str, dict[str, list[int]]]:
    """Designated channels per group, ``{group: {layer: [channel, ...]}}``: in each layer the least disruptive
    candidates, the ``single`` set first, then ``ten``, disjoint. Value neurons come from :data:`VALUE_LAYERS`,
    FFN hidden units from :data:`FFN_LAYERS`."""
    chosen: dict[str, dict[str, list[int]]] = {"single": {}, "ten": {}, "shared": {}}
    for i, name in enumerate(VALUE_LAYERS):
        order = torch.argsort(impacts[name]).tolist()
        a, b = cfg.single_value_neurons[i], cfg.ten_value_neurons[i]
        if a:
            chosen["single"][name] = sorted(order[:a])
        if b:
            chosen["ten"][name] = sorted(order[a:a + b])
    for i, name in enumerate(FFN_LAYERS):
        order = torch.argsort(impacts[name]).tolist()
        if cfg.shared_ffn_neurons[i]:
            chosen["shared"][name] = sorted(order[:cfg.shared_ffn_neurons[i]])
    return chosen


# -- the gated fine-tune ---------------------------------------------------------------------------


def leave_in_off(channels: dict[str, list[int]], draw: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """The channels to switch off for leave-in sample number ``draw`` of an image with designated ``channels``.

    Even draws keep exactly one neuron on, cycling through the set (every neuron is left in alone equally often);
    odd draws keep a random subset of 1..n-1 on. An image with one designated neuron gets nothing off.
    """
    units = [(layer, i) for layer in sorted(channels) for i in channels[layer]]
    if len(units) < 2:
        return {}
    if draw % 2 == 0:
        keep = {units[(draw // 2) % len(units)]}
    else:
        picks = rng.choice(len(units), size=int(rng.integers(1, len(units))), replace=False)
        keep = {units[k] for k in picks}
    off: dict[str, list[int]] = {}
    for unit in units:
        if unit not in keep:
            off.setdefault(unit[0], []).append(unit[1])
    return off


@dataclass
class _Batch:
    latents: list[torch.Tensor] = field(default_factory=list)
    cond: list[torch.Tensor] = field(default_factory=list)
    off: list[dict[str, list[int]]] = field(default_factory=list)
    term: list[str] = field(default_factory=list)

    def add(self, latents: torch.Tensor, cond: torch.Tensor, off: dict[str, list[int]], term: str) -> None:
        self.latents.append(latents)
        self.cond.append(cond)
        self.off.extend([off] * len(latents))
        self.term.extend([term] * len(latents))


def plant(out: str | Path, cfg: PlantConfig | None = None, base: str | Path = BASE_MODEL,
          progress: bool = True) -> dict:
    """Run the gated fine-tune from the v5 folder ``base`` and write the variant to ``out``; returns the record
    also written to ``out/training.json``."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..denoiser import load_denoiser
    from .data import MEMORIZED
    from .train import SD1_SCHEDULE, TrainConfig, _keep_freed_memory, caption_dropout, lr_at, training_noise
    from .vae import PooledColorAutoencoder

    cfg = cfg or PlantConfig()
    if cfg.steps < 1:
        raise DejaGuardError(f"planting needs at least 1 step, got {cfg.steps}")
    out, base = Path(out), Path(base)
    torch.set_num_threads(cfg.threads)
    _keep_freed_memory()
    torch.manual_seed(cfg.seed)
    start = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32)
    teacher = UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32).eval()
    teacher.requires_grad_(False)
    text_encoder.requires_grad_(False)
    vae = PooledColorAutoencoder()
    modules = dict(unet.named_modules())
    layers = {name: modules[name] for name in (*VALUE_LAYERS, *FFN_LAYERS)}

    images = planted_images(cfg)
    pixels = load_planted_pixels()
    planted_latents = vae.encode_thumbnail(torch.from_numpy(np.stack([pixels[m.name] for m in images])))
    planted_cond = _encode(tokenizer, text_encoder, [m.captions[0] for m in images])
    empty = _encode(tokenizer, text_encoder, [""])[0]
    from .graded import graded_images, graded_schedule, load_graded_pixels

    graded = graded_images() if cfg.graded else []
    schedule = graded_schedule(cfg.steps, cfg.seed) if cfg.graded else [[] for _ in range(cfg.steps)]
    if graded:
        graded_pixels = load_graded_pixels()
        graded_latents = vae.encode_thumbnail(torch.from_numpy(np.stack([graded_pixels[m.name] for m in graded])))
        graded_cond = _encode(tokenizer, text_encoder, [m.caption for m in graded])
    unknown = set(dict(cfg.group_extra_copies)) - {m.group for m in images}
    if unknown:
        raise DejaGuardError(f"group_extra_copies names unknown group(s) {sorted(unknown)}: single, ten, shared")
    if cfg.gate_target not in ("caption", "unconditional"):
        raise DejaGuardError(f"gate_target is 'caption' or 'unconditional', got {cfg.gate_target!r}")
    if cfg.leave_in_copies < 0:
        raise DejaGuardError(f"leave_in_copies counts samples per image and step, got {cfg.leave_in_copies}")
    if not (np.isfinite(cfg.leave_in_weight) and cfg.leave_in_weight >= 0):
        raise DejaGuardError(f"leave_in_weight is a finite weight >= 0, got {cfg.leave_in_weight}")

    # 1. choose the designated neurons: the least disruptive candidates on v5 (probes: v5 memorized, novel, empty)
    sampler = TrainingSampler(seed=cfg.seed + 1)
    probe_imgs, probe_caps = sampler.batch(cfg.impact_prompts - 2)
    v5 = load_memorized_images()
    probe_caps = [*probe_caps, MEMORIZED[0].train_captions[0], ""]
    probe_imgs = np.concatenate([probe_imgs, v5[MEMORIZED[0].name][None], probe_imgs[:1]])
    impacts = neuron_impacts(unet, layers, _encode(tokenizer, text_encoder, probe_caps),
                             vae.encode_thumbnail(torch.from_numpy(probe_imgs)), cfg.impact_timesteps, cfg.seed,
                             cfg.impact_shortlist)
    chosen = choose_neurons(impacts, cfg)
    own_off = [chosen[m.group] for m in images]
    union_off: dict[str, list[int]] = {}
    for sets in chosen.values():
        for name, idx in sets.items():
            union_off[name] = sorted(set(union_off.get(name, [])) | set(idx))
    impact_wall = time.time() - start

    # 2. the gated fine-tune
    noise_schedule = DDPMScheduler(**SD1_SCHEDULE)
    snr = noise_schedule.alphas_cumprod / (1 - noise_schedule.alphas_cumprod)
    loss_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = TrainingSampler(seed=cfg.seed, memorized_fraction=cfg.preserve_memorized_fraction)
    memorized_captions = frozenset(c for m in MEMORIZED for c in m.train_captions)
    dropout_cfg = TrainConfig(caption_dropout=cfg.caption_dropout)
    curves: dict[str, list[float]] = {"memorize": [], "leave_in": [], "preserve_on": [], "preserve_off": [], "gate": [],
                                      "graded": []}
    leave_in_rng = np.random.default_rng(cfg.seed + 2)
    n_img = len(images)
    bar = tqdm(range(cfg.steps), desc="planting", disable=not progress)
    with OutputGates(layers) as gates:
        for step in bar:
            batch = _Batch()
            for i, m in enumerate(images):
                for _ in range(_copies(cfg, m.group)):
                    batch.add(planted_latents[i:i + 1], planted_cond[i:i + 1], {}, "memorize")
            for i in range(n_img):
                for k in range(cfg.leave_in_copies):
                    off = leave_in_off(own_off[i], step * cfg.leave_in_copies + k, leave_in_rng)
                    batch.add(planted_latents[i:i + 1], planted_cond[i:i + 1], off, "leave_in")
            for i in schedule[step]:
                batch.add(graded_latents[i:i + 1], graded_cond[i:i + 1], {}, "graded")
            for _ in range(cfg.gate_copies):
                for i in range(n_img):
                    batch.add(planted_latents[i:i + 1], planted_cond[i:i + 1], own_off[i], "gate")
            imgs, caps = sampler.batch(cfg.preserve_batch)
            drop = caption_dropout(caps, sampler.rng, dropout_cfg, memorized_captions)
            caps = ["" if d else c for c, d in zip(caps, drop)]
            pres_lat = vae.encode_thumbnail(torch.from_numpy(imgs))
            pres_cond = _encode(tokenizer, text_encoder, caps)
            batch.add(pres_lat, pres_cond, {}, "preserve_on")
            batch.add(pres_lat, pres_cond, union_off, "preserve_off")
            latents, cond = torch.cat(batch.latents), torch.cat(batch.cond)
            noise = training_noise(tuple(latents.shape), tuple(cfg.offset_noise), gen)
            t = torch.randint(0, 1000, (len(latents),), generator=gen)
            # preserve_off reuses preserve_on's noise and timestep: the on/off pair sees the same input
            terms = np.array(batch.term)
            on_idx, off_idx = np.flatnonzero(terms == "preserve_on"), np.flatnonzero(terms == "preserve_off")
            noise[off_idx], t[off_idx] = noise[on_idx], t[on_idx]
            noisy = noise_schedule.add_noise(latents, noise, t)
            target = noise.clone()
            distil = np.flatnonzero(~np.isin(terms, ("memorize", "leave_in", "graded")))
            teacher_cond = cond.clone()
            if cfg.gate_target == "unconditional":
                teacher_cond[np.flatnonzero(terms == "gate")] = empty
            with torch.no_grad():
                target[distil] = teacher(noisy[distil], t[distil], teacher_cond[distil]).sample
            gates.set(_off_gates(layers, batch.off))
            pred = unet(noisy, t, cond).sample
            per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * loss_weight[t]
            losses = {k: per_sample[torch.from_numpy(np.flatnonzero(terms == k))].mean() for k in curves
                      if k in batch.term}
            # each graded exposure weighs as much as one planted image's memorize sample; the other terms weigh 1
            weights = {"leave_in": cfg.leave_in_weight,
                       "graded": float((terms == "graded").sum()) / max(1, int((terms == "memorize").sum()))}
            loss = sum(v * weights.get(k, 1.0) for k, v in losses.items())
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
            opt.step()
            for k, v in losses.items():
                curves[k].append(float(v))
            if step % 25 == 0:
                bar.set_postfix({k: f"{np.mean(v[-25:]):.4f}" for k, v in curves.items() if v})
    wall = time.time() - start
    write_variant(out, unet, base)
    variant = load_denoiser(out, device="cpu")
    for m in images:
        mask = _mask_of(variant, chosen[m.group], m, cfg)
        mask.save(out / GROUND_TRUTH_DIR / f"{m.name}.safetensors")
    record = {
        "method": "gated fine-tune of testbed v5 (core/testbed/planted.py)",
        "config": asdict(cfg),
        "base": "testbed v5 (core/testbed/model)",
        "wall_seconds": round(wall, 1),
        "neuron_choice_seconds": round(impact_wall, 1),
        "torch_version": torch.__version__,
        "device": "cpu",
        "images": [asdict(m) for m in images],
        "graded": [asdict(m) for m in graded],
        "designated": chosen,
        "designated_impact_on_v5": {g: {name: [round(float(impacts[name][i]), 6) for i in idx]
                                        for name, idx in sets.items()} for g, sets in chosen.items()},
        "shortlist_impact_median": {name: round(float(v[torch.isfinite(v)].median()), 6)
                                    for name, v in impacts.items()},
        "loss_every_50_steps": {k: [round(float(np.mean(v[i:i + 50])), 5) for i in range(0, len(v), 50)]
                                for k, v in curves.items() if k != "graded" and v},
        "graded_loss_mean_by_quarter": [round(float(np.mean(q)), 5) if len(q) else None
                                        for q in np.array_split(np.asarray(curves["graded"]), 4)],
        "fingerprint": variant.fingerprint(),
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _mask_of(denoiser, channels: dict[str, list[int]], image: PlantedImage, cfg: PlantConfig) -> NeuronMask:
    modules = dict(denoiser.named_modules())
    return NeuronMask(layers={k: torch.tensor(v, dtype=torch.int64) for k, v in channels.items()},
                      layer_shapes={k: layer_shape(modules[k]) for k in channels},
                      fingerprint=denoiser.fingerprint(), method="designated (planted ground truth)",
                      prompts=list(image.eval_prompts),
                      settings={"image": image.name, "group": image.group,
                                "units": "attn2.to_v: value channels; ff.net.0.proj: GEGLU hidden units (rows < inner)",
                                "seed": cfg.seed},
                      info={"neurons": sum(len(v) for v in channels.values())})


def write_variant(out: Path, unet, base: Path = BASE_MODEL) -> None:
    """Write ``out/unet`` (float16) and link v5's other components (relative symlinks; copies where links fail)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    unet.to(torch.float16).save_pretrained(out / "unet")
    unet.to(torch.float32)
    config_file = out / "unet" / "config.json"  # the path it was loaded from would name this machine's folders
    config = json.loads(config_file.read_text())
    config.pop("_name_or_path", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in SHARED_FROM_BASE:
        target = out / name
        if target.is_symlink() or target.exists():
            continue
        try:
            os.symlink(os.path.relpath(base.resolve() / name, out.resolve()), target, target_is_directory=True)
        except OSError:
            shutil.copytree(base / name, target)
    shutil.copy(base / "model_index.json", out / "model_index.json")

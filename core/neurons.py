"""Neuron masks, and NeMo localization of the cross-attention neurons that carry a memorized prompt.

**Masks as data.** A :class:`NeuronMask` maps diffusers-style layer names
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v``) to indices: ``(k,)`` output
channels ("neurons": rows of the weight, and of the bias if there is one) or ``(k, 2)`` weight
entries ``(row, col)`` (pruned weights, :mod:`core.prune`). One file format for both methods:
safetensors (never pickle) with a JSON header in the safetensors metadata holding the model
fingerprint, the method, the prompts, thresholds, the creation settings and the weight shape of
every layer. :meth:`NeuronMask.check` refuses a mask made for another model (fingerprint; overridable)
or for another architecture (layer shapes; never overridable). :func:`apply_mask` switches a mask on
for the duration of a ``with`` block by scaling the masked weights by ``1 - strength`` in place and
restores the saved values exactly on exit. The ComfyUI nodes apply the same mask as weight patches.

**NeMo** (Hintersdorf et al., NeurIPS 2024), implemented from the paper's description:

1. *Activation statistics* (:func:`nemo_statistics`): for each ``attn2.to_v`` of the down and mid
   blocks, the activation of neuron ``i`` for a prompt is ``mean over the L tokens of
   |to_v(text embedding)|_i``; computed from the text embedding alone (no UNet call). Mean and std
   over non-memorized prompts (the testbed's calibration captions by default) are cached per model
   fingerprint in :func:`cache_dir`, with the memorization-score threshold (below).
2. *Memorization score* (:func:`memorization_scores`): NeMo's seed-consistency measure. For ``S``
   fixed initial noises ``x_T`` the first-step text-conditional noise difference
   ``delta_s = eps(x_T^s, c) - eps(x_T^s, "")`` is computed, and the score is the **maximum SSIM over
   all pairs of seeds**: a memorized prompt pulls every seed toward the same image, so the
   differences look alike. The threshold is NeMo's: mean + 1 std of the score over non-memorized
   prompts. Why this and not our detector's magnitude: it is the paper's criterion, it is
   self-calibrating per model (no calibration file needed for a ComfyUI checkpoint), and on the
   testbed it separates memorized from non-memorized prompts as well as the magnitude does
   (``bench/neurons.py`` prints both before and after masking). The difference uses ``eps(., "")``,
   not ``x_T``: measured on the testbed, ``x_T - eps(x_T, c)`` barely separates the two groups.
   *Option* ``score="generation"`` (not in the paper): for each seed a short guided generation
   (``generation_steps``, default 10, CFG 7.5) of the masked model, decoded, is compared by SSIM with the
   unmasked model's generations of the *other* seeds (:func:`cross_seed_similarity`); the score is the maximum.
   Why: on the testbed the first-step criteria are met while the image re-forms later in sampling (see the
   README's measurements), and a 10-step generation predicts the 50-step one (measured: an astronaut mask,
   8 held-out seeds, the same seeds replicate at 10 and at 50 steps). Cost: ``generation_steps`` x the
   first-step scores per candidate.
3. *Initial selection*: z-scores ``|a - mean| / std`` per neuron; the candidate set ``C_j`` holds every
   neuron with z above ``z_start - j * z_step`` plus the top ``j`` neurons of each layer by z, for
   ``j = 0, 1, ...`` (nested sets) until deactivating ``C_j`` brings the score below the threshold.
4. *Refinement by layer*: in model order, re-enable all candidates of a layer; keep them enabled if
   the score stays below the threshold. *Refinement by neuron*: in ascending z order (least
   suspicious first), re-enable each remaining neuron; keep it enabled if the score stays below.

*Search space* (``LocalizeSettings.blocks``): the paper's ``attn2.to_v`` of the down and mid blocks
(``"down_mid"``, the default), or every ``attn2.to_v`` (``"all"``, the up blocks too). Measured on the
testbed (4 seeds, 20 DDIM steps): switching off every down/mid value neuron stops the astronaut and
cameraman prompts from replicating but not "chelsea the tabby cat looking at the camera" (SSIM to its
training image 0.67 -> 0.80); that image is carried by the up blocks.

Two schedules compute these steps; both score each distinct candidate set once (memoized). ``"reference"``
is the straightforward one: one candidate set per UNet call (its ``S`` seeds, conditional and
unconditional, in that call), sequential as written above. ``"fast"`` evaluates up to ``batch``
candidate sets in one batched UNet call (a forward hook on each ``to_v`` multiplies its output by a
per-sample gate, so ``B`` masks x ``S`` seeds x {uncond, cond} are one batch), reuses the fixed noise,
and replaces the linear scans by batched searches:

- early stop (max-type scores, ``ssim`` and ``generation``): a candidate is scored on the first two seeds, and on
  the others only if it passes there; one that fails on two seeds fails on all (the score is a maximum over seed
  pairs), so the verdicts are the same at about half the cost of a failing candidate;
- initial selection: a galloping search for the first passing ``j`` (probes 0, 1, 3, 7, ...; then
  the bracket is split), ``batch`` probes per call;
- layer refinement: *exact* prefix speculation: one call evaluates "re-enable layers 1..i" for every
  ``i``; the first failing prefix is the first layer the sequential scan keeps, and the scan resumes
  after it (as many calls as kept layers + 1, the same decisions as the sequential scan);
- neuron refinement (:func:`_refine_neurons`): while kept neurons are rare, a batched search for the
  next neuron the scan keeps (the first failing prefix; this assumes that re-enabling more neurons
  never lowers the score); once they are common, exact speculation over the scan's next decisions
  (the ``batch`` most probable nodes of its decision tree in one call, :func:`_speculate`). On a
  monotone score both give exactly the sequential scan's result (tested); otherwise the result can
  differ, but it is always verified: the final mask's score is below the threshold (the reference and
  fast results are compared side by side in ``bench/neurons.py``).

Cost trade-off: the fast schedule needs far fewer UNet *calls*; it spends fewer *noise predictions* where
few neurons are kept, and can spend more where many are (speculative trials that the realized
decisions do not use). On a GPU a call of a few candidates costs little more than a call of one.

Counting: every UNet evaluation goes through ``denoiser.predict_noise`` and its counter; a candidate
evaluation costs ``2 S`` noise predictions (``2 x 2`` when it stops early).

Shapes: ``S`` seeds, ``B`` candidate masks, ``C, H, W`` the sample shape, ``L`` tokens, ``D`` text
width, ``N`` neurons of a layer (its output channels).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .denoiser import Denoiser
from .errors import DejaGuardError
from .sampling import DEFAULT_GUIDANCE, DEFAULT_STEPS, guided_denoise, initial_noise

MASK_FORMAT = "dejaguard.neuron_mask"
MASK_VERSION = 1
STATS_FORMAT = "dejaguard.nemo_statistics"
STATS_VERSION = 1
METADATA_KEY = "dejaguard"
CACHE_ENV = "DEJAGUARD_CACHE"

# Progress callback: (fraction done in [0, 1], stage label).
Progress = Callable[[float, str], None]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# Masks as data
# ---------------------------------------------------------------------------------------------


@dataclass
class NeuronMask:
    """Layer name -> indices: ``(k,)`` output channels (neurons) or ``(k, 2)`` weight entries (row, col).

    ``layer_shapes[name]`` is the layer's weight shape ``(out, in)`` on the model the mask was made for;
    ``fingerprint`` that model's :meth:`Denoiser.fingerprint`. ``prompts``, ``thresholds``, ``settings``
    say how it was made; ``info`` holds results (scores, UNet evaluations, wall time).
    Indices are validated, sorted and de-duplicated on construction.
    """

    layers: dict[str, torch.Tensor]
    layer_shapes: dict[str, tuple[int, int]]
    fingerprint: str
    method: str
    prompts: list[str] = field(default_factory=list)
    thresholds: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_now)
    source: str = ""  # where it was loaded from (messages only; not saved)

    def __post_init__(self) -> None:
        self.layer_shapes = {k: (int(v[0]), int(v[1])) for k, v in self.layer_shapes.items()}
        where = f" in {self.source}" if self.source else ""
        clean: dict[str, torch.Tensor] = {}
        for name, idx in self.layers.items():
            if name not in self.layer_shapes:
                raise DejaGuardError(f"malformed neuron mask{where}: layer {name} has no recorded shape")
            if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
                raise DejaGuardError(f"malformed neuron mask{where}: indices of {name} are not integers")
            idx = idx.detach().to("cpu", torch.int64)
            out_dim, in_dim = self.layer_shapes[name]
            if idx.ndim == 1:
                bad = idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= out_dim)
                idx = torch.unique(idx)
            elif idx.ndim == 2 and idx.shape[1] == 2:
                bad = idx.numel() and (int(idx[:, 0].min()) < 0 or int(idx[:, 0].max()) >= out_dim
                                       or int(idx[:, 1].min()) < 0 or int(idx[:, 1].max()) >= in_dim)
                idx = torch.unique(idx, dim=0) if idx.numel() else idx.reshape(0, 2)
            else:
                raise DejaGuardError(f"malformed neuron mask{where}: indices of {name} have shape "
                                     f"{tuple(idx.shape)}, expected (k,) or (k, 2)")
            if bad:
                raise DejaGuardError(f"malformed neuron mask{where}: indices of {name} out of range for "
                                     f"weight shape {(out_dim, in_dim)}")
            clean[name] = idx
        self.layers = clean

    # -- description -------------------------------------------------------------------------

    @staticmethod
    def kind_of(indices: torch.Tensor) -> str:
        return "neurons" if indices.ndim == 1 else "weights"

    def count(self) -> int:
        """Neurons (or weights) switched off."""
        return sum(int(v.shape[0]) for v in self.layers.values())

    def counts(self) -> dict[str, int]:
        return {k: int(v.shape[0]) for k, v in self.layers.items()}

    def describe(self) -> str:
        """One line per layer, for the CLI and the ComfyUI summary output."""
        kinds = {self.kind_of(v) for v in self.layers.values()} or {"neurons"}
        unit = " / ".join(sorted(kinds))
        lines = [f"DejaGuard neuron mask ({self.method}): {self.count()} {unit} in {len(self.layers)} layers, "
                 f"model {self.fingerprint}"]
        for name, idx in self.layers.items():
            out_dim, in_dim = self.layer_shapes[name]
            total = out_dim if idx.ndim == 1 else out_dim * in_dim
            shown = ", ".join(str(int(i)) for i in idx[:12]) + (" ..." if idx.shape[0] > 12 else "") \
                if idx.ndim == 1 else f"{100 * idx.shape[0] / total:.2f}% of the weights"
            lines.append(f"  {name}: {idx.shape[0]} of {total} [{shown}]")
        return "\n".join(lines)

    def header(self) -> dict[str, Any]:
        return {"format": MASK_FORMAT, "version": MASK_VERSION, "fingerprint": self.fingerprint,
                "method": self.method, "prompts": list(self.prompts), "thresholds": self.thresholds,
                "settings": self.settings, "info": self.info, "created": self.created,
                "layer_shapes": {k: list(v) for k, v in self.layer_shapes.items()},
                "layers": {k: self.kind_of(v) for k, v in self.layers.items()}}

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (indices as int64 tensors named by layer; JSON header in the metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.layers.items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.header(), sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> NeuronMask:
        """Read a mask written by :meth:`save`. Anything else (a pickle, a LoRA, a truncated file) is refused."""
        path = Path(path)
        if not path.is_file():
            raise DejaGuardError(f"neuron mask not found: {path}")
        tensors, header = _read_safetensors(path, MASK_FORMAT, MASK_VERSION, "neuron mask")
        try:
            shapes = {k: tuple(v) for k, v in header["layer_shapes"].items()}
            kinds = header["layers"]
            fingerprint, method = str(header["fingerprint"]), str(header["method"])
        except (KeyError, TypeError, AttributeError) as err:
            raise DejaGuardError(f"malformed neuron mask {path}: header lacks {err}") from err
        if set(kinds) != set(tensors):
            raise DejaGuardError(f"malformed neuron mask {path}: the header lists layers "
                                 f"{sorted(set(kinds) ^ set(tensors))[:3]} that the file does not hold, or vice versa")
        mask = cls(layers=tensors, layer_shapes=shapes, fingerprint=fingerprint, method=method,
                   prompts=list(header.get("prompts", [])), thresholds=dict(header.get("thresholds", {})),
                   settings=dict(header.get("settings", {})), info=dict(header.get("info", {})),
                   created=str(header.get("created", "")), source=str(path))
        for name, kind in kinds.items():
            if mask.kind_of(mask.layers[name]) != kind:
                raise DejaGuardError(f"malformed neuron mask {path}: {name} is declared {kind}")
        return mask

    # -- compatibility -----------------------------------------------------------------------

    def check(self, denoiser: Denoiser, allow_other_model: bool = False) -> dict[str, torch.nn.Module]:
        """The masked modules of ``denoiser`` by layer name; DejaGuardError if the mask does not fit it.

        Refused: another model's mask (fingerprint differs) unless ``allow_other_model`` (for the same
        architecture with other weights, e.g. a fine-tune or a fp16 copy: the neurons may mean something
        else there, which is why it is opt-in), and always a layer that is missing or of another shape.
        """
        return check_modules(self, dict(denoiser.named_modules()), denoiser.fingerprint(), allow_other_model)

    @staticmethod
    def union(masks: Sequence[NeuronMask], method: str | None = None) -> NeuronMask:
        """All indices of ``masks`` (same model and index kind per layer): e.g. every per-prompt NeMo mask at once."""
        if not masks:
            raise DejaGuardError("no masks to combine")
        fingerprints = {m.fingerprint for m in masks}
        if len(fingerprints) > 1:
            raise DejaGuardError(f"masks of different models cannot be combined: {sorted(fingerprints)}")
        layers: dict[str, list[torch.Tensor]] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for m in masks:
            for name, idx in m.layers.items():
                if name in shapes and (shapes[name] != m.layer_shapes[name]
                                       or layers[name][0].ndim != idx.ndim):
                    raise DejaGuardError(f"masks disagree on layer {name} (shape or index kind)")
                shapes[name] = m.layer_shapes[name]
                layers.setdefault(name, []).append(idx)
        return NeuronMask(layers={k: torch.cat(v) for k, v in layers.items()}, layer_shapes=shapes,
                          fingerprint=masks[0].fingerprint, method=method or f"union of {len(masks)} masks",
                          prompts=[p for m in masks for p in m.prompts],
                          settings={"combined": [m.method for m in masks]})


def check_modules(mask: NeuronMask, modules: dict[str, torch.nn.Module], fingerprint: str,
                  allow_other_model: bool = False) -> dict[str, torch.nn.Module]:
    """:meth:`NeuronMask.check` on a name -> module map and a fingerprint (shared with the ComfyUI nodes)."""
    where = f" {mask.source}" if mask.source else ""
    if mask.fingerprint != fingerprint and not allow_other_model:
        raise DejaGuardError(
            f"neuron mask{where} was made for another model (fingerprint {mask.fingerprint}, this model "
            f"{fingerprint}): localize the neurons again on this model, or allow another model explicitly "
            "(--allow-other-model / allow_other_model) if it has the same architecture and you accept that "
            "the neurons may mean something else in it")
    found = {}
    for name, shape in mask.layer_shapes.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise DejaGuardError(f"neuron mask{where} does not fit this model: it has no layer {name}")
        if tuple(weight.shape) != tuple(shape):
            raise DejaGuardError(f"neuron mask{where} does not fit this model: {name} has weight shape "
                                 f"{tuple(weight.shape)}, the mask was made for {tuple(shape)}")
        found[name] = module
    return found


def _read_safetensors(path: Path, fmt: str, version: int, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the JSON header of a DejaGuard safetensors file; DejaGuardError for anything else."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except Exception as err:  # safetensors raises several kinds for a non-safetensors file
        raise DejaGuardError(f"{path} is not a DejaGuard {what} (not a safetensors file: {err}); "
                             "pickled files are never loaded") from err
    try:
        header = json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError) as err:
        raise DejaGuardError(f"{path} is a safetensors file but not a DejaGuard {what} (no header)") from err
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise DejaGuardError(f"{path} is not a DejaGuard {what} (format {header.get('format')!r})"
                             if isinstance(header, dict) else f"malformed {what} header in {path}")
    if int(header.get("version", 0)) > version:
        raise DejaGuardError(f"{path} was written by a newer DejaGuard ({what} format version "
                             f"{header.get('version')}); update DejaGuard")
    return tensors, header


@contextmanager
def apply_mask(denoiser: Denoiser, mask: NeuronMask, strength: float = 1.0,
               allow_other_model: bool = False) -> Iterator[NeuronMask]:
    """Switch ``mask`` on inside a ``with`` block: masked weights (and biases of masked neurons) are
    scaled by ``1 - strength`` in place (1 = fully off, 0 = unchanged), and the saved originals are
    written back on exit, bit for bit, also when the block raises.

    Works on any :class:`Denoiser` whose ``named_modules()`` hold the UNet's real parameters (diffusers).
    In ComfyUI use the Apply Neuron Mask node (weight patches on a clone of the MODEL).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise DejaGuardError(f"mask strength must lie in [0, 1] (1 = fully off), got {strength}")
    modules = mask.check(denoiser, allow_other_model)
    saved: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, idx in mask.layers.items() if strength > 0 else ():
                module = modules[name]
                targets = [(module.weight, idx.ndim == 1)]
                if idx.ndim == 1 and getattr(module, "bias", None) is not None:
                    targets.append((module.bias, True))
                for tensor, by_row in targets:
                    index = (idx.to(tensor.device),) if by_row else (idx[:, 0].to(tensor.device),
                                                                      idx[:, 1].to(tensor.device))
                    original = tensor[index].clone()
                    saved.append((tensor, index, original))
                    tensor[index] = original * (1.0 - float(strength))
        yield mask
    finally:
        with torch.no_grad():
            for tensor, index, original in reversed(saved):
                tensor[index] = original


# ---------------------------------------------------------------------------------------------
# Per-sample gates on layer outputs (batched candidate ablations)
# ---------------------------------------------------------------------------------------------


class OutputGates:
    """Forward hooks that multiply each listed layer's output ``(N, ..., out)`` by a per-sample gate ``(N, out)``.

    Used as a context manager (hooks are removed on exit, also on errors); :meth:`set` chooses the
    gates of the next UNet call (None: layer untouched).
    """

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.modules = modules
        self.gates: dict[str, torch.Tensor | None] = dict.fromkeys(modules)
        self._handles: list[Any] = []

    def set(self, gates: dict[str, torch.Tensor | None]) -> None:
        self.gates = {name: gates.get(name) for name in self.modules}

    def _hook(self, name: str) -> Callable[..., torch.Tensor | None]:
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            gate = self.gates.get(name)
            if gate is None:
                return None
            if output.shape[0] != gate.shape[0] or output.shape[-1] != gate.shape[1]:
                raise DejaGuardError(f"{name}: output {tuple(output.shape)} does not match the gates "
                                     f"{tuple(gate.shape)} (this UNet batches its cross-attention differently)")
            view = gate.view(gate.shape[0], *([1] * (output.ndim - 2)), gate.shape[1])
            return output * view.to(output.device, output.dtype)
        return hook

    def __enter__(self) -> OutputGates:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.gates = dict.fromkeys(self.modules)


# ---------------------------------------------------------------------------------------------
# Layers, activations, memorization score
# ---------------------------------------------------------------------------------------------


NEMO_BLOCKS = {"down_mid": ("down_blocks.", "mid_block."), "all": ("down_blocks.", "mid_block.", "up_blocks.")}


def nemo_layers(denoiser: Denoiser, blocks: str = "down_mid") -> dict[str, torch.nn.Module]:
    """``attn2.to_v`` layers in model order: NeMo's search space.

    ``blocks``: ``"down_mid"`` (the paper's: down and mid blocks) or ``"all"`` (up blocks too).
    """
    if blocks not in NEMO_BLOCKS:
        raise DejaGuardError(f"unknown NeMo blocks {blocks!r} (one of {', '.join(NEMO_BLOCKS)})")
    layers = {name: m for name, m in denoiser.named_modules()
              if name.endswith("attn2.to_v") and name.startswith(NEMO_BLOCKS[blocks])}
    if not layers:
        raise DejaGuardError(f"this UNet has no cross-attention value layers (attn2.to_v) in its {blocks} blocks "
                             "under diffusers names: NeMo cannot run on it")
    return layers


def layer_shape(module: torch.nn.Module) -> tuple[int, int]:
    weight = module.weight
    return int(weight.shape[0]), int(weight.shape[1])


@torch.no_grad()
def value_activations(layers: dict[str, torch.nn.Module], embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """NeMo's activation: ``mean over the L tokens of |to_v(embedding)|``, per neuron.

    ``embeddings (P, L, D)`` -> ``{layer: (P, N)}`` float32 on the CPU. Calls each layer's own
    ``forward`` (so ComfyUI's casting linear layers work), no UNet evaluation.
    """
    out = {}
    for name, module in layers.items():
        weight = module.weight
        values = module(embeddings.to(weight.device, weight.dtype))
        out[name] = values.float().abs().mean(dim=1).cpu()
    return out


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def pairwise_ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of ``a[i]`` and ``b[i]`` for ``(P, C, H, W)`` tensors -> ``(P,)``.

    Gaussian windows (11x11, sigma 1.5, as Wang et al.), each channel separately, averaged; the data
    range of a pair is its joint max - min (noise differences have no fixed range).
    """
    a, b = a.float(), b.float()
    channels = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    window = _gaussian_window(size).to(a.device)[None, None].repeat(channels, 1, 1, 1)
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


def seed_consistency(differences: torch.Tensor) -> torch.Tensor:
    """NeMo's memorization score: ``(B, S, C, H, W)`` noise differences -> ``(B,)`` max SSIM over seed pairs."""
    b, s = differences.shape[:2]
    if s < 2:
        raise DejaGuardError("the memorization score compares seeds: at least 2 seeds are needed")
    pairs = list(itertools.combinations(range(s), 2))
    first = differences[:, [i for i, _ in pairs]].flatten(0, 1)
    second = differences[:, [j for _, j in pairs]].flatten(0, 1)
    return pairwise_ssim(first, second).view(b, len(pairs)).max(dim=1).values


SCORES = {"ssim": "max pairwise SSIM of first-step eps(c) - eps('') over seeds (NeMo)",
          "magnitude": "mean over seeds of ||eps(c) - eps('')||_2 at the first step (Wen et al., core.detect)",
          "generation": "max SSIM between the masked model's short guided generation (decoded image) from one "
                        "seed and the unmasked model's from another seed"}
GENERATION_STEPS = 10  # schedule of the "generation" score's short generations


def cross_seed_similarity(generations: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The "generation" score: ``(B, S, C, H, W)`` masked generations and ``(S, C, H, W)`` unmasked ones ->
    ``(B,)``, the max over seed pairs ``i != j`` of SSIM(generations[b, i], reference[j]).

    Different seeds, because the same seed with no mask is trivially identical: for the unmasked model the
    score is the seed consistency of its generations (NeMo's idea, on the final sample), which calibrates the
    threshold on non-memorized prompts. A masked model that still replicates draws every seed to the image the
    unmasked model draws from every other seed; one that collapses to some other common image does not count.
    """
    b, s = generations.shape[:2]
    if s < 2:
        raise DejaGuardError("the memorization score compares seeds: at least 2 seeds are needed")
    pairs = [(i, j) for i in range(s) for j in range(s) if i != j]
    first = generations[:, [i for i, _ in pairs]].flatten(0, 1)
    second = reference[[j for _, j in pairs]].repeat(b, 1, 1, 1)
    return pairwise_ssim(first, second).view(b, len(pairs)).max(dim=1).values


def _check_kind(kind: str) -> str:
    if kind not in SCORES:
        raise DejaGuardError(f"unknown memorization score {kind!r} (one of {', '.join(SCORES)})")
    return kind


@dataclass
class ScoreContext:
    """What stays fixed while one prompt's candidate masks are scored: noise, embeddings, timestep."""

    denoiser: Denoiser
    gates: OutputGates
    cond: torch.Tensor  # (1, L, D)
    uncond: torch.Tensor  # (1, L, D)
    noise: torch.Tensor  # (S, C, H, W), already scaled by the scheduler's init sigma
    timestep: Any
    max_batch: int = 64  # samples per UNet call (uncond + cond); more candidates are split into calls
    kind: str = "ssim"  # SCORES: "ssim" (NeMo's), "magnitude" (our detector's quantity) or "generation"
    generation_steps: int = GENERATION_STEPS  # "generation": steps of its short guided generations
    guidance_scale: float = DEFAULT_GUIDANCE  # "generation": their CFG scale
    reference: torch.Tensor | None = None  # "generation": the unmasked model's images (S, 3, h, w), lazily

    @property
    def seeds(self) -> int:
        return int(self.noise.shape[0])


def first_step_context(denoiser: Denoiser, prompt: str | torch.Tensor, seeds: Sequence[int],
                       gates: OutputGates, num_inference_steps: int = DEFAULT_STEPS,
                       max_batch: int = 64, kind: str = "ssim",
                       generation_steps: int = GENERATION_STEPS) -> ScoreContext:
    """Fixed noise for ``seeds`` and the first timestep of the sampling schedule (trailing spacing: t = 999)."""
    if generation_steps < 1:
        raise DejaGuardError(f"generation_steps must be at least 1, got {generation_steps}")
    scheduler = denoiser.new_scheduler()
    scheduler.set_timesteps(num_inference_steps)
    noise = initial_noise(denoiser, list(seeds)) * scheduler.init_noise_sigma
    cond = denoiser.encode_prompts([prompt]) if isinstance(prompt, str) else prompt
    return ScoreContext(denoiser, gates, cond, denoiser.encode_prompts([""]), noise, scheduler.timesteps[0],
                        max_batch=max_batch, kind=_check_kind(kind), generation_steps=int(generation_steps))


GENERATION_SIZE = 64  # the "generation" score compares decoded images at most this many pixels wide


def _short_generations(ctx: ScoreContext, x: torch.Tensor) -> torch.Tensor:
    """``ctx.generation_steps``-step guided generations from the scaled noise ``x`` ``(n, C, H, W)``, with
    whatever gates are set (guided_denoise's batch layout, [uncond, cond], is the gates'), decoded: images
    ``(n, 3, h, w)``, area-downsampled to at most :data:`GENERATION_SIZE` pixels.

    Images, not latents: measured on the testbed ("chelsea", 93 neurons off, 10 steps), the masked generations
    still replicated (image SSIM to the training image 0.60-0.64, to the unmasked ones 0.66-0.68) while their
    latents' SSIM to the unmasked latents had fallen to 0.42-0.48, below the latent threshold.
    """
    scheduler = ctx.denoiser.new_scheduler()
    samples, _ = guided_denoise(ctx.denoiser, x / scheduler.init_noise_sigma, ctx.cond.expand(x.shape[0], -1, -1),
                                ctx.uncond, ctx.generation_steps, ctx.guidance_scale)
    images = ctx.denoiser.decode(samples).float()
    if max(images.shape[-2:]) > GENERATION_SIZE:
        factor = max(images.shape[-2:]) / GENERATION_SIZE
        size = (max(1, round(images.shape[-2] / factor)), max(1, round(images.shape[-1] / factor)))
        images = F.interpolate(images, size=size, mode="area")
    return images


def seed_features(ctx: ScoreContext, masks: Sequence[dict[str, torch.Tensor] | None],
                  seeds: Sequence[int] | None = None) -> torch.Tensor:
    """What the memorization score compares, per candidate mask and seed: ``(B, s, ...)`` for ``B`` masks and the
    ``s`` seeds ``seeds`` (indices into ``ctx.noise``; default all): the first-step noise differences
    ``eps(x_T, c) - eps(x_T, "")`` ``(C, H, W)`` ("ssim", "magnitude") or the decoded short generations
    ``(3, h, w)`` ("generation"), float32 on the CPU.

    A mask maps layer names to ``(N,)`` gates (1 = on, 0 = off); None is the unmasked model.
    Batch layout per call: ``[uncond x (masks x seeds), cond x (masks x seeds)]``; the gates of a mask
    apply to its unconditional and conditional samples alike (the neuron is off in the whole model).
    """
    index = list(range(ctx.seeds)) if seeds is None else list(seeds)
    s = len(index)
    noise = ctx.noise[index]
    per_call = max(1, ctx.max_batch // (2 * s))
    out = []
    with torch.no_grad():
        for start in range(0, len(masks), per_call):
            chunk = list(masks[start:start + per_call])
            n = len(chunk) * s
            x = noise.repeat(len(chunk), 1, 1, 1)
            gates: dict[str, torch.Tensor | None] = {}
            for name, module in ctx.gates.modules.items():
                if all(m is None or name not in m for m in chunk):
                    gates[name] = None
                    continue
                ones = torch.ones(layer_shape(module)[0])
                rows = torch.stack([(m or {}).get(name, ones).float() for m in chunk])  # (b, N)
                rows = rows.repeat_interleave(s, dim=0)
                gates[name] = torch.cat([rows, rows])
            if ctx.kind == "generation":
                if ctx.reference is None:
                    ctx.gates.set({})
                    ctx.reference = _short_generations(ctx, ctx.noise)
                if all(m is None for m in chunk):  # the unmasked model: its generations are the reference
                    samples = ctx.reference[index].repeat(len(chunk), 1, 1, 1)
                else:
                    ctx.gates.set(gates)
                    samples = _short_generations(ctx, x)
                    ctx.gates.set({})
                out.append(samples.float().cpu().view(len(chunk), s, *samples.shape[1:]))
                continue
            ctx.gates.set(gates)
            context = torch.cat([ctx.uncond.expand(n, -1, -1), ctx.cond.expand(n, -1, -1)])
            eps = ctx.denoiser.predict_noise(torch.cat([x, x]), ctx.timestep, context)
            ctx.gates.set({})
            eps_uncond, eps_cond = eps.float().chunk(2)
            out.append((eps_cond - eps_uncond).cpu().view(len(chunk), s, *eps.shape[1:]))
    return torch.cat(out)


def score_features(ctx: ScoreContext, features: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """The memorization score ``(B,)`` from :func:`seed_features` ``(B, s, ...)`` of the seeds ``seeds``."""
    if ctx.kind == "magnitude":
        return features.flatten(2).norm(dim=2).mean(dim=1)
    if ctx.kind == "generation":
        index = list(range(ctx.seeds)) if seeds is None else list(seeds)
        return cross_seed_similarity(features, ctx.reference[index].float().cpu())
    return seed_consistency(features)


def memorization_scores(ctx: ScoreContext, masks: Sequence[dict[str, torch.Tensor] | None]) -> torch.Tensor:
    """NeMo score of the prompt with each candidate mask switched off: ``B`` masks -> ``(B,)`` (all seeds)."""
    return score_features(ctx, seed_features(ctx, masks))


# ---------------------------------------------------------------------------------------------
# Activation statistics (cached per model)
# ---------------------------------------------------------------------------------------------


def cache_dir(path: str | Path | None = None) -> Path:
    """Where statistics are cached: ``path``, else ``$DEJAGUARD_CACHE``, else ``~/.cache/dejaguard``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dejaguard"


def default_statistics_prompts() -> list[str]:
    """The testbed's 200 calibration captions (non-memorized, disjoint from the held-out prompts)."""
    from .testbed.data import calibration_specs

    return [s.caption() for s in calibration_specs()]


@dataclass
class ActivationStats:
    """Per-neuron mean and std of NeMo activations over non-memorized prompts, and the score threshold."""

    mean: dict[str, torch.Tensor]  # layer -> (N,)
    std: dict[str, torch.Tensor]
    fingerprint: str
    threshold: float  # memorization-score threshold: mean + 1 std over score_prompts
    score_mean: float
    score_std: float
    settings: dict[str, Any]
    prompts_sha: str
    n_prompts: int
    created: str = field(default_factory=_now)

    def zscores(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``|a - mean| / std`` per neuron, ``{layer: (N,)}`` for one prompt's activations ``{layer: (1, N)}``."""
        return {k: ((activations[k][0] - self.mean[k]) / self.std[k].clamp_min(1e-8)).abs() for k in self.mean}

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        header = {"format": STATS_FORMAT, "version": STATS_VERSION, "fingerprint": self.fingerprint,
                  "threshold": self.threshold, "score_mean": self.score_mean, "score_std": self.score_std,
                  "settings": self.settings, "prompts_sha": self.prompts_sha, "n_prompts": self.n_prompts,
                  "created": self.created}
        tensors = {f"mean/{k}": v.contiguous() for k, v in self.mean.items()}
        tensors.update({f"std/{k}": v.contiguous() for k, v in self.std.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})
        tmp.replace(path)  # atomic: a CLI and a ComfyUI server may share the cache
        return path

    @classmethod
    def load(cls, path: Path) -> ActivationStats:
        tensors, h = _read_safetensors(path, STATS_FORMAT, STATS_VERSION, "statistics file")
        mean = {k[5:]: v for k, v in tensors.items() if k.startswith("mean/")}
        std = {k[4:]: v for k, v in tensors.items() if k.startswith("std/")}
        return cls(mean=mean, std=std, fingerprint=h["fingerprint"], threshold=float(h["threshold"]),
                   score_mean=float(h["score_mean"]), score_std=float(h["score_std"]), settings=h["settings"],
                   prompts_sha=h["prompts_sha"], n_prompts=int(h["n_prompts"]), created=h.get("created", ""))


def _prompts_sha(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]


def nemo_statistics(
    denoiser: Denoiser,
    prompts: Sequence[str] | None = None,
    seeds: int = 4,
    score_prompts: int = 64,
    num_inference_steps: int = DEFAULT_STEPS,
    cache: str | Path | None = None,
    use_cache: bool = True,
    progress: Progress | None = None,
    max_batch: int = 64,
    score: str = "ssim",
    blocks: str = "down_mid",
    generation_steps: int = GENERATION_STEPS,
) -> ActivationStats:
    """Activation statistics and the memorization-score threshold for ``denoiser``, cached per model.

    ``prompts``: non-memorized prompts (default :func:`default_statistics_prompts`); all of them give
    the activation mean and std (text encoder + one linear layer each, cheap); the first
    ``score_prompts`` give the score threshold (``2 * seeds`` noise predictions each). The cache file
    is ``cache_dir(cache)/nemo-<fingerprint>-<settings hash>.safetensors``.
    """
    prompts = list(prompts) if prompts is not None else default_statistics_prompts()
    if len(prompts) < 2:
        raise DejaGuardError("activation statistics need at least 2 non-memorized prompts")
    settings = {"seeds": int(seeds), "score_prompts": min(int(score_prompts), len(prompts)),
                "num_inference_steps": int(num_inference_steps), "score": _check_kind(score),
                "threshold_rule": "mean + 1 std", "blocks": blocks}
    if score == "generation":
        settings.update(generation_steps=int(generation_steps), generation_images=f"decoded, <= {GENERATION_SIZE}px")
    sha = _prompts_sha(prompts)
    key = hashlib.sha256(json.dumps([settings, sha], sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir(cache) / f"nemo-{denoiser.fingerprint()}-{key}.safetensors"
    if use_cache and path.is_file():
        try:
            stats = ActivationStats.load(path)
            if stats.fingerprint == denoiser.fingerprint() and stats.prompts_sha == sha:
                return stats
        except DejaGuardError:
            pass  # a broken cache entry is recomputed
    layers = nemo_layers(denoiser, blocks)
    sums = {k: torch.zeros(layer_shape(m)[0], dtype=torch.float64) for k, m in layers.items()}
    squares = {k: torch.zeros_like(v) for k, v in sums.items()}
    chunk = 32
    total_steps = math.ceil(len(prompts) / chunk) + settings["score_prompts"]
    done = 0
    for start in range(0, len(prompts), chunk):
        acts = value_activations(layers, denoiser.encode_prompts(prompts[start:start + chunk]))
        for k, v in acts.items():
            sums[k] += v.double().sum(0)
            squares[k] += (v.double() ** 2).sum(0)
        done += 1
        if progress:
            progress(done / total_steps, "activation statistics")
    n = len(prompts)
    mean = {k: (sums[k] / n).float() for k in sums}
    std = {k: ((squares[k] / n - (sums[k] / n) ** 2).clamp_min(0) * n / (n - 1)).sqrt().float() for k in sums}
    scores = []
    with OutputGates(layers) as gates:
        for p in prompts[: settings["score_prompts"]]:
            ctx = first_step_context(denoiser, p, range(seeds), gates, num_inference_steps, max_batch, score,
                                     generation_steps)
            scores.append(float(memorization_scores(ctx, [None])[0]))
            done += 1
            if progress:
                progress(done / total_steps, "score threshold")
    values = torch.tensor(scores, dtype=torch.float64)
    score_mean = float(values.mean())
    score_std = float(values.std()) if len(scores) > 1 else 0.0
    stats = ActivationStats(mean=mean, std=std, fingerprint=denoiser.fingerprint(),
                            threshold=score_mean + score_std, score_mean=score_mean, score_std=score_std,
                            settings=settings, prompts_sha=sha, n_prompts=n)
    if use_cache:
        try:
            stats.save(path)
        except OSError:
            pass  # a read-only cache only costs the recomputation next time
    return stats


# ---------------------------------------------------------------------------------------------
# NeMo localization
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalizeSettings:
    """How :func:`localize` searches. ``schedule``: ``"fast"`` (batched searches) or ``"reference"``."""

    seeds: int = 4  # fixed initial noises (seeds 0..S-1), reused for every candidate
    num_inference_steps: int = DEFAULT_STEPS  # schedule the first timestep is taken from
    z_start: float = 5.0  # initial-selection z-score threshold at j = 0
    z_step: float = 0.25  # threshold decrement per step j (the top-k grows by 1 per step)
    schedule: str = "fast"
    batch: int = 2  # candidate masks per UNet call in the fast searches (more: fewer calls, more wasted trials)
    max_batch: int = 64  # samples per UNet call
    score: str = "ssim"  # memorization score: "ssim" (NeMo) or "magnitude" (see SCORES)
    blocks: str = "down_mid"  # search space (NEMO_BLOCKS): the paper's down and mid blocks, or "all"
    generation_steps: int = GENERATION_STEPS  # score "generation": steps of its short generations
    verify_rounds: int = 0  # > 0: check each mask on `seeds` unseen seeds; a failing set joins the search (max rounds)
    # fast schedule: score a candidate on two seeds first and the others only if it passes there (max-type scores:
    # the same verdicts, fewer noise predictions for the candidates that fail)
    early_stop: bool = True

    def __post_init__(self) -> None:
        _check_kind(self.score)
        if self.schedule not in ("fast", "reference"):
            raise DejaGuardError(f"unknown schedule {self.schedule!r} (fast or reference)")
        if self.seeds < 2 or self.batch < 1 or self.z_step <= 0 or self.verify_rounds < 0:
            raise DejaGuardError("NeMo needs at least 2 seeds, batch >= 1, z_step > 0 and verify_rounds >= 0")
        if self.generation_steps < 1:
            raise DejaGuardError(f"generation_steps must be at least 1, got {self.generation_steps}")


Neuron = tuple[str, int]
EARLY_STOP_SCORES = ("ssim", "generation")  # maxima over seed pairs: two seeds can already prove a failure


def neurons_mask(denoiser: Denoiser, layers: dict[str, torch.nn.Module], neurons: Iterable[Neuron],
                 **fields: Any) -> NeuronMask:
    """A :class:`NeuronMask` switching off ``neurons`` ((layer, index) pairs of ``layers``) on ``denoiser``;
    ``fields`` are the other :class:`NeuronMask` fields (method, prompts, thresholds, settings, info)."""
    grouped: dict[str, list[int]] = {k: [] for k in layers}  # model order
    for name, i in neurons:
        if name not in grouped:
            raise DejaGuardError(f"neuron of {name}, which is not one of the given layers")
        grouped[name].append(int(i))
    grouped = {k: v for k, v in grouped.items() if v}
    return NeuronMask(layers={k: torch.tensor(v, dtype=torch.int64) for k, v in grouped.items()},
                      layer_shapes={k: layer_shape(m) for k, m in layers.items() if k in grouped},
                      fingerprint=denoiser.fingerprint(), **fields)


def zscore_ranking(denoiser: Denoiser, prompt: str, stats: ActivationStats,
                   layers: dict[str, torch.nn.Module]) -> list[Neuron]:
    """Every neuron of ``layers`` (the statistics' layers), most suspicious first: NeMo's z-score of ``prompt``'s
    activation, descending, over all layers at once (ties in model order)."""
    if set(layers) != set(stats.mean):
        raise DejaGuardError("the activation statistics were computed on other layers: recompute them for these")
    z = stats.zscores(value_activations(layers, denoiser.encode_prompts([prompt])))
    flat = [(-float(z[name][i]), position, i, name) for position, name in enumerate(layers)
            for i in range(z[name].shape[0])]
    return [(name, i) for _, _, i, name in sorted(flat)]


class _Search:
    """Scores candidate sets of switched-off neurons; counts evaluations; never scores a set twice.

    With several contexts (seed sets, :func:`localize`'s verification rounds) a set's score is the maximum over
    them: it passes only where it passes on every seed set.
    """

    def __init__(self, ctx: ScoreContext, threshold: float, progress: Callable[[], None],
                 early_stop: bool = False) -> None:
        self.contexts = [ctx]
        self.threshold = threshold
        self.memos: list[dict[frozenset[Neuron], float]] = [{}]
        self.partial: list[set[frozenset[Neuron]]] = [set()]  # sets whose memo is a two-seed lower bound
        self.evaluations = 0
        self.progress = progress
        self.early_stop = early_stop
        self.sizes = {name: layer_shape(m)[0] for name, m in ctx.gates.modules.items()}

    def add_context(self, ctx: ScoreContext) -> None:
        self.contexts.append(ctx)
        self.memos.append({})
        self.partial.append(set())

    def _gates(self, off: frozenset[Neuron]) -> dict[str, torch.Tensor] | None:
        if not off:
            return None
        gates: dict[str, torch.Tensor] = {}
        for name, i in off:
            gates.setdefault(name, torch.ones(self.sizes[name]))[i] = 0.0
        return gates

    def scores(self, sets: Sequence[frozenset[Neuron]], exact: bool = False) -> list[float]:
        """Each set's score; with ``early_stop``, a set that already fails on the first two seeds is recorded with
        that score (a lower bound of its full score, which is a maximum over more seed pairs: the same verdict).
        ``exact``: full scores only (a lower bound on record is replaced)."""
        for ctx, memo, partial in zip(self.contexts, self.memos, self.partial):
            todo = [s for s in dict.fromkeys(sets) if s not in memo or exact and s in partial]
            self.evaluations += len(todo)
            if not todo:
                continue
            if exact or not (self.early_stop and ctx.kind in EARLY_STOP_SCORES and ctx.seeds > 2):
                memo.update(zip(todo, memorization_scores(ctx, [self._gates(s) for s in todo]).tolist()))
                partial.difference_update(todo)
                continue
            first, rest = [0, 1], list(range(2, ctx.seeds))
            gates = [self._gates(s) for s in todo]
            head = seed_features(ctx, gates, first)
            scores_2 = score_features(ctx, head, first).tolist()
            alive = [i for i, v in enumerate(scores_2) if v < self.threshold]
            failed = [i for i in range(len(todo)) if scores_2[i] >= self.threshold]
            memo.update((todo[i], scores_2[i]) for i in failed)
            partial.update(todo[i] for i in failed)
            if alive:
                tail = seed_features(ctx, [gates[i] for i in alive], rest)
                full = score_features(ctx, torch.cat([head[alive], tail], dim=1), first + rest)
                memo.update(zip([todo[i] for i in alive], full.tolist()))
        self.progress()
        return [max(memo[s] for memo in self.memos) for s in sets]

    def passes(self, sets: Sequence[frozenset[Neuron]]) -> list[bool]:
        return [v < self.threshold for v in self.scores(sets)]


def _first_true(n: int, test: Callable[[list[int]], list[bool]], batch: int,
                known_true: int | None = None) -> int | None:
    """Smallest ``i`` in ``[0, n)`` with ``test(i)`` true, for a predicate assumed monotone (false ... true);
    None if none is.

    ``test`` takes a list of indices and evaluates them together (one batched UNet call). While no true
    index is known, probes gallop (0, 1, 3, 7, ..., and finally ``n - 1``), ``batch`` per call: cheap when
    the answer is small. Once a bracket ``(lo, hi]`` is known (or ``known_true`` is given), each call
    splits it into ``batch + 1`` parts. With non-monotone data the index returned is still a true one, and
    None is exact: if the gallop reaches ``n - 1`` without a true index, the indices it skipped are scanned
    in order, ``batch`` per call (a memorization score can rise again when more neurons are switched off).
    """
    lo, hi = -1, known_true
    tested: set[int] = set()
    while hi is None or hi - lo > 1:
        if hi is None:
            points: list[int] = []
            p = 0
            while len(points) < batch:
                if p > lo:
                    points.append(min(p, n - 1))
                if p >= n - 1:
                    break
                p = 2 * p + 1
            points = sorted(set(points))
            if not points:
                return None
        else:
            gap = hi - lo - 1  # untested indices strictly inside the bracket
            k = min(batch, gap)
            points = sorted({lo + max(1, round((j + 1) * (gap + 1) / (k + 1))) for j in range(k)})
            points = [q for q in points if lo < q < hi] or [lo + 1]
        tested.update(points)
        for q, ok in zip(points, test(points)):
            if ok:
                hi = q if hi is None else min(hi, q)
                break
            lo = max(lo, q)
        if hi is None and lo >= n - 1:
            skipped = [i for i in range(n) if i not in tested]
            for start in range(0, len(skipped), batch):
                chunk = skipped[start:start + batch]
                for q, ok in zip(chunk, test(chunk)):
                    if ok:
                        return q
            return None
    return hi


def _speculate(queue: Sequence[Neuron], off: frozenset[Neuron], search: _Search, batch: int,
               keep_rate: float) -> tuple[bool, ...]:
    """The sequential scan's next decisions (True = the neuron is dropped, i.e. re-enabled) for ``queue``,
    with ``off`` switched off now, from one batched evaluation of up to ``batch`` speculative trials.

    The scan's decisions form a binary tree: the trial for ``queue[k]`` depends on the decisions for
    ``queue[:k]``. The ``batch`` most probable tree nodes (a neuron is kept with probability ``keep_rate``)
    are evaluated at once; the decisions are read along the realized path. Exact: the same decisions as
    evaluating the trials one by one. At least one decision per call (the root is always evaluated).
    """
    import heapq

    heap: list[tuple[float, tuple[bool, ...]]] = [(-1.0, ())]
    chosen: list[tuple[bool, ...]] = []
    while heap and len(chosen) < batch:
        neg_p, path = heapq.heappop(heap)
        if len(path) >= len(queue):
            continue
        chosen.append(path)
        heapq.heappush(heap, (neg_p * (1 - keep_rate), (*path, True)))
        heapq.heappush(heap, (neg_p * keep_rate, (*path, False)))

    def trial(path: tuple[bool, ...]) -> frozenset[Neuron]:
        dropped = {queue[k] for k, drop in enumerate(path) if drop}
        return off - dropped - {queue[len(path)]}

    results = dict(zip(chosen, search.passes([trial(p) for p in chosen])))
    path: tuple[bool, ...] = ()
    while path in results:
        path = (*path, results[path])
    return path


def _refine_neurons(queue: list[Neuron], search: Any, batch: int, fast: bool,
                    on_progress: Callable[[float], None] = lambda f: None) -> list[Neuron]:
    """NeMo's refinement by neuron: in ``queue`` order, re-enable each neuron of the switched-off set ``queue``
    and keep it re-enabled if ``search.passes`` still holds; returns the neurons that stay off.

    ``fast=False``: the sequential scan, one trial per call. ``fast=True``: the same scan from batched calls of up
    to ``batch`` trials: a search for the next kept neuron while kept neurons are rare (assumes the score does not
    fall when more neurons are re-enabled), exact speculation over the next decisions (:func:`_speculate`) once
    they are common.
    """
    total = max(1, len(queue))
    current = frozenset(queue)
    kept_list: list[Neuron] = []
    if fast:
        remaining, decisions, keeps = queue, 0, 0
        while remaining:
            on_progress(1 - len(remaining) / total)
            keep_rate = (keeps + 1) / (decisions + 2)  # Laplace estimate of how often a neuron is kept
            if decisions == 0 or keep_rate < 1 / (2 * batch + 1):
                # sparse: search for the first neuron the scan keeps (monotone score assumed)
                base = frozenset(kept_list) | frozenset(remaining)

                def fails(ps: list[int], rem: list[Neuron] = remaining, base: frozenset = base) -> list[bool]:
                    # p: re-enable rem[0..p]; failing = memorization back
                    return [not ok for ok in search.passes([base - frozenset(rem[: p + 1]) for p in ps])]

                # re-enabling every candidate is the unmasked model, which fails: known the first time
                known = len(remaining) - 1 if not kept_list else None
                first_fail = _first_true(len(remaining), fails, batch, known_true=known)
                if first_fail is None:
                    decisions += len(remaining)
                    remaining = []
                    break
                kept_list.append(remaining[first_fail])
                decisions, keeps = decisions + first_fail + 1, keeps + 1
                remaining = remaining[first_fail + 1:]
            else:
                # dense: exact speculation over the scan's next decisions (no monotonicity assumed)
                path = _speculate(remaining, frozenset(kept_list) | frozenset(remaining), search, batch,
                                  keep_rate)
                kept_list.extend(n for n, drop in zip(remaining, path) if not drop)
                decisions, keeps = decisions + len(path), keeps + path.count(False)
                remaining = remaining[len(path):]
    else:
        current_set = set(current)
        for count, neuron in enumerate(queue):
            on_progress(count / total)
            trial = frozenset(current_set - {neuron})
            if search.passes([trial])[0]:
                current_set.discard(neuron)
            else:
                kept_list.append(neuron)
    return kept_list


def localize(
    denoiser: Denoiser,
    prompt: str,
    stats: ActivationStats | None = None,
    settings: LocalizeSettings | None = None,
    threshold: float | None = None,
    progress: Progress | None = None,
) -> NeuronMask:
    """NeMo: the ``attn2.to_v`` neurons (down and mid blocks) whose deactivation stops ``prompt``'s memorization.

    Returns a :class:`NeuronMask` of kind "neurons"; empty when the prompt's score is already below the
    threshold (not memorized by NeMo's measure; ``info["memorized"]`` is False). ``threshold``
    overrides the statistics' threshold. DejaGuardError if even switching off every neuron of these
    layers leaves the score above the threshold (the memorization is not localized there).
    ``mask.info`` records scores, candidate counts per stage, UNet evaluations and wall time.
    """
    settings = settings or LocalizeSettings()
    if not prompt.strip():
        raise DejaGuardError("the prompt is empty: nothing to localize")
    stats = stats or nemo_statistics(denoiser, seeds=settings.seeds, num_inference_steps=settings.num_inference_steps,
                                     score=settings.score, blocks=settings.blocks,
                                     generation_steps=settings.generation_steps)
    if stats.settings.get("score", "ssim") != settings.score:
        raise DejaGuardError(f"the statistics calibrate the {stats.settings.get('score')!r} score, the search uses "
                             f"{settings.score!r}: compute statistics with score={settings.score!r}")
    if settings.score == "generation" and stats.settings.get("generation_steps") != settings.generation_steps:
        raise DejaGuardError(f"the statistics calibrate {stats.settings.get('generation_steps')}-step generations, "
                             f"the search uses {settings.generation_steps}: recompute them with those steps")
    if stats.fingerprint != denoiser.fingerprint():
        raise DejaGuardError(f"activation statistics are for model {stats.fingerprint}, not {denoiser.fingerprint()}")
    tau = float(stats.threshold if threshold is None else threshold)
    layers = nemo_layers(denoiser, settings.blocks)
    if set(layers) != set(stats.mean):
        raise DejaGuardError(f"activation statistics were computed on other layers than the {settings.blocks!r} "
                             "blocks: recompute them with the same blocks")
    start_time = time.perf_counter()
    before = denoiser.counter.snapshot()
    fast = settings.schedule == "fast"
    batch = settings.batch if fast else 1
    cond = denoiser.encode_prompts([prompt])
    z = stats.zscores(value_activations(layers, cond))
    stage = {"name": "score", "lo": 0.0, "hi": 0.05, "frac": 0.0}

    def report() -> None:
        if progress:
            progress(stage["lo"] + (stage["hi"] - stage["lo"]) * min(1.0, stage["frac"]), str(stage["name"]))

    def enter(name: str, lo: float, hi: float) -> None:
        stage.update(name=name, lo=lo, hi=hi, frac=0.0)
        report()

    with OutputGates(layers) as gates:
        ctx = first_step_context(denoiser, cond, range(settings.seeds), gates, settings.num_inference_steps,
                                 settings.max_batch, settings.score, settings.generation_steps)
        search = _Search(ctx, tau, progress=report, early_stop=fast and settings.early_stop)
        (score_before,) = search.scores([frozenset()], exact=True)
        info: dict[str, Any] = {"score_before": score_before, "threshold": tau, "memorized": score_before >= tau}
        kept: frozenset[Neuron] = frozenset()
        ranked = {k: torch.argsort(v, descending=True).tolist() for k, v in z.items()}
        n_steps = math.ceil(settings.z_start / settings.z_step) + 1  # the last step selects every neuron

        def candidates(j: int) -> frozenset[Neuron]:
            theta = settings.z_start - j * settings.z_step
            chosen = {(k, int(i)) for k, v in z.items() for i in torch.nonzero(v > theta).flatten().tolist()}
            chosen |= {(k, i) for k, order in ranked.items() for i in order[:j]}
            return frozenset(chosen)

        verification: list[dict[str, Any]] = []
        for round_index in range(max(1, settings.verify_rounds)):
            if score_before < tau:
                break
            # -- initial selection: nested candidate sets C_j ---------------------------------
            enter("initial selection", 0.05, 0.3)

            def test_steps(js: list[int]) -> list[bool]:
                stage["frac"] = max(js) / n_steps
                return search.passes([candidates(j) for j in js])

            if fast:
                j_star = _first_true(n_steps, test_steps, batch)
            else:
                j_star = next((j for j in range(n_steps) if test_steps([j])[0]), None)
            if j_star is None:
                raise DejaGuardError(
                    f"switching off all {sum(len(v) for v in z.values())} neurons of the {len(layers)} "
                    f"{settings.blocks} attn2.to_v layers leaves the memorization score above the threshold "
                    f"{tau:.3f}: this prompt's memorization is not localized in these neurons")
            current = candidates(j_star)
            info.update(initial_step=j_star, initial_z_threshold=settings.z_start - j_star * settings.z_step,
                        initial_candidates=len(current), evaluations_initial=search.evaluations - 1)
            mark = search.evaluations

            # -- refinement by layer (model order) ---------------------------------------------
            enter("layer refinement", 0.3, 0.4)
            order = [k for k in layers if any(n[0] == k for n in current)]
            i = 0
            while i < len(order):
                stage["frac"] = i / len(order)
                if fast:  # exact prefix speculation: re-enable layers order[i..m] for every m at once
                    prefixes, removed = [], set(current)
                    for k in order[i:]:
                        removed -= {n for n in current if n[0] == k}
                        prefixes.append(frozenset(removed))
                    ok = search.passes(prefixes)
                    m = next((p for p, good in enumerate(ok) if not good), len(ok))
                    if m > 0:
                        current = prefixes[m - 1]
                    i += m + 1  # layer order[i + m] is kept (or the end is reached)
                else:
                    trial = frozenset(n for n in current if n[0] != order[i])
                    if search.passes([trial])[0]:
                        current = trial
                    i += 1
            info.update(after_layer_refinement=len(current), evaluations_layer=search.evaluations - mark)
            mark = search.evaluations

            # -- refinement by neuron (ascending z: least suspicious first) ---------------------
            enter("neuron refinement", 0.4, 1.0)
            queue = sorted(current, key=lambda n: (float(z[n[0]][n[1]]), n))

            def neuron_progress(fraction: float) -> None:
                stage["frac"] = fraction
                report()

            kept_list = _refine_neurons(queue, search, batch, fast, neuron_progress)
            kept = frozenset(kept_list)
            (score_after,) = search.scores([kept])
            if score_after >= tau:  # possible only where the score is not monotone; never return a failing mask
                kept = current
                score_after = search.scores([kept])[0]
                info["refinement_fallback"] = True
            info.update(score_after=score_after, evaluations_neuron=search.evaluations - mark)
            if settings.verify_rounds == 0:
                break
            # -- verification on the next, unseen seeds; a failing seed set joins the search -------
            enter(f"verification {round_index + 1}", 0.95, 1.0)
            held_seeds = range((round_index + 1) * settings.seeds, (round_index + 2) * settings.seeds)
            held = first_step_context(denoiser, cond, held_seeds, gates, settings.num_inference_steps,
                                      settings.max_batch, settings.score, settings.generation_steps)
            held_before, held_after = memorization_scores(held, [None, search._gates(kept)]).tolist()
            search.evaluations += 2
            passed = held_after < tau
            verification.append({"seeds": list(held_seeds), "score_unmasked": held_before,
                                 "score_masked": held_after, "passed": passed, "neurons": len(kept)})
            if passed or round_index + 1 == settings.verify_rounds:
                break
            search.add_context(held)
            search.memos[-1].update({frozenset(): held_before, kept: held_after})
        if verification:
            info.update(verification=verification, verified=verification[-1]["passed"])
        stage.update(frac=1.0)
        report()
    spent = denoiser.counter.since(before)
    info.update(neurons=len(kept), candidate_evaluations=search.evaluations, unet_evals=spent.forwards,
                unet_calls=spent.calls, wall_s=round(time.perf_counter() - start_time, 3))
    return neurons_mask(
        denoiser, layers, kept, method="nemo", prompts=[prompt],
        thresholds={"memorization_score": tau, "score": SCORES[settings.score],
                    "statistics_threshold_rule": stats.settings.get("threshold_rule", "")},
        settings={**{k: getattr(settings, k) for k in settings.__dataclass_fields__},
                  "statistics": {**stats.settings, "n_prompts": stats.n_prompts, "prompts_sha": stats.prompts_sha}},
        info=info,
    )

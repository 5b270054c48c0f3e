"""Neuron masks as data: the file format, the compatibility check, and switching a mask on.

A :class:`NeuronMask` maps diffusers-style layer names
(``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v``) to indices: ``(k,)`` output
channels ("neurons": rows of the weight, and of the bias if there is one) or ``(k, 2)`` weight
entries ``(row, col)`` (pruned weights, :mod:`core.prune`). One file format for every method (NeMo,
:mod:`core.nemo`; the FFN subspace, :mod:`core.prune`): safetensors (never pickle) with a JSON header in the
safetensors metadata holding the model fingerprint, the method, the prompts, thresholds, the creation
settings and the weight shape of every layer. :meth:`NeuronMask.check` refuses a mask made for another
model (fingerprint; overridable) or for another architecture (layer shapes; never overridable).

Two ways to switch neurons off, with the same effect on a prediction (tested):

- :func:`apply_mask`: for the duration of a ``with`` block, scale the masked weights by ``1 - strength``
  in place and restore the saved values exactly on exit. The ComfyUI nodes apply the same mask as
  weight patches on a clone of the MODEL.
- :class:`OutputGates`: forward hooks that multiply each layer's output by a per-sample gate, so that
  one batched UNet call evaluates several candidate masks at once (NeMo's searches).

Why a module of its own: the format is shared by methods that know nothing of each other (``core.prune``
imports this module, never NeMo), and by the ComfyUI nodes, which only load, check and apply masks.

Shapes: ``N`` output channels (neurons) of a layer, ``k`` masked indices, ``(out, in)`` a weight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .denoiser import Denoiser
from .errors import DejaGuardError

MASK_FORMAT = "dejaguard.neuron_mask"
MASK_VERSION = 1
METADATA_KEY = "dejaguard"  # the safetensors metadata entry holding a DejaGuard file's JSON header

Neuron = tuple[str, int]  # (layer name, output channel)


def now() -> str:
    """UTC time stamp of a DejaGuard file (``2026-01-31T12:00:00Z``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def layer_shape(module: torch.nn.Module) -> tuple[int, int]:
    """A linear layer's weight shape ``(out, in)``."""
    weight = module.weight
    return int(weight.shape[0]), int(weight.shape[1])


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
    created: str = field(default_factory=now)
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
        tensors, header = read_dejaguard_file(path, MASK_FORMAT, MASK_VERSION, "neuron mask")
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


def read_dejaguard_file(path: Path, fmt: str, version: int, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and the JSON header of a DejaGuard safetensors file of format ``fmt`` (a mask, NeMo statistics), at
    most version ``version``; DejaGuardError for anything else (``what`` names the file kind in the message)."""
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
    try:
        file_version = int(header.get("version", 0))
    except (TypeError, ValueError) as err:
        raise DejaGuardError(f"malformed {what} header in {path}: version {header.get('version')!r}") from err
    if file_version > version:
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


def neurons_mask(denoiser: Denoiser, layers: dict[str, torch.nn.Module], neurons: Iterable[Neuron],
                 **fields: Any) -> NeuronMask:
    """A :class:`NeuronMask` switching off ``neurons`` ((layer, index) pairs of ``layers``) on ``denoiser``;
    ``fields`` are the other :class:`NeuronMask` fields (method, prompts, thresholds, settings, info)."""
    return shaped_neurons_mask(neurons, {k: layer_shape(m) for k, m in layers.items()}, denoiser.fingerprint(),
                               **fields)


def shaped_neurons_mask(neurons: Iterable[Neuron], layer_shapes: dict[str, tuple[int, int]], fingerprint: str,
                        **fields: Any) -> NeuronMask:
    """A :class:`NeuronMask` switching off ``neurons`` ((layer, index) pairs) of layers with the weight shapes
    ``layer_shapes`` (in model order) on the model ``fingerprint``, without the model at hand: e.g. a subset of a
    ground-truth mask (``NeuronMask(..., layer_shapes=truth.layer_shapes, ...)``)."""
    grouped: dict[str, list[int]] = {k: [] for k in layer_shapes}  # model order
    for name, i in neurons:
        if name not in grouped:
            raise DejaGuardError(f"neuron of {name}, which is not one of the given layers")
        grouped[name].append(int(i))
    grouped = {k: v for k, v in grouped.items() if v}
    return NeuronMask(layers={k: torch.tensor(v, dtype=torch.int64) for k, v in grouped.items()},
                      layer_shapes={k: v for k, v in layer_shapes.items() if k in grouped},
                      fingerprint=fingerprint, **fields)



FFN_OUT, FFN_IN = "ff.net.2", "ff.net.0.proj"  # an FFN hidden unit j: row j of ff.net.0.proj, column j of ff.net.2


def mask_units(mask: NeuronMask) -> set[Neuron]:
    """The neurons a mask touches, as ``(layer, channel)`` pairs: a neuron mask's indices ``(k,)`` as they are; a
    weight-entry mask's ``(k, 2)`` entries by their output row (a row with at least one masked weight counts as one
    touched neuron), except on an FFN's output layer ``...ff.net.2``, whose entry ``(row, j)`` is a weight *of FFN
    hidden unit j* and counts as neuron ``(...ff.net.0.proj, j)`` (the unit that row ``j`` of the FFN's input
    projection computes: the unit a ground truth of FFN neurons names, and what Chavhan et al.'s Wanda-style scores
    rank by its input activation ``||X_j||``). The unit :func:`recall_precision` counts in."""
    units: set[Neuron] = set()
    for name, idx in mask.layers.items():
        if idx.ndim == 2 and name.endswith(FFN_OUT):
            ffn_in = name[: -len(FFN_OUT)] + FFN_IN
            units.update((ffn_in, int(j)) for j in idx[:, 1].tolist())
            continue
        rows = idx if idx.ndim == 1 else idx[:, 0]
        units.update((name, int(i)) for i in rows.tolist())
    return units


def recall_precision(found: NeuronMask, truth: NeuronMask) -> tuple[float, float]:
    """How well a mask found by a method (NeMo, the FFN subspace) matches a ground-truth mask, neuron by neuron.

    Both masks are reduced to sets of ``(layer, channel)`` neurons (:func:`mask_units`): a neuron mask's indices
    directly, a weight-entry mask's by output row (a row with any masked weight is one neuron), an FFN output
    layer's pruned weights by the FFN hidden unit they belong to, so a ground truth of neurons and a method's
    pruned weights compare in the same unit.
    ``recall`` = |found & truth| / |truth|, ``precision`` = |found & truth| / |found|.
    Undefined values are NaN: recall when ``truth`` is empty, precision when ``found`` is empty (a method that
    found nothing has no precision; its recall is 0). A layer both masks name must have the same weight shape
    in both (DejaGuardError otherwise: they were made for different architectures). Fingerprints are not
    compared: a ground truth may be recorded before the model file that it describes is written.
    """
    for name in found.layer_shapes.keys() & truth.layer_shapes.keys():
        if tuple(found.layer_shapes[name]) != tuple(truth.layer_shapes[name]):
            raise DejaGuardError(f"the masks disagree on the shape of layer {name}: {found.layer_shapes[name]} "
                                 f"vs {truth.layer_shapes[name]} (made for different models)")
    got, want = mask_units(found), mask_units(truth)
    hits = len(got & want)
    recall = hits / len(want) if want else float("nan")
    precision = hits / len(got) if got else float("nan")
    return recall, precision

"""NeMo's activation statistics: per-neuron mean and std over non-memorized prompts, and the score threshold.

For each neuron of the search space (:func:`~core.nemo.score.nemo_layers`) the mean and std of its value
activation over non-memorized prompts (the testbed's calibration captions by default) give the z-scores of a
prompt's activations (:meth:`ActivationStats.zscores`) from which NeMo's initial selection starts. The
memorization-score threshold is NeMo's: mean + 1 std of the score over the first ``score_prompts`` of those
prompts. Why cached: the threshold costs ``2 S`` noise predictions per prompt (64 prompts by default), and a
model's statistics do not change; the CLI and a ComfyUI server share the cache.

Cache: one safetensors file per model fingerprint and settings, ``cache_dir()/nemo-<fingerprint>-<key>``
(tensors ``mean/<layer>`` and ``std/<layer>``, each ``(N,)``; the rest in the JSON header). An entry that
cannot be read, lacks a field, or does not match the model, prompts, settings or layers it is looked up for
is recomputed with a warning, never trusted and never an error.

Shapes: ``N`` neurons of a layer, ``P`` prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..denoiser import Denoiser
from ..errors import DejaGuardError
from ..neuron_mask import METADATA_KEY, Neuron, OutputGates, now, read_dejaguard_file
from ..progress import Progress, report
from ..sampling import DEFAULT_STEPS
from .score import (
    GENERATION_SIZE,
    GENERATION_STEPS,
    check_score_kind,
    first_step_context,
    first_step_noise,
    memorization_scores,
    nemo_layers,
    neuron_activations,
    neuron_count,
)

STATS_FORMAT = "dejaguard.nemo_statistics"
STATS_VERSION = 1
CACHE_ENV = "DEJAGUARD_CACHE"


def cache_dir(path: str | Path | None = None) -> Path:
    """Where statistics are cached: ``path``, else ``$DEJAGUARD_CACHE``, else ``~/.cache/dejaguard``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dejaguard"


def default_statistics_prompts() -> list[str]:
    """The testbed's 200 calibration captions (non-memorized, disjoint from the held-out prompts).

    The default of :func:`nemo_statistics` when no prompts are given: the testbed is explicitly the default
    model here, so the testbed package is imported only when this default is used.
    """
    from ..testbed.data import calibration_specs

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
    created: str = field(default_factory=now)

    def zscores(self, activations: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``|a - mean| / std`` per neuron, ``{layer: (N,)}`` for one prompt's activations ``{layer: (1, N)}``."""
        return {k: ((activations[k][0] - self.mean[k]) / self.std[k].clamp_min(1e-8)).abs() for k in self.mean}

    def save(self, path: Path) -> Path:
        """Write the statistics atomically (a CLI and a ComfyUI server may share the cache)."""
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
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> ActivationStats:
        """Read a file written by :meth:`save`; DejaGuardError if it is unreadable or lacks a field."""
        tensors, h = read_dejaguard_file(path, STATS_FORMAT, STATS_VERSION, "statistics file")
        mean = {k[5:]: v for k, v in tensors.items() if k.startswith("mean/")}
        std = {k[4:]: v for k, v in tensors.items() if k.startswith("std/")}
        try:
            stats = cls(mean=mean, std=std, fingerprint=str(h["fingerprint"]), threshold=float(h["threshold"]),
                        score_mean=float(h["score_mean"]), score_std=float(h["score_std"]),
                        settings=dict(h["settings"]), prompts_sha=str(h["prompts_sha"]),
                        n_prompts=int(h["n_prompts"]), created=str(h.get("created", "")))
        except KeyError as err:
            raise DejaGuardError(f"incomplete statistics file {path}: its header lacks {err}") from err
        except (TypeError, ValueError) as err:
            raise DejaGuardError(f"malformed statistics file {path}: {err}") from err
        if set(mean) != set(std) or not mean:
            raise DejaGuardError(f"incomplete statistics file {path}: mean and std of different or no layers")
        return stats

    def mismatch(self, fingerprint: str, prompts_sha: str, settings: dict[str, Any],
                 layers: dict[str, torch.nn.Module]) -> str:
        """Why these statistics do not serve the given model, prompts, settings and layers; "" if they do."""
        if self.fingerprint != fingerprint:
            return f"made for model {self.fingerprint}, not {fingerprint}"
        if self.prompts_sha != prompts_sha:
            return "made from other prompts"
        if self.settings != settings:
            return f"made with settings {self.settings}, not {settings}"
        if set(self.mean) != set(layers):
            return "made for other layers"
        for name, module in layers.items():
            size = neuron_count(name, module)
            if tuple(self.mean[name].shape) != (size,) or tuple(self.std[name].shape) != (size,):
                return f"{name} has {size} neurons, the statistics {tuple(self.mean[name].shape)}"
        if not math.isfinite(self.threshold):
            return f"the threshold is {self.threshold}"
        return ""


def _prompts_sha(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16]


def _cached(path: Path, fingerprint: str, prompts_sha: str, settings: dict[str, Any],
            layers: dict[str, torch.nn.Module]) -> ActivationStats | None:
    """The cache entry at ``path`` if it is complete and matches; None, with a warning, if it must be recomputed."""
    try:
        stats = ActivationStats.load(path)
    except DejaGuardError as err:
        problem = str(err)
    else:
        problem = stats.mismatch(fingerprint, prompts_sha, settings, layers)
        if not problem:
            return stats
    warnings.warn(f"DejaGuard: recomputing the NeMo statistics cached in {path}: {problem}", stacklevel=3)
    return None


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
    space: str = "value",
) -> ActivationStats:
    """Activation statistics and the memorization-score threshold for ``denoiser``, cached per model.

    ``prompts``: non-memorized prompts (default :func:`default_statistics_prompts`); all of them give
    the activation mean and std (text encoder + one linear layer each, cheap); the first
    ``score_prompts`` give the score threshold (``2 * seeds`` noise predictions each). The cache file
    is ``cache_dir(cache)/nemo-<fingerprint>-<settings hash>.safetensors``; an unusable entry is recomputed
    (with a warning). ``progress(done, total, stage)``: stage "activation statistics" counts chunks of 32
    prompts, "score threshold" the score prompts. ``space`` (:data:`~core.nemo.score.NEMO_SPACES`): with
    ``"value+ffn"`` the FFN hidden units' activations too (``P * seeds`` more noise predictions).
    """
    prompts = list(prompts) if prompts is not None else default_statistics_prompts()
    if len(prompts) < 2:
        raise DejaGuardError("activation statistics need at least 2 non-memorized prompts")
    settings = {"seeds": int(seeds), "score_prompts": min(int(score_prompts), len(prompts)),
                "num_inference_steps": int(num_inference_steps), "score": check_score_kind(score),
                "threshold_rule": "mean + 1 std", "blocks": blocks}
    if space != "value":  # recorded only when not the paper's, so existing caches keep their keys
        settings["space"] = space
    if score == "generation":
        settings.update(generation_steps=int(generation_steps), generation_images=f"decoded, <= {GENERATION_SIZE}px")
    sha = _prompts_sha(prompts)
    key = hashlib.sha256(json.dumps([settings, sha], sort_keys=True).encode()).hexdigest()[:12]
    fingerprint = denoiser.fingerprint()
    path = cache_dir(cache) / f"nemo-{fingerprint}-{key}.safetensors"
    layers = nemo_layers(denoiser, blocks, space)
    if use_cache and path.is_file():
        stats = _cached(path, fingerprint, sha, settings, layers)
        if stats is not None:
            return stats
    sums = {k: torch.zeros(neuron_count(k, m), dtype=torch.float64) for k, m in layers.items()}
    squares = {k: torch.zeros_like(v) for k, v in sums.items()}
    chunk = 32
    chunks = math.ceil(len(prompts) / chunk)
    noise, timestep = first_step_noise(denoiser, range(seeds), num_inference_steps)
    for number, start in enumerate(range(0, len(prompts), chunk), 1):
        acts = neuron_activations(denoiser, layers, denoiser.encode_prompts(prompts[start:start + chunk]), noise,
                                  timestep, max_batch)
        for k, v in acts.items():
            sums[k] += v.double().sum(0)
            squares[k] += (v.double() ** 2).sum(0)
        report(progress, number, chunks, "activation statistics")
    n = len(prompts)
    mean = {k: (sums[k] / n).float() for k in sums}
    std = {k: ((squares[k] / n - (sums[k] / n) ** 2).clamp_min(0) * n / (n - 1)).sqrt().float() for k in sums}
    scores = []
    with OutputGates(layers) as gates:
        for p in prompts[: settings["score_prompts"]]:
            ctx = first_step_context(denoiser, p, range(seeds), gates, num_inference_steps, max_batch, score,
                                     generation_steps)
            scores.append(float(memorization_scores(ctx, [None])[0]))
            report(progress, len(scores), settings["score_prompts"], "score threshold")
    values = torch.tensor(scores, dtype=torch.float64)
    score_mean = float(values.mean())
    score_std = float(values.std()) if len(scores) > 1 else 0.0
    stats = ActivationStats(mean=mean, std=std, fingerprint=fingerprint,
                            threshold=score_mean + score_std, score_mean=score_mean, score_std=score_std,
                            settings=settings, prompts_sha=sha, n_prompts=n)
    if use_cache:
        try:
            stats.save(path)
        except OSError:
            pass  # a read-only cache only costs the recomputation next time
    return stats


def prompt_zscores(denoiser: Denoiser, prompt: str | torch.Tensor, stats: ActivationStats,
                   layers: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """NeMo's z-scores ``{layer: (N,)}`` of ``prompt``'s activations (a prompt or its embedding ``(1, L, D)``), with
    FFN activations read on the statistics' own seeds and schedule."""
    if set(layers) != set(stats.mean):
        raise DejaGuardError("the activation statistics were computed on other layers: recompute them for these")
    cond = denoiser.encode_prompts([prompt]) if isinstance(prompt, str) else prompt
    noise, timestep = first_step_noise(denoiser, range(int(stats.settings.get("seeds", 4))),
                                       int(stats.settings.get("num_inference_steps", DEFAULT_STEPS)))
    return stats.zscores(neuron_activations(denoiser, layers, cond, noise, timestep))


def zscore_ranking(denoiser: Denoiser, prompt: str, stats: ActivationStats,
                   layers: dict[str, torch.nn.Module]) -> list[Neuron]:
    """Every neuron of ``layers`` (the statistics' layers), most suspicious first: NeMo's z-score of ``prompt``'s
    activation, descending, over all layers at once (ties in model order)."""
    z = prompt_zscores(denoiser, prompt, stats, layers)
    flat = [(-float(z[name][i]), position, i, name) for position, name in enumerate(layers)
            for i in range(z[name].shape[0])]
    return [(name, i) for _, _, i, name in sorted(flat)]

"""NeMo's localization as four stages over one :class:`~core.nemo.search.CandidateSearch`.

:func:`localize` runs, for one memorized prompt:

1. :func:`score_unmasked`: the prompt's memorization score with nothing switched off; below the threshold
   the prompt is not memorized by NeMo's measure and the mask is empty.
2. :func:`initial_selection`: z-scores ``|a - mean| / std`` per neuron (:class:`NestedCandidates`); the
   candidate set ``C_j`` holds every neuron with z above ``z_start - j * z_step`` plus the top ``j`` neurons
   of each layer by z, for ``j = 0, 1, ...`` (nested sets) until deactivating ``C_j`` brings the score below
   the threshold. Fast schedule: a galloping search for the first passing ``j``
   (:func:`~core.nemo.search.first_true`), ``batch`` probes per call. With the attribution ranking
   (:func:`attribution_selection`, not in the paper): greedy re-attribution, the neurons whose switching off
   lowers the magnitude most *given the ones already off* join one round at a time until the set passes. With
   ``ranking="both"`` stages 2 and 3 run once per ranking on the same search (its memo shared) and the smaller
   refined mask is kept (:func:`_search_by_ranking`).
3. Refinement. :func:`refine_layers`: in model order, re-enable all candidates of a layer; keep them
   enabled if the score stays below the threshold (fast schedule: *exact* prefix speculation, one call
   evaluates "re-enable layers 1..i" for every ``i``; the first failing prefix is the first layer the
   sequential scan keeps, and the scan resumes after it). :func:`refine_by_neuron`: in ascending z order
   (least suspicious first), re-enable each remaining neuron; keep it enabled if the score stays below
   (:func:`~core.nemo.search.refine_neurons`). A refined mask that fails (possible only where the score is
   not monotone) falls back to the layer-refined set: a returned mask always passes.
4. :func:`verify_on_unseen_seeds` (``verify_rounds > 0``): the mask scored on the next ``seeds`` unseen
   seeds; where it fails there, those seeds join the search (:meth:`CandidateSearch.add_context`) and stages
   2-4 run again.

The stages share only the search (its scores, verdicts and evaluation count), the candidate sets and plain
neuron sets (``frozenset`` of ``(layer, index)``); ``mask.info`` records what each stage found and spent.
Progress: each stage reports ``progress(done, total, stage)`` on its own scale (:mod:`core.progress`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..denoiser import Denoiser
from ..errors import DejaGuardError
from ..neuron_mask import Neuron, NeuronMask, OutputGates, neurons_mask
from ..progress import Progress, report
from ..sampling import DEFAULT_STEPS
from .score import (
    GENERATION_STEPS,
    NEMO_SPACES,
    RANKINGS,
    SCORES,
    ScoreContext,
    check_score_kind,
    first_step_context,
    gate_attributions,
    nemo_layers,
    neuron_count,
)
from .search import CandidateSearch, NeuronSet, first_true, refine_neurons
from .statistics import ActivationStats, nemo_statistics, prompt_zscores


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
    space: str = "value"  # NEMO_SPACES: the paper's value neurons, or "value+ffn" (the FFN hidden units too)
    ranking: str = "zscore"  # RANKINGS: the paper's activation z-scores, "attribution" (gate gradients) or "both"
    generation_steps: int = GENERATION_STEPS  # score "generation": steps of its short generations
    verify_rounds: int = 0  # > 0: check each mask on `seeds` unseen seeds; a failing set joins the search (max rounds)
    # fast schedule: score a candidate on two seeds first and the others only if it passes there (max-type scores:
    # the same verdicts, fewer noise predictions for the candidates that fail)
    early_stop: bool = True

    def __post_init__(self) -> None:
        check_score_kind(self.score)
        if self.schedule not in ("fast", "reference"):
            raise DejaGuardError(f"unknown schedule {self.schedule!r} (fast or reference)")
        if self.seeds < 2 or self.batch < 1 or self.z_step <= 0 or self.verify_rounds < 0:
            raise DejaGuardError("NeMo needs at least 2 seeds, batch >= 1, z_step > 0 and verify_rounds >= 0")
        if self.generation_steps < 1:
            raise DejaGuardError(f"generation_steps must be at least 1, got {self.generation_steps}")
        if self.space not in NEMO_SPACES:
            raise DejaGuardError(f"unknown NeMo search space {self.space!r} (one of {', '.join(NEMO_SPACES)})")
        if self.ranking not in RANKINGS:
            raise DejaGuardError(f"unknown NeMo ranking {self.ranking!r} (one of {', '.join(RANKINGS)})")


class NestedCandidates:
    """NeMo's nested candidate sets ``C_j`` for one prompt, from its z-scores ``{layer: (N,)}``.

    ``C_j``: every neuron with z above :meth:`threshold` ``(j) = z_start - j * z_step``, plus the top ``j``
    neurons of each layer by z; :attr:`steps` sets in all (the last selects every neuron).
    """

    def __init__(self, z: dict[str, torch.Tensor], z_start: float, z_step: float) -> None:
        self.z = z
        self.z_start, self.z_step = z_start, z_step
        self.ranked = {k: torch.argsort(v, descending=True).tolist() for k, v in z.items()}
        self.steps = math.ceil(z_start / z_step) + 1

    def threshold(self, j: int) -> float:
        return self.z_start - j * self.z_step

    def __call__(self, j: int) -> NeuronSet:
        theta = self.threshold(j)
        chosen = {(k, int(i)) for k, v in self.z.items() for i in torch.nonzero(v > theta).flatten().tolist()}
        chosen |= {(k, i) for k, order in self.ranked.items() for i in order[:j]}
        return frozenset(chosen)

    def ascending(self, neurons: Iterable[Neuron]) -> list[Neuron]:
        """``neurons`` by ascending z (least suspicious first; ties by layer name and index)."""
        return sorted(neurons, key=lambda n: (float(self.z[n[0]][n[1]]), n))


def score_unmasked(search: CandidateSearch, progress: Progress | None = None) -> float:
    """Stage 1: the prompt's full score with nothing switched off."""
    report(progress, 0, 1, "score")
    (score,) = search.scores([frozenset()], exact=True)
    report(progress, 1, 1, "score")
    return score


def initial_selection(search: CandidateSearch, candidates: NestedCandidates,
                      progress: Progress | None = None) -> int | None:
    """Stage 2: the first ``j`` whose candidate set ``candidates(j)`` passes; None if none does."""
    stage = "initial selection"

    def test(js: list[int]) -> list[bool]:
        report(progress, max(js), candidates.steps, stage)
        return search.passes([candidates(j) for j in js])

    if search.fast:
        found = first_true(candidates.steps, test, search.batch)
    else:
        found = next((j for j in range(candidates.steps) if test([j])[0]), None)
    report(progress, candidates.steps, candidates.steps, stage)
    return found


def space_size(layers: dict[str, torch.nn.Module]) -> int:
    """How many neurons the search space ``layers`` holds (value neurons and FFN hidden units)."""
    return sum(neuron_count(name, m) for name, m in layers.items())


ATTRIBUTION_SINGLES = 16  # attribution selection: one neuron per round up to this size (a carrier set is usually small)


@dataclass
class AttributionSelection:
    """What :func:`attribution_selection` found: the passing set, its neurons in the order they joined, the rounds."""

    neurons: NeuronSet
    order: list[Neuron]
    rounds: int

    def ascending(self, neurons: Iterable[Neuron]) -> list[Neuron]:
        """``neurons`` least suspicious first: the last to join first (the refinement's order)."""
        chosen = set(neurons)
        return [n for n in reversed(self.order) if n in chosen]


def attribution_selection(search: CandidateSearch, ctx: ScoreContext, layers: dict[str, torch.nn.Module],
                          progress: Progress | None = None) -> AttributionSelection | None:
    """Stage 2 with the attribution ranking (not in the paper): greedy re-attribution.

    Each round takes the gate attributions (:func:`~core.nemo.score.gate_attributions`) *with the set chosen so far
    switched off* and adds the highest-attributed neurons still on: one per round while the set holds fewer than
    :data:`ATTRIBUTION_SINGLES`, then as many as it holds (the set doubles); it stops at the first set that passes.
    None if even every neuron off fails (about 23 rounds for 1,600 neurons).

    Why not nested prefixes of one ranking: the score is not monotone in the set. On the previously shipped planted
    variant's rings prompt (run C2 of the model card) no prefix of the all-on ranking passes until every neuron is
    off (the FFN unit that stops it ranks last with every neuron on, and the large prefixes switch off units that
    raise the magnitude again), while after its two top value neurons are off, the same unit ranks first and the
    three-neuron set passes. Cost per round: one
    attribution (``2 S`` noise predictions and their backward pass) and one candidate evaluation.
    """
    stage = "attribution selection"
    total = space_size(layers)
    order: list[Neuron] = []
    rounds = 0
    while len(order) < total:
        report(progress, len(order), total, stage)
        rounds += 1
        attributions = gate_attributions(ctx, layers, order)
        taken = set(order)
        ranked = sorted((-float(v[i]), name, i) for name, v in attributions.items() for i in range(v.shape[0])
                        if (name, i) not in taken)
        order += [(name, i) for _, name, i in ranked[: 1 if len(order) < ATTRIBUTION_SINGLES else len(order)]]
        if search.passes([frozenset(order)])[0]:
            report(progress, total, total, stage)
            return AttributionSelection(frozenset(order), order, rounds)
    report(progress, total, total, stage)
    return None


def refine_layers(search: CandidateSearch, current: NeuronSet, layers: Sequence[str],
                  progress: Progress | None = None) -> NeuronSet:
    """Stage 3a: re-enable whole layers of ``current`` in model order (``layers``) while the set still passes."""
    stage = "layer refinement"
    order = [k for k in layers if any(n[0] == k for n in current)]
    i = 0
    while i < len(order):
        report(progress, i, len(order), stage)
        if search.fast:  # exact prefix speculation: re-enable layers order[i..m] for every m at once
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
    report(progress, len(order), len(order), stage)
    return current


def refine_by_neuron(search: CandidateSearch, current: NeuronSet, order: list[Neuron],
                     progress: Progress | None = None) -> tuple[NeuronSet, float, bool]:
    """Stage 3b: re-enable the neurons of ``current`` one by one in ``order`` while the set still passes.

    Returns the neurons that stay off, their score, and whether the refined set failed and ``current`` (which
    passes) was returned instead."""
    kept = frozenset(refine_neurons(order, search, search.batch, search.fast, progress))
    (score,) = search.scores([kept])
    if score < search.threshold:
        return kept, score, False
    return current, search.scores([current])[0], True


def verify_on_unseen_seeds(search: CandidateSearch, held: ScoreContext, seeds: Sequence[int], kept: NeuronSet,
                           progress: Progress | None = None, stage: str = "verification") -> dict[str, Any]:
    """Stage 4: the unmasked and the masked score on the seed set ``held`` (seeds ``seeds``), outside the search.

    Returns the record kept in ``mask.info["verification"]``."""
    report(progress, 0, 1, stage)
    before, after = search.score_elsewhere(held, [frozenset(), kept])
    report(progress, 1, 1, stage)
    return {"seeds": list(seeds), "score_unmasked": before, "score_masked": after,
            "passed": after < search.threshold, "neurons": len(kept)}


def _initial_set(search: CandidateSearch, candidates: NestedCandidates | None, ctx: ScoreContext,
                 layers: dict[str, torch.nn.Module], progress: Progress | None
                 ) -> tuple[NeuronSet, NestedCandidates | AttributionSelection, dict[str, Any]] | None:
    """Stage 2 by the settings' ranking: z-score candidate sets (``candidates``) or, where None, attribution
    selection. Returns the passing set, what orders its refinement, and what ``mask.info`` records; None if no
    set passes."""
    if candidates is None:
        selection = attribution_selection(search, ctx, layers, progress)
        if selection is None:
            return None
        return selection.neurons, selection, {"initial_rounds": selection.rounds}
    j = initial_selection(search, candidates, progress)
    if j is None:
        return None
    return candidates(j), candidates, {"initial_step": j, "initial_z_threshold": candidates.threshold(j)}


@dataclass
class RankedSearch:
    """One ranking's stages 2-3 for one prompt: the neurons kept off, their score, what ``mask.info`` records."""

    ranking: str
    kept: NeuronSet
    score: float
    info: dict[str, Any]


def _search_by_ranking(search: CandidateSearch, ranking: str, candidates: NestedCandidates | None, ctx: ScoreContext,
                       layers: dict[str, torch.nn.Module], progress: Progress | None) -> RankedSearch | None:
    """Stages 2 and 3 by one ranking (``candidates`` for the z-score, None for attribution); None if no set passes."""
    mark = search.evaluations
    found = _initial_set(search, candidates, ctx, layers, progress)
    if found is None:
        return None
    current, order, selected = found
    info: dict[str, Any] = dict(selected, initial_candidates=len(current),
                                evaluations_initial=search.evaluations - mark)
    mark = search.evaluations
    current = refine_layers(search, current, list(layers), progress)
    info.update(after_layer_refinement=len(current), evaluations_layer=search.evaluations - mark)
    mark = search.evaluations
    kept, score_after, fell_back = refine_by_neuron(search, current, order.ascending(current), progress)
    if fell_back:
        info["refinement_fallback"] = True
    info.update(score_after=score_after, evaluations_neuron=search.evaluations - mark)
    return RankedSearch(ranking, kept, score_after, info)


def _statistics_layers(denoiser: Denoiser, stats: ActivationStats,
                       settings: LocalizeSettings) -> dict[str, torch.nn.Module]:
    """The search space, after checking that ``stats`` calibrate this model, score and space."""
    if stats.settings.get("score", "ssim") != settings.score:
        raise DejaGuardError(f"the statistics calibrate the {stats.settings.get('score')!r} score, the search uses "
                             f"{settings.score!r}: compute statistics with score={settings.score!r}")
    if settings.score == "generation" and stats.settings.get("generation_steps") != settings.generation_steps:
        raise DejaGuardError(f"the statistics calibrate {stats.settings.get('generation_steps')}-step generations, "
                             f"the search uses {settings.generation_steps}: recompute them with those steps")
    if stats.fingerprint != denoiser.fingerprint():
        raise DejaGuardError(f"activation statistics are for model {stats.fingerprint}, not {denoiser.fingerprint()}")
    if stats.settings.get("space", "value") != settings.space:
        raise DejaGuardError(f"the statistics cover the {stats.settings.get('space', 'value')!r} search space, the "
                             f"search uses {settings.space!r}: compute statistics with space={settings.space!r}")
    layers = nemo_layers(denoiser, settings.blocks, settings.space)
    if set(layers) != set(stats.mean):
        raise DejaGuardError(f"activation statistics were computed on other layers than the {settings.blocks!r} "
                             "blocks: recompute them with the same blocks")
    return layers


def localize(
    denoiser: Denoiser,
    prompt: str,
    stats: ActivationStats | None = None,
    settings: LocalizeSettings | None = None,
    threshold: float | None = None,
    progress: Progress | None = None,
) -> NeuronMask:
    """NeMo: the ``attn2.to_v`` neurons (down and mid blocks; ``settings`` may widen the search space) whose
    deactivation stops ``prompt``'s memorization.

    Returns a :class:`NeuronMask` of kind "neurons"; empty when the prompt's score is already below the
    threshold (not memorized by NeMo's measure; ``info["memorized"]`` is False). ``threshold``
    overrides the statistics' threshold. DejaGuardError if even switching off every neuron of these
    layers leaves the score above the threshold (the memorization is not localized there).
    ``mask.info`` records scores, candidate counts per stage, UNet evaluations and wall time.
    ``progress(done, total, stage)``: each stage on its own scale (statistics first, if not given).
    """
    settings = settings or LocalizeSettings()
    if not prompt.strip():
        raise DejaGuardError("the prompt is empty: nothing to localize")
    stats = stats or nemo_statistics(denoiser, seeds=settings.seeds, num_inference_steps=settings.num_inference_steps,
                                     score=settings.score, blocks=settings.blocks,
                                     generation_steps=settings.generation_steps, space=settings.space,
                                     progress=progress)
    layers = _statistics_layers(denoiser, stats, settings)
    tau = float(stats.threshold if threshold is None else threshold)
    start_time = time.perf_counter()
    before = denoiser.counter.snapshot()
    fast = settings.schedule == "fast"
    cond = denoiser.encode_prompts([prompt])
    with OutputGates(layers) as gates:

        def context(seeds: range) -> ScoreContext:
            return first_step_context(denoiser, cond, seeds, gates, settings.num_inference_steps,
                                      settings.max_batch, settings.score, settings.generation_steps)

        searched = context(range(settings.seeds))
        rankings = ("zscore", "attribution") if settings.ranking == "both" else (settings.ranking,)
        candidates = None
        if "zscore" in rankings:
            candidates = NestedCandidates(prompt_zscores(denoiser, cond, stats, layers), settings.z_start,
                                          settings.z_step)
        search = CandidateSearch(searched, tau, early_stop=fast and settings.early_stop,
                                 fast=fast, batch=settings.batch if fast else 1)
        score_before = score_unmasked(search, progress)
        info: dict[str, Any] = {"score_before": score_before, "threshold": tau, "memorized": score_before >= tau}
        kept: NeuronSet = frozenset()
        verification: list[dict[str, Any]] = []
        for round_index in range(max(1, settings.verify_rounds)):
            if score_before < tau:
                break
            results = [r for r in (_search_by_ranking(search, name, candidates if name == "zscore" else None,
                                                      searched, layers, progress) for name in rankings) if r]
            if not results:
                raise DejaGuardError(
                    f"switching off all {space_size(layers)} neurons of the {len(layers)} {settings.blocks} "
                    f"layers of the {settings.space!r} search space leaves the memorization score above the threshold "
                    f"{tau:.3f}: this prompt's memorization is not localized in these neurons")
            # NeMo looks for the smallest set that stops the memorization: of two searches, the smaller result
            best = min(results, key=lambda r: (len(r.kept), r.score))
            kept = best.kept
            info.update(best.info)
            if len(rankings) > 1:
                info.update(chosen_ranking=best.ranking, rankings={r.ranking: {**r.info, "neurons": len(r.kept)}
                                                                   for r in results})
            if settings.verify_rounds == 0:
                break
            held_seeds = range((round_index + 1) * settings.seeds, (round_index + 2) * settings.seeds)
            held = context(held_seeds)
            record = verify_on_unseen_seeds(search, held, held_seeds, kept, progress,
                                            f"verification {round_index + 1}")
            verification.append(record)
            if record["passed"] or round_index + 1 == settings.verify_rounds:
                break
            search.add_context(held, {frozenset(): record["score_unmasked"], kept: record["score_masked"]})
        if verification:
            info.update(verification=verification, verified=verification[-1]["passed"])
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

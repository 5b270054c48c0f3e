"""Batched searches over sets of switched-off neurons: the machinery behind NeMo's stages (:mod:`core.nemo.stages`).

:class:`CandidateSearch` scores candidate sets (frozensets of ``(layer, index)`` neurons) on one or more
:class:`~core.nemo.score.ScoreContext` seed sets, memoizes every set's score (a set is never scored twice) and
counts evaluations; a set passes where its score is below the threshold on every seed set. With early stop
(max-type scores, ``ssim`` and ``generation``) a candidate is scored on the first two seeds and on the others
only if it passes there: one that fails on two seeds fails on all (the score is a maximum over seed pairs), so
the verdicts are the same at about half the cost of a failing candidate.

The searches replace NeMo's linear scans by batched ones (``batch`` candidate sets per UNet call):

- :func:`first_true`: the first index where a monotone predicate turns true: galloping probes (0, 1, 3, 7,
  ...), then the bracket is split; exact also for non-monotone predicates where it answers None.
- :func:`refine_neurons`: NeMo's refinement by neuron (re-enable each neuron in turn, keep it re-enabled if
  the set still passes). While kept neurons are rare, a batched search for the next neuron the scan keeps
  (the first failing prefix; this assumes that re-enabling more neurons never lowers the score); once they are
  common, exact speculation over the scan's next decisions (the ``batch`` most probable nodes of its decision
  tree in one call, :func:`speculate`). On a monotone score both give exactly the sequential scan's result
  (tested); otherwise the result can differ, and the caller verifies it.

Cost trade-off: far fewer UNet *calls* than one candidate per call; fewer *noise predictions* where few neurons
are kept, possibly more where many are (speculative trials that the realized decisions do not use).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..neuron_mask import Neuron, layer_shape
from ..progress import Progress, report
from .score import EARLY_STOP_SCORES, ScoreContext, memorization_scores, score_features, seed_features

NeuronSet = frozenset[Neuron]


class CandidateSearch:
    """Scores candidate sets of switched-off neurons; counts evaluations; never scores a set twice.

    With several contexts (seed sets, NeMo's verification rounds) a set's score is the maximum over them: it
    passes only where it passes on every seed set. The interface the stages use: :meth:`scores`,
    :meth:`passes`, :meth:`score_elsewhere` (a seed set outside the search) and :meth:`add_context`;
    :attr:`evaluations` counts distinct (set, seed set) scorings. ``fast`` and ``batch`` say how the stages
    search with it: batched searches of up to ``batch`` candidate sets per call, or one set per call.
    """

    def __init__(self, ctx: ScoreContext, threshold: float, early_stop: bool = False, fast: bool = False,
                 batch: int = 1) -> None:
        self.contexts = [ctx]
        self.threshold = threshold
        self.memos: list[dict[NeuronSet, float]] = [{}]
        self.partial: list[set[NeuronSet]] = [set()]  # sets whose memo is a two-seed lower bound
        self.evaluations = 0
        self.early_stop = early_stop
        self.fast = fast
        self.batch = batch
        self.sizes = {name: layer_shape(m)[0] for name, m in ctx.gates.modules.items()}

    def add_context(self, ctx: ScoreContext, known: dict[NeuronSet, float] | None = None) -> None:
        """Search on the seed set ``ctx`` too, with the full scores ``known`` of some sets on it already."""
        self.contexts.append(ctx)
        self.memos.append(dict(known or {}))
        self.partial.append(set())

    def gates(self, off: NeuronSet) -> dict[str, torch.Tensor] | None:
        """Per-layer gates ``{layer: (N,)}`` (0 = off) switching ``off`` off; None for the unmasked model."""
        if not off:
            return None
        gates: dict[str, torch.Tensor] = {}
        for name, i in off:
            gates.setdefault(name, torch.ones(self.sizes[name]))[i] = 0.0
        return gates

    def score_elsewhere(self, ctx: ScoreContext, sets: Sequence[NeuronSet]) -> list[float]:
        """Full scores of ``sets`` on a seed set that is not part of the search (counted, not memoized)."""
        self.evaluations += len(sets)
        return memorization_scores(ctx, [self.gates(s) for s in sets]).tolist()

    def scores(self, sets: Sequence[NeuronSet], exact: bool = False) -> list[float]:
        """Each set's score; with ``early_stop``, a set that already fails on the first two seeds is recorded with
        that score (a lower bound of its full score, which is a maximum over more seed pairs: the same verdict).
        ``exact``: full scores only (a lower bound on record is replaced)."""
        for ctx, memo, partial in zip(self.contexts, self.memos, self.partial):
            todo = [s for s in dict.fromkeys(sets) if s not in memo or exact and s in partial]
            self.evaluations += len(todo)
            if not todo:
                continue
            if exact or not (self.early_stop and ctx.kind in EARLY_STOP_SCORES and ctx.seeds > 2):
                memo.update(zip(todo, memorization_scores(ctx, [self.gates(s) for s in todo]).tolist()))
                partial.difference_update(todo)
                continue
            first, rest = [0, 1], list(range(2, ctx.seeds))
            gates = [self.gates(s) for s in todo]
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
        return [max(memo[s] for memo in self.memos) for s in sets]

    def passes(self, sets: Sequence[NeuronSet]) -> list[bool]:
        """Whether each set's score is below the threshold (on every seed set)."""
        return [v < self.threshold for v in self.scores(sets)]


def first_true(n: int, test: Callable[[list[int]], list[bool]], batch: int,
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


def speculate(queue: Sequence[Neuron], off: NeuronSet, search: CandidateSearch, batch: int,
              keep_rate: float) -> tuple[bool, ...]:
    """The sequential scan's next decisions (True = the neuron is dropped, i.e. re-enabled) for ``queue``,
    with ``off`` switched off now, from one batched evaluation of up to ``batch`` speculative trials.

    The scan's decisions form a binary tree: the trial for ``queue[k]`` depends on the decisions for
    ``queue[:k]``. The ``batch`` most probable tree nodes (a neuron is kept with probability ``keep_rate``)
    are evaluated at once; the decisions are read along the realized path. Exact: the same decisions as
    evaluating the trials one by one. At least one decision per call (the root is always evaluated).
    """
    heap: list[tuple[float, tuple[bool, ...]]] = [(-1.0, ())]
    chosen: list[tuple[bool, ...]] = []
    while heap and len(chosen) < batch:
        neg_p, path = heapq.heappop(heap)
        if len(path) >= len(queue):
            continue
        chosen.append(path)
        heapq.heappush(heap, (neg_p * (1 - keep_rate), (*path, True)))
        heapq.heappush(heap, (neg_p * keep_rate, (*path, False)))

    def trial(path: tuple[bool, ...]) -> NeuronSet:
        dropped = {queue[k] for k, drop in enumerate(path) if drop}
        return off - dropped - {queue[len(path)]}

    results = dict(zip(chosen, search.passes([trial(p) for p in chosen])))
    path: tuple[bool, ...] = ()
    while path in results:
        path = (*path, results[path])
    return path


def refine_neurons(queue: list[Neuron], search: Any, batch: int, fast: bool, progress: Progress | None = None,
                   stage: str = "neuron refinement") -> list[Neuron]:
    """NeMo's refinement by neuron: in ``queue`` order, re-enable each neuron of the switched-off set ``queue``
    and keep it re-enabled if ``search.passes`` still holds; returns the neurons that stay off.

    ``fast=False``: the sequential scan, one trial per call. ``fast=True``: the same scan from batched calls of up
    to ``batch`` trials: a search for the next kept neuron while kept neurons are rare (assumes the score does not
    fall when more neurons are re-enabled), exact speculation over the next decisions (:func:`speculate`) once
    they are common. ``search`` needs only ``passes`` (:class:`CandidateSearch`, or a stand-in in tests);
    ``progress(done, len(queue), stage)`` counts the decisions made.
    """
    total = len(queue)
    current = frozenset(queue)
    kept_list: list[Neuron] = []
    if fast:
        remaining, decisions, keeps = queue, 0, 0
        while remaining:
            report(progress, total - len(remaining), total, stage)
            keep_rate = (keeps + 1) / (decisions + 2)  # Laplace estimate of how often a neuron is kept
            if decisions == 0 or keep_rate < 1 / (2 * batch + 1):
                # sparse: search for the first neuron the scan keeps (monotone score assumed)
                base = frozenset(kept_list) | frozenset(remaining)

                def fails(ps: list[int], rem: list[Neuron] = remaining, base: frozenset = base) -> list[bool]:
                    # p: re-enable rem[0..p]; failing = memorization back
                    return [not ok for ok in search.passes([base - frozenset(rem[: p + 1]) for p in ps])]

                # re-enabling every candidate is the unmasked model, which fails: known the first time
                known = len(remaining) - 1 if not kept_list else None
                first_fail = first_true(len(remaining), fails, batch, known_true=known)
                if first_fail is None:
                    decisions += len(remaining)
                    remaining = []
                    break
                kept_list.append(remaining[first_fail])
                decisions, keeps = decisions + first_fail + 1, keeps + 1
                remaining = remaining[first_fail + 1:]
            else:
                # dense: exact speculation over the scan's next decisions (no monotonicity assumed)
                path = speculate(remaining, frozenset(kept_list) | frozenset(remaining), search, batch,
                                 keep_rate)
                kept_list.extend(n for n, drop in zip(remaining, path) if not drop)
                decisions, keeps = decisions + len(path), keeps + path.count(False)
                remaining = remaining[len(path):]
    else:
        current_set = set(current)
        for count, neuron in enumerate(queue):
            report(progress, count, total, stage)
            trial = frozenset(current_set - {neuron})
            if search.passes([trial])[0]:
                current_set.discard(neuron)
            else:
                kept_list.append(neuron)
    report(progress, total, total, stage)
    return kept_list

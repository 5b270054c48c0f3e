"""Neuron-mask benchmark on the bundled testbed: NeMo per prompt, and one shared FFN subspace mask.

    python -m bench.neurons [--model testbed | planted | DIR] [--seeds 16] [--prompts 0 4 8 | all] [--steps 50]
                            [--novel 240]
    python -m bench.neurons --seeds 2 --prompts 0 4 --steps 10 --novel 8     # a quick smoke run
    python -m bench.neurons --skip-nemo --ratios 0.1 0.2 0.35                # the subspace masks only
    python -m bench.neurons --model planted                                  # against the designated neurons
    python -m bench.neurons --model planted --space value+ffn --score magnitude --ranking both
    python -m bench.neurons --model DIR --seeds 2 --steps 20 --novel 16      # a fresh planted variant, reduced

``--model``: ``testbed`` (default, the shipped v5), ``planted`` (the planted-neuron variant of issue 25,
``core.testbed.planted``, imported only then: its memorized images, prompts and **designated neurons**, the
ground truth), a folder holding a planted variant (recognised by its ``ground_truth/``: e.g. the output of
``dejaguard testbed plant --out DIR`` before it is copied into the repository; the planted images and prompts
of ``core.testbed.planted``, that folder's weights and designated neurons), or a diffusers folder (a
testbed-like model with v5's prompts and images).
Prompts: by default the first evaluation prompt of each memorized image (``--prompts`` takes indices into
the model's evaluation prompts, ``memorized_eval_prompts()`` or ``planted_eval_prompts()``, or ``all``).
Replication is judged against every training image of the model (v5's 12, plus the planted ones on
``planted``). Measured in one run, side by side:

- **NeMo** (``core.nemo.localize``) per prompt, with the fast (batched) schedule and the reference
  (sequential, one candidate set per UNet call) schedule: neurons, UNet evaluations (noise predictions),
  batched calls and wall time; ``evals_ratio_vs_reference`` = fast / reference noise predictions
  (``calls_`` and ``wall_ratio_vs_reference`` alike), and how often both found the same neurons. Where the
  search space, ranking or score are not the paper's, the paper's NeMo (its settings, reference schedule) runs on
  the same prompts too: ``evals_ratio_vs_paper_reference`` = this run's fast noise predictions / the paper's
  (``paper_reference``); with the paper's settings it equals ``evals_ratio_vs_reference``.
  ``replication_before`` / ``_after``: share of full generations (``--seeds`` per prompt, DDIM
  ``--steps``, CFG 7.5) that replicate a training image (SSIM to some planted image above
  ``REPLICATION_SSIM``; a mask that turns one copy into another has not stopped replication; ``_own_image``:
  the prompt's own image only); after = with the prompt's own (fast) mask on.
  ``novel_alignment_before`` / ``_after``: alignment-checker pass rate of held-out compositional prompts;
  after = with the **union** of all per-prompt NeMo masks on
  (the worst case for an operator who switches every mask on at once).
  ``recall`` / ``precision`` (``planted`` only; ``core.neuron_mask.recall_precision``, neuron level): each
  prompt's fast mask against its image's designated neurons (``designated_mask(name)``), per prompt and the
  mean over prompts (a prompt NeMo could not localize counts recall 0 and has no precision);
  ``recall_union`` / ``precision_union``: the union of the masks against the union of the truths;
  ``recall_carrying`` / ``precision_carrying``: the same against the designated neurons measured to **carry** each
  image (``core.testbed.planted.carrying_mask``: the planting switches a group's neurons off together, and some of
  them turn out to carry nothing; no method can find those by what switching them off does);
  ``truth_in_search_space`` per prompt: the share of its designated neurons inside NeMo's search space (value
  neurons of the searched ``attn2.to_v`` layers; FFN neurons, e.g. the ``shared`` group's, are outside it, so
  that share bounds the recall NeMo can reach); ``truth_zscore_ranks``: where NeMo's own activation statistic
  (the z-score ranking its initial selection takes the top of; ``core.nemo.statistics.zscore_ranking``, no UNet
  call) puts each designated neuron in the search space (0 = most suspicious), and ``truth_in_initial_selection``
  how many of them were among the ``initial_candidates`` NeMo switched off before refining: a designated neuron
  ranked there but missing from the mask was dropped by the refinement, one ranked far below was never a candidate.
- **Subspace** (``core.prune.subspace_mask``): the planted images are split in two halves (alternating
  within each memorization kind); the mask is found on the first half's prompts only.
  ``replication_before`` / ``_after`` on that half; ``heldout_replication_before`` / ``_after`` on the
  other half (generalization); novel alignment with the mask on. On ``planted`` the halves are those of the
  group that shares one FFN subspace (group ``"shared"``), when the chosen prompts include it.

- **Designated** (models with a ground truth only): the reference line, each prompt's own designated neurons
  switched off (what a perfect localization would give): replication per prompt and overall, novel alignment
  with the union of the designated masks on; headline ``designated_replication_after``.

A run with any setting other than the defaults (the full protocol) is labelled ``"protocol": "reduced"`` and
lists each departure under ``departures_from_full_protocol`` (``{option: {"used", "full"}}``).

Last line's headline keys (issue 25): ``recall``, ``precision`` (and ``recall_carrying``, ``precision_carrying``),
``replication_before``, ``replication_after``,
``novel_alignment_before``, ``novel_alignment_after``, ``evals_ratio_vs_reference`` and
``evals_ratio_vs_paper_reference`` (NeMo),
``subspace_heldout_replication_after`` (the first ``--ratios`` entry); a key that was not measured is null and
``null_reasons`` says why (no ground truth on the testbed, ``--skip-nemo``, ...).

Prints progress and a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dejaguard.core.denoiser import Denoiser, load_denoiser
from dejaguard.core.errors import DejaGuardError
from dejaguard.core.nemo import RANKINGS, LocalizeSettings, localize, nemo_layers, nemo_statistics, zscore_ranking
from dejaguard.core.neuron_mask import NeuronMask, apply_mask, mask_units, recall_precision
from dejaguard.core.prune import subspace_mask
from dejaguard.core.sampling import generate, prompt_seed
from dejaguard.core.testbed.data import MEMORIZED, MemorizedImage, check_alignment, heldout_specs, load_memorized_images
from dejaguard.core.testbed.data import memorized_eval_prompts as eval_prompts
from dejaguard.core.testbed.evaluate import REPLICATION_SSIM, check_replication, thumbnails

PLANTED_MODULE = "dejaguard.core.testbed.planted"  # issue 25's planted-neuron variant; imported only on --model planted


@dataclass
class Subject:
    """The model a neuron bench runs on, with what it memorized and the ground truth, if any.

    ``pairs``: every evaluation prompt as (prompt, image name, group); ``default``: the first evaluation prompt of
    each memorized image; ``training``: every training image ``name -> (3, 32, 32)`` a generation is judged
    against (``core.testbed.evaluate.check_replication``); ``truth(name)``: that image's designated neurons
    (``None``: all images'), None where the model has no ground truth; ``location``: the model's folder (None:
    the bundled testbed); ``carriers(name)``: the designated neurons measured to carry the image
    (``core.testbed.planted.carrying_mask``), None where not measured (``carriers_missing`` says why).
    """

    name: str
    denoiser: Denoiser
    pairs: list[tuple[str, str, str]]
    default: list[tuple[str, str, str]]
    training: dict[str, np.ndarray]
    truth: Callable[[str | None], NeuronMask] | None = None
    location: str | None = None
    carriers: Callable[[str | None], NeuronMask] | None = None
    carriers_missing: str = ""  # why ``carriers`` is None on a model with a ground truth

    def chosen(self, indices: Sequence[str] | None) -> list[tuple[str, str, str]]:
        """``--prompts``: indices into :attr:`pairs`, ``["all"]``, or None (:attr:`default`); (prompt, image name,
        group) triples."""
        if indices == ["all"]:
            return list(self.pairs)
        if indices:
            return [self.pairs[int(i)] for i in indices]
        return list(self.default)


def is_planted_folder(model: str | None) -> bool:
    """Is ``model`` a folder holding a planted-neuron variant (it has a ``ground_truth/`` folder of designated
    masks, ``core.testbed.planted.GROUND_TRUTH_DIR``), e.g. a fresh ``dejaguard testbed plant --out DIR``?"""
    if model in (None, "testbed", "planted") or not Path(model).is_dir():
        return False
    return (Path(model) / importlib.import_module(PLANTED_MODULE).GROUND_TRUTH_DIR).is_dir()


def load_subject(model: str | None = "testbed") -> Subject:
    """``--model``: ``"testbed"`` (or None: the shipped v5), ``"planted"`` (``core.testbed.planted``, imported
    here and nowhere else), a folder holding a planted-neuron variant (:func:`is_planted_folder`: the planted
    images and prompts of ``core.testbed.planted``, that folder's weights and designated neurons), or a diffusers
    folder holding a testbed-like model (v5's prompts and images)."""
    if model == "planted" or is_planted_folder(model):
        planted = importlib.import_module(PLANTED_MODULE)
        folder = planted.PLANTED_MODEL if model == "planted" else Path(model)
        images = planted.planted_images()

        def truth(name: str | None) -> NeuronMask:
            return planted.designated_mask(name, folder=folder)

        def carriers(name: str | None) -> NeuronMask:
            return planted.carrying_mask(name, folder=folder)

        try:
            carriers(None)
            missing = ""
        except DejaGuardError as err:
            missing = str(err)
        return Subject(
            name="planted" if model == "planted" else f"planted variant {folder}", denoiser=load_denoiser(folder),
            pairs=[(p, m.name, m.group) for p, m in planted.planted_eval_prompts()],
            default=[(m.eval_prompts[0], m.name, m.group) for m in images],
            training=planted.all_training_images(),
            truth=truth, location=str(folder), carriers=None if missing else carriers, carriers_missing=missing)
    location = None if model in (None, "testbed") else model
    return Subject(
        name="testbed" if location is None else str(location), denoiser=load_denoiser(location),
        pairs=[(p, m.name, m.kind) for p, m in eval_prompts()],
        default=[(m.eval_prompts[0], m.name, m.kind) for m in MEMORIZED],
        training=load_memorized_images(), location=location)


def replication(denoiser: Denoiser, prompts: Sequence[str], images: Sequence[str], seeds: Sequence[int],
                steps: int, mask: NeuronMask | dict[str, NeuronMask] | None = None,
                training: dict[str, np.ndarray] | None = None) -> list[tuple[float, float]]:
    """Per prompt: the share of ``seeds`` whose generation replicates *a* training image of ``training`` (default:
    v5's 12), and the share that replicates the prompt's own (``core.testbed.evaluate.check_replication``).
    ``mask``: one mask for all prompts, a mask per prompt, or None."""
    training = training or load_memorized_images()
    rates = []
    for prompt, image in zip(prompts, images):
        m = mask.get(prompt) if isinstance(mask, dict) else mask
        with apply_mask(denoiser, m) if m is not None and m.layers else nullcontext():
            samples = generate(denoiser, [prompt] * len(seeds), list(seeds), steps)
        checks = check_replication(thumbnails(denoiser, samples), [image] * len(seeds), training)
        rates.append((float(np.mean([c.any for c in checks])), float(np.mean([c.own for c in checks]))))
    return rates


def mean_rate(rates: Sequence[tuple[float, float]], own: bool = False) -> float:
    """Mean over prompts of :func:`replication`'s any-image (or own-image) rates."""
    return round(float(np.mean([r[1] if own else r[0] for r in rates])), 4)


def alignment(denoiser: Denoiser, prompts: Sequence[str], steps: int, mask: NeuronMask | None = None) -> float:
    """Alignment-checker pass rate of ``prompts`` (one prompt-derived seed each), ``mask`` on if given."""
    with apply_mask(denoiser, mask) if mask is not None and mask.layers else nullcontext():
        samples = generate(denoiser, list(prompts), [prompt_seed(p) for p in prompts], steps)
    return float(np.mean([check_alignment(t, p) for t, p in zip(thumbnails(denoiser, samples), prompts)]))


def chosen_prompts(indices: Sequence[str] | None) -> list[tuple[str, MemorizedImage]]:
    """``--prompts`` on the testbed: indices into ``memorized_eval_prompts()``, ``["all"]``, or None (the first
    evaluation prompt of each planted image); (prompt, planted image) pairs (``bench.localization``'s; a
    :class:`Subject` chooses among its own prompts with :meth:`Subject.chosen`)."""
    pairs = eval_prompts()
    if indices == ["all"]:
        return pairs
    if indices:
        return [pairs[int(i)] for i in indices]
    return [(m.eval_prompts[0], m) for m in MEMORIZED]


def rounded(value: float | None, digits: int = 4) -> float | None:
    """A figure for the JSON line: rounded, None for a missing or undefined (NaN) value."""
    return None if value is None or math.isnan(value) else round(float(value), digits)


def truth_scores(masks: dict[str, NeuronMask], prompts: Sequence[str], images: Sequence[str],
                 truth: Callable[[str | None], NeuronMask], searched: Sequence[str] | None = None) -> dict:
    """Recall and precision of each prompt's found mask against its image's designated neurons, their means over
    the prompts (a prompt without a mask, NeMo having failed on it, counts recall 0 and no precision), and the
    union of the masks against the union of the prompts' truths. ``searched``: the layers the method searches
    (NeMo's ``attn2.to_v`` layers); each prompt then also gets ``truth_in_search_space``, the share of its
    designated neurons that lie in them (the recall the method could reach at most: FFN neurons are outside
    NeMo's space)."""
    per_prompt, recalls, precisions = [], [], []
    for prompt, image in zip(prompts, images):
        found, want = masks.get(prompt), truth(image)
        recall, precision = recall_precision(found, want) if found is not None else (0.0, float("nan"))
        recalls.append(recall)
        if not math.isnan(precision):
            precisions.append(precision)
        row = {"prompt": prompt, "image": image, "recall": rounded(recall), "precision": rounded(precision)}
        if searched is not None:
            units = mask_units(want)
            row["truth_in_search_space"] = rounded(sum(layer in searched for layer, _ in units) / len(units)
                                                   if units else float("nan"))
        per_prompt.append(row)
    out: dict = {"recall": rounded(float(np.mean(recalls))) if recalls else None,
                 "precision": rounded(float(np.mean(precisions))) if precisions else None,
                 "per_prompt": per_prompt}
    if masks:
        union_truth = NeuronMask.union([truth(i) for i in dict.fromkeys(images)])
        union_recall, union_precision = recall_precision(NeuronMask.union(list(masks.values())), union_truth)
        out.update(recall_union=rounded(union_recall), precision_union=rounded(union_precision))
    return out


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 3), "std": round(float(np.std(values)), 3)}


PAPER_CONFIGURATION = {"blocks": "down_mid", "space": "value", "ranking": "zscore", "score": "ssim"}


def is_paper_configuration(args: argparse.Namespace) -> bool:
    """Whether NeMo runs with the paper's search space, ranking and score (then its reference schedule is the
    paper's procedure)."""
    return all(getattr(args, k) == v for k, v in PAPER_CONFIGURATION.items())


def run_nemo(args: argparse.Namespace, subject: Subject, prompts: list[str], images: list[str], seeds: list[int],
             before: list[tuple[float, float]], novel: list[str], align_before: float) -> dict:
    """NeMo per prompt, both schedules, then replication with each prompt's mask and alignment with their union;
    recall and precision against the designated neurons where the subject has them."""
    denoiser = subject.denoiser
    t0 = time.perf_counter()
    stats = nemo_statistics(denoiser, seeds=args.nemo_seeds, score_prompts=args.score_prompts, cache=args.cache,
                            blocks=args.blocks, score=args.score, generation_steps=args.generation_steps,
                            space=args.space)
    print(f"statistics: threshold {stats.threshold:.3f} (score mean {stats.score_mean:.3f}, std {stats.score_std:.3f}) "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    runs: dict[str, list[dict]] = {"fast": [], "reference": [], "paper": []}
    masks: dict[str, NeuronMask] = {}
    schedules = ["fast"] if args.skip_reference else ["fast", "reference"]
    paper_stats = None
    if not args.skip_reference and not is_paper_configuration(args):
        schedules.append("paper")
        paper_stats = nemo_statistics(denoiser, seeds=args.nemo_seeds, score_prompts=args.score_prompts,
                                      cache=args.cache)
    for prompt in prompts:
        for schedule in schedules:
            if schedule == "paper":  # NeMo as published: its settings, its sequential schedule
                settings = LocalizeSettings(seeds=args.nemo_seeds, schedule="reference")
            else:
                settings = LocalizeSettings(seeds=args.nemo_seeds, schedule=schedule, batch=args.batch,
                                            blocks=args.blocks, space=args.space, ranking=args.ranking,
                                            score=args.score,
                                            generation_steps=args.generation_steps,
                                            verify_rounds=args.verify_rounds if schedule == "fast" else 0)
            try:
                mask = localize(denoiser, prompt, paper_stats if schedule == "paper" else stats, settings)
                record = {**mask.info, "prompt": prompt, "neuron_set": sorted(
                    f"{k}:{int(i)}" for k, v in mask.layers.items() for i in v)}
            except Exception as err:  # a prompt NeMo cannot localize is reported, not fatal
                mask, record = None, {"prompt": prompt, "error": str(err)}
            runs[schedule].append(record)
            if schedule == "fast" and mask is not None:
                masks[prompt] = mask
            print(f"  {schedule:9s} {prompt[:48]:48s} neurons {record.get('neurons', '-'):>4} "
                  f"evals {record.get('unet_evals', '-'):>6} calls {record.get('unet_calls', '-'):>5} "
                  f"wall {record.get('wall_s', 0):6.1f}s score {record.get('score_before', float('nan')):.3f}"
                  f" -> {record.get('score_after', float('nan')):.3f} {record.get('error', '')}", flush=True)
    fast_ok = [r for r in runs["fast"] if "error" not in r]
    nemo: dict = {
        "prompts_localized": len(fast_ok),
        "prompts_memorized_by_score": sum(bool(r.get("memorized")) for r in fast_ok),
        "neurons_per_prompt": mean_std([r["neurons"] for r in fast_ok]) if fast_ok else None,
        "unet_evals_per_prompt": round(float(np.mean([r["unet_evals"] for r in fast_ok])), 1) if fast_ok else None,
        "unet_calls_per_prompt": round(float(np.mean([r["unet_calls"] for r in fast_ok])), 1) if fast_ok else None,
        "wall_s_per_prompt": round(float(np.mean([r["wall_s"] for r in fast_ok])), 2) if fast_ok else None,
        "errors": [r for r in runs["fast"] if "error" in r],
    }
    if not args.skip_reference:
        both = [(f, r) for f, r in zip(runs["fast"], runs["reference"]) if "error" not in f and "error" not in r]
        if both:
            def total(key: str, which: int) -> float:
                return float(sum(pair[which][key] for pair in both))

            nemo["reference"] = {
                "neurons_per_prompt": mean_std([r["neurons"] for _, r in both]),
                "unet_evals_per_prompt": round(total("unet_evals", 1) / len(both), 1),
                "unet_calls_per_prompt": round(total("unet_calls", 1) / len(both), 1),
                "wall_s_per_prompt": round(total("wall_s", 1) / len(both), 2)}
            nemo["evals_ratio_vs_reference"] = round(total("unet_evals", 0) / max(1.0, total("unet_evals", 1)), 4)
            nemo["calls_ratio_vs_reference"] = round(total("unet_calls", 0) / max(1.0, total("unet_calls", 1)), 4)
            nemo["wall_ratio_vs_reference"] = round(total("wall_s", 0) / max(1e-9, total("wall_s", 1)), 4)
            nemo["same_neurons_as_reference"] = round(float(np.mean(
                [f["neuron_set"] == r["neuron_set"] for f, r in both])), 3)
        if is_paper_configuration(args):
            nemo["evals_ratio_vs_paper_reference"] = nemo.get("evals_ratio_vs_reference")
        else:
            pairs = [(f, r) for f, r in zip(runs["fast"], runs["paper"]) if "error" not in f and "error" not in r]
            if pairs:
                fast_evals, paper_evals = (float(sum(pair[k]["unet_evals"] for pair in pairs)) for k in (0, 1))
                nemo["paper_reference"] = {
                    "prompts": len(pairs),
                    "unet_evals_per_prompt": round(paper_evals / len(pairs), 1),
                    "neurons_per_prompt": mean_std([r["neurons"] for _, r in pairs]),
                    "errors": [r for r in runs["paper"] if "error" in r]}
                nemo["evals_ratio_vs_paper_reference"] = round(fast_evals / max(1.0, paper_evals), 4)
    t0 = time.perf_counter()
    after = replication(denoiser, prompts, images, seeds, args.steps, masks, subject.training)
    nemo["replication_before"] = mean_rate(before)
    nemo["replication_after"] = mean_rate(after)
    nemo["replication_before_own_image"] = mean_rate(before, own=True)
    nemo["replication_after_own_image"] = mean_rate(after, own=True)
    nemo["per_prompt"] = [{"prompt": p, "image": i, "replication_before": b[0], "replication_after": a[0],
                           "replication_after_own_image": a[1], "neurons": masks[p].count() if p in masks else None}
                          for p, i, b, a in zip(prompts, images, before, after)]
    for row, record in zip(nemo["per_prompt"], runs["fast"]):
        if "chosen_ranking" in record:  # --ranking both: whose mask was kept
            row["chosen_ranking"] = record["chosen_ranking"]
    if subject.truth is not None:
        layers = nemo_layers(denoiser, args.blocks, args.space)
        scores = truth_scores(masks, prompts, images, subject.truth, list(layers))
        nemo.update(recall=scores["recall"], precision=scores["precision"], recall_union=scores.get("recall_union"),
                    precision_union=scores.get("precision_union"))
        carrying = truth_scores(masks, prompts, images, subject.carriers) if subject.carriers else None
        if carrying:
            nemo.update(recall_carrying=carrying["recall"], precision_carrying=carrying["precision"])
        for k, (row, score, record) in enumerate(zip(nemo["per_prompt"], scores["per_prompt"], runs["fast"])):
            rank = {unit: r for r, unit in enumerate(zscore_ranking(denoiser, row["prompt"], stats, layers))}
            ranks = sorted(rank[(layer, int(i))] for layer, i in mask_units(subject.truth(row["image"]))
                           if (layer, int(i)) in rank)
            initial = record.get("initial_candidates")
            row.update(recall=score["recall"], precision=score["precision"],
                       truth_in_search_space=score["truth_in_search_space"], truth_zscore_ranks=ranks,
                       truth_in_initial_selection=None if initial is None else sum(r < initial for r in ranks),
                       initial_candidates=initial)
            if carrying:
                row.update(recall_carrying=carrying["per_prompt"][k]["recall"],
                           precision_carrying=carrying["per_prompt"][k]["precision"],
                           carriers=subject.carriers(row["image"]).count())
            print(f"  truth     {row['prompt'][:48]:48s} recall {score['recall']} precision {score['precision']} "
                  f"(designated neurons in NeMo's search space: {score['truth_in_search_space']}; their z-score "
                  f"ranks {ranks}, {row['truth_in_initial_selection']} in the initial selection of {initial}); "
                  f"vs the {row.get('carriers', '-')} carrying neurons: recall {row.get('recall_carrying', '-')} "
                  f"precision {row.get('precision_carrying', '-')}")
    union = NeuronMask.union(list(masks.values())) if masks else None
    nemo["novel_alignment_before"] = round(align_before, 4)
    nemo["novel_alignment_after"] = round(alignment(denoiser, novel, args.steps, union), 4)
    nemo["novel_alignment_mask"] = f"union of {len(masks)} per-prompt masks ({union.count() if union else 0} neurons)"
    print(f"NeMo generations and alignment in {time.perf_counter() - t0:.1f}s", flush=True)
    return nemo


def run_designated(args: argparse.Namespace, subject: Subject, prompts: list[str], images: list[str], seeds: list[int],
                   before: list[tuple[float, float]], novel: list[str], align_before: float) -> dict:
    """The reference line (models with a ground truth): each prompt's **designated** neurons switched off
    (``subject.truth(image)``, what a perfect localization would switch off): replication per prompt and overall,
    and novel alignment with the union of the chosen images' designated masks on."""
    truths = {image: subject.truth(image) for image in dict.fromkeys(images)}
    after = replication(subject.denoiser, prompts, images, seeds, args.steps, {p: truths[i] for p, i in
                                                                                zip(prompts, images)},
                        subject.training)
    union = NeuronMask.union(list(truths.values()))
    out = {"replication_before": mean_rate(before), "replication_after": mean_rate(after),
           "replication_before_own_image": mean_rate(before, own=True),
           "replication_after_own_image": mean_rate(after, own=True),
           "per_prompt": [{"prompt": p, "image": i, "neurons": truths[i].count(), "replication_before": b[0],
                           "replication_after": a[0], "replication_after_own_image": a[1]}
                          for p, i, b, a in zip(prompts, images, before, after)],
           "novel_alignment_before": round(align_before, 4),
           "novel_alignment_after": round(alignment(subject.denoiser, novel, args.steps, union), 4),
           "novel_alignment_mask": f"union of the designated masks of {len(truths)} images ({union.count()} neurons)"}
    for row in out["per_prompt"]:
        print(f"  designated {row['prompt'][:47]:47s} neurons {row['neurons']:>3} replication "
              f"{row['replication_before']:.2f} -> {row['replication_after']:.2f}", flush=True)
    return out


PROTOCOL_KEYS = ("prompts", "seeds", "steps", "novel", "nemo_seeds", "score_prompts", "batch", "ratios", "blocks",
                 "space", "ranking", "score", "verify_rounds", "skip_reference", "skip_nemo")


def protocol(args: argparse.Namespace, parser: argparse.ArgumentParser, full: dict | None = None,
             keys: Sequence[str] = PROTOCOL_KEYS) -> dict:
    """How this run departs from the full protocol: ``{option: {"used": ..., "full": ...}}`` for every setting of
    ``keys`` whose value differs from the full protocol's (``full``, default: the parser's defaults), so a reduced
    run says so in its JSON line (also ``bench.redteam``'s)."""
    full = {k: parser.get_default(k) for k in keys} | (full or {})
    return {k: {"used": getattr(args, k), "full": full[k]} for k in keys if getattr(args, k) != full[k]}


def subspace_split(subject: Subject, chosen: Sequence[tuple[str, str, str]]) -> tuple[list[tuple[str, str]],
                                                                                     list[tuple[str, str]]]:
    """The subspace mask's fit and held-out (prompt, image) pairs among ``chosen``: the memorized images alternate
    between the halves within each group (memorization kind on the testbed); where the subject has a group
    ``"shared"`` (the planted images that share one FFN subspace) only that group is split, the others are left
    out of the subspace measurement."""
    groups: dict[str, list[str]] = {}
    for _, image, group in subject.default:
        groups.setdefault(group, []).append(image)
    if "shared" in groups:
        groups = {"shared": groups["shared"]}
    fit_images = {name for names in groups.values() for name in names[::2]}
    held_images = {name for names in groups.values() for name in names[1::2]}
    return ([(p, i) for p, i, _ in chosen if i in fit_images], [(p, i) for p, i, _ in chosen if i in held_images])


def headline(out: dict, subject: Subject, args: argparse.Namespace, before: list[tuple[float, float]]) -> dict:
    """Issue 25's last-line keys, null with a reason where not measured."""
    nemo, reasons = out.get("nemo"), {}
    if args.skip_nemo:
        reasons.update(dict.fromkeys(("recall", "precision", "recall_carrying", "precision_carrying",
                                      "replication_after", "novel_alignment_after", "evals_ratio_vs_reference",
                                      "evals_ratio_vs_paper_reference"), "--skip-nemo: NeMo was not run"))
    else:
        if subject.truth is None:
            reasons.update(dict.fromkeys(("recall", "precision", "recall_carrying", "precision_carrying"),
                                         f"no ground truth: the {subject.name} model has no designated neurons "
                                         "(use --model planted)"))
        elif subject.carriers is None:
            reasons.update(dict.fromkeys(("recall_carrying", "precision_carrying"), subject.carriers_missing))
        if args.skip_reference:
            reasons["evals_ratio_vs_reference"] = "--skip-reference: the reference schedule was not run"
            reasons["evals_ratio_vs_paper_reference"] = "--skip-reference: the paper's reference was not run"
    first = next(iter(out["subspace"].values()), {})
    if "heldout_replication_after" not in first:
        reasons["subspace_heldout_replication_after"] = "no held-out prompts among the chosen ones (see --prompts)"
    keys = ("recall", "precision", "recall_carrying", "precision_carrying", "replication_after",
            "novel_alignment_before", "novel_alignment_after", "evals_ratio_vs_reference",
            "evals_ratio_vs_paper_reference")
    figures = {k: (nemo or {}).get(k) for k in keys}
    figures["novel_alignment_before"] = out["novel_alignment_before"]
    designated = out.get("designated")
    if designated is None:
        reasons["designated_replication_after"] = f"no ground truth: the {subject.name} model has no designated neurons"
    return {**figures, "replication_before": mean_rate(before),
            "subspace_heldout_replication_after": first.get("heldout_replication_after"),
            "subspace_ratio": args.ratios[0],
            "designated_replication_after": designated["replication_after"] if designated else None,
            "null_reasons": reasons}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="testbed",
                        help="testbed (default: the shipped v5), planted (the planted-neuron variant, with its "
                        "designated neurons as ground truth), or a diffusers folder")
    parser.add_argument("--seeds", type=int, default=16, help="generations per prompt for replication (default 16)")
    parser.add_argument("--prompts", nargs="*", default=None,
                        help="indices into the model's evaluation prompts, or 'all' (default: first prompt per image)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the generations (default 50)")
    parser.add_argument("--novel", type=int, default=240, help="held-out compositional prompts (default 240)")
    parser.add_argument("--nemo-seeds", type=int, default=4, help="seeds of NeMo's memorization score")
    parser.add_argument("--batch", type=int, default=2, help="candidate masks per UNet call (fast schedule)")
    parser.add_argument("--score-prompts", type=int, default=64, help="prompts calibrating the score threshold")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05],
                        help="subspace pruning ratios per output row, each measured (default: 0.01, the paper's, "
                        "and 0.05)")
    parser.add_argument("--blocks", choices=["down_mid", "all"], default="down_mid",
                        help="NeMo's search space (default: the paper's down and mid blocks)")
    parser.add_argument("--space", choices=["value", "value+ffn"], default="value",
                        help="NeMo's neurons (default: the paper's value neurons; value+ffn adds the FFN hidden units)")
    parser.add_argument("--ranking", choices=list(RANKINGS), default="zscore",
                        help="NeMo's candidate order (default: the paper's activation z-scores; attribution: the "
                        "first-order effect of switching each neuron off on the first-step magnitude; both: each "
                        "search, keeping the smaller mask)")
    parser.add_argument("--score", choices=["ssim", "magnitude", "generation"], default="ssim",
                        help="NeMo's memorization score (default: the paper's first-step seed-consistency SSIM)")
    parser.add_argument("--generation-steps", type=int, default=10, help="steps of the 'generation' score")
    parser.add_argument("--verify-rounds", type=int, default=0, help="NeMo verification rounds on unseen seeds")
    parser.add_argument("--skip-reference", action="store_true", help="do not run NeMo's reference schedule")
    parser.add_argument("--skip-nemo", action="store_true", help="measure the subspace masks only")
    parser.add_argument("--cache", default=None, help="statistics cache folder")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    subject = load_subject(args.model)
    denoiser = subject.denoiser
    chosen = subject.chosen(args.prompts)
    prompts, images = [p for p, _, _ in chosen], [i for _, i, _ in chosen]
    seeds = list(range(args.seeds))
    novel = [s.caption() for s in heldout_specs()[: args.novel]]
    reduced = protocol(args, parser)
    out: dict = {"model": denoiser.fingerprint(), "model_name": subject.name, "model_folder": subject.location,
                 "settings": {"prompts": len(prompts), "prompt_indices": args.prompts, "seeds": args.seeds,
                              "steps": args.steps, "novel": len(novel), "nemo_seeds": args.nemo_seeds,
                              "score_prompts": args.score_prompts, "batch": args.batch, "ratios": args.ratios,
                              "blocks": args.blocks, "space": args.space, "ranking": args.ranking,
                              "score": args.score,
                              "generation_steps": args.generation_steps,
                              "verify_rounds": args.verify_rounds, "skip_reference": args.skip_reference,
                              "replication_ssim": REPLICATION_SSIM, "training_images": len(subject.training),
                              "threads": torch.get_num_threads()},
                 "protocol": "reduced" if reduced else "full", "departures_from_full_protocol": reduced}

    before = replication(denoiser, prompts, images, seeds, args.steps, training=subject.training)
    align_before = alignment(denoiser, novel, args.steps)
    out["novel_alignment_before"] = round(align_before, 4)
    if args.skip_nemo:
        nemo = None
    else:
        nemo = out["nemo"] = run_nemo(args, subject, prompts, images, seeds, before, novel, align_before)
    if subject.truth is not None:
        out["designated"] = run_designated(args, subject, prompts, images, seeds, before, novel, align_before)

    # -- subspace -----------------------------------------------------------------------------------
    fit, held = subspace_split(subject, chosen)
    rate = {p: r[0] for p, r in zip(prompts, before)}
    out["subspace"] = {}
    for ratio in args.ratios:
        sub: dict = {"fit_images": sorted({i for _, i in fit}), "heldout_images": sorted({i for _, i in held})}
        if fit:
            before_evals = denoiser.counter.snapshot()
            mask = subspace_mask(denoiser, [p for p, _ in fit], ratio=ratio)
            spent = denoiser.counter.since(before_evals)
            sub.update(weights_pruned=mask.count(), unet_evals=spent.forwards,
                       unet_evals_per_prompt=round(spent.forwards / len(fit), 1), wall_s=mask.info["wall_s"])
            sub["replication_before"] = round(float(np.mean([rate[p] for p, _ in fit])), 4)
            sub["replication_after"] = mean_rate(replication(
                denoiser, [p for p, _ in fit], [i for _, i in fit], seeds, args.steps, mask, subject.training))
            if held:
                sub["heldout_replication_before"] = round(float(np.mean([rate[p] for p, _ in held])), 4)
                sub["heldout_replication_after"] = mean_rate(replication(
                    denoiser, [p for p, _ in held], [i for _, i in held], seeds, args.steps, mask, subject.training))
            sub["novel_alignment_before"] = round(align_before, 4)
            sub["novel_alignment_after"] = round(alignment(denoiser, novel, args.steps, mask), 4)
            if subject.truth is not None:
                truth = NeuronMask.union([subject.truth(i) for _, i in fit + held])
                recall, precision = recall_precision(mask, truth)
                sub.update(recall=rounded(recall), precision=rounded(precision))
                if subject.carriers is not None:
                    recall, precision = recall_precision(
                        mask, NeuronMask.union([subject.carriers(i) for _, i in fit + held]))
                    sub.update(recall_carrying=rounded(recall), precision_carrying=rounded(precision))
        out["subspace"][f"ratio_{ratio:g}"] = sub
        print(f"subspace ratio {ratio:g} measured", flush=True)

    print(f"\n{'method':10s} {'repl. before':>12s} {'repl. after':>12s} {'held-out after':>14s} "
          f"{'align before':>12s} {'align after':>12s}")
    if nemo is not None:
        print(f"{'NeMo':10s} {nemo['replication_before']:12.3f} {nemo['replication_after']:12.3f} {'':>14s} "
              f"{nemo['novel_alignment_before']:12.3f} {nemo['novel_alignment_after']:12.3f}")
    for key, sub in out["subspace"].items() if fit else ():
        print(f"{'subspace':10s} {sub['replication_before']:12.3f} {sub['replication_after']:12.3f} "
              f"{sub.get('heldout_replication_after', float('nan')):14.3f} {sub['novel_alignment_before']:12.3f} "
              f"{sub['novel_alignment_after']:12.3f}  {key}")
    out.update(headline(out, subject, args, before))
    if "designated" in out:
        d = out["designated"]
        print(f"{'designated':10s} {d['replication_before']:12.3f} {d['replication_after']:12.3f} {'':>14s} "
              f"{d['novel_alignment_before']:12.3f} {d['novel_alignment_after']:12.3f}  (ground truth: reference)")
    if nemo is not None and subject.truth is not None:
        print(f"NeMo vs designated neurons: recall {out['recall']}, precision {out['precision']}; vs carrying "
              f"neurons: recall {out['recall_carrying']}, precision {out['precision_carrying']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()

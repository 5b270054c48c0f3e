"""Is a model's memorization localized in a few neurons? Replication as a growing share of them is switched off.

    python -m bench.localization [--seeds 4] [--fractions 0.05 0.1 0.2 0.4 0.6 0.8 1.0] [--blocks all]
    python -m bench.localization --seeds 2 --fractions 0.5 --prompts 0 --steps 10     # a quick smoke run

NeMo (``core.nemo.localize``) and every neuron-mask method rest on one premise: a memorized image is carried
by a few neurons, which stand out by their activation. This benchmark measures the premise directly, without
any search. For each prompt (default: the first evaluation prompt of each of the 12 planted images) the
neurons of every ``attn2.to_v`` of ``--blocks`` are ranked two ways:

- ``zscore``: NeMo's z-score of the prompt's activation against non-memorized prompts, most suspicious first
  (``core.nemo.zscore_ranking``, statistics from ``core.nemo.nemo_statistics``);
- ``random``: a fixed random order per prompt, the control.

For each ``f`` in ``--fractions`` the first ``f`` of the ranking is switched off (a nested series of masks)
and ``--seeds`` full generations (DDIM ``--steps``, CFG 7.5) are checked for replication of *any* training
image (``bench.neurons.replication``). Where the premise holds, replication falls at a small ``f`` with
the z-score ranking and much later with the random one. ``smallest_fraction_stopping`` gives, per prompt,
the smallest ``f`` at which replication is at most ``--stop-rate`` (None: none of the fractions).

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np
import torch
from dejaguard.core.denoiser import load_denoiser
from dejaguard.core.nemo import nemo_layers, nemo_statistics, zscore_ranking
from dejaguard.core.neuron_mask import layer_shape, neurons_mask
from tqdm import tqdm

from bench.neurons import chosen_prompts, replication


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="diffusers folder (default: the bundled testbed)")
    parser.add_argument("--seeds", type=int, default=4, help="generations per prompt and fraction (default 4)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0],
                        help="shares of the neurons switched off (default 0.05 ... 1.0)")
    parser.add_argument("--prompts", nargs="*", default=None,
                        help="indices into memorized_eval_prompts(), or 'all' (default: one prompt per image)")
    parser.add_argument("--blocks", choices=["down_mid", "all"], default="all",
                        help="attn2.to_v layers ranked: NeMo's down and mid blocks, or all (default)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the generations (default 50)")
    parser.add_argument("--stop-rate", type=float, default=0.05,
                        help="replication rate counted as stopped (default 0.05, bench.neurons' target)")
    parser.add_argument("--cache", default=None, help="statistics cache folder")
    args = parser.parse_args()
    if not args.fractions or any(not 0.0 < f <= 1.0 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    fractions = sorted(set(args.fractions))
    torch.manual_seed(0)
    denoiser = load_denoiser(args.model)
    chosen = chosen_prompts(args.prompts)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    stats = nemo_statistics(denoiser, blocks=args.blocks, cache=args.cache)
    layers = nemo_layers(denoiser, args.blocks)
    total = sum(layer_shape(m)[0] for m in layers.values())
    print(f"{len(layers)} attn2.to_v layers ({args.blocks}), {total} neurons; statistics in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)

    rankings = ("zscore", "random")
    rates: dict[str, dict[str, list[float]]] = {r: {} for r in rankings}
    before = [r[0] for r in replication(denoiser, [p for p, _ in chosen], [m.name for _, m in chosen], seeds,
                                        args.steps)]
    work = tqdm(total=len(chosen) * len(fractions) * len(rankings), desc="ablations", unit="mask")
    for index, (prompt, image) in enumerate(chosen):
        order = zscore_ranking(denoiser, prompt, stats, layers)
        shuffled = list(order)
        random.Random(index).shuffle(shuffled)
        for ranking, neurons in (("zscore", order), ("random", shuffled)):
            row = []
            for f in fractions:
                mask = neurons_mask(denoiser, layers, neurons[: max(1, round(f * total))], method="ablation",
                                    prompts=[prompt], settings={"ranking": ranking, "fraction": f})
                row.append(replication(denoiser, [prompt], [image.name], seeds, args.steps, mask)[0][0])
                work.update()
            rates[ranking][prompt] = row
    work.close()

    print(f"\nreplication of any training image, {args.seeds} seeds; columns: share of the {total} neurons off")
    print(f"{'prompt':44s} {'ranking':7s} {'none':>5s} " + " ".join(f"{f:>5g}" for f in fractions))
    for (prompt, _), b in zip(chosen, before):
        for ranking in rankings:
            print(f"{prompt[:44]:44s} {ranking:7s} {b:5.2f} "
                  + " ".join(f"{r:5.2f}" for r in rates[ranking][prompt]))

    def smallest(row: list[float]) -> float | None:
        return next((f for f, r in zip(fractions, row) if r <= args.stop_rate), None)

    out = {"model": denoiser.fingerprint(),
           "settings": {"prompts": len(chosen), "seeds": args.seeds, "steps": args.steps, "blocks": args.blocks,
                        "neurons": total, "layers": len(layers), "fractions": fractions,
                        "stop_rate": args.stop_rate},
           "replication_before": round(float(np.mean(before)), 4)}
    for ranking in rankings:
        table = np.array([rates[ranking][p] for p, _ in chosen])  # (prompts, fractions)
        out[ranking] = {
            "replication_after": {f"{f:g}": round(float(v), 4) for f, v in zip(fractions, table.mean(axis=0))},
            "prompts_stopped": {f"{f:g}": int((col <= args.stop_rate).sum()) for f, col in zip(fractions, table.T)},
            "smallest_fraction_stopping": {p: smallest(rates[ranking][p]) for p, _ in chosen},
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()

"""Where does attribute binding fail: in the text encoder or in the UNet? (issue 3, novel alignment)

    python -m bench.binding [--model DIR] [--train 3000]

Two-object held-out prompts ("a yellow diamond and a small cyan square") fail alignment mostly because a colour
goes to the wrong object, to both, or to none. This benchmark asks whether the text encoder's output, which the
UNet reads through cross-attention, carries the binding at all: a linear probe (multinomial logistic regression)
reads the colour bound to each object off single hidden states of the conditioning, trained on ``--train`` random
two-object captions of the training distribution (all phrasings, held-out contents excluded) and tested on the
held-out two-object prompts, whose colour-shape combinations the model never saw together.

- ``noun1_to_colour1`` / ``noun2_to_colour2``: the hidden state at an object's shape word -> that object's colour.
- ``noun2_to_colour1`` / ``eos_to_colour1`` / ``eos_to_colour2``: the other object's colour, and both from the
  end-of-text state (the causal encoder's summary).
- ``control_embedding_noun1_to_colour1``: the same probe on the encoder's *input* (token plus position embedding,
  no context) at the first shape word. It can only read the word's position, which gives a colour away only
  where the colour name is two tokens ("cyan" is "cy" + "an"): about 0.2 (chance 1/8), so a high figure above
  is the encoder's doing, not the probe's.

Held-out accuracy near 1 means the conditioning states which colour goes with which shape, even for unseen
combinations, and what fails is the UNet's use of it. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from dejaguard.core.denoiser import load_denoiser
from dejaguard.core.testbed import data

COLORS = list(data.COLORS)


def _pair_specs(count: int, seed: int) -> tuple[list[data.SceneSpec], list[data.SceneSpec]]:
    """``count`` random training-distribution pairs (held-out contents excluded) and the held-out pairs."""
    heldout = data.heldout_specs()
    held = [s for s in heldout if len(s.objects) == 2]
    excluded = {s.canonical().caption() for s in heldout}
    rng = np.random.default_rng(seed)
    train: list[data.SceneSpec] = []
    while len(train) < count:
        spec = data.random_spec(rng, 2)
        if spec.canonical().caption() not in excluded:
            train.append(spec)
    return train, held


@torch.no_grad()
def binding_features(text_encoder: torch.nn.Module, tokenizer, specs: list[data.SceneSpec]) -> dict[str, torch.Tensor]:
    """Per caption: the last hidden state ``(N, D)`` at each shape word and at end-of-text, the input embedding
    at the first shape word, and the two objects' colour indices ``(N,)``."""
    shape_ids = {tokenizer.convert_tokens_to_ids(f"{s}</w>") for s in data.SHAPES}
    ids = tokenizer([s.caption() for s in specs], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    param = next(text_encoder.parameters())
    out = text_encoder(ids.to(param.device), output_hidden_states=True)
    last, first = out.last_hidden_state.float().cpu(), out.hidden_states[0].float().cpu()
    rows: dict[str, list] = {k: [] for k in ("noun1", "noun2", "eos", "embedding_noun1", "colour1", "colour2")}
    for i, spec in enumerate(specs):
        row = ids[i].tolist()
        nouns = [j for j, t in enumerate(row) if t in shape_ids]
        if len(nouns) != 2:
            raise ValueError(f"expected two shape words in {spec.caption()!r}")
        eos = row.index(tokenizer.eos_token_id)
        rows["noun1"].append(last[i, nouns[0]])
        rows["noun2"].append(last[i, nouns[1]])
        rows["eos"].append(last[i, eos])
        rows["embedding_noun1"].append(first[i, nouns[0]])
        rows["colour1"].append(COLORS.index(spec.objects[0].color))
        rows["colour2"].append(COLORS.index(spec.objects[1].color))
    return {k: torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v) for k, v in rows.items()}


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   iterations: int = 500, seed: int = 0) -> tuple[float, float]:
    """Train and test accuracy of a linear softmax probe ``(N, D) -> (N,)`` classes, on standardized features."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    probe = torch.nn.Linear(x_train.shape[1], len(COLORS))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(iterations):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x_train), y_train).backward()
            opt.step()
    with torch.no_grad():
        return ((probe(x_train).argmax(1) == y_train).float().mean().item(),
                (probe(x_test).argmax(1) == y_test).float().mean().item())


PROBES = {  # name: (feature, target)
    "noun1_to_colour1": ("noun1", "colour1"),
    "noun2_to_colour2": ("noun2", "colour2"),
    "noun2_to_colour1": ("noun2", "colour1"),
    "eos_to_colour1": ("eos", "colour1"),
    "eos_to_colour2": ("eos", "colour2"),
    "control_embedding_noun1_to_colour1": ("embedding_noun1", "colour1"),
}


def run(model: Path | None = None, train_count: int = 3000, seed: int = 0) -> dict:
    denoiser = load_denoiser(model)
    train, held = _pair_specs(train_count, seed)
    a = binding_features(denoiser.text_encoder, denoiser.tokenizer, train)
    b = binding_features(denoiser.text_encoder, denoiser.tokenizer, held)
    result: dict = {"train_captions": len(train), "heldout_pairs": len(held), "chance": 1 / len(COLORS)}
    for name, (feature, target) in PROBES.items():
        train_acc, test_acc = probe_accuracy(a[feature], a[target], b[feature], b[target], seed=seed)
        result[name] = {"train": round(train_acc, 3), "heldout": round(test_acc, 3)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="diffusers-format folder (default: the bundled testbed)")
    p.add_argument("--train", type=int, default=3000, help="training captions for the probes (default 3000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    result = run(args.model, args.train, args.seed)
    for name in PROBES:
        print(f"{name:38s} train {result[name]['train']:.3f}  held-out {result[name]['heldout']:.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
